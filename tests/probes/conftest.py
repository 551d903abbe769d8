"""Shared fixtures: a tiny random model, small chain files, a throwaway MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.models import tiny_model
from lmlab.probes.chains import SAMPLE_PATH


@pytest.fixture(scope="session")
def tiny_lm():
    return tiny_model("llama", n_layers=3, hidden_size=64)


@pytest.fixture(scope="session")
def sample_records() -> list[dict]:
    return json.loads(SAMPLE_PATH.read_text())


@pytest.fixture
def chain_file(tmp_path: Path, sample_records: list[dict]) -> Path:
    path = tmp_path / "chains.json"
    path.write_text(json.dumps(sample_records[:30]))
    return path



def record(task_id: str, chain: str, annotated: str, problem: str = "What is 2 + 3?") -> dict:
    return {"task_id": task_id, "problem": problem, "reasoning_chain": chain,
            "annotated_chain": annotated}
