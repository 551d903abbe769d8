"""Context benchmark: local batched vs one-call-at-a-time throughput, and a completed
grid's re-run making zero model calls.

Usage: ``python bench/bench_context.py [--tiny] [--prompts 8] [--length 512]``.
Prints the figures and logs them to the MLflow experiment ``bench`` (run ``context``).
The default subject is the embedded SmolLM2-135M; ``--tiny`` uses a random tiny model.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import torch

from lmlab.llm.accounting import Ledger
from lmlab.llm.clients import LocalClient
from lmlab.context.engine import EngineSettings, run_items
from lmlab.context.family import ContextFamily
from lmlab.context.rows import RowStore
from lmlab.sweeps.spec import parse_spec


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny model (seconds, not minutes)")
    parser.add_argument("--prompts", type=int, default=8, help="needle prompts per throughput run")
    parser.add_argument("--length", type=int, default=512, help="target prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    return parser.parse_args()


def spec_for(args: argparse.Namespace, depths: list[float], samples: int) -> Any:
    return parse_spec({"family": "context", "name": "bench-context",
                       "grid": {"length": [args.length], "depth": depths},
                       "context": {"task": "niah", "samples": samples,
                                   "max_tokens": args.max_tokens}})


def throughput(lm: Any, args: argparse.Namespace, batch_size: int, root: Path) -> dict[str, float]:
    """Send the same needle prompts through the local client at one batch size."""
    depths = [100 * i / max(args.prompts - 1, 1) for i in range(args.prompts)]
    family = ContextFamily(spec_for(args, depths, 1))
    ledger = Ledger()
    client = LocalClient(lm, ledger, batch_size=batch_size)
    items = [item for params in family.conditions()
             for item in family.task.items(params, client, args.max_tokens, client.identity,
                                           {"max_tokens": args.max_tokens})]
    with RowStore(root / f"rows-b{batch_size}.sqlite") as store:
        start = time.perf_counter()
        run_items(items, client, store, EngineSettings())
        seconds = time.perf_counter() - start
    totals = ledger.totals["subject"]
    tokens = totals["prompt_tokens"] + totals["completion_tokens"]
    return {"seconds": seconds, "prompts_per_s": len(items) / seconds, "tokens_per_s": tokens / seconds,
            "completion_tokens_per_s": totals["completion_tokens"] / seconds}


def rerun(lm: Any, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """Run a small grid twice on one row store; the second pass must make no calls."""
    spec = spec_for(args, [0, 100], 2)
    figures = {}
    for label in ("first", "second"):
        family = ContextFamily(spec)
        ctx = SimpleNamespace(model=lm, store_dir=root / "grid", run_id=None)
        family.prepare(ctx)
        start = time.perf_counter()
        results = [family.run_condition(ctx, p) for p in family.conditions()]
        figures[f"{label}_seconds"] = time.perf_counter() - start
        figures[f"{label}_calls"] = sum(r.metrics["calls_made"] for r in results)
    return figures


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    if args.tiny:
        from lmlab.models import tiny_model

        lm = tiny_model()
        args.length = min(args.length, 400)
    else:
        from lmlab.models import load_model

        lm = load_model()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warmup = argparse.Namespace(**{**vars(args), "prompts": 2})
        throughput(lm, warmup, args.batch_size, root / "warmup")  # first-call overheads
        batched = throughput(lm, args, args.batch_size, root)
        single = throughput(lm, args, 1, root)
        again = rerun(lm, args, root)
    metrics = {**{f"batched_{k}": v for k, v in batched.items()},
               **{f"single_{k}": v for k, v in single.items()},
               "batched_speedup": single["seconds"] / batched["seconds"],
               **{f"rerun_{k}": v for k, v in again.items()}}
    print(f"machine: {machine}; model: {'tiny' if args.tiny else 'smollm2-135m'}; "
          f"{args.prompts} needle prompts of {args.length} tokens, {args.max_tokens} new tokens")
    for key, value in metrics.items():
        print(f"{key:32s} {value:10.3f}")
    mlflow.set_experiment("bench")
    with mlflow.start_run(run_name="context"):
        mlflow.log_params({"model": "tiny" if args.tiny else "smollm2-135m", "prompts": args.prompts,
                           "length": args.length, "max_tokens": args.max_tokens,
                           "batch_size": args.batch_size, "machine": machine})
        mlflow.log_metrics(metrics)


if __name__ == "__main__":
    main()
