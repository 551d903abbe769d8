"""Helpers of the services tests: the servers' URLs, worker environments, a tracking
server the test owns (to stop and restart it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from lmlab.tracking import KEY_TAG

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")


@dataclass(frozen=True)
class Services:
    pg_url: str  # postgresql://postgres:<password>@127.0.0.1:<port> (no database)
    mlflow_url: str
    backend_url: str
    artifacts_dir: Path

    @property
    def password(self) -> str:
        return self.pg_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]

    def new_database(self, prefix: str = "lmlab_test") -> str:
        """A fresh, empty database; its URL without the password (PGPASSWORD has it)."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(f"{self.pg_url}/postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"{self.pg_url.replace(':' + self.password + '@', '@')}/{name}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env(services: Services, tracking_uri: str, experiment: str, home: Path,
               host: str, **extra: str) -> dict[str, str]:
    """The environment of one worker "host": its own folder, name and caches."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": experiment,
           "LMLAB_STORE_DIR": str(home / ".lmlab"), "LMLAB_WORKER_HOST": host,
           "LMLAB_HEARTBEAT_INTERVAL": "1", "LMLAB_HEARTBEAT_GRACE": "4", "LMLAB_POLL_SECONDS": "0.5",
           "LMLAB_THREADS": "1", "PGPASSWORD": services.password,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           **extra}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def start_worker(spec: Path, storage: str, log: Path, env: dict[str, str], cwd: Path,
                 *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), "--spec", str(spec), "--storage", storage,
                             "--log", str(log), *extra], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


class TrackingServer:
    """An `mlflow server` of the test's own (so it can be stopped and started again)."""

    def __init__(self, backend: str, artifacts: Path, log: Path, env: dict[str, str]) -> None:
        self.backend, self.artifacts, self.log_path, self.env = backend, artifacts, log, env
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180) -> None:
        log = open(self.log_path, "ab")
        exe = Path(sys.executable).with_name("mlflow")
        self.process = subprocess.Popen(
            [str(exe), "server", "--backend-store-uri", self.backend, "--artifacts-destination",
             str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env={**self.env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {self.log_path.read_text()[-2000:]}")

    def healthy(self) -> bool:
        import urllib.request

        try:
            urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)




TINY = {
    "family": "steering", "name": "scale-grid", "model": {"name": "tiny:llama"},
    "grid": {"method": ["suffix_contrast"], "layer": [0, 1, 2], "alpha": [0.5, 1.0],
             "intervention": ["add"]},
    "steering": {"n_prompts": 2, "n_train": 4, "eval_splits": ["harm_test", "benign"],
                 "generation": {"max_new_tokens": 3, "batch_size": 4}, "kl_tokens": 2},
}


def write_spec(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def runs_of(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=5000) if found else []


def children(runs: list) -> list:
    return [r for r in runs if r.data.tags.get("lmlab.role") != "sweep"]


def finished_conditions(runs: list) -> Counter:
    return Counter((r.data.tags[KEY_TAG], r.data.params.get("splits")) for r in children(runs)
                   if r.info.status == "FINISHED")
