"""Plan estimates from what conditions really took on this machine.

Each family estimates a condition from reference rates (tokens per second measured once
on some CPU). The real time on another machine, under another load, or with another model
differs by a roughly constant factor, so every computed condition records its wall time
beside that reference estimate, per (host, family, model); the next plan scales the
reference estimate by the measured ratio. A family without a reference estimate (0 s,
such as an API model) is estimated from the measured seconds per work unit instead.

The record is ``<store>/throughput.json`` (one small JSON object, rewritten atomically);
the newest ``WINDOW`` conditions count, so a machine that got faster is seen soon.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

FILE_NAME = "throughput.json"
WINDOW = 50


@dataclass(frozen=True)
class Measured:
    """One condition as it ran: wall seconds, the reference estimate, its work units."""

    seconds: float
    reference_seconds: float
    units: float


def machine_key(host: str, family: str, model: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{host}|{family}|{digest}"


class ThroughputLog:
    def __init__(self, store: Path, key: str) -> None:
        self.path = Path(store) / FILE_NAME
        self.key = key

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def history(self) -> list[Measured]:
        rows = self._read().get(self.key, [])
        out = []
        for row in rows if isinstance(rows, list) else []:
            try:
                out.append(Measured(float(row[0]), float(row[1]), float(row[2])))
            except (TypeError, ValueError, IndexError):
                continue  # a hand-edited or truncated entry: the others still count
        return out

    def record(self, measured: Measured) -> None:
        if not math.isfinite(measured.seconds) or measured.seconds <= 0:
            return
        data = self._read()
        rows = [[m.seconds, m.reference_seconds, m.units] for m in [*self.history(), measured]]
        data[self.key] = [[round(x, 4) for x in r] for r in rows[-WINDOW:]]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".throughput-")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, self.path)


def scaled_estimate(history: list[Measured], reference_seconds: float, units: float) -> float | None:
    """Seconds for work with this reference estimate and units, from ``history``; None when
    nothing comparable was measured."""
    with_reference = [m for m in history if m.reference_seconds > 0]
    if reference_seconds > 0 and with_reference:
        ratio = sum(m.seconds for m in with_reference) / sum(m.reference_seconds for m in with_reference)
        return reference_seconds * ratio
    with_units = [m for m in history if m.units > 0]
    if units > 0 and with_units:
        return units * sum(m.seconds for m in with_units) / sum(m.units for m in with_units)
    return None


def duration(seconds: float) -> str:
    """``42 s`` below a minute and a half, else ``3.4 min``."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
