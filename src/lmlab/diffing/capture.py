"""Generate, capture, replay: one resident base model, organisms switched as adapters.

* :class:`ResidentBase` holds the base model once per process. Organisms are PEFT
  adapters loaded on it (``load_adapter``) and switched with ``set_adapter``; the clean
  model is the same weights under ``disable_adapter()``. The base is never reloaded.
* :func:`generate_responses` decodes greedily (or samples with one seed per prompt) and
  keeps the generated token ids; each prompt's record is cached by content as soon as its
  batch finishes, so an interrupted run resumes at the first unfinished prompt.
* Capture reads the prefill ``prompt ids + generated ids`` (or stores only the response's
  tokens, ``response_only``); the replay feeds the clean model exactly the same ids.
  :func:`check_replay` compares the token-id hash of every (organism, replay) pair and
  fails loudly on a mismatch; nothing is ever truncated to a shorter length.

Diff conventions, named in every output:

* ``same_text``: organism minus clean model, both reading the organism's tokens, token by
  token;
* ``own_text``: each model reading its own generation (response statistics compared per
  prompt; tokens differ, so there is no per-token difference).
"""

from __future__ import annotations

import datetime as dt
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from lmlab.activations import ids_hash
from lmlab.cache import DiskCache, content_key
from lmlab.diffing.prompt_sets import PromptSet
from lmlab.diffing.variants import Organism
from lmlab.errors import LmlabError
from lmlab.generation import GenerationConfig, generate
from lmlab.identity import folder_digest
from lmlab.models import LoadedModel

CLEAN = "clean"
CONVENTIONS = {
    "same_text": "organism minus clean model, both reading the organism's own tokens, token by token",
    "own_text": "each model reading its own generation; response statistics subtracted prompt by prompt",
}


class ReplayMismatch(LmlabError):
    """The clean replay did not read the organism's token ids."""


