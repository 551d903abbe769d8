"""One condition, (organism, prompt set), from generations to tables.

Steps (each resumable through a content-addressed cache): the clean model's and the
organism's generations; the organism reading its own tokens; the clean model replaying
exactly those ids (hash-checked pair by pair); the clean model reading its own tokens.
Every read is projected on every trait vector as it happens (or stored raw and projected
after, ``capture.store: activations``). The result is the per-token projection table and the
per-response statistics of both conventions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lmlab.activations import ActivationCache, ExtractionConfig, extract
from lmlab.cache import DiskCache
from lmlab.diffing import analysis
from lmlab.diffing.capture import (CLEAN, CaptureItem, ResidentBase, Response,
                                   TraitProjection, capture_items, check_replay,
                                   generate_responses, items_digest, paired_difference,
                                   project_stored, store_root)
from lmlab.diffing.prompt_sets import PromptSet
from lmlab.diffing.settings import DiffingSettings
from lmlab.diffing.traits import TraitVector
from lmlab.diffing.variants import Organism
from lmlab.errors import LmlabError
from lmlab.models import LoadedModel
from lmlab.stats import CI_HI, CI_LO

Column = tuple[str, str]  # (trait, method)


@dataclass
class Projector:
    """The trait vectors as the store projects them: per layer, one row per column."""

    layers: tuple[int, ...]
    columns: dict[int, list[Column | None]]  # None pads a layer with fewer vectors
    units: dict[int, torch.Tensor]
    key: str

    @classmethod
    def build(cls, vectors: Sequence[TraitVector], layers: Sequence[int], width: int,
              key: str) -> "Projector":
        per_layer = {layer: [v for v in vectors if v.layer == layer] for layer in layers}
        slots = max(len(v) for v in per_layer.values())
        if slots == 0:
            raise LmlabError("no trait vectors at any of diffing.layers")
        columns, units = {}, {}
        for layer, found in per_layer.items():
            rows = [v.unit for v in found] + [torch.zeros(width)] * (slots - len(found))
            columns[layer] = [(v.trait, v.method) for v in found] + [None] * (slots - len(found))
            units[layer] = torch.stack(rows).float()
        return cls(tuple(layers), columns, units, key)

    def transform(self) -> TraitProjection:
        return TraitProjection(self.units, self.key)


@dataclass
class Readings:
    """Projections (tokens, columns + norm) per layer for one list of items."""

    items: list[CaptureItem]
    by_layer: dict[int, list[np.ndarray]]
    cache: ActivationCache
    report: dict = field(default_factory=dict)  # the store's ExtractionReport

    def of(self, layer: int, index: int) -> np.ndarray:
        return self.by_layer[layer][index]


@dataclass
class ConditionData:
    organism: Organism
    prompt_set: PromptSet
    organism_responses: list[Response]
    clean_responses: list[Response]
    own: Readings  # organism reading its own tokens
    replay: Readings  # clean model reading the organism's tokens
    clean_own: Readings  # clean model reading its own tokens
    residual_norm: dict[int, float]
    pieces: dict[str, list[str]] = field(default_factory=dict)  # item id -> response pieces
    pairs_checked: int = 0
    captures: list[dict] = field(default_factory=list)


def replay_of(items: Sequence[CaptureItem]) -> list[CaptureItem]:
    """The clean model's items: the organism's ids, copied, nothing re-tokenized."""
    return [CaptureItem(i.task_id, i.input_ids.copy(), i.store_from, i.response_start)
            for i in items]


def _read(view: LoadedModel, items: list[CaptureItem], settings: DiffingSettings,
          projector: Projector, cache: DiskCache, what: str) -> Readings:
    config = ExtractionConfig(tuple(projector.layers), settings.capture.dtype,
                              settings.capture.batch_size)
    stream = settings.capture.store == "scores"
    print(f"diffing: {what}")
    stored, report = extract(view, items, items_digest(items), config, store_root(cache),
                             projection=projector.transform() if stream else None,
                             unit="responses")
    by_layer = {}
    for layer in projector.layers:
        arrays = stored.layer(layer, items)
        by_layer[layer] = arrays if stream else [project_stored(a, projector.units[layer])
                                                 for a in arrays]
    return Readings(list(items), by_layer, stored, report.to_dict())


def run_captures(resident: ResidentBase, organism: Organism, prompt_set: PromptSet,
                 settings: DiffingSettings, projector: Projector, cache: DiskCache
                 ) -> ConditionData:
    generation = settings.generation
    with resident.use(None) as clean:
        clean_responses = generate_responses(clean, CLEAN, prompt_set, generation, cache,
                                             progress=f"generate clean/{prompt_set.name}")
    with resident.use(organism) as view:
        organism_responses = generate_responses(view, organism.name, prompt_set, generation,
                                                cache, progress=f"generate {organism.name}")
    response_only = settings.capture.response_only
    own_items = capture_items(organism_responses, response_only)
    clean_items = capture_items(clean_responses, response_only)
    if not own_items or not clean_items:
        raise LmlabError(f"organism {organism.name!r} or the clean model produced no response "
                         f"tokens on prompt set {prompt_set.name!r}; raise max_new_tokens")
    with resident.use(organism) as view:
        own = _read(view, own_items, settings, projector, cache,
                    f"{organism.name} reading its own {len(own_items)} responses")
    replay_items = replay_of(own_items)
    with resident.use(None) as clean:
        replay = _read(clean, replay_items, settings, projector, cache,
                       f"clean model replaying {organism.name}'s ids")
        clean_own = _read(clean, clean_items, settings, projector, cache,
                          "clean model reading its own responses")
    pairs = check_replay(organism.name, own_items, replay_items, own.cache.items,
                         replay.cache.items)
    data = ConditionData(organism, prompt_set, organism_responses, clean_responses, own, replay,
                         clean_own, _residual_norms(clean_own, projector.layers),
                         pairs_checked=pairs)
    tokenizer = resident.base.tokenizer
    for response in organism_responses + clean_responses:
        key = f"{response.model}:{response.prompt_set}/{response.prompt_id}"
        data.pieces[key] = token_pieces(tokenizer, response.response_ids)
    return data


def _residual_norms(readings: Readings, layers: Sequence[int]) -> dict[int, float]:
    """Mean |h| of the clean model on its own prompt set, first token left out (its norm is
    outsized in most models)."""
    out = {}
    for layer in layers:
        norms = [array[max(1 - item.store_from, 0):, -1]
                 for item, array in zip(readings.items, readings.by_layer[layer])]
        values = np.concatenate(norms) if norms else np.array([])
        out[layer] = float(values.mean()) if values.size else float("nan")
    return out


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:  # type: ignore[no-untyped-def]
    """Each token's text, so that the pieces concatenate to the decoded response."""
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(list(ids[:end]), skip_special_tokens=True)
        pieces.append(text[len(previous):] if text.startswith(previous) else text)
        previous = text
    return pieces


