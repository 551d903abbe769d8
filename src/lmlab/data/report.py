"""What a loader did with a file: rows read, kept, and dropped by reason.

Every loader returns one :class:`DataReport` per input beside its rows. The sweep prints
its line, logs its counts as metrics and logs the input on every child run with
``mlflow.data``, so the UI's Datasets column shows exactly what a run read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_EXAMPLES = 3  # locations kept per drop reason


@dataclass
class DataReport:
    """One input of a sweep.

    name: the role of the input in the family (``harm_test``, ``haystack``, ``chains``).
    source: the path (or ``bundled:<name>``) as the user wrote it.
    digest: content digest of the file or folder (see :mod:`lmlab.identity`).
    rows_read: records found in the file; rows_kept: records the family will use.
    dropped: records left out, by reason (``duplicate``, ``empty``, ``malformed``, ...).
    requested: how many records the settings asked for, when that is a fixed number.
    unit: what a row is (``prompts``, ``chains``, ``files``...).
    notes: sentences the user should read (which column was used, ids made unique...).
    examples: where the first few dropped records of each reason were (``line 7``), so the
    console line says what to fix in the file.

    A reason dropped 0 times is kept (``drop(reason, 0)``) and logged as a 0 metric, so a
    run shows that the check ran; the console line shows only reasons that dropped rows.
    """

    name: str
    source: str
    digest: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    requested: int | None = None
    unit: str = "rows"
    notes: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, count: int = 1, where: str | None = None) -> None:
        self.dropped[reason] += count
        if where is None or not count:
            return
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)

    @property
    def shortfall(self) -> int:
        """Rows asked for but not available (0 when the file had enough)."""
        if self.requested is None:
            return 0
        return max(self.requested - self.rows_kept, 0)

    def summary(self) -> str:
        """Counts in words: ``12 prompts read, 9 kept, dropped 2 empty (line 3, line 8), ...``."""
        text = f"{self.rows_read} {self.unit} read, {self.rows_kept} kept"
        dropped = [self._dropped_words(reason, n)
                   for reason, n in sorted(self.dropped.items()) if n]
        return text + (f", dropped {', '.join(dropped)}" if dropped else "")

    def _dropped_words(self, reason: str, count: int) -> str:
        where = self.examples.get(reason, [])
        if not where:
            return f"{count} {reason}"
        more = ", ..." if count > len(where) else ""
        return f"{count} {reason} ({', '.join(where)}{more})"

    def line(self) -> str:
        """One console line: what was read and what happened to it."""
        text = f"data {self.name}: {self.source} ({self.digest}): {self.summary()}"
        if self.requested is not None:
            text += f"; {self.requested} requested"
        return text

    def warnings(self) -> list[str]:
        """Lines to print after :meth:`line`: the notes, then a shortfall warning."""
        out = [f"note: {self.name}: {note}" for note in self.notes]
        if self.shortfall:
            out.append(f"warning: {self.name} asked for {self.requested} {self.unit} but "
                       f"{self.source} has only {self.rows_kept} usable ({self.summary()}); "
                       f"using {self.rows_kept}, {self.shortfall} short")
        return out

    def metrics(self) -> dict[str, float]:
        prefix = f"data/{self.name}"
        out = {f"{prefix}/rows_read": float(self.rows_read),
               f"{prefix}/rows_kept": float(self.rows_kept)}
        out.update({f"{prefix}/dropped_{reason}": float(n) for reason, n in self.dropped.items()})
        if self.requested is not None:
            out[f"{prefix}/requested"] = float(self.requested)
            out[f"{prefix}/shortfall"] = float(self.shortfall)
        return out

    def profile(self) -> dict[str, Any]:
        """The summary MLflow stores with the dataset (shown in the run's Datasets)."""
        return {"rows_read": self.rows_read, "rows_kept": self.rows_kept,
                "duplicates_removed": int(self.dropped.get("duplicate", 0)),
                "dropped": dict(self.dropped), "dropped_at": self.examples,
                "requested": self.requested, "shortfall": self.shortfall, "unit": self.unit}
