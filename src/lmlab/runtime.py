"""Process-wide runtime settings: how many CPU threads torch may use.

On a shared machine the default (every logical core) oversubscribes: a forward pass was
measured 4x slower. lmlab sets one thread count for the whole run, from (first match)
the ``LMLAB_THREADS`` environment variable, the spec's ``runtime.threads``, or the
number of physical cores this process may run on. The count is logged on the run.
Threads never change a result, so they are not part of any condition key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from lmlab.errors import LmlabError

THREADS_ENV = "LMLAB_THREADS"


@dataclass(frozen=True)
class RuntimeSpec:
    """``runtime:`` in a spec. threads: CPU threads for torch (default: physical cores)."""

    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool)
                                         or not isinstance(self.threads, int) or self.threads < 1):
            raise LmlabError(f"runtime.threads must be a positive integer, got {self.threads!r}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "RuntimeSpec":
        from lmlab.config import from_mapping

        return from_mapping(cls, raw, "runtime")


def physical_cores() -> int:
    """Physical cores available to this process (affinity and cgroup masks respected)."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        physical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = physical
    return max(1, min(physical, allowed))


def resolve_threads(spec: RuntimeSpec) -> tuple[int, str]:
    """(thread count, where it came from)."""
    raw = os.environ.get(THREADS_ENV)
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise LmlabError(f"{THREADS_ENV} must be a positive integer, got {raw!r}") from None
        if value < 1:
            raise LmlabError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
        return value, THREADS_ENV
    if spec.threads is not None:
        return spec.threads, "runtime.threads"
    return physical_cores(), "physical cores"


def apply_threads(spec: RuntimeSpec) -> tuple[int, str]:
    """Set torch's intra-op thread count for this process; return (count, source)."""
    import torch

    threads, source = resolve_threads(spec)
    torch.set_num_threads(threads)
    return threads, source