# ---------------------------------------------------------------- tables


def _shift(data: ConditionData, layer: int, index: int) -> np.ndarray:
    """same_text per-token shift of item ``index`` at ``layer``, response tokens only."""
    item = data.own.items[index]
    start = item.response_start - item.store_from
    both = paired_difference(item.task_id, data.own.of(layer, index), data.replay.of(layer, index))
    return both[start:, :-1]


def _positions(item: CaptureItem, rows: int) -> np.ndarray:
    """Token index of each stored row: 0 = first response token, negative in the prompt."""
    return np.arange(item.store_from, item.store_from + rows) - item.response_start


def projection_table(data: ConditionData, projector: Projector) -> pd.DataFrame:
    """The columnar projection table of one condition (one row per token, layer, trait)."""
    columns: dict[str, list[np.ndarray]] = {name: [] for name in PROJECTION_COLUMNS}
    readings = [("same_text", "shift", data.own, data.replay),
                ("own_text", "organism", data.own, None),
                ("own_text", "clean", data.clean_own, None)]
    for convention, reading, first, second in readings:
        for layer in projector.layers:
            names = [(i, n) for i, n in enumerate(projector.columns[layer]) if n is not None]
            norm = data.residual_norm[layer]
            for index, item in enumerate(first.items):
                scores = first.of(layer, index)
                if second is not None:
                    scores = paired_difference(item.task_id, scores, second.of(layer, index))
                rows = scores.shape[0]
                prompt_set, prompt_id = item.task_id.split("/", 1)
                chosen = scores[:, [i for i, _ in names]]  # (tokens, traits)
                count = chosen.size
                columns["organism"].append(np.full(count, data.organism.name, dtype=object))
                columns["convention"].append(np.full(count, convention, dtype=object))
                columns["reading"].append(np.full(count, reading, dtype=object))
                columns["prompt_set"].append(np.full(count, prompt_set, dtype=object))
                columns["prompt_id"].append(np.full(count, prompt_id, dtype=object))
                columns["token_index"].append(np.repeat(_positions(item, rows), len(names)))
                ids = item.input_ids[item.store_from:item.store_from + rows]
                columns["token_id"].append(np.repeat(ids, len(names)))
                columns["layer"].append(np.full(count, layer))
                columns["trait"].append(np.tile(np.array([n[0] for _, n in names], dtype=object), rows))
                columns["method"].append(np.tile(np.array([n[1] for _, n in names], dtype=object), rows))
                flat = chosen.reshape(-1).astype(np.float32)
                columns["score"].append(flat)
                columns["score_scaled"].append((flat / norm).astype(np.float32))
    return pd.DataFrame({name: np.concatenate(parts) for name, parts in columns.items()})


