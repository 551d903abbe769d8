"""Run a sweep spec: ``mlflow run . -e sweep -P spec=sweeps/<name>.yaml``.

Input: a YAML spec (default ``sweeps/smoke.yaml``). Output: the parent MLflow run (the one
``mlflow run`` created, or a new one) with ``summary.csv`` and plots, and one child run
per condition. Prints the parent run id and the command that opens the UI on it.
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401  (puts src/ on the path when lmlab is not installed)
from lmlab.errors import LmlabError, exit_cleanly_on_user_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sweeps/smoke.yaml", help="path to a sweep YAML spec")
    parser.add_argument("--experiment-name", default=None,
                        help="experiment for a run started outside `mlflow run` (default: the family)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL shared by all workers (default or \"\": journal file)")
    parser.add_argument("--test-mode", default=None, choices=["true", "false"],
                        help="run the family's fixed test subset")
    return parser.parse_args(argv)


@exit_cleanly_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lmlab.sweeps.runner import mark_run_failed, run_sweep, ui_hint
    from lmlab.sweeps.spec import load_spec

    try:
        overrides = {"storage": args.storage or None,
                     "test_mode": None if args.test_mode is None else args.test_mode == "true"}
        spec = load_spec(args.spec, overrides)
        outcome = run_sweep(spec, experiment_name=args.experiment_name)
    except LmlabError as error:
        mark_run_failed(str(error))
        raise
    print(f"\nsweep {spec.name!r} finished: {len(outcome.summary)} conditions, "
          f"{outcome.total_seconds:.0f} s ({100 * outcome.tracking_seconds / outcome.total_seconds:.1f}% "
          f"in tracking calls)")
    print(ui_hint(outcome))


if __name__ == "__main__":
    main(sys.argv[1:])
