"""Scale benchmark (not a test): many workers on one study, and what coordination costs.

1. throughput of 1, 2 and 4 worker processes on one study (tiny random model, a steering
   grid), as a ratio to 1 worker: wall time from launch to the last exit, and the span
   from the first child run's start to the last one's end (start-up excluded);
2. per-condition coordination overhead (claim, trial, child run, params, identity.json,
   datasets, metrics, finish, tell) of a synthetic family that computes nothing, in ms:
   journal study + SQLite tracking store, and (with --services) PostgreSQL study + MLflow
   tracking server;
3. the coordination cost of a 10,000-condition sweep: claims + trials + run creation only,
   on a synthetic study with no model.

Usage:
    python bench/bench_scale.py [--services] [--conditions 10000] [--skip-throughput]
``--services`` reads the URLs written by ``scripts/ci_services.sh``. Figures go to stdout
and to ``bench/out/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from lmlab.sweeps.family import ConditionResult, Family, SweepContext, register  # noqa: E402

SERVICES_ENV = Path(os.environ.get("LMLAB_SERVICES_DIR", "/tmp/lmlab-services")) / "services.env"


@register
class NullFamily(Family):
    """Conditions that compute nothing: what is left of a sweep is coordination."""

    name = "bench-null"

    def conditions(self) -> list[dict[str, Any]]:
        return self.spec.grid_points()

    def run_condition(self, ctx: SweepContext, params: Mapping[str, Any]) -> ConditionResult:
        return ConditionResult(metrics={"value": float(params["i"])})


def load_avg() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def services() -> dict[str, str]:
    if not SERVICES_ENV.exists():
        raise SystemExit("run scripts/ci_services.sh first (or drop --services)")
    values = dict(line.split("=", 1) for line in SERVICES_ENV.read_text().splitlines() if "=" in line)
    password = values["LMLAB_PG_URL"].split("://", 1)[1].split("@")[0].split(":", 1)[1]
    os.environ["PGPASSWORD"] = password
    return {**values, "password": password}


def new_database(svc: Mapping[str, str]) -> str:
    import psycopg

    name = f"lmlab_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{svc['LMLAB_PG_URL']}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{svc['LMLAB_PG_URL'].replace(':' + svc['password'] + '@', '@')}/{name}"


# ---------------------------------------------------------------- 1. throughput

TINY_GRID = {
    "family": "steering", "name": "bench-scale", "model": {"name": "tiny:llama"},
    "grid": {"method": ["suffix_contrast"], "layer": [0, 1, 2], "alpha": [0.25, 0.5, 0.75, 1.0],
             "intervention": ["add"]},
    "steering": {"n_prompts": 6, "n_train": 4, "eval_splits": ["harm_test", "benign"],
                 "generation": {"max_new_tokens": 16, "batch_size": 8}, "kl_tokens": 4},
}


def throughput(workers: int, root: Path, tracking: str | None, storage: str | None) -> dict[str, float]:
    import yaml

    root.mkdir(parents=True)
    spec = root / "grid.yaml"
    spec.write_text(yaml.safe_dump({**TINY_GRID, "name": f"bench-scale-{workers}-{root.name}"}))
    uri = tracking or f"sqlite:///{root}/mlflow.db"
    experiment = f"bench-scale-{workers}-{uuid.uuid4().hex[:6]}"
    mlflow.set_tracking_uri(uri)
    MlflowClient().search_experiments()  # schema first
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment,
           "LMLAB_THREADS": "1", "LMLAB_POLL_SECONDS": "0.5",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_RUN_ID", None)
    argv = [sys.executable, str(ROOT / "entrypoints" / "sweep.py"), "--spec", str(spec)]
    if storage:
        argv += ["--storage", storage]
    began = time.perf_counter()
    procs = []
    for n in range(workers):
        home = root / f"w{n}"
        home.mkdir()
        procs.append(subprocess.Popen(argv, env={**env, "LMLAB_STORE_DIR": str(home / ".lmlab")}
                                      if storage else env, cwd=root, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(err[-3000:])
    wall = time.perf_counter() - began
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    kids = [r for r in runs if r.data.tags.get("lmlab.role") != "sweep"]
    span = (max(r.info.end_time for r in kids) - min(r.info.start_time for r in kids)) / 1000
    return {"conditions": len(kids), "wall_s": wall, "compute_span_s": span,
            "conditions_per_min_wall": 60 * len(kids) / wall, "conditions_per_min_span": 60 * len(kids) / span}


# ---------------------------------------------------------------- 2. per-condition overhead


def null_sweep(n: int, root: Path, tracking: str | None, storage: str | None) -> dict[str, float]:
    from lmlab.sweeps.runner import run_sweep
    from lmlab.sweeps.spec import parse_spec

    root.mkdir(parents=True, exist_ok=True)
    uri = tracking or f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = f"bench-null-{uuid.uuid4().hex[:6]}"
    os.environ["LMLAB_STORE_DIR"] = str(root / ".lmlab")
    mlflow.set_tracking_uri(uri)
    spec = parse_spec({"family": "bench-null", "name": f"null-{uuid.uuid4().hex[:6]}",
                       "model": {"name": "tiny:llama"}, "grid": {"i": list(range(n))},
                       **({"storage": storage} if storage else {})})
    outcome = run_sweep(spec)
    loop = outcome.total_seconds
    # "other": claims, trials, heartbeats and the runner's MLflow searches for finished
    # runs (searches are not timed by Tracker, which times logging calls only).
    return {"conditions": n, "ms_per_condition": 1000 * loop / n,
            "tracking_ms_per_condition": 1000 * outcome.tracking_seconds / n,
            "other_ms_per_condition": 1000 * (loop - outcome.tracking_seconds) / n}


# ---------------------------------------------------------------- 3. 10,000 conditions


def claims_and_runs(n: int, root: Path, tracking: str | None, storage: str | None,
                    runs_sample: int) -> dict[str, float]:
    """Claim n keys and give each a trial (all n), and create + finish MLflow runs for
    ``runs_sample`` of them; the run cost is scaled to n (it is linear: checked below)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from lmlab.sweeps.claims import Coordinator, HeartbeatSettings, open_storage

    root.mkdir(parents=True, exist_ok=True)
    opened = open_storage(storage, root / ".lmlab", HeartbeatSettings(), lambda s, t: None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=opened.storage, study_name=f"bench-{uuid.uuid4().hex[:6]}")
    coord = Coordinator(study, opened, lambda t, r: None)
    distribution = {"i": CategoricalDistribution(tuple(range(n)))}
    began = time.perf_counter()
    chunk_times = []
    for i in range(n):
        claim = coord.claim(f"bench-{study.study_name}-{i}")
        assert claim is not None
        trial = coord.create_trial({"i": i}, distribution)
        coord.attach(claim, trial.number)
        study.tell(trial.number, 1.0)
        if (i + 1) % (n // 4) == 0:
            chunk_times.append(time.perf_counter() - began)
    claims_s = time.perf_counter() - began
    uri = tracking or f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment(f"bench-runs-{uuid.uuid4().hex[:6]}")
    began = time.perf_counter()
    for i in range(runs_sample):
        run = client.create_run(experiment, tags={"condition_key": str(i)})
        client.set_terminated(run.info.run_id)
    runs_s = time.perf_counter() - began
    quarters = [b - a for a, b in zip([0.0] + chunk_times[:-1], chunk_times)]
    return {"conditions": n, "claims_and_trials_s": claims_s,
            "claims_ms_each": 1000 * claims_s / n,
            "claims_first_quarter_s": quarters[0], "claims_last_quarter_s": quarters[-1],
            "runs_measured": runs_sample, "run_create_finish_ms_each": 1000 * runs_s / runs_sample,
            "runs_s_for_all": runs_s / runs_sample * n,
            "total_coordination_s_for_all": claims_s + runs_s / runs_sample * n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", action="store_true", help="also PostgreSQL + tracking server")
    parser.add_argument("--conditions", type=int, default=10000)
    parser.add_argument("--runs-sample", type=int, default=1000)
    parser.add_argument("--null-conditions", type=int, default=200)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    os.environ.setdefault("LMLAB_THREADS", "1")
    backends: list[tuple[str, str | None, Any]] = [("journal+sqlite", None, None)]
    if args.services:
        svc = services()
        backends.append(("postgresql+server", svc["LMLAB_MLFLOW_URL"], lambda: new_database(svc)))
    figures: dict[str, Any] = {"load_avg_start": load_avg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_throughput:
            for name, tracking, database in backends:
                base = None
                for workers in [int(w) for w in args.workers.split(",")]:
                    result = throughput(workers, root / f"tp-{name}-{workers}", tracking,
                                        database() if database else None)
                    base = base or result
                    result["ratio_wall"] = result["conditions_per_min_wall"] / base["conditions_per_min_wall"]
                    result["ratio_span"] = result["conditions_per_min_span"] / base["conditions_per_min_span"]
                    result["load_avg"] = load_avg()
                    figures[f"throughput/{name}/{workers}"] = result
                    print(f"throughput {name} {workers} worker(s): {json.dumps(result)}", flush=True)
        for name, tracking, database in backends:
            result = null_sweep(args.null_conditions, root / f"null-{name}", tracking,
                                database() if database else None)
            result["load_avg"] = load_avg()
            figures[f"overhead/{name}"] = result
            print(f"overhead {name}: {json.dumps(result)}", flush=True)
        for name, tracking, database in backends:
            result = claims_and_runs(args.conditions, root / f"claims-{name}", tracking,
                                     database() if database else None, args.runs_sample)
            result["load_avg"] = load_avg()
            figures[f"coordination/{name}"] = result
            print(f"coordination {name}: {json.dumps(result)}", flush=True)
    figures["load_avg_end"] = load_avg()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
