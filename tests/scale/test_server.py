"""The tracking server as the only thing workers share: restarts, artifacts, the model
registry across hosts, and secrets that must never reach it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from lmlab.tracking import KEY_TAG
from scale_helpers import (TINY, Services, TrackingServer, children, finished_conditions, free_port,
                           runs_of, start_worker, worker_env, write_spec)

GRID7 = {**TINY, "name": "scale-restart", "grid": {**TINY["grid"], "alpha": [0.5]}}


def test_workers_ride_out_a_tracking_server_restart(services: Services, own_server: TrackingServer,
                                                    tmp_path: Path) -> None:
    experiment = f"restart-{uuid.uuid4().hex[:6]}"
    storage = services.new_database()
    spec = write_spec(tmp_path / "grid.yaml", GRID7)
    log = tmp_path / "calls.jsonl"
    workers = [start_worker(spec, storage, log,
                            worker_env(services, own_server.url, experiment, tmp_path / host, host),
                            tmp_path / host, "--slow", "1.5") for host in ("host-a", "host-b")]
    client = MlflowClient(own_server.url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not finished_conditions(runs_of(client, experiment)):
        time.sleep(0.5)
    assert finished_conditions(runs_of(client, experiment)), "no condition finished before the restart"
    assert all(w.poll() is None for w in workers), "the workers are mid-sweep when the server stops"
    own_server.stop()
    time.sleep(3)  # workers meet connection errors and retry
    own_server.start()
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    runs = runs_of(client, experiment)
    finished = finished_conditions(runs)
    assert len(finished) == 7 and set(finished.values()) == {1}, finished
    assert Counter(r.data.tags[KEY_TAG] for r in children(runs)) == Counter(k for k, _ in finished), \
        "no extra or lost child run"
    assert {r.info.status for r in runs} == {"FINISHED"}
    for parent in [r for r in runs if r.data.tags.get("lmlab.role") == "sweep"]:
        path = client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))
        assert len(pd.read_csv(path)) == 7, "the summary lost nothing"
        assert "sweep_seconds" in parent.data.metrics
    for child in children(runs):  # every child's artifacts went through the server
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"completions.csv", "identity.json"} <= files
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")


PROBE_A = """
import json, sys, tempfile
import numpy as np
from mlflow.tracking import MlflowClient
from lmlab.probes.registry import CHAMPION, log_probe, register_probe, save_probe
from lmlab.probes.train import Probe
rng = np.random.default_rng(0)
probe = Probe(layer=3, lag=2, label="backtracking", weight=rng.normal(size=8).astype(np.float32),
              bias=0.1, mean=np.zeros(8, np.float32), scale=np.ones(8, np.float32),
              threshold=0.5, strength=1.0)
client = MlflowClient()
experiment = client.create_experiment(sys.argv[1])
run = client.create_run(experiment).info.run_id
saved = save_probe(probe, tempfile.mkdtemp(), {"model": "tiny"})
source = log_probe(client, run, saved)
version = register_probe(client, sys.argv[2], source, run, {"layer": 3, "lag": 2})
client.set_registered_model_alias(sys.argv[2], CHAMPION, version)
client.set_terminated(run)
x = rng.normal(size=(4, 8)).astype(np.float32)
print(json.dumps({"x": x.tolist(), "p": probe.predict_proba(x).tolist()}))
"""

PROBE_B = """
import json, sys
import numpy as np
from lmlab.probes.registry import load_registered
x = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
print(json.dumps(np.asarray(load_registered(sys.argv[1]).predict(x)).tolist()))
"""


def test_a_probe_registered_on_host_a_loads_by_alias_on_host_b(services: Services,
                                                               tmp_path: Path) -> None:
    name = f"probe-backtracking-scale-{uuid.uuid4().hex[:6]}"

    def host(directory: str, *args: str) -> str:
        home = tmp_path / directory
        home.mkdir()
        env = worker_env(services, services.mlflow_url, "unused", home, directory,
                         HOME=str(home), TMPDIR=str(home))
        result = subprocess.run([sys.executable, "-c", *args], env=env, cwd=home, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.strip().splitlines()[-1]

    trained = json.loads(host("host-a", PROBE_A, f"probes-{name}", name))
    predicted = json.loads(host("host-b", PROBE_B, name, json.dumps(trained["x"])))
    assert predicted == trained["p"]
    version = MlflowClient(services.mlflow_url).get_model_version_by_alias(name, "champion")
    assert not version.source.startswith(("/", "file:")), "the model lives behind the server"


SECRET_KEY = "sk-lmlab-test-" + "Q7xZ2pL9vK4mN8wR"


class FakeChatServer:
    """An OpenAI-style chat endpoint on 127.0.0.1 that insists on the API key."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.authorizations.append(self.headers.get("Authorization", ""))
                body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "42"}}],
                                   "usage": {"prompt_tokens": 100000, "completion_tokens": 1,
                                             "total_tokens": 100001}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def test_api_keys_and_database_passwords_never_reach_runs_artifacts_or_logs(
        services: Services, tmp_path: Path) -> None:
    from lmlab.models import tiny_model

    model_dir = tmp_path / "served-model"
    tiny_model().tokenizer.save_pretrained(model_dir)
    chat = FakeChatServer()
    experiment = f"secrets-{uuid.uuid4().hex[:6]}"
    storage = services.new_database().replace("postgres@", f"postgres:{services.password}@")
    spec = write_spec(tmp_path / "niah.yaml", {
        "family": "context", "name": "secrets", "model": {"name": "tiny:llama"},
        "grid": {"length": [200], "depth": [50]},
        "context": {"task": "niah", "samples": 1, "max_tokens": 4,
                    "subject": {"model": f"openai/{model_dir}", "api_base": chat.api_base,
                                "api_key_env": "LMLAB_TEST_API_KEY", "context_window": 512}}})
    env = worker_env(services, services.mlflow_url, experiment, tmp_path / "w", "host-w",
                     LMLAB_TEST_API_KEY=SECRET_KEY)
    env.pop("PGPASSWORD")  # the password travels in the storage URL this time
    worker = start_worker(spec, storage, tmp_path / "calls.jsonl", env, tmp_path / "w")
    output = worker.communicate(timeout=600)[0]
    assert worker.returncode == 0, output[-3000:]
    assert chat.authorizations and all(a == f"Bearer {SECRET_KEY}" for a in chat.authorizations)

    client = MlflowClient(services.mlflow_url)
    runs = runs_of(client, experiment)
    assert len(runs) == 2
    seen: list[str] = [output]
    for run in runs:
        seen += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(run.data.metrics)]
        folder = client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id))
        seen += [p.read_bytes().decode("utf-8", "replace") for p in Path(folder).rglob("*") if p.is_file()]
        seen += [json.dumps([d.dataset.source for d in run.inputs.dataset_inputs])]
    everything = "\n".join(seen)
    assert "spec.yaml" in " ".join(a.path for r in runs for a in client.list_artifacts(r.info.run_id))
    assert SECRET_KEY not in everything
    assert services.password not in everything
    assert "postgres:***@" in everything, "the storage URL is shown, masked"
