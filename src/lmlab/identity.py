"""What a result depends on, as one record: the identity of a condition.

A condition is reused only when everything that can change its result is the same:

* the model: name, resolved dtype and device type (``dtype: auto`` is bfloat16 on a GPU
  and float32 on a CPU), quantization, and the weights themselves (a content digest of a
  local directory or of the embedded GGUF file, the commit of a Hub snapshot), plus the
  adapter's digest or revision;
* the data: a content digest of every file or folder the condition reads, so editing a
  prompt file or removing an essay at the same path makes new keys;
* the family's result-changing settings (each family names its operational ones, such as
  batch sizes and thread counts, which are left out) and the condition's params;
* the lmlab version, so results of older scoring code are not mixed with newer ones.

Digests of large files are memoised on disk by (path, size, mtime), so hashing a
multi-gigabyte checkpoint happens once, not at every sweep start.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from lmlab import __version__
from lmlab.errors import LmlabError

DIGEST_CHARS = 16
_CHUNK = 1 << 20
_memo: dict[tuple[str, int, int], str] = {}


def _memo_path() -> Path:
    from lmlab.models import cache_root

    return cache_root() / "digests.json"


def _load_disk_memo() -> dict[str, str]:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_disk_memo(memo: Mapping[str, str]) -> None:
    from lmlab.cache import atomic_write_bytes

    try:
        atomic_write_bytes(_memo_path(), json.dumps(dict(memo)).encode())
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised by path, size and modification time)."""
    path = Path(path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as error:
        raise LmlabError(f"cannot read {path}: {error.strerror}") from error
    signature = (str(path), stat.st_size, stat.st_mtime_ns)
    if signature in _memo:
        return _memo[signature]
    big = stat.st_size > 64 * _CHUNK
    disk_key = "|".join(map(str, signature))
    if big:
        known = _load_disk_memo().get(disk_key)
        if known:
            _memo[signature] = known
            return known
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()[:DIGEST_CHARS]
    _memo[signature] = value
    if big:
        memo = _load_disk_memo()
        memo[disk_key] = value
        _save_disk_memo(memo)
    return value


def folder_digest(path: str | Path, ignore: Iterable[str] = (".git", "__pycache__")) -> str:
    """Digest over every file below ``path``: relative names and contents, sorted."""
    root = Path(path).expanduser().resolve()
    skipped = set(ignore)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if skipped & set(relative.parts) or relative.name.startswith(".~"):
            continue
        digest.update(str(relative).encode() + b"\0" + file_digest(file).encode() + b"\n")
    return digest.hexdigest()[:DIGEST_CHARS]


def path_digest(path: str | Path) -> str:
    """Content digest of a file or a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        return folder_digest(path)
    if path.is_file():
        return file_digest(path)
    raise LmlabError(f"data not found: {path}")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def digest_of(value: Any) -> str:
    """Stable digest of a JSON-serialisable value (dict keys sorted)."""
    from lmlab.tracking import canonical_value

    payload = json.dumps(canonical_value(value), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:DIGEST_CHARS]


# ---------------------------------------------------------------- settings


def strip_operational(settings: Mapping[str, Any], operational: Iterable[str]) -> dict[str, Any]:
    """A copy of ``settings`` without the operational keys (dotted paths reach into
    nested mappings: ``generation.batch_size``)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in settings.items()}
    for dotted in operational:
        head, _, rest = dotted.partition(".")
        if head not in out:
            continue
        if not rest:
            out.pop(head)
        elif isinstance(out[head], Mapping):
            out[head] = strip_operational(out[head], [rest])
    return out


# ---------------------------------------------------------------- the model


def _hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit a Hub id resolves to in the local cache, or the requested name."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
        return Path(folder).name
    except Exception:  # not cached, offline, or not a Hub id: fall back to the name
        return f"{revision or 'main'} (unresolved)"


def _weights_identity(location: str, revision: str | None = None) -> dict[str, str]:
    path = Path(location).expanduser()
    if path.is_dir():
        return {"weights_digest": folder_digest(path)}
    if path.is_file():
        return {"weights_digest": file_digest(path)}
    return {"revision": _hub_revision(location, revision)}


def model_identity(spec: Any) -> dict[str, Any]:
    """Everything about the model that can change a result, without loading it."""
    from lmlab.models import EMBEDDED_NAME, TINY_PREFIX, embedded_gguf_path, resolve_device, \
        resolve_dtype

    device = resolve_device(spec.device)
    ident: dict[str, Any] = {
        "name": spec.name, "quantization": spec.quantization,
        "dtype": str(resolve_dtype(spec.dtype, device)).removeprefix("torch."),
        "device_type": device.type,
    }
    if spec.name.startswith(TINY_PREFIX):
        ident["weights"] = "random init (seeded)"
    elif spec.name == EMBEDDED_NAME:
        ident["weights_digest"] = file_digest(embedded_gguf_path())
    else:
        ident.update(_weights_identity(spec.name, getattr(spec, "revision", None)))
    if spec.adapter:
        adapter = _weights_identity(spec.adapter)
        ident["adapter"] = {"name": spec.adapter, **adapter}
    return ident


# ---------------------------------------------------------------- the condition


def condition_identity(family: str, model: Mapping[str, Any], data: Mapping[str, str],
                       settings: Any, params: Mapping[str, Any], test_mode: bool = False,
                       ) -> dict[str, Any]:
    """The record a condition key hashes. ``data`` maps each input's name to its digest."""
    identity = {"family": family, "lmlab": __version__, "model": dict(model),
                "data": dict(sorted(data.items())), "settings": settings, "params": dict(params)}
    if test_mode:  # test-mode results never stand in for full-run ones
        identity["test_mode"] = True
    return identity

