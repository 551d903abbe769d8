"""Run a sweep spec: ``mlflow run . -e sweep -P spec=sweeps/<name>.yaml``.

Input: a YAML spec (default ``sweeps/smoke.yaml``; a relative path is read from the
project directory). Any spec setting can be overridden with a dotted key, ``-P
context.max_tokens=64`` through ``mlflow run`` or ``--context.max_tokens 64`` here (values
read as YAML). Output: the parent MLflow run (the one ``mlflow run`` created, or a new one)
with ``summary.csv`` and plots, and one child run per condition. Prints the parent run id
and the command that opens the UI on it. A bad spec or argument prints one line
``lmlab: error: ...``, exits 2 and closes the run ``mlflow run`` created as FAILED.
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401  (puts src/ on the path when lmlab is not installed)
from lmlab.errors import ArgumentParser, LmlabError, exit_cleanly_on_user_error

_BOOLEANS = {"true": True, "false": False}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sweeps/smoke.yaml", help="path to a sweep YAML spec")
    parser.add_argument("--experiment-name", default=None,
                        help="experiment for a run started outside `mlflow run` (default: the family)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: journal file)")
    parser.add_argument("--test-mode", default="",
                        help="true: run the family's fixed test subset; false: the full sweep; "
                             "empty (default): as the spec says")
    return parser.parse_known_args(argv)


def test_mode_override(value: str) -> bool | None:
    """``--test-mode`` as a boolean; empty means "as the spec says"."""
    if not value.strip():
        return None
    if value.strip().lower() not in _BOOLEANS:
        raise LmlabError(f"--test-mode must be true or false, got {value!r}")
    return _BOOLEANS[value.strip().lower()]


@exit_cleanly_on_user_error
def main(argv: list[str] | None = None) -> None:
    args, rest = parse_args(argv)
    from lmlab.sweeps.specfile import parse_overrides, read_spec_file

    overrides = {**parse_overrides(rest), "storage": args.storage or None,
                 "test_mode": test_mode_override(args.test_mode)}
    raw = read_spec_file(args.spec, overrides)  # file and YAML errors before the slow imports
    from lmlab.sweeps.runner import run_sweep, ui_hint
    from lmlab.sweeps.spec import parse_spec

    spec = parse_spec(raw, origin=args.spec)

    outcome = run_sweep(spec, experiment_name=args.experiment_name)
    print(f"\nsweep {spec.name!r} finished: {len(outcome.summary)} conditions, "
          f"{outcome.total_seconds:.0f} s ({100 * outcome.tracking_seconds / outcome.total_seconds:.1f}% "
          f"in tracking calls)")
    print(ui_hint(outcome))


if __name__ == "__main__":
    main(sys.argv[1:])
