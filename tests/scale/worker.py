"""A sweep worker for the scale tests: the real entry point, plus a log of every
condition it starts computing and an optional SIGKILL at a chosen point.

    python tests/scale/worker.py --spec S.yaml --log calls.jsonl [--die-at child:2]

``--die-at`` kills this process with SIGKILL (nothing is cleaned up, exactly as
``kill -9`` from outside) at one of:
  child:N    inside the N-th condition it computes (its child run is RUNNING)
  between:N  right after the N-th condition it computed has finished and been told
  summary    when the parent's summary is being logged
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "entrypoints"))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(log: Path | None, die_at: str | None, slow_s: float) -> None:
    from lmlab.sweeps import runner

    phase, _, count = (die_at or "").partition(":")
    limit = int(count) if count else 0
    computed = {"started": 0, "done": 0}
    compute_run = runner.SweepRunner._compute_run
    compute_claimed = runner.SweepRunner._compute_claimed
    log_parent = runner.SweepRunner._log_parent

    def logged_compute_run(self, params, key, trial):  # type: ignore[no-untyped-def]
        computed["started"] += 1
        if log is not None:
            with open(log, "a") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "key": key, "t": time.time(),
                                            "outputs": str(params.get("splits"))}) + "\n")
        if phase == "child" and computed["started"] == limit:
            original = self.family.run_condition

            def dying(ctx, p):  # type: ignore[no-untyped-def]
                time.sleep(0.2)
                die()
                return original(ctx, p)

            self.family.run_condition = dying
        elif slow_s:
            original = self.family.run_condition

            def slow(ctx, p, _original=original):  # type: ignore[no-untyped-def]
                time.sleep(slow_s)
                return _original(ctx, p)

            self.family.run_condition = slow
        try:
            return compute_run(self, params, key, trial)
        finally:
            self.family.__dict__.pop("run_condition", None)

    def counted_compute_claimed(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        outcome = compute_claimed(self, *args, **kwargs)
        computed["done"] += 1
        if phase == "between" and computed["done"] == limit:
            die()
        return outcome

    def dying_log_parent(self, summary):  # type: ignore[no-untyped-def]
        if phase == "summary":
            die()
        return log_parent(self, summary)

    runner.SweepRunner._compute_run = logged_compute_run
    runner.SweepRunner._compute_claimed = counted_compute_claimed
    runner.SweepRunner._log_parent = dying_log_parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--log", default=None)
    parser.add_argument("--die-at", default=None)
    parser.add_argument("--slow", type=float, default=0.0, help="seconds added to each condition")
    parser.add_argument("--storage", default=None)
    args = parser.parse_args()
    install(Path(args.log) if args.log else None, args.die_at, args.slow)
    import sweep

    argv = ["--spec", args.spec] + (["--storage", args.storage] if args.storage else [])
    sweep.main(argv)


if __name__ == "__main__":
    main()