PROJECTION_COLUMNS = ("organism", "convention", "reading", "prompt_set", "prompt_id",
                      "token_index", "token_id", "layer", "trait", "method", "score",
                      "score_scaled")


def response_values(data: ConditionData, projector: Projector, unit: str) -> pd.DataFrame:
    """Per response, convention, layer, trait and statistic: the value in ``unit``."""
    rows = []
    clean_index = {item.task_id: i for i, item in enumerate(data.clean_own.items)}
    for layer in projector.layers:
        scale = data.residual_norm[layer] if unit == "scaled" else 1.0
        for index, item in enumerate(data.own.items):
            start = item.response_start - item.store_from
            shift = _shift(data, layer, index) / scale
            own = data.own.of(layer, index)[start:, :-1] / scale
            key = f"{data.organism.name}:{item.task_id}"
            spans = analysis.clause_spans(data.pieces.get(key, []))
            clean_at = clean_index.get(item.task_id)
            clean_scores = clean_spans = None
            if clean_at is not None:
                clean_item = data.clean_own.items[clean_at]
                clean_start = clean_item.response_start - clean_item.store_from
                clean_scores = data.clean_own.of(layer, clean_at)[clean_start:, :-1] / scale
                clean_spans = analysis.clause_spans(data.pieces.get(f"{CLEAN}:{item.task_id}", []))
            prompt_set, prompt_id = item.task_id.split("/", 1)
            for column, name in enumerate(projector.columns[layer]):
                if name is None:
                    continue
                base = {"organism": data.organism.name, "prompt_set": prompt_set,
                        "prompt_id": prompt_id, "layer": layer, "trait": name[0],
                        "method": name[1], "unit": unit}
                same = analysis.response_stats(shift[:, column], spans)
                rows.extend({**base, "convention": "same_text", "stat": stat, "value": value}
                            for stat, value in same.items())
                if clean_scores is None:
                    continue
                mine = analysis.response_stats(own[:, column], spans)
                theirs = analysis.response_stats(clean_scores[:, column], clean_spans)
                rows.extend({**base, "convention": "own_text", "stat": stat,
                             "value": mine[stat] - theirs[stat]} for stat in mine)
    return pd.DataFrame(rows)