class ResidentBase:
    """One base model in memory with organisms as switchable PEFT adapters."""

    def __init__(self, lm: LoadedModel) -> None:
        self.base = lm
        self.peft = None  # the PeftModel wrapping lm.model once the first adapter loads
        self.adapters: dict[str, str] = {}  # organism name -> PEFT adapter name
        self.loads = 0  # adapter loads (the base itself is loaded once, by the caller)

    def add(self, organism: Organism) -> None:
        """Load an organism's adapter on the resident base (once)."""
        if organism.name in self.adapters:
            return
        from peft import PeftModel

        name = f"organism_{len(self.adapters)}"  # PEFT names must be plain identifiers
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base.model, str(organism.adapter),
                                                      adapter_name=name, is_trainable=False)
                self.peft.eval()
            else:
                self.peft.load_adapter(str(organism.adapter), adapter_name=name, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise LmlabError(f"organism {organism.name!r}: adapter {organism.adapter} could not "
                             f"be loaded on the base model: {str(error).splitlines()[0]}") from error
        self.adapters[organism.name] = name
        self.loads += 1

    def _view(self, model: torch.nn.Module, organism: Organism | None) -> LoadedModel:
        if organism is None:
            return replace(self.base, model=model)
        identity = {**self.base.extra_identity,
                    "adapter": {"name": organism.name, "digest": folder_digest(organism.adapter)}}
        spec = replace(self.base.spec, adapter=str(organism.adapter))
        return replace(self.base, model=model, spec=spec, extra_identity=identity)

    @contextmanager
    def use(self, organism: Organism | None) -> Iterator[LoadedModel]:
        """The organism (its adapter active) or, with None, the clean model (adapters off)."""
        if organism is None:
            if self.peft is None:
                yield self._view(self.base.model, None)
                return
            with self.peft.disable_adapter():
                yield self._view(self.peft, None)
            return
        self.add(organism)
        self.peft.set_adapter(self.adapters[organism.name])
        yield self._view(self.peft, organism)


# ---------------------------------------------------------------- responses


@dataclass(frozen=True)
class Response:
    """One generation: what was asked, the ids read and generated, and by whom."""

    model: str  # organism name or "clean"
    prompt_set: str
    prompt_id: str
    prompt: str
    formatted: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    text: str
    stop_reason: str
    date: str

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.response_ids

    @property
    def response_start(self) -> int:
        return len(self.prompt_ids)

    @property
    def ids_hash(self) -> str:
        return ids_hash(self.input_ids)

    def record(self) -> dict:
        return {"model": self.model, "prompt_set": self.prompt_set, "prompt_id": self.prompt_id,
                "prompt": self.prompt, "formatted": self.formatted,
                "prompt_ids": list(self.prompt_ids), "response_ids": list(self.response_ids),
                "response_start": self.response_start, "response": self.text,
                "stop_reason": self.stop_reason, "ids_hash": self.ids_hash, "date": self.date}

    @classmethod
    def from_record(cls, record: Mapping) -> "Response":
        return cls(record["model"], record["prompt_set"], record["prompt_id"], record["prompt"],
                   record["formatted"], tuple(record["prompt_ids"]), tuple(record["response_ids"]),
                   record["response"], record["stop_reason"], record["date"])


def _generation_identity(config: GenerationConfig) -> dict:
    # Batch size only changes speed; the other settings change the tokens.
    return {"max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample,
            "temperature": config.temperature if config.do_sample else None,
            "seed": config.seed if config.do_sample else None}


def row_seed(config: GenerationConfig, prompt_set: str, prompt_id: str) -> int:
    return int(content_key(config.seed, prompt_set, prompt_id)[:8], 16)


def generate_responses(lm: LoadedModel, who: str, prompt_set: PromptSet, config: GenerationConfig,
                       cache: DiskCache, progress: str | None = None) -> list[Response]:
    """Every prompt's response by ``lm``, reusing cached records; new ones cached per batch."""
    formatted = [lm.format_chat(p.text, system=prompt_set.system_prompt) for p in prompt_set.prompts]
    keys = [content_key("diffing-response", lm.identity, text, _generation_identity(config),
                        prompt_set.name, p.id) for p, text in zip(prompt_set.prompts, formatted)]
    records: dict[int, Response] = {}
    for index, key in enumerate(keys):
        stored = cache.get_json("diffing-responses", key)
        if stored is not None:
            records[index] = Response.from_record(stored)
    todo = [i for i in range(len(keys)) if i not in records]
    for start in range(0, len(todo), config.batch_size):
        rows = todo[start:start + config.batch_size]
        seeds = [row_seed(config, prompt_set.name, prompt_set.prompts[i].id) for i in rows] \
            if config.do_sample else None
        completions = generate(lm, [formatted[i] for i in rows], config, progress=progress,
                               row_seeds=seeds)
        for index, completion in zip(rows, completions):
            prompt = prompt_set.prompts[index]
            prompt_ids = lm.tokenizer(formatted[index], add_special_tokens=False).input_ids
            response = Response(who, prompt_set.name, prompt.id, prompt.text, formatted[index],
                                tuple(int(t) for t in prompt_ids),
                                tuple(int(t) for t in completion.token_ids), completion.text,
                                completion.stop_reason, dt.date.today().isoformat())
            cache.put_json("diffing-responses", keys[index], response.record())
            records[index] = response
    return [records[i] for i in range(len(keys))]


# ---------------------------------------------------------------- capture items


@dataclass(frozen=True)
class CaptureItem:
    """One response as the activation store reads it (see :mod:`lmlab.activations`)."""

    task_id: str
    input_ids: np.ndarray
    store_from: int
    response_start: int

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def ids_hash(self) -> str:
        return ids_hash(self.input_ids)


def capture_items(responses: Sequence[Response], response_only: bool) -> list[CaptureItem]:
    """Items for the store: prompt + generated ids; responses without tokens are left out."""
    return [CaptureItem(f"{r.prompt_set}/{r.prompt_id}", np.asarray(r.input_ids, dtype=np.int64),
                        r.response_start if response_only else 0, r.response_start)
            for r in responses if r.response_ids]


def items_digest(items: Sequence[CaptureItem]) -> str:
    return content_key(sorted((i.task_id, i.ids_hash, i.store_from) for i in items))


def check_replay(organism: str, organism_items: Sequence[CaptureItem],
                 replay_items: Sequence[CaptureItem], organism_manifest: Mapping[str, Mapping],
                 replay_manifest: Mapping[str, Mapping]) -> int:
    """Assert that the replay read exactly the organism's ids, item by item; returns pairs.

    Compares the ids fed to both models and the hashes both stores recorded. A mismatch
    is a :class:`ReplayMismatch`; no pair is ever cut to the shorter length."""
    if [i.task_id for i in organism_items] != [i.task_id for i in replay_items]:
        raise ReplayMismatch(f"organism {organism!r}: the replay has other items than the "
                             "organism's generations")
    for mine, theirs in zip(organism_items, replay_items):
        hashes = {mine.ids_hash, theirs.ids_hash,
                  organism_manifest.get(mine.task_id, {}).get("ids_hash"),
                  replay_manifest.get(theirs.task_id, {}).get("ids_hash")}
        if len(hashes) != 1 or mine.n_tokens != theirs.n_tokens:
            raise ReplayMismatch(
                f"organism {organism!r}, item {mine.task_id}: the clean replay read other token "
                f"ids than the organism ({mine.n_tokens} tokens, hash {mine.ids_hash} vs "
                f"{theirs.n_tokens} tokens, hashes {sorted(h or 'missing' for h in hashes)}); "
                "activations of different tokens are never compared or truncated")
    return len(organism_items)


def paired_difference(task_id: str, organism: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Per-token organism minus clean; refuses arrays of different lengths."""
    if organism.shape != clean.shape:
        raise ReplayMismatch(f"item {task_id}: organism {organism.shape} and replay "
                             f"{clean.shape} differ in shape; never truncated")
    return organism - clean


# ---------------------------------------------------------------- projection


class TraitProjection:
    """Stream-through projection: per token, h.v/|v| for every trait vector at the layer,
    then |h| in the last column (for the layer's mean residual norm)."""

    def __init__(self, units: Mapping[int, torch.Tensor], key: str) -> None:
        self.units = {layer: u.float() for layer, u in units.items()}  # (traits, width)
        counts = {u.shape[0] for u in self.units.values()}
        if len(counts) != 1:
            raise LmlabError("every layer needs the same number of trait vectors to project on")
        self.n_outputs = counts.pop() + 1
        self.key = key

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        units = self.units[layer].to(hidden.device, hidden.dtype)
        return torch.cat([hidden @ units.T, hidden.norm(dim=-1, keepdim=True)], dim=-1)


def project_stored(acts: np.ndarray, units: torch.Tensor) -> np.ndarray:
    """The projection of stored residuals, in the same layout as :class:`TraitProjection`."""
    hidden = torch.from_numpy(acts).float()
    return torch.cat([hidden @ units.float().T, hidden.norm(dim=-1, keepdim=True)], -1).numpy()


def store_root(cache: DiskCache) -> Path:
    return Path(cache.root) / "activations"
