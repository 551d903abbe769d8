"""Steering benchmark on the embedded model (not a test): prints and logs to experiment `bench`.

1. steered vs unsteered batched generation throughput (goal: overhead <= 5%);
2. batched (32) vs one-prompt-at-a-time generation (goal: >= 8x at batch 32 on CPU);
3. share of a smoke sweep's wall time spent in tracking calls (goal: <= 5%).

Usage: python bench/bench_steering.py [--skip-sweep] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import mlflow
import torch

from lmlab.data.prompts import load_prompts
from lmlab.generation import GenerationConfig, generate
from lmlab.hooks import add_vector
from lmlab.models import load_model


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def generation_figures(repeats: int, new_tokens: int) -> dict[str, float]:
    lm = load_model()
    prompts = [lm.format_chat(r.prompt) for r in load_prompts("bundled:benign")[:32]]
    config = GenerationConfig(max_new_tokens=new_tokens, batch_size=32)
    # Force every row to run the full length so both arms generate the same token count.
    lm.model.generation_config.min_new_tokens = new_tokens
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    edits = {15: add_vector(vector / vector.norm() * 40.0)}
    generate(lm, prompts[:4], GenerationConfig(max_new_tokens=4))  # warm-up
    plain, steered = [], []
    for _ in range(repeats):  # interleaved so machine noise hits both arms alike
        plain.append(timed(lambda: generate(lm, prompts, config)))
        steered.append(timed(lambda: generate(lm, prompts, config, edits=edits)))
    tokens = len(prompts) * new_tokens
    single = timed(lambda: generate(lm, prompts, GenerationConfig(max_new_tokens=new_tokens, batch_size=1)))
    return {
        "unsteered_tokens_per_s": tokens / min(plain),
        "steered_tokens_per_s": tokens / min(steered),
        "steering_overhead_pct": 100 * (min(steered) / min(plain) - 1),
        "one_at_a_time_tokens_per_s": tokens / single,
        "batched_speedup_x": single / min(plain),
    }


def sweep_tracking_share() -> dict[str, float]:
    from lmlab.sweeps.runner import run_sweep
    from lmlab.sweeps.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        os.environ.pop("MLFLOW_RUN_ID", None)
        try:
            outcome = run_sweep(load_spec("sweeps/smoke.yaml"), experiment_name="smoke-bench")
        finally:
            mlflow.set_tracking_uri(previous)
    return {"smoke_sweep_seconds": outcome.total_seconds,
            "smoke_tracking_seconds": outcome.tracking_seconds,
            "smoke_tracking_share_pct": 100 * outcome.tracking_seconds / outcome.total_seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    figures = generation_figures(args.repeats, args.new_tokens)
    if not args.skip_sweep:
        figures.update(sweep_tracking_share())
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
    for name, value in figures.items():
        print(f"{name:32s} {value:10.2f}")
    print(f"machine: {machine}")
    mlflow.set_experiment("bench")
    with mlflow.start_run(run_name="steering"):
        mlflow.log_params({"machine": machine, "new_tokens": args.new_tokens, "batch": 32})
        mlflow.log_metrics(figures)


if __name__ == "__main__":
    main()