def trajectory_table(data: ConditionData, projector: Projector, unit: str, bins: int,
                     n_resamples: int, seed: int, methods: Sequence[str]) -> pd.DataFrame:
    """same_text shift by relative response position: mean and interval over responses."""
    rows = []
    for layer in projector.layers:
        scale = data.residual_norm[layer] if unit == "scaled" else 1.0
        binned: dict[Column, list[np.ndarray]] = {}
        for index, item in enumerate(data.own.items):
            shift = _shift(data, layer, index) / scale
            for column, name in enumerate(projector.columns[layer]):
                if name is not None and name[1] in methods:
                    binned.setdefault(name, []).append(analysis.binned_trajectory(shift[:, column], bins))
        for (trait, method), curves in binned.items():
            stacked = np.stack(curves)
            for b in range(bins):
                estimate = analysis.mean_with_interval(stacked[:, b], n_resamples=n_resamples,
                                                       seed=seed)
                rows.append({"organism": data.organism.name, "prompt_set": data.prompt_set.name,
                             "layer": layer, "trait": trait, "method": method, "unit": unit,
                             "bin": b, "position": (b + 0.5) / bins, "mean": estimate.value,
                             "mean" + CI_LO: estimate.lower, "mean" + CI_HI: estimate.upper,
                             "n": estimate.n})
    return pd.DataFrame(rows)


def clause_table(data: ConditionData, projector: Projector, layer: int, method: str, unit: str,
                 top_k: int) -> pd.DataFrame:
    """The top same_text clauses per trait at ``layer``: text, mean shift, where."""
    rows = []
    scale = data.residual_norm[layer] if unit == "scaled" else 1.0
    for index, item in enumerate(data.own.items):
        shift = _shift(data, layer, index) / scale
        pieces = data.pieces.get(f"{data.organism.name}:{item.task_id}", [])
        for a, b in analysis.clause_spans(pieces):
            text = "".join(pieces[a:b]).strip()
            if not text:
                continue
            for column, name in enumerate(projector.columns[layer]):
                if name is not None and name[1] == method:
                    rows.append({"trait": name[0], "prompt_id": item.task_id.split("/", 1)[1],
                                 "clause": text, "start_token": a, "n_tokens": b - a,
                                 "shift": float(shift[a:b, column].mean())})
    frame = pd.DataFrame(rows, columns=["trait", "prompt_id", "clause", "start_token", "n_tokens",
                                        "shift"])
    if frame.empty:
        return frame
    frame = frame.sort_values(["trait", "shift"], ascending=[True, False])
    frame["rank"] = frame.groupby("trait").cumcount() + 1
    return frame[frame["rank"] <= top_k].reset_index(drop=True)


def generation_records(data: ConditionData) -> list[dict]:
    return [r.record() for r in data.organism_responses + data.clean_responses]


def behaviour_rates(data: ConditionData) -> dict[str, float]:
    """Quirk rates in the organism's and the clean model's text (lmlab.diffing.behaviour)."""
    try:
        from lmlab.diffing.behaviour import quirk_rate
        from lmlab.diffing.organisms import QUIRKS
    except ImportError:
        return {}
    metrics: dict[str, float] = {}
    texts = {"organism": [r.text for r in data.organism_responses],
             "clean": [r.text for r in data.clean_responses]}
    for quirk in QUIRKS:
        for who, batch in texts.items():
            metrics.update(quirk_rate(quirk, batch).to_dict(f"behaviour/{quirk}_rate_{who}"))
    return metrics


def manifests(data: ConditionData) -> dict[str, Mapping]:
    return {name: readings.cache.manifest() for name, readings in
            (("organism_own", data.own), ("clean_replay", data.replay),
             ("clean_own", data.clean_own))}
