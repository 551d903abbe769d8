"""Shared fixtures: tiny random models (3 layers, width 64), built once per session, and
fresh MLflow stores that cost milliseconds instead of seconds.

Tests must not change these models; hooks are removed by the code under test.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from lmlab.models import LoadedModel, tiny_model

# Entry points import their `_bootstrap` sibling; tests load them by file path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "entrypoints"))

# Tiny models gain nothing from intra-op threads, and on a shared CPU extra threads
# spin-wait on each other (a 3-layer forward goes from ~5 ms to ~0.5 s).
torch.set_num_threads(1)
os.environ.setdefault("LMLAB_THREADS", "1")  # sweeps run in tests set threads from this

TINY_ARCHS = ("llama", "qwen2", "gemma", "gpt2")
_BUILT: dict[str, LoadedModel] = {}


def tiny(arch: str) -> LoadedModel:
    """The session's tiny model of ``arch`` (built on first use)."""
    if arch not in _BUILT:
        _BUILT[arch] = tiny_model(arch, n_layers=3, hidden_size=64)
    return _BUILT[arch]


@pytest.fixture(scope="session", params=TINY_ARCHS)
def any_lm(request: pytest.FixtureRequest) -> LoadedModel:
    """One tiny model per architecture (tests using it run once per arch)."""
    return tiny(request.param)


@pytest.fixture(scope="session")
def llama_lm() -> LoadedModel:
    return tiny("llama")


@pytest.fixture(scope="session")
def tiny_lm_of():
    """``tiny_lm_of(arch)``: the session's tiny model of that architecture."""
    return tiny


# ---------------------------------------------------------------- fresh tracking stores

_MIGRATION: dict[str, Any] = {}  # "migrate": MLflow's own migration, "template": its result


def _migrated_template() -> Path:
    """An empty SQLite tracking store with MLflow's whole schema, migrated once per session."""
    if "template" not in _MIGRATION:
        from mlflow.store.db import utils

        path = Path(tempfile.mkdtemp(prefix="lmlab-mlflow-template-")) / "mlflow.db"
        engine = utils.create_sqlalchemy_engine_with_retry(f"sqlite:///{path}")
        _MIGRATION["migrate"](engine)
        engine.dispose()
        _MIGRATION["template"] = path
    return _MIGRATION["template"]


def _initialize_from_template(engine: Any) -> None:
    """MLflow's first use of an empty SQLite file runs every schema migration (about 5 s on
    this machine, once per test that makes a store); copying a migrated template gives the
    same tables in milliseconds. Experiments are not in the template: MLflow's store creates
    its Default experiment afterwards, with this store's own artifact root."""
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:":
        _MIGRATION["migrate"](engine)
        return
    source, target = sqlite3.connect(_migrated_template()), sqlite3.connect(database)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


@pytest.fixture(scope="session", autouse=True)
def _fast_fresh_tracking_stores() -> Iterator[None]:
    from mlflow.store.db import utils
    from mlflow.store.model_registry import sqlalchemy_store as registry_store

    _MIGRATION["migrate"] = utils._initialize_tables
    patch = pytest.MonkeyPatch()
    patch.setattr(utils, "_initialize_tables", _initialize_from_template)
    patch.setattr(registry_store, "_initialize_tables", _initialize_from_template)
    yield
    patch.undo()
    if "template" in _MIGRATION:
        shutil.rmtree(_MIGRATION.pop("template").parent, ignore_errors=True)


_MLFLOW_PROCESS_VARIABLES = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def _mlflow_process_variables_do_not_leak() -> Iterator[None]:
    """``mlflow.set_experiment`` writes MLFLOW_EXPERIMENT_ID into the environment; an entry
    point run in process (train_organism, sweep) would hand its experiment to every later
    test and subprocess. Each test gets the variables back as they were."""
    saved = {name: os.environ.get(name) for name in _MLFLOW_PROCESS_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh sqlite tracking store and lmlab store dir under tmp_path."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("LMLAB_STORE_DIR", str(tmp_path / ".lmlab"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(previous)
