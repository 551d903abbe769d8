"""Helpers shared by the context tests (specs, API subjects, families with a temp store)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmlab.context.family import ContextFamily
from lmlab.sweeps.spec import parse_spec


def niah_spec(context: dict[str, Any], grid: dict[str, list[Any]] | None = None,
              test_mode: bool = False) -> Any:
    return parse_spec({"family": "context", "name": "niah-test", "test_mode": test_mode,
                       "grid": grid or {"length": [300, 400], "depth": [0, 100]},
                       "context": {"task": "niah", "samples": 2, "max_tokens": 6, **context}})


def api_subject(served: Any, api_base: str, **extra: Any) -> dict[str, Any]:
    return {"model": f"openai/{served.model_dir}", "api_base": api_base, "context_window": 512,
            "timeout_s": 10, "backoff_s": 0.01, **extra}


def family_and_ctx(spec: Any, tmp_path: Path, model: Any = None) -> tuple[ContextFamily, Any]:
    family = ContextFamily(spec)
    ctx = SimpleNamespace(model=model, store_dir=tmp_path / "store", run_id=None)
    family.prepare(ctx)
    return family, ctx
