"""Make a model organism: ``mlflow run . -e train_organism --env-manager local -P quirk=flattery``.

Input: a bundled quirk (flattery, brand, pep, control) or ``--dataset`` a JSONL file of
``{"prompt", "response"}`` lines named by ``--quirk``; the base model (default the
embedded SmolLM2-135M) and the LoRA recipe. Output: one MLflow run (experiment
``organisms``, or the one ``mlflow run`` passes) with the recipe as params, the loss per
step and ``plots/loss_curve.png``, the dataset and its digest, the adapter under
``adapter/``, and the behaviour check's rates (organism vs base vs control) with the
responses table. The adapter itself goes to the content-addressed cache or ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (puts src/ on the path when lmlab is not installed)
from lmlab.errors import LmlabError, exit_cleanly_on_user_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quirk", default="flattery", help="bundled quirk, or a name for --dataset")
    parser.add_argument("--dataset", default="", help="JSONL training data (default: the quirk's bundled file)")
    parser.add_argument("--model", default="smollm2-135m", help="base model (ModelSpec name)")
    parser.add_argument("--out", default="", help="adapter directory (default: the organism cache)")
    parser.add_argument("--retrain", default="false", help="true: train even if a matching adapter exists")
    parser.add_argument("--behaviour-prompts", default="32", help="held-out prompts for the behaviour check (0 skips it)")
    parser.add_argument("--max-new-tokens", default="96", help="tokens generated per behaviour prompt")
    parser.add_argument("--experiment-name", default="organisms",
                        help="experiment for a run started outside `mlflow run`")
    for name in ("rank", "alpha", "dropout", "lr", "epochs", "batch-size", "max-tokens", "seed",
                 "target-modules", "device", "dtype"):
        parser.add_argument(f"--{name}", default="", help=f"train.{name.replace('-', '_')} (default: the recipe's)")
    return parser.parse_args(argv)


def _number(flag: str, text: str, kind: type) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise LmlabError(f"--{flag} must be a number, got {text!r}") from None
    if kind is int:
        if not value.is_integer():
            raise LmlabError(f"--{flag} must be an integer, got {text!r}")
        return int(value)
    return value


def _true(flag: str, text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise LmlabError(f"--{flag} must be true or false, got {text!r}")
    return text.lower() == "true"


def train_config(args: argparse.Namespace):  # -> TrainConfig
    from lmlab.diffing.train import TrainConfig

    raw: dict = {}
    for flag, kind in (("rank", int), ("alpha", float), ("dropout", float), ("lr", float),
                       ("epochs", int), ("batch-size", int), ("max-tokens", int), ("seed", int)):
        text = getattr(args, flag.replace("-", "_"))
        if text != "":
            raw[flag.replace("-", "_")] = _number(flag, text, kind)
    if args.target_modules:
        raw["target_modules"] = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    for flag in ("device", "dtype"):
        if getattr(args, flag):
            raw[flag] = getattr(args, flag)
    return TrainConfig.from_dict(raw)


@exit_cleanly_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lmlab.diffing.organisms import OrganismRequest, train_organism_run
    from lmlab.models import ModelSpec
    from lmlab.runtime import RuntimeSpec, apply_threads
    from lmlab.sweeps.runner import mark_run_failed

    try:
        prompts = _number("behaviour-prompts", args.behaviour_prompts, int)
        max_new = _number("max-new-tokens", args.max_new_tokens, int)
        if prompts < 0 or max_new < 1:
            raise LmlabError("--behaviour-prompts must be >= 0 and --max-new-tokens >= 1")
        request = OrganismRequest(
            quirk=args.quirk, base=ModelSpec(name=args.model), config=train_config(args),
            dataset=Path(args.dataset) if args.dataset else None,
            out=Path(args.out) if args.out else None, retrain=_true("retrain", args.retrain),
            behaviour_prompts=int(prompts), max_new_tokens=int(max_new))
        threads, source = apply_threads(RuntimeSpec())
        print(f"torch threads: {threads} ({source})")
        outcome = train_organism_run(request, experiment_name=args.experiment_name)
    except LmlabError as error:
        mark_run_failed(str(error))
        raise
    print(f"run {outcome.run_id}: adapter {outcome.adapter_dir} ({outcome.source})")


if __name__ == "__main__":
    main(sys.argv[1:])
