"""Shared fixtures: tiny random models (3 layers, width 64), built once per session.

Tests must not change these models; hooks are removed by the code under test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
