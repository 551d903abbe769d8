"""The activation store every family uses: residuals of tokenized items on disk,
resumable per item.

An item is anything with ``task_id`` (its id), ``input_ids`` (a 1-D integer array),
``n_tokens`` and ``ids_hash`` (a probes chain, a diffing response); an optional
``store_from`` keeps only the tokens from that index on (a response without its prompt),
though the model still reads the whole item.

Layout under ``root/<key>/`` where ``key`` hashes (model identity, dataset digest, layers,
dtype and, for projections, the projection's key)::

    cache.json                      what the cache holds (written first)
    shards/<name>.safetensors       one shard per batch: "<item id>/<layer>" -> (tokens, width)
    manifest/<name>.json            that shard's items: id, n_tokens, store_from, ids_hash, layers

A shard is written atomically before its manifest, so an item listed in a manifest is
complete; an interrupted extraction resumes at the first item no manifest lists. Stored
tensors are cloned first, so a token at a layer takes exactly width x dtype-size bytes
(a view would drag the whole batch's storage into the file). MLflow gets ``cache.json``
and the merged manifest, never the tensors.

Stream-through: given a :class:`Projection`, the store keeps the projection of each
token (float32, one column per output) instead of the raw residual, so raw activations
never reach the disk.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lmlab.cache import atomic_write_bytes, content_key
from lmlab.errors import LmlabError
from lmlab.hooks import capture_residuals, check_layers
from lmlab.models import LoadedModel

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Headroom over the planned size for safetensors headers and the filesystem.
_DISK_MARGIN = 1.1
#: Forward tokens per second used for the time printed before a launch: the embedded
#: model (SmolLM2-135M, all 30 layers) on a shared 2-core CPU (probes measured 120-360).
DEFAULT_TOKENS_PER_S = 240.0


class Item(Protocol):
    """What the store captures: one token sequence with a stable id."""

    task_id: str
    input_ids: np.ndarray

    @property
    def n_tokens(self) -> int: ...

    @property
    def ids_hash(self) -> str: ...


class Projection(Protocol):
    """A per-layer map from residuals (tokens, width) to outputs (tokens, n_outputs)."""

    key: str  # content identity (vectors, normalisation): part of the cache key
    n_outputs: int

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor: ...


def ids_hash(ids: Sequence[int] | np.ndarray) -> str:
    """The hash every store and replay check compares: sha256 of the int64 ids."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def store_from(item: Item) -> int:
    return int(getattr(item, "store_from", 0) or 0)


def stored_tokens(item: Item) -> int:
    return item.n_tokens - store_from(item)


