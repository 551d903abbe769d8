"""The row store: one row per cell, the checkpoint of every context run.

A cell is one request to one subject model: its id hashes the compact recipe (what
rebuilds the prompt), the subject's identity and the decoding settings, so test mode,
a re-run or a resumed run that asks the same question finds the same row. Rows live in
SQLite (one transaction per write, so a killed process leaves whole rows only); a
finished row is never replaced by a new call, and an errored row is retried.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from lmlab.cache import content_key
from lmlab.errors import LmlabError

# Statuses that mean "this cell is answered for good": never sent again.
FINISHED = frozenset({"done", "truncated", "over_context"})
STATUSES = FINISHED | {"error"}


def cell_id(recipe: Mapping[str, Any], subject: Mapping[str, Any],
            decoding: Mapping[str, Any]) -> str:
    """Identity of one request: recipe x subject model x decoding settings."""
    return content_key({"recipe": dict(recipe), "subject": dict(subject),
                        "decoding": dict(decoding)})


class RowStore:
    """SQLite table ``rows(cell_id primary key, status, task, updated, body JSON)``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS rows (cell_id TEXT PRIMARY KEY, "
                             "status TEXT NOT NULL, task TEXT, updated REAL, body TEXT NOT NULL)")
        except sqlite3.DatabaseError as error:
            raise LmlabError(f"row store {self.path} is not a usable SQLite file: {error}") from error

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "RowStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = list(dict.fromkeys(ids))
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for key, body in self._db.execute(
                        f"SELECT cell_id, body FROM rows WHERE cell_id IN ({marks})", chunk):
                    found[key] = json.loads(body)
        return found

    def finished(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.get(ids).items() if v.get("status") in FINISHED}

    def put(self, row: Mapping[str, Any]) -> None:
        """Write one row; an existing finished row is only updated by a finished row."""
        status = row.get("status")
        if status not in STATUSES or not row.get("cell_id"):
            raise ValueError(f"row needs a cell_id and a status in {sorted(STATUSES)}")
        body = json.dumps(dict(row), sort_keys=True, default=str)
        with self._lock:
            self._db.execute(
                "INSERT INTO rows (cell_id, status, task, updated, body) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(cell_id) DO UPDATE SET status=excluded.status, task=excluded.task, "
                "updated=excluded.updated, body=excluded.body "
                "WHERE rows.status = 'error' OR excluded.status != 'error'",
                (row["cell_id"], status, row.get("task"), time.time(), body))

    def count(self, status: str | None = None) -> int:
        with self._lock:
            if status is None:
                return int(self._db.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM rows WHERE status = ?",
                                        (status,)).fetchone()[0])

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(body) for (body,) in self._db.execute("SELECT body FROM rows")]
