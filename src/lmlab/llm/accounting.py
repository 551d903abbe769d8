"""Every model call recorded once: tokens, stop reason, latency, cost and its source.

A :class:`Ledger` sums the calls of one process by role (subject, judge), enforces the
budget cap, renders the live progress line and flattens totals into run metrics.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lmlab.errors import LmlabError

CostSource = Literal["provider", "price_table", "none"]
Role = Literal["subject", "judge"]


@dataclass(frozen=True)
class CallRecord:
    """One completed model call (one row of a batch counts as one call)."""

    role: Role
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    stop_reason: str
    latency_s: float
    cost_usd: float
    cost_source: CostSource
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BudgetExceeded(LmlabError):
    """The budget cap was reached; finished rows are kept and a re-run resumes."""


class Ledger:
    """Thread-safe totals of the calls made by this process, with an optional budget."""

    def __init__(self, budget_usd: float | None = None) -> None:
        self.budget_usd = budget_usd
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self.totals: dict[str, dict[str, float]] = {}
        self.sources: set[str] = set()
        self.retries = 0

    def record(self, call: CallRecord) -> None:
        with self._lock:
            total = self.totals.setdefault(call.role, dict.fromkeys(
                ("calls", "prompt_tokens", "completion_tokens", "reasoning_tokens",
                 "cost_usd", "latency_s"), 0.0))
            total["calls"] += 1
            total["prompt_tokens"] += call.prompt_tokens
            total["completion_tokens"] += call.completion_tokens
            total["reasoning_tokens"] += call.reasoning_tokens
            total["cost_usd"] += call.cost_usd
            total["latency_s"] += call.latency_s
            self.sources.add(call.cost_source)

    def note_retry(self) -> None:
        with self._lock:
            self.retries += 1

    @property
    def spent_usd(self) -> float:
        with self._lock:
            return sum(t["cost_usd"] for t in self.totals.values())

    def check_budget(self) -> None:
        """Raise BudgetExceeded before a new call once the cap is reached."""
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
            raise BudgetExceeded(
                f"budget cap of ${self.budget_usd:.4f} reached (spent ${self.spent_usd:.4f}); "
                "finished rows are kept, raise context.subject.budget_usd and rerun to resume")

    def calls(self, role: str | None = None) -> int:
        with self._lock:
            if role is not None:
                return int(self.totals.get(role, {}).get("calls", 0))
            return int(sum(t["calls"] for t in self.totals.values()))

    def tokens_per_minute(self) -> float:
        minutes = max(time.monotonic() - self._start, 1e-6) / 60
        with self._lock:
            tokens = sum(t["prompt_tokens"] + t["completion_tokens"] for t in self.totals.values())
        return tokens / minutes

    def line(self) -> str:
        """The live progress line: calls, tokens, tokens/min, cost and where it came from."""
        with self._lock:
            parts = []
            for role, t in sorted(self.totals.items()):
                parts.append(f"{role} {int(t['calls'])} calls {int(t['prompt_tokens'])}+"
                             f"{int(t['completion_tokens'])} tok")
            sources = "/".join(sorted(self.sources)) or "none"
        spent = self.spent_usd
        return " | ".join(parts + [f"{self.tokens_per_minute():.0f} tok/min",
                                   f"${spent:.4f} ({sources})", f"retries {self.retries}"])

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"calls_made": float(self.calls()),
                                 "tokens_per_min": self.tokens_per_minute(),
                                 "retries": float(self.retries), "cost_usd": self.spent_usd}
        with self._lock:
            for role, t in self.totals.items():
                for name, value in t.items():
                    out[f"{role}_{name}"] = float(value)
        return out


class TokenRateLimiter:
    """Blocks until sending ``tokens`` keeps the last 60 s under ``tokens_per_minute``.

    A single request larger than the whole limit is let through once the window is
    empty, so it waits instead of deadlocking.
    """

    def __init__(self, tokens_per_minute: int | None, window_s: float = 60.0) -> None:
        self.limit = tokens_per_minute
        self.window_s = window_s
        self._sent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.waited_s = 0.0

    def acquire(self, tokens: int, deadline_s: float = 3600.0) -> None:
        if not self.limit:
            return
        start = time.monotonic()
        while True:
            with self._lock:
                now = time.monotonic()
                while self._sent and now - self._sent[0][0] >= self.window_s:
                    self._sent.popleft()
                used = sum(n for _, n in self._sent)
                if used + tokens <= self.limit or not self._sent:
                    self._sent.append((now, tokens))
                    self.waited_s += now - start
                    return
                wait = self.window_s - (now - self._sent[0][0])
            if time.monotonic() - start > deadline_s:
                raise LmlabError("token-per-minute limiter waited over an hour; limit too low?")
            time.sleep(min(max(wait, 0.01), 1.0))