@dataclass(frozen=True)
class ExtractionConfig:
    """Which layers to capture and how to store them.

    layers: block outputs to keep (layer L = hidden_states[L + 1], see lmlab.hooks).
    dtype: storage precision, float16 or bfloat16 (half the bytes of float32).
    batch_size: chains per forward pass and per shard.
    """

    layers: tuple[int, ...]
    dtype: str = "float16"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.layers:
            raise LmlabError("extraction needs at least one layer")
        if any(not isinstance(layer, int) or isinstance(layer, bool) for layer in self.layers):
            raise LmlabError(f"layers must be integers, got {list(self.layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise LmlabError(f"layers must not repeat, got {list(self.layers)}")
        if self.dtype not in DTYPES:
            raise LmlabError(f"activation dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise LmlabError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes_per_value(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass
class ExtractionReport:
    key: str
    directory: Path
    planned_bytes: int
    n_extracted: int
    n_reused: int
    tokens_extracted: int
    seconds: float
    forward_passes: int = 0

    def to_dict(self) -> dict[str, float | int | str]:
        return {"activation_cache_key": self.key, "activation_planned_bytes": self.planned_bytes,
                "activation_items_extracted": self.n_extracted,
                "activation_items_reused": self.n_reused,
                "activation_tokens_extracted": self.tokens_extracted,
                "activation_seconds": round(self.seconds, 3)}


@dataclass
class ActivationCache:
    """A finished cache directory: item manifest and per-layer reads."""

    directory: Path
    info: dict
    items: dict[str, dict] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.directory.name

    @property
    def layers(self) -> list[int]:
        return list(self.info["layers"])

    def manifest(self) -> dict:
        return {**self.info, "items": [self.items[k] for k in sorted(self.items)]}

    def layer(self, layer: int, chains: Sequence[Item]) -> list[np.ndarray]:
        """float32 ``(stored tokens, width)`` of ``layer`` for each item, in order (width:
        the residual width, or the projection's outputs)."""
        from safetensors import safe_open

        if layer not in self.info["layers"]:
            raise LmlabError(f"layer {layer} is not in the activation cache "
                             f"(cached: {self.info['layers']})")
        by_shard: dict[str, list[int]] = {}
        for index, chain in enumerate(chains):
            entry = self.items.get(chain.task_id)
            if entry is None or entry["ids_hash"] != chain.ids_hash:
                raise LmlabError(f"item {chain.task_id} is missing or stale in the activation "
                                 f"cache {self.directory}")
            by_shard.setdefault(entry["shard"], []).append(index)
        out: list[np.ndarray | None] = [None] * len(chains)
        for shard, indices in by_shard.items():
            with safe_open(str(self.directory / "shards" / f"{shard}.safetensors"), "pt") as fh:
                for index in indices:
                    chain = chains[index]
                    tensor = fh.get_tensor(f"{chain.task_id}/{layer}")
                    if tensor.shape[0] != stored_tokens(chain):
                        raise LmlabError(f"chain {chain.task_id}: {tensor.shape[0]} cached "
                                         f"activations for {stored_tokens(chain)} tokens")
                    out[index] = tensor.float().numpy()
        return out  # type: ignore[return-value]


def cache_key(lm: LoadedModel, dataset_digest: str, config: ExtractionConfig,
              projection: Projection | None = None) -> str:
    if projection is None:
        return content_key("activations", lm.identity, dataset_digest, sorted(config.layers),
                           config.dtype)
    return content_key("projections", lm.identity, dataset_digest, sorted(config.layers),
                       projection.key)


def _row_bytes(lm: LoadedModel, config: ExtractionConfig, projection: Projection | None) -> int:
    """Bytes one token takes at one layer: width x dtype size (float32 outputs projected)."""
    if projection is None:
        return lm.hidden_size * config.bytes_per_value
    return projection.n_outputs * 4


def planned_bytes(chains: Sequence[Item], lm: LoadedModel, config: ExtractionConfig,
                  projection: Projection | None = None) -> int:
    tokens = sum(stored_tokens(chain) for chain in chains)
    return tokens * len(config.layers) * _row_bytes(lm, config, projection)


def _read_items(directory: Path) -> dict[str, dict]:
    items: dict[str, dict] = {}
    for path in sorted((directory / "manifest").glob("*.json")):
        for entry in json.loads(path.read_text()):
            items[entry["id"]] = entry
    return items


def _is_done(entry: dict | None, item: Item) -> bool:
    return entry is not None and entry.get("ids_hash") == item.ids_hash \
        and entry.get("store_from", 0) == store_from(item)


def _reusable(root: Path, info: dict, chains: Sequence[Item]) -> Path | None:
    """A finished cache of the same model, data and dtype whose layers cover ``info``'s."""
    for candidate in sorted(root.glob("*/cache.json")):
        other = json.loads(candidate.read_text())
        same = all(other.get(k) == info.get(k)
                   for k in ("model", "dataset_digest", "dtype", "width", "projection"))
        if same and set(info["layers"]) <= set(other["layers"]):
            items = _read_items(candidate.parent)
            if all(_is_done(items.get(c.task_id), c) for c in chains):
                return candidate.parent
    return None


def _batches(chains: Sequence[Item], size: int) -> Iterator[list[Item]]:
    # Similar lengths per batch waste less compute on padding.
    ordered = sorted(chains, key=lambda chain: (chain.n_tokens, chain.task_id))
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


def _right_padded(batch: Sequence[Item], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Right padding keeps every real token at its true position without position_ids,
    # and causal attention never lets a real token see the pads after it.
    width = max(chain.n_tokens for chain in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, chain in enumerate(batch):
        ids[row, :chain.n_tokens] = torch.as_tensor(np.asarray(chain.input_ids, dtype=np.int64))
        mask[row, :chain.n_tokens] = 1
    return ids, mask


def _write_shard(directory: Path, batch: Sequence[Item], captured: dict[int, torch.Tensor],
                 dtype: torch.dtype, projection: Projection | None = None) -> None:
    from safetensors.torch import save

    name = content_key([chain.task_id for chain in batch], [c.ids_hash for c in batch],
                       [store_from(c) for c in batch])
    tensors: dict[str, torch.Tensor] = {}
    for row, chain in enumerate(batch):
        for layer, hidden in captured.items():
            kept = hidden[row, store_from(chain):chain.n_tokens]
            if projection is not None:
                kept = projection(layer, kept.float()).float()
            # clone(): a view would be saved with the whole batch's storage.
            tensors[f"{chain.task_id}/{layer}"] = kept.to(dtype if projection is None
                                                          else torch.float32).clone().contiguous()
    atomic_write_bytes(directory / "shards" / f"{name}.safetensors", save(tensors))
    entries = [{"id": chain.task_id, "n_tokens": chain.n_tokens, "store_from": store_from(chain),
                "ids_hash": chain.ids_hash, "shard": name, "layers": sorted(captured)}
               for chain in batch]
    atomic_write_bytes(directory / "manifest" / f"{name}.json", json.dumps(entries).encode())


def check_disk(directory: Path, needed: int) -> None:
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * _DISK_MARGIN > free:
        raise LmlabError(f"activation cache needs {needed / 1e9:.2f} GB (+10% margin) but only "
                         f"{free / 1e9:.2f} GB is free at {probe}; free space, reduce layers or "
                         "chains, or set LMLAB_STORE_DIR elsewhere")


def _info(lm: LoadedModel, dataset_digest: str, config: ExtractionConfig,
          projection: Projection | None) -> dict:
    info = {"model": lm.identity, "model_name": lm.spec.name, "dataset_digest": dataset_digest,
            "layers": sorted(config.layers), "dtype": config.dtype, "width": lm.hidden_size,
            "layer_convention": "layer L = output of decoder block L = hidden_states[L + 1]"}
    if projection is not None:
        info.update(dtype="float32", width=projection.n_outputs, projection=projection.key,
                    residual_width=lm.hidden_size)
    return info


def plan_line(directory: Path, chains: Sequence[Item], todo: Sequence[Item], lm: LoadedModel,
              config: ExtractionConfig, projection: Projection | None,
              tokens_per_second: float, unit: str = "items") -> str:
    """Size and time of an extraction, printed before it starts."""
    stored = sum(stored_tokens(chain) for chain in chains)
    row = _row_bytes(lm, config, projection)
    width = f"{projection.n_outputs} projections" if projection else f"{lm.hidden_size} width"
    dtype_bytes = 4 if projection else config.bytes_per_value
    seconds = sum(chain.n_tokens for chain in todo) / tokens_per_second
    return (f"lmlab: activation cache {directory}: {stored} tokens x {len(config.layers)} layers x "
            f"{width} x {dtype_bytes} bytes = {stored * len(config.layers) * row / 1e6:.1f} MB "
            f"({len(chains) - len(todo)} of {len(chains)} {unit} already cached); about "
            f"{seconds:.0f} s for the rest at {tokens_per_second:.0f} tokens/s")


def extract(lm: LoadedModel, chains: Sequence[Item], dataset_digest: str,
            config: ExtractionConfig, root: Path, log: bool = True,
            projection: Projection | None = None,
            tokens_per_second: float = DEFAULT_TOKENS_PER_S, unit: str = "chains",
            ) -> tuple[ActivationCache, ExtractionReport]:
    """Capture every requested layer for every item, reusing finished items and caches.

    With ``projection``, each token's projection is stored instead of its residual.
    ``unit`` names the items in the printed plan (the probes family's chains by default)."""
    check_layers(lm, config.layers)
    if not chains:
        raise LmlabError("no items to extract activations for")
    start = time.perf_counter()
    info = _info(lm, dataset_digest, config, projection)
    key = cache_key(lm, dataset_digest, config, projection)
    planned = planned_bytes(chains, lm, config, projection)
    reused_dir = _reusable(Path(root), info, chains)
    directory = reused_dir or Path(root) / key
    done = _read_items(directory) if directory.exists() else {}
    todo = [c for c in chains if not _is_done(done.get(c.task_id), c)]
    todo_bytes = planned_bytes(todo, lm, config, projection)
    if log:
        print(plan_line(directory, chains, todo, lm, config, projection, tokens_per_second, unit))
    if reused_dir is not None:
        cache = ActivationCache(reused_dir, json.loads((reused_dir / "cache.json").read_text()), done)
        return cache, ExtractionReport(reused_dir.name, reused_dir, planned, 0, len(chains), 0,
                                       time.perf_counter() - start)
    if todo:
        check_disk(directory, todo_bytes)
    atomic_write_bytes(directory / "cache.json", json.dumps(info, indent=1).encode())
    passes = tokens_done = 0
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batches = list(_batches(todo, config.batch_size))
    for batch in tqdm(batches, desc="activations", unit="batch", disable=not log or not batches):
        ids, mask = _right_padded(batch, pad_id)
        # Projections read the residual at the model's precision; raw storage casts once.
        captured = capture_residuals(lm, ids, mask, list(config.layers),
                                     dtype=None if projection else config.torch_dtype)
        for layer, hidden in captured.items():
            if hidden.shape[:2] != ids.shape:
                raise LmlabError(f"layer {layer}: activations {tuple(hidden.shape[:2])} do not "
                                 f"match input ids {tuple(ids.shape)}")
        _write_shard(directory, batch, {layer: t.cpu() for layer, t in captured.items()},
                     config.torch_dtype, projection)
        passes += 1
        tokens_done += int(mask.sum())
    cache = ActivationCache(directory, info, _read_items(directory))
    report = ExtractionReport(key, directory, planned, len(todo), len(chains) - len(todo),
                              tokens_done, time.perf_counter() - start, passes)
    return cache, report


def stored_data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its JSON header)."""
    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
    return path.stat().st_size - 8 - header_len
