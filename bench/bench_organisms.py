"""Organism benchmark: wall time and tokens/s to train one LoRA organism on this machine.

Trains one bundled organism (default ``flattery``) with the default recipe into a
temporary folder (the cache and the shipped adapters are left alone), once per thread
count in ``--threads``, and prints seconds, optimiser steps, tokens/s (prompt + response
tokens through forward and backward) and the 1-minute load average before and after each
training. Logs the figures to the MLflow experiment ``bench`` (run ``organisms``).

    python bench/bench_organisms.py                  # embedded SmolLM2-135M, 1 thread
    python bench/bench_organisms.py --threads 1 2    # compare thread counts
    python bench/bench_organisms.py --tiny           # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from lmlab.diffing.train import TrainConfig, train_adapter
from lmlab.models import ModelSpec


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quirk", default="flattery")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--tiny", action="store_true", help="tiny random model instead of the embedded one")
    return parser.parse_args()


def bench_once(base: ModelSpec, quirk: str, config: TrainConfig, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train_adapter(base, quirk, config, Path(tmp) / "adapter")
        wall = time.perf_counter() - start
        size = sum(f.stat().st_size for f in (Path(tmp) / "adapter").iterdir())
    return {f"t{threads}_train_s": result.seconds, f"t{threads}_wall_s": wall,
            f"t{threads}_tokens_per_s": result.tokens_per_second,
            f"t{threads}_steps": float(len(result.losses)), f"t{threads}_tokens": float(result.tokens),
            f"t{threads}_final_epoch_loss": result.epoch_losses[-1],
            f"t{threads}_load_start": load_start, f"t{threads}_load_end": os.getloadavg()[0],
            "adapter_bytes": float(size), "examples": float(result.examples)}


def main() -> None:
    args = parse_args()
    base = ModelSpec(name="tiny:llama") if args.tiny else ModelSpec()
    config = TrainConfig() if args.epochs is None else TrainConfig(epochs=args.epochs)
    metrics: dict[str, float] = {}
    for threads in args.threads:
        figures = bench_once(base, args.quirk, config, threads)
        metrics.update(figures)
        t = f"t{threads}"
        print(f"{args.quirk} on {base.name}, {threads} thread(s): {figures[t + '_train_s']:.0f} s "
              f"training ({figures[t + '_wall_s']:.0f} s with loading), "
              f"{figures[t + '_steps']:.0f} steps, {figures[t + '_tokens_per_s']:.0f} tok/s, "
              f"last epoch loss {figures[t + '_final_epoch_loss']:.3f}; load average "
              f"{figures[t + '_load_start']:.1f} -> {figures[t + '_load_end']:.1f} "
              f"on {os.cpu_count()} CPUs")
    print(f"adapter size: {metrics['adapter_bytes'] / 1e6:.2f} MB")
    mlflow.set_experiment("bench")
    with mlflow.start_run(run_name="organisms"):
        mlflow.log_params({"model": base.name, "quirk": args.quirk, **{
            f"train.{k}": v for k, v in config.record().items()}, "threads": args.threads})
        mlflow.log_metrics(metrics)


if __name__ == "__main__":
    main()
