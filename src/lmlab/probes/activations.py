"""Moved to :mod:`lmlab.activations` (one activation store for every family); kept as a
re-export so existing imports keep working."""

from lmlab.activations import *  # noqa: F401,F403
from lmlab.activations import _batches, _right_padded  # noqa: F401  (bench_probes uses them)
