"""Several workers on one study, dead workers, incomplete conditions, store problems.

Single-machine paths only (journal study, SQLite tracking store); the same scenarios on
PostgreSQL and an MLflow tracking server are in ``tests/scale`` (marked ``services``).
Workers are real processes (``tests/scale/worker.py`` around the sweep entry point).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmlab.errors import LmlabError
from lmlab.steering.family import SteeringFamily
from lmlab.sweeps.claims import JournalClaimBoard, SqlClaimBoard, worker_owner
from lmlab.sweeps.runner import run_sweep, slot_seed
from lmlab.sweeps.spec import parse_spec
from lmlab.tracking import FAILURE_TAG, KEY_TAG, PARENT_TAG, mask_url

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scale" / "worker.py"

TINY = {
    "family": "steering", "name": "tiny-scale", "model": {"name": "tiny:llama"},
    "grid": {"method": ["suffix_contrast"], "layer": [1], "alpha": [0.5, 1.0], "intervention": ["add"]},
    "steering": {"n_prompts": 3, "n_train": 4, "eval_splits": ["harm_test", "benign"],
                 "generation": {"max_new_tokens": 4, "batch_size": 4}, "kl_tokens": 2},
}
SEARCH = {**{k: v for k, v in TINY.items() if k != "grid"}, "name": "tiny-search",
          "search": {"params": {"layer": {"int": [0, 2]}, "alpha": {"float": [0.1, 1.0]}},
                     "n_trials": 3, "sampler": "random", "seed": 1}}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    return tmp_path


def journal_study(store: Path, name: str, suffix: str = "") -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(store / ".lmlab" / "optuna.journal")))
    return optuna.load_study(study_name=name + suffix, storage=storage)


def all_runs(experiment: str = "steering") -> list:
    client = MlflowClient()
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              max_results=5000)


def finished_keys(runs: list) -> list[tuple[str, str]]:
    """(condition key, outputs asked) of every FINISHED child: a condition whose finished
    run lacks a requested output (steering's ``splits``) is computed again for it."""
    return [(r.data.tags[KEY_TAG], r.data.params.get("splits", "")) for r in runs
            if r.info.status == "FINISHED" and KEY_TAG in r.data.tags]


def spawn_worker(store: Path, spec: Path, log: Path, *extra: str,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
                "LMLAB_POLL_SECONDS": "0.5", **(env or {})}
    full_env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen([sys.executable, str(WORKER), "--spec", str(spec), "--log", str(log),
                             *extra], env=full_env, cwd=store, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def write_spec(store: Path, raw: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = store / name
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- claims


def _claim_all(board_factory, keys: list[str], results) -> None:  # type: ignore[no-untyped-def]
    board = board_factory()
    won = [key for key in keys if board.insert(key, 0, worker_owner())]
    results.put((os.getpid(), won))


def _journal_board(path: str):  # type: ignore[no-untyped-def]
    return lambda: JournalClaimBoard(Path(path))


def _sql_board(url: str):  # type: ignore[no-untyped-def]
    def make():  # type: ignore[no-untyped-def]
        import sqlalchemy

        return SqlClaimBoard(sqlalchemy.create_engine(url, connect_args={"timeout": 60}))
    return make


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_each_claim_is_won_by_exactly_one_of_several_racing_processes(tmp_path: Path, kind: str) -> None:
    keys = [f"condition-{i}" for i in range(40)]
    if kind == "journal":
        factory = _journal_board(str(tmp_path / "claims.journal"))
    else:
        factory = _sql_board(f"sqlite:///{tmp_path}/claims.db")
        factory()  # the table exists before the race, as after open_storage
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_claim_all, args=(factory, keys, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    won = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    winners = [key for _, keys_won in won for key in keys_won]
    assert sorted(winners) == sorted(keys), "every key won once, none twice"
    board = factory()
    assert all(board.latest(key).epoch == 0 for key in keys)


def test_a_claim_given_up_is_taken_again_at_the_next_epoch_by_one_worker(tmp_path: Path) -> None:
    board = JournalClaimBoard(tmp_path / "claims.journal")
    assert board.insert("k", 0, worker_owner())
    assert not board.insert("k", 0, worker_owner() | {"lmlab.worker": "someone-else"})
    board.attach("k", 0, -1)  # released
    other = JournalClaimBoard(tmp_path / "claims.journal")
    assert other.latest("k").trial_id == -1
    assert other.insert("k", 1, worker_owner())
    assert other.latest("k").epoch == 1


# ---------------------------------------------------------------- grid trials


def test_grid_objectives_name_splits_the_grid_evaluates() -> None:
    grid = SteeringFamily(parse_spec({**TINY, "steering": {**TINY["steering"],
                                                           "eval_splits": ["harm_train", "harm_test", "benign"]}}))
    assert grid.objectives() == [("harm_test/refusal", "maximize"), ("benign/cost", "minimize")]
    assert SteeringFamily(parse_spec(SEARCH)).objectives()[0] == ("harm_val/refusal", "maximize")


def test_every_grid_trial_ends_complete_with_the_conditions_values(store: Path) -> None:
    outcome = run_sweep(parse_spec(TINY))
    study = journal_study(store, parse_spec(TINY).study_name)
    trials = study.get_trials()
    assert len(trials) == 5
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    assert study.metric_names == ["harm_test/refusal", "benign/cost"]
    by_key = {row[KEY_TAG]: row for row in outcome.summary.to_dict("records")}
    for trial in trials:
        row = by_key[trial.user_attrs[KEY_TAG]]
        assert trial.values == [row["harm_test/refusal"], row["benign/cost"]]
        assert trial.user_attrs["mlflow_run_id"] == row["run_id"]
    run_sweep(parse_spec(TINY))  # a re-run reuses and adds no trial
    assert len(journal_study(store, parse_spec(TINY).study_name).get_trials()) == 5


# ---------------------------------------------------------------- adoption


def _first_sweep_with_parent_status(store: Path, status: str, tags: dict[str, str]) -> str:
    first = run_sweep(parse_spec(TINY))
    client = MlflowClient()
    client.update_run(first.parent_run_id, status=status)
    for name, value in tags.items():
        client.set_tag(first.parent_run_id, name, value)
    return first.parent_run_id


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()


def test_children_of_a_live_workers_parent_are_not_adopted(store: Path) -> None:
    live = _first_sweep_with_parent_status(store, "RUNNING", {"lmlab.pid": str(os.getpid())})
    second = run_sweep(parse_spec(TINY))
    children = [r for r in all_runs() if r.data.tags.get("lmlab.role") != "sweep"]
    assert len(children) == 5
    assert {r.data.tags[PARENT_TAG] for r in children} == {live}
    assert second.summary["reused"].all()


def test_children_of_a_parent_on_an_unknown_host_are_not_adopted(store: Path) -> None:
    remote = _first_sweep_with_parent_status(store, "RUNNING", {"lmlab.host": "another-host",
                                                                "lmlab.pid": _dead_pid()})
    run_sweep(parse_spec(TINY))
    children = [r for r in all_runs() if r.data.tags.get("lmlab.role") != "sweep"]
    assert {r.data.tags[PARENT_TAG] for r in children} == {remote}


def test_children_of_a_dead_workers_parent_are_adopted(store: Path) -> None:
    dead = _first_sweep_with_parent_status(store, "RUNNING", {"lmlab.pid": _dead_pid()})
    second = run_sweep(parse_spec(TINY))
    children = [r for r in all_runs() if r.data.tags.get("lmlab.role") != "sweep"]
    assert {r.data.tags[PARENT_TAG] for r in children} == {second.parent_run_id}
    assert {r.data.tags["lmlab.adopted_from"] for r in children} == {dead}
    assert MlflowClient().get_run(dead).info.status == "FAILED", "its dead parent is closed"


# ---------------------------------------------------------------- several workers


def test_two_search_workers_share_the_trial_budget_and_never_repeat_a_condition(store: Path) -> None:
    spec = write_spec(store, SEARCH)
    MlflowClient().search_experiments()  # schema first, then fan out
    workers = [spawn_worker(store, spec, store / "calls.jsonl") for _ in range(2)]
    for worker in workers:
        out, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, out[-3000:]
    study = journal_study(store, parse_spec(SEARCH).study_name)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3, "n_trials counts the study's trials across workers"
    assert len({(t.params["layer"], t.params["alpha"]) for t in complete}) == 3, "no lockstep"
    keys = finished_keys(all_runs())
    assert len(keys) == len(set(keys)), "no condition FINISHED twice"
    calls = [(c["key"], c["outputs"]) for c in map(json.loads, (store / "calls.jsonl").read_text().splitlines())]
    assert len(calls) == len(set(calls)), "no condition computed twice"


def test_search_slots_propose_from_distinct_seeds() -> None:
    assert len({slot_seed(0, slot) for slot in range(100)}) == 100
    assert slot_seed(1, 0) != slot_seed(0, 0)


def test_a_killed_workers_condition_is_taken_over_and_its_runs_closed(store: Path) -> None:
    spec = write_spec(store, TINY)
    MlflowClient().search_experiments()
    victim = spawn_worker(store, spec, store / "calls.jsonl", "--die-at", "child:2")
    out, _ = victim.communicate(timeout=600)
    assert victim.returncode == -9, out[-2000:]
    running = [r for r in all_runs() if r.info.status == "RUNNING"]
    assert len(running) == 2, "the killed worker left its parent and one child RUNNING"
    resumed = run_sweep(parse_spec(TINY))
    runs = all_runs()
    assert "RUNNING" not in {r.info.status for r in runs}
    assert {MlflowClient().get_run(r.info.run_id).info.status for r in running} == {"FAILED"}
    keys = finished_keys(runs)
    assert len(keys) == 5 and len(set(keys)) == 5
    assert len(resumed.summary) == 5
    study = journal_study(store, parse_spec(TINY).study_name)
    states = sorted(t.state.name for t in study.get_trials())
    assert states == ["COMPLETE"] * 5 + ["FAIL"], "the dead trial FAIL, every condition COMPLETE"


# ---------------------------------------------------------------- incomplete conditions

CONTEXT = {"family": "context", "name": "niah-incomplete", "model": {"name": "tiny:llama"},
           "grid": {"length": [300], "depth": [50]},
           "context": {"task": "niah", "samples": 2, "max_tokens": 4}}


def test_a_condition_with_failed_rows_is_not_finished_and_the_next_run_retries_them(
        store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from lmlab.llm import clients

    original = clients.LocalClient.complete

    def failing(self, requests):  # type: ignore[no-untyped-def]
        for request in requests:
            yield request, clients.CallFailure("server_error", "injected", 3)

    monkeypatch.setattr(clients.LocalClient, "complete", failing)
    with pytest.raises(LmlabError, match="1 condition.s. incomplete"):
        run_sweep(parse_spec(CONTEXT))
    runs = all_runs("context")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]
    child = [r for r in runs if r.data.tags.get("lmlab.role") != "sweep"][0]
    assert child.data.metrics["rows_error"] == 2
    assert "2 of 2 rows failed (2 server_error)" in child.data.tags[FAILURE_TAG]

    monkeypatch.setattr(clients.LocalClient, "complete", original)
    capsys.readouterr()
    second = run_sweep(parse_spec(CONTEXT))
    assert "0 already finished, 1 to run" in capsys.readouterr().out
    row = second.summary.iloc[0]
    assert row["rows_sent"] == 2 and row["rows_error"] == 0 and not row["reused"]
    assert [r.info.status for r in all_runs("context")].count("FINISHED") == 2  # child + parent


# ---------------------------------------------------------------- store problems


@pytest.mark.parametrize("uri, message", [
    ("bogus://x", "tracking URI 'bogus://x' is not supported"),
    ("sqlite:////proc/mlflow.db", "cannot be opened for writing"),
    ("sqlite:////no/such/folder/mlflow.db", "folder /no/such/folder does not exist"),
])
def test_an_unusable_tracking_store_is_one_line_at_once(monkeypatch, tmp_path, uri, message) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    began = time.monotonic()
    with pytest.raises(LmlabError, match=message.replace("(", r"\(")):
        run_sweep(parse_spec(TINY))
    assert time.monotonic() - began < 10


def test_an_unknown_mlflow_run_id_is_one_line(store: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    with pytest.raises(LmlabError, match="MLFLOW_RUN_ID=0123456789abcdef0123456789abcdef is not a run"):
        run_sweep(parse_spec(TINY))


def test_a_read_only_store_is_one_line(store: Path) -> None:
    MlflowClient().search_experiments()  # the database exists
    mlflow.set_tracking_uri(f"sqlite:///file:{store}/mlflow.db?mode=ro&uri=true")
    with pytest.raises(LmlabError, match="cannot write to the tracking store .*readonly"):
        run_sweep(parse_spec(TINY))


def test_a_database_password_is_masked_wherever_the_storage_is_shown() -> None:
    from lmlab.sweeps.runner import _spec_yaml

    url = "postgresql://lmlab:s3cret-pw@127.0.0.1:5432/optuna"
    assert mask_url(url) == "postgresql://lmlab:***@127.0.0.1:5432/optuna"
    assert mask_url("postgresql://lmlab@127.0.0.1/optuna") == "postgresql://lmlab@127.0.0.1/optuna"
    assert "s3cret-pw" not in _spec_yaml(parse_spec({**TINY, "storage": url}))
