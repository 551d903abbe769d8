"""Run one steering condition: ``mlflow run . -e steer -P layer=15 -P alpha=0.25``.

Input: the condition's params on the command line (model and settings as in
``sweeps/smoke.yaml``). ``alpha`` is the strength in the intervention's own unit: for
``add`` the added norm as a multiple of the layer's mean residual norm, for ``ablate``
the share of the component removed (0 to 1); the runs log it as ``add_norm_multiple`` or
``ablate_fraction``. Output: the run ``mlflow run`` created holds a baseline child and
the condition's child (with its matched random control), as a one-point sweep would.
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401  (puts src/ on the path when lmlab is not installed)
from lmlab.errors import ArgumentParser, exit_cleanly_on_user_error


def _integer(value: str) -> int:
    """An integer, also when ``mlflow run`` passes a ``type: float`` param as ``15.0``."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}")
    return int(number)


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=_integer, required=True)
    parser.add_argument("--alpha", type=_number, required=True,
                        help="add: multiple of the layer's mean residual norm (logged as "
                             "add_norm_multiple); ablate: share of the component removed, "
                             "0 to 1 (logged as ablate_fraction)")
    parser.add_argument("--method", default="suffix_contrast")
    parser.add_argument("--intervention", default="add")
    parser.add_argument("--scope", default="layer")
    parser.add_argument("--n-prompts", type=_integer, default=20)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--experiment-name", default=None)
    return parser.parse_args(argv)


@exit_cleanly_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lmlab.steering.family import STRENGTH
    from lmlab.sweeps.runner import run_sweep, ui_hint
    from lmlab.sweeps.spec import parse_spec

    strength = STRENGTH.get(args.intervention, "alpha")
    raw = {"family": "steering",
           "name": f"steer-{args.method}-{args.intervention}-L{args.layer}-{strength}{args.alpha:g}",
           "model": {"name": args.model},
           "grid": {"method": [args.method], "layer": [args.layer], "alpha": [args.alpha],
                    "intervention": [args.intervention], "scope": [args.scope]},
           "steering": {"n_prompts": args.n_prompts}}
    outcome = run_sweep(parse_spec(raw, origin="steer"), experiment_name=args.experiment_name)
    print(ui_hint(outcome))


if __name__ == "__main__":
    main(sys.argv[1:])
