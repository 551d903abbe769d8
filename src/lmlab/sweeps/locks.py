"""Per-condition claim files so several local workers never compute the same condition."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmlab.tracking import owner_is_dead, owner_tags


class ConditionLock:
    """``<dir>/<key>.lock`` created exclusively; a lock whose owner process died is taken over."""

    def __init__(self, directory: Path, key: str) -> None:
        self.path = Path(directory) / f"{key}.lock"

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._owner_dead():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(owner_tags(), handle)
            return True
        return False

    def held_by_other(self) -> bool:
        return self.path.exists() and not self._owner_dead()

    def _owner_dead(self) -> bool:
        try:
            tags = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return True
        return owner_is_dead(tags) and tags != owner_tags()

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
