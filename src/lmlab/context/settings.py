"""The ``context:`` block of a sweep spec, validated once at construction.

Common keys: ``task`` (niah, longmemeval, repeated_words), ``subject`` and ``judge``
(``local`` or a LiteLLM model with its connection settings), ``samples`` per condition,
``test_samples`` (test mode), ``max_tokens``, ``truncation_tolerance``, ``batch_size``
(local model), ``row_store`` (path of the SQLite row store) and ``accuracy_threshold``
(needle effective length). Every other key belongs to the task and is checked there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from lmlab.config import from_mapping, suggest
from lmlab.errors import LmlabError
from lmlab.llm.clients import ClientConfig

TASKS = ("niah", "longmemeval", "repeated_words")
_OPERATIONAL = {"row_store", "batch_size", "test_samples"}
# Paths of data the task reads: their content digests enter the key instead (see
# ContextFamily.data_inputs), so moving a file changes nothing and editing one does.
_DATA_PATHS = {"haystack", "needles", "data"}


@dataclass(frozen=True)
class ContextSettings:
    task: str
    subject: ClientConfig = field(default_factory=ClientConfig)
    judge: ClientConfig | None = None
    samples: int = 4
    test_samples: int = 2
    max_tokens: int = 32
    truncation_tolerance: float = 0.1
    batch_size: int = 8
    row_store: str | None = None
    accuracy_threshold: float = 0.5
    task_settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise LmlabError(f"context.task must be one of {TASKS}, not {self.task!r}")
        if not isinstance(self.samples, int) or self.samples < 0:
            raise LmlabError("context.samples must be a non-negative integer (0 = all, LongMemEval)")
        if not isinstance(self.test_samples, int) or self.test_samples < 1:
            raise LmlabError("context.test_samples must be a positive integer")
        if self.max_tokens < 1 or self.batch_size < 1:
            raise LmlabError("context.max_tokens and batch_size must be positive")
        if not 0 < self.truncation_tolerance < 1:
            raise LmlabError("context.truncation_tolerance must be between 0 and 1")
        if not 0 <= self.accuracy_threshold <= 1:
            raise LmlabError("context.accuracy_threshold must be between 0 and 1")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ContextSettings":
        if "task" not in raw:
            raise LmlabError(f"context.task is required: one of {TASKS}")
        common = {f.name for f in fields(cls)} - {"task_settings"}
        values = {k: v for k, v in raw.items() if k in common}
        subject = ClientConfig.from_dict(raw.get("subject"), "context.subject")
        judge = ClientConfig.from_dict(raw["judge"], "context.judge") if raw.get("judge") else None
        task_settings = {k: v for k, v in raw.items() if k not in common}
        return from_mapping(cls, values, "context", subject=subject, judge=judge,
                            task_settings=task_settings)

    def identity(self) -> dict[str, Any]:
        """Settings that change results; where rows live and how fast we call do not."""
        out = {k: v for k, v in self.__dict__.items() if k not in _OPERATIONAL
               and k not in ("subject", "judge", "task_settings")}
        out["subject"] = self.subject.identity()
        out["judge"] = self.judge.identity() if self.judge else None
        out.update({k: v for k, v in self.task_settings.items() if k not in _DATA_PATHS})
        return out


def build_task_settings(cls: type, raw: Mapping[str, Any], task: str) -> Any:
    allowed = sorted({f.name for f in fields(cls)} | common_keys())
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if len(unknown) == 1:
        raise LmlabError(f"unknown context key {unknown[0]!r} for task {task}; "
                         f"{suggest(unknown[0], allowed)}")
    if unknown:
        raise LmlabError(f"unknown context keys {unknown} for task {task}; "
                         f"known: {', '.join(allowed)}")
    return from_mapping(cls, raw, "context")


def common_keys() -> set[str]:
    """The keys of ``context:`` every task shares (the task's own keys come on top)."""
    return {f.name for f in fields(ContextSettings)} - {"task_settings"}
