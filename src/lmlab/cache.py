"""Content-addressed on-disk cache for generations, directions and activations.

Keys are hashes of everything that determines a result (model identity, inputs,
settings), so a result is reused by any later run or sweep that asks the same question.
Writes are atomic (temp file + rename): a killed process never leaves a half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def content_key(*parts: Any) -> str:
    """Stable hash of JSON-serialisable parts (dict keys sorted)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class DiskCache:
    """JSON and tensor entries under ``root/<namespace>/<key>``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, namespace: str, key: str, suffix: str) -> Path:
        return self.root / namespace / f"{key}{suffix}"

    def get_json(self, namespace: str, key: str) -> Any | None:
        path = self._path(namespace, key, ".json")
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def put_json(self, namespace: str, key: str, value: Any) -> None:
        atomic_write_bytes(self._path(namespace, key, ".json"), json.dumps(value).encode())

    def get_tensors(self, namespace: str, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._path(namespace, key, ".safetensors")
        return load_file(str(path)) if path.is_file() else None

    def put_tensors(self, namespace: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        # clone().contiguous(): views would otherwise drag their whole storage along.
        data = save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()})
        atomic_write_bytes(self._path(namespace, key, ".safetensors"), data)
