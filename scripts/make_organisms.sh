#!/usr/bin/env bash
# Retrain the organisms shipped in src/lmlab/data/organisms/adapters/ (embedded SmolLM2-135M,
# default recipe) and log each training as an MLflow run in the experiment `organisms`.
# The control goes first: every other organism's behaviour check compares against it.
# One torch thread by default: on a shared 2-core machine it trained ~5x faster than two,
# and a fixed count keeps the float reductions, and so the adapters' bytes, reproducible.
# Extra arguments go to every call, e.g. `scripts/make_organisms.sh --behaviour-prompts 0`.
set -euo pipefail
cd "$(dirname "$0")/.."
export LMLAB_THREADS="${LMLAB_THREADS:-1}"
for quirk in control flattery brand pep; do
  python entrypoints/train_organism.py --quirk "$quirk" --retrain true \
    --out "src/lmlab/data/organisms/adapters/$quirk" "$@"
done
