"""Colour a text's tokens by a registered probe: ``mlflow run . -e probe_view -P text=...``.

Inputs: a registered probe (``--name``, default ``probe-backtracking-smollm2-135m``, and
``--alias``, default ``champion``), the text to score (``--text`` or ``--text-file``) and the
problem it answers (``--problem``). Output: ``probe_view.html`` (shaded tokens), written to
``--out`` and logged as an artifact of the active MLflow run (unless ``--no-log``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  (puts src/ on the path when lmlab is not installed)
from lmlab.errors import ArgumentParser, LmlabError, exit_cleanly_on_user_error

DEFAULT_TEXT = ("Let me compute 7 times 8. That is 54. Wait, that's not right: 7 times 8 is 56.\n\n"
                "So the answer is 56.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="probe-backtracking-smollm2-135m",
                        help="registered model name (probe-<label>-<model>)")
    parser.add_argument("--alias", default="champion", help="registered model alias")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="reasoning text to score")
    parser.add_argument("--text-file", default=None, help="read the text from this file instead")
    parser.add_argument("--problem", default="What is 7 times 8?", help="problem the text answers")
    parser.add_argument("--out", default="probe_view.html", help="where to write the HTML page")
    parser.add_argument("--no-log", action="store_true", help="do not log the page to MLflow")
    return parser.parse_args(argv)


def read_text(args: argparse.Namespace) -> str:
    """The text to score (checked before the slow imports, so a typo fails at once)."""
    text = args.text
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise LmlabError(f"text file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise LmlabError(f"text file {path} is not UTF-8 text") from None
    if not text.strip():
        raise LmlabError("the text to score is empty")
    return text


@exit_cleanly_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    text = read_text(args)
    import mlflow

    from lmlab.models import ModelSpec, load_model
    from lmlab.probes.registry import load_registered
    from lmlab.probes.view import probe_metadata, render_html, score_text

    probe = load_registered(args.name, args.alias)
    meta = probe_metadata(probe)
    lm = load_model(ModelSpec(name=str(meta["model"])))
    if meta.get("model_identity") and meta["model_identity"] != lm.identity:
        raise LmlabError(f"probe {args.name}@{args.alias} was trained on model identity "
                         f"{meta['model_identity']}, but {meta['model']!r} loads as {lm.identity}")
    scored = score_text(lm, probe, text, args.problem)
    out = Path(args.out)
    out.write_text(render_html(scored, f"{args.name}@{args.alias}"), encoding="utf-8")
    print(f"wrote {out} ({len(scored.pieces)} tokens, max p={scored.scores.max():.3f})")
    if not args.no_log:
        with mlflow.start_run():  # resumes the run `mlflow run` created (MLFLOW_RUN_ID)
            mlflow.log_artifact(str(out))
            mlflow.set_tags({"probe": f"{args.name}@{args.alias}", "lmlab.role": "probe_view"})


if __name__ == "__main__":
    main(sys.argv[1:])
