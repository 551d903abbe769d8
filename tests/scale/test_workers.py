"""Several sweep workers on one PostgreSQL study and one MLflow tracking server.

Each worker plays a host of its own: its own folder, store and caches, and its own
``LMLAB_WORKER_HOST`` name, so no worker can see another's pid: a dead worker is found
only through the Optuna heartbeats kept in PostgreSQL.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from scale_helpers import (TINY, Services, children, finished_conditions, runs_of, start_worker,
                           worker_env, write_spec)
from lmlab.tracking import KEY_TAG


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def study_trials(storage: str, spec: dict[str, Any]) -> list[optuna.trial.FrozenTrial]:
    from lmlab.sweeps.spec import parse_spec

    return optuna.load_study(study_name=parse_spec(spec).study_name, storage=storage).get_trials()


def test_three_workers_share_one_steering_grid(services: Services, tmp_path: Path) -> None:
    experiment = f"three-workers-{uuid.uuid4().hex[:6]}"
    storage = services.new_database()
    spec = write_spec(tmp_path / "grid.yaml", TINY)
    log = tmp_path / "calls.jsonl"
    workers = []
    for name in ("host-a", "host-b", "host-c"):
        env = worker_env(services, services.mlflow_url, experiment, tmp_path / name, name)
        workers.append(start_worker(spec, storage, log, env, tmp_path / name))
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], "\n".join(o[-1500:] for o in outputs)

    client = MlflowClient(services.mlflow_url)
    runs = runs_of(client, experiment)
    finished = finished_conditions(runs)
    assert len(finished) == 13, "1 baseline + 6 steered + 6 random controls"
    assert set(finished.values()) == {1}, "exactly one FINISHED run per condition"
    assert {r.info.status for r in runs} == {"FINISHED"}, "no error, nothing left RUNNING"
    started = Counter(c["key"] for c in calls(log))
    assert len(started) == 13 and set(started.values()) == {1}, "no condition computed twice"
    assert len({c["pid"] for c in calls(log)}) >= 2, "the work was shared"
    keys = {key for key, _ in finished}
    for parent in [r for r in runs if r.data.tags.get("lmlab.role") == "sweep"]:
        path = client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))
        assert set(pd.read_csv(path)[KEY_TAG]) == keys, "every parent's summary covers all"
    trials = study_trials(storage, TINY)
    assert len(trials) == 13 and {t.state.name for t in trials} == {"COMPLETE"}
    assert all(len(t.values) == 2 for t in trials)


GRID5 = {**TINY, "name": "scale-kill", "grid": {**TINY["grid"], "layer": [0, 1], "alpha": [0.5]}}
#: Every phase is hit; where in it (which child) and the survivor's pace are seeded.
PHASES = ["child", "between", "summary", "child", "between"]


def rerun_here(services: Services, experiment: str, home: Path, storage: str,
               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> list[str]:
    """Run the sweep once more in this process (a fresh worker "host-c"); the conditions
    it computed."""
    import mlflow

    from lmlab.sweeps import runner
    from lmlab.sweeps.spec import parse_spec

    env = worker_env(services, services.mlflow_url, experiment, home, "host-c")
    with monkeypatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "LMLAB_STORE_DIR",
                     "LMLAB_WORKER_HOST", "LMLAB_HEARTBEAT_INTERVAL", "LMLAB_HEARTBEAT_GRACE",
                     "LMLAB_POLL_SECONDS", "PGPASSWORD"):
            patch.setenv(name, env[name])
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        computed: list[str] = []
        original = runner.SweepRunner._compute_run

        def counted(self, params, key, trial):  # type: ignore[no-untyped-def]
            computed.append(key)
            return original(self, params, key, trial)

        patch.setattr(runner.SweepRunner, "_compute_run", counted)
        mlflow.set_tracking_uri(services.mlflow_url)
        capsys.readouterr()
        runner.run_sweep(parse_spec({**GRID5, "storage": storage}))
    return computed


def test_a_worker_killed_at_random_points_loses_nothing(services: Services, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """kill -9 (SIGKILL, nothing cleaned up) in a child, between children or in the
    parent's summary; 5 seeded repetitions, each finished by the survivor and a re-run."""
    for seed in range(5):
        rng = random.Random(seed)
        phase = PHASES[seed]
        death = phase if phase == "summary" else f"{phase}:{rng.choice([1, 2])}"
        survivor_delay = rng.choice(["0", "0.5", "1.0"])
        root = tmp_path / f"rep{seed}"
        experiment = f"kill-{seed}-{uuid.uuid4().hex[:6]}"
        storage = services.new_database()
        root.mkdir(parents=True)
        spec = write_spec(root / "grid.yaml", GRID5)
        log = root / "calls.jsonl"
        env_a = worker_env(services, services.mlflow_url, experiment, root / "a", "host-a")
        env_b = worker_env(services, services.mlflow_url, experiment, root / "b", "host-b")
        victim = start_worker(spec, storage, log, env_a, root / "a", "--die-at", death)
        survivor = start_worker(spec, storage, log, env_b, root / "b", "--slow", survivor_delay)
        victim_out = victim.communicate(timeout=600)[0]
        survivor_out = survivor.communicate(timeout=600)[0]
        where = f"repetition {seed} ({death})"
        assert victim.returncode == -9, f"{where}: the victim was not killed\n{victim_out[-1500:]}"
        assert survivor.returncode == 0, f"{where}:\n{survivor_out[-2000:]}"
        rerun_calls = rerun_here(services, experiment, root / "c", storage, monkeypatch, capsys)
        assert "5 already finished, 0 to run" in capsys.readouterr().out, where

        client = MlflowClient(services.mlflow_url)
        runs = runs_of(client, experiment)
        finished = finished_conditions(runs)
        assert len(finished) == 5 and set(finished.values()) == {1}, f"{where}: {finished}"
        assert "RUNNING" not in {r.info.status for r in runs}, f"{where}: a run left RUNNING"
        assert rerun_calls == [], f"{where}: the re-run computed something again"
        ended = {(r.data.tags[KEY_TAG]): r.info.end_time / 1000 for r in children(runs)
                 if r.info.status == "FINISHED"}
        recomputed = [c for c in calls(log) if c["t"] > ended[c["key"]]]
        assert recomputed == [], f"{where}: finished conditions computed again"
        trials = study_trials(storage, GRID5)
        complete = Counter(t.user_attrs.get(KEY_TAG) for t in trials if t.state.name == "COMPLETE")
        assert len(complete) == 5 and set(complete.values()) == {1}, where
        assert {t.state.name for t in trials} <= {"COMPLETE", "FAIL"}, where
        if death.startswith("child"):
            killed = [r for r in children(runs) if r.info.status == "FAILED"]
            assert len(killed) == 1, f"{where}: the killed child is closed FAILED"
            assert "heartbeat" in killed[0].data.tags.get("lmlab.failure_reason", ""), where
