"""The steering sweep family: one condition = (method, layer, strength, intervention, scope).

Every sweep starts with the unsteered baseline; each steered condition is paired with a
``random`` control of the same norm (its ``control_for`` param names the method it
controls) unless ``controls: []``. A condition generates completions for each evaluation
split, scores them with the refusal detectors and the degeneracy check, and compares
every prompt with its own baseline answer.

Strength. The spec's grid key ``alpha`` means a different unit per intervention, so a
condition carries it under a name that says which:

* ``add_norm_multiple``: the added vector's norm, as a multiple of the layer's mean
  residual norm;
* ``ablate_fraction``: the share of each activation's component along the direction
  that is removed (0 to 1).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from lmlab import __version__, stats
from lmlab.cache import content_key, tensor_digest
from lmlab.config import from_mapping
from lmlab.data.prompts import BUNDLED_SPLITS, PromptRow, digest, load_prompt_set, source_path
from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.generation import (Completion, EncodedPrompts, GenerationConfig, encode_prompts,
                              generate, generate_scored, score_after)
from lmlab.hooks import POSITIONS, Edit, ablate_direction, add_vector, check_layers
from lmlab.identity import strip_operational
from lmlab.llm.accounting import BudgetExceeded, Ledger
from lmlab.llm.clients import Client, ClientConfig, make_client
from lmlab.models import LoadedModel
from lmlab.steering import directions as dirs
from lmlab.steering.evaluation import (COMPLIANCE_OPENING, OUTCOMES, REFUSAL_OPENING,
                                       DegeneracyThresholds, classify, kl_per_prompt,
                                       likelihood_margin, perplexity, phrase_refusal,
                                       repetition)
from lmlab.steering.judging import judge_completions
from lmlab.sweeps.family import ConditionResult, Family, SweepContext, register

INTERVENTIONS = ("add", "ablate")
SCOPES = ("layer", "all")
GRID_KEYS = {"method", "layer", "alpha", "intervention", "scope"}
#: The param that carries the grid's ``alpha`` for each intervention.
STRENGTH = {"add": "add_norm_multiple", "ablate": "ablate_fraction"}
#: On a control condition: the real method whose norm it borrows.
CONTROL_FOR = "control_for"
BASELINE = {"method": "none", "layer": None, "intervention": "none", "scope": "layer"}
SEARCH_SPLITS = ["harm_val", "benign"]
FINAL_SPLITS = ["harm_test", "benign"]
#: Bump when the fields of a scored row or their meaning change (old cached rows are then
#: not reused).
ROW_FORMAT = 2
#: Unsteered prompt encodings kept in memory for the fluency passes of steered conditions
#: (one per split, shared by every condition); beyond this the oldest are dropped.
UNSTEERED_ENCODINGS_BYTES = 1 << 30


@dataclass(frozen=True)
class SteeringSettings:
    """Settings under ``steering:`` in a spec.

    Operational (left out of condition keys): ``eval_splits`` (which splits to report;
    a finished run that has the splits asked for is reused), ``generation.batch_size``
    and the judge's settings that only say where and how fast to call it (its
    ``ClientConfig.identity()`` is what counts). ``data`` paths are replaced by the files'
    content digests.
    judge: optional third refusal detector, ``{model: <LiteLLM name> | local, ...}`` as the
    context family's ``judge``; its verdicts are cached by content and its calls, tokens
    and cost logged on each run.
    """

    data: Mapping[str, str] = field(default_factory=lambda: {s: f"bundled:{s}" for s in BUNDLED_SPLITS})
    n_prompts: int = 20  # per evaluation split (unique prompts, file order)
    n_train: int = 32  # prompts used to compute directions
    eval_splits: tuple[str, ...] = ("harm_train", "harm_test", "benign")
    controls: tuple[str, ...] = ("random",)
    positions: str = "all"
    generation: GenerationConfig = GenerationConfig()
    min_relative_norm: float = 0.01
    degenerate: DegeneracyThresholds = DegeneracyThresholds()
    kl_tokens: int = 8
    seed: int = 0
    judge: ClientConfig | None = None
    max_prompt_chars: int | None = None  # longer prompts are dropped (counted as too_long)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SteeringSettings":
        converted: dict[str, Any] = {}
        if "data" in raw:
            if not isinstance(raw["data"], Mapping):
                raise LmlabError("steering.data must map split names to files")
            extra = set(raw["data"]) - set(BUNDLED_SPLITS)
            if extra:
                raise LmlabError(f"unknown steering data split(s): {sorted(extra)}")
            converted["data"] = {**{s: f"bundled:{s}" for s in BUNDLED_SPLITS},
                                 **{k: str(v) for k, v in raw["data"].items()}}
        if "generation" in raw:
            converted["generation"] = from_mapping(GenerationConfig, raw["generation"], "steering.generation")
        if "degenerate" in raw:
            converted["degenerate"] = from_mapping(DegeneracyThresholds, raw["degenerate"],
                                                   "steering.degenerate")
        if "judge" in raw:
            converted["judge"] = (ClientConfig.from_dict(raw["judge"], "steering.judge")
                                  if raw["judge"] else None)
        return from_mapping(cls, raw, "steering", **converted)

    def __post_init__(self) -> None:
        if self.n_prompts < 1 or self.n_train < 2:
            raise LmlabError("steering.n_prompts must be >= 1 and n_train >= 2")
        unknown = set(self.eval_splits) - set(BUNDLED_SPLITS)
        if unknown:
            raise LmlabError(f"steering.eval_splits has unknown split(s) {sorted(unknown)}")
        if set(self.controls) - {dirs.CONTROL_METHOD}:
            raise LmlabError(f"steering.controls may only contain {dirs.CONTROL_METHOD!r}")
        if self.positions not in POSITIONS:
            raise LmlabError(f"steering.positions must be one of {POSITIONS}")
        if not self.min_relative_norm >= 0:
            raise LmlabError("steering.min_relative_norm must be >= 0")

    def scoring_identity(self) -> dict[str, Any]:
        """What changes completions and their scores (the judge's verdicts are cached apart)."""
        return strip_operational(asdict(self), SteeringFamily.operational_settings + ("data", "judge"))

    def identity(self) -> dict[str, Any]:
        """Result-changing settings: everything but the operational ones and data paths."""
        return {**self.scoring_identity(), "judge": self.judge.identity() if self.judge else None}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def steered_condition(point: Mapping[str, Any], splits: list[str]) -> dict[str, Any]:
    """A grid point or search proposal (``alpha`` and friends) as a condition's params."""
    intervention = point.get("intervention", "add")
    condition = {"method": point.get("method", "suffix_contrast"), "layer": point.get("layer"),
                 "intervention": intervention, "scope": point.get("scope", "layer")}
    condition[STRENGTH.get(intervention, "alpha")] = point.get("alpha")
    return {**condition, "splits": splits}


@register
class SteeringFamily(Family):
    name = "steering"
    work_unit_name = "completions"
    operational_settings = ("eval_splits", "generation.batch_size")
    output_params = ("splits",)

    def __init__(self, spec) -> None:  # type: ignore[no-untyped-def]
        super().__init__(spec)
        self.settings = SteeringSettings.from_dict(spec.settings)
        if spec.grid is not None and set(spec.grid) - GRID_KEYS:
            raise LmlabError(f"unknown steering grid key(s): {sorted(set(spec.grid) - GRID_KEYS)}; "
                             f"allowed: {sorted(GRID_KEYS)}")
        if spec.search is not None and set(spec.search.params) - GRID_KEYS:
            raise LmlabError(f"unknown steering search param(s): "
                             f"{sorted(set(spec.search.params) - GRID_KEYS)}")
        self.prompts: dict[str, list[PromptRow]] = {}
        self.reports: dict[str, DataReport] = {}
        # (method, controlled method or None, layer) -> direction
        self.directions: dict[tuple[str, str | None, int], dirs.Direction] = {}
        self.judge: Client | None = None
        self.judge_spent_usd = 0.0
        self.unsteered: dict[str, EncodedPrompts] = {}  # content key -> encoding

    # ------------------------------------------------------------ conditions
    def settings_identity(self) -> Any:
        return self.settings.identity()

    def _splits_read(self) -> list[str]:
        needed = self._splits_needed() | {"harm_train", "harmless_train"}
        return [split for split in BUNDLED_SPLITS if split in needed]

    def data_inputs(self) -> dict[str, Path]:
        return {split: source_path(self.settings.data[split]) for split in self._splits_read()}

    def key_inputs(self) -> tuple[str, ...]:
        # Directions read the train splits, so every condition depends on them; each
        # evaluated split is an output tied to its own file's digest.
        return ("harm_train", "harmless_train")

    def data_reports(self) -> list[DataReport]:
        return [self.reports[split] for split in self._splits_read() if split in self.reports]

    def with_controls(self, condition: dict[str, Any]) -> list[dict[str, Any]]:
        """The condition, then one control per ``steering.controls`` that borrows its norm."""
        return [condition] + [{**condition, "method": control, CONTROL_FOR: condition["method"]}
                              for control in self.settings.controls]

    def conditions(self) -> list[dict[str, Any]]:
        splits = list(self.settings.eval_splits)
        out = [{**BASELINE, "splits": splits}]
        for point in self.spec.grid_points():
            condition = steered_condition(point, splits)
            variants = [condition] if condition["method"] == dirs.CONTROL_METHOD \
                else self.with_controls(condition)
            out.extend(v for v in variants if v not in out)
        return out

    def search_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return steered_condition(params, SEARCH_SPLITS)

    def final_conditions(self, chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        finals = [{**BASELINE, "splits": FINAL_SPLITS}]
        for params in chosen:
            finals += self.with_controls({**params, "splits": FINAL_SPLITS})
        return finals

    def objectives(self) -> list[tuple[str, str]]:
        """Refusal on the first harmful split the sweep evaluates (harm_val in a search),
        and the benign cost when benign is evaluated: every trial has its values."""
        splits = SEARCH_SPLITS if self.spec.search is not None else list(self.settings.eval_splits)
        harmful = next((s for s in ("harm_val", "harm_test", "harm_train") if s in splits), None)
        out = [(f"{harmful}/refusal", "maximize")] if harmful else []
        return out + ([("benign/cost", "minimize")] if "benign" in splits else [])

    def validate_condition(self, params: Mapping[str, Any]) -> None:
        if params["intervention"] == "none":
            return
        method = params["method"]
        if method not in dirs.METHODS:
            raise LmlabError(f"unknown direction method {method!r}; known: {dirs.REAL_METHODS}")
        if method == dirs.CONTROL_METHOD and params.get(CONTROL_FOR) not in dirs.REAL_METHODS:
            raise LmlabError(f"{dirs.CONTROL_METHOD!r} is the matched-norm control, not a method: "
                             f"list real methods {dirs.REAL_METHODS} in grid.method and keep "
                             f"steering.controls: [{dirs.CONTROL_METHOD}] (one control per method)")
        if params["intervention"] not in INTERVENTIONS:
            raise LmlabError(f"intervention must be one of {INTERVENTIONS}, not {params['intervention']!r}")
        if params["scope"] not in SCOPES:
            raise LmlabError(f"scope must be one of {SCOPES}, not {params['scope']!r}")
        layer = params["layer"]
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise LmlabError(f"layer must be an integer, got {layer!r}")
        self._validate_strength(params)
        for split in params["splits"]:
            if split not in self.settings.data:
                raise LmlabError(f"no data for split {split!r}")

    @staticmethod
    def _validate_strength(params: Mapping[str, Any]) -> None:
        name = STRENGTH[params["intervention"]]
        value = params.get(name)
        where = f"{name} (the grid's alpha for {params['intervention']})"
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise LmlabError(f"{where} must be a finite number >= 0, got {value!r}")
        if params["intervention"] == "ablate" and value > 1:
            raise LmlabError(f"{where} is the share of the component removed and must be in "
                             f"[0, 1], got {value} (above 1 would reflect the component "
                             "instead of removing it)")

    def run_name(self, params: Mapping[str, Any]) -> str:
        splits = "+".join(params["splits"])
        if params["intervention"] == "none":
            return f"baseline [{splits}]"
        scope = "all-layers" if params["scope"] == "all" else f"L{params['layer']}"
        method = params["method"]
        if method == dirs.CONTROL_METHOD:
            method = f"random (control for {params.get(CONTROL_FOR)})"
        name = STRENGTH[params["intervention"]]
        return f"{method} {params['intervention']} {scope} {name}={params.get(name)} [{splits}]"

    def work_units(self, params: Mapping[str, Any]) -> int:
        return self.settings.n_prompts * len(params["splits"])

    def estimate_seconds(self, params: Mapping[str, Any]) -> float:
        # Measured on a 2-core CPU with the embedded model: ~175 generated tokens/s at batch 32,
        # plus about a third more for the scoring passes.
        tokens = self.work_units(params) * self.settings.generation.max_new_tokens
        return tokens / 175 * 1.35

    # ------------------------------------------------------------ preparation
    def prepare(self, ctx: SweepContext) -> None:
        lm = ctx.model
        layers = self._layers_needed()
        check_layers(lm, layers)
        if not lm.has_chat_template:
            print("warning: the model has no chat template; a base model has no refusal to steer")
        self.prompts = {split: self._load_split(split) for split in self._splits_read()}
        for method in self._methods_needed():
            for layer, direction in self._directions(ctx, method, layers).items():
                self.directions[(method, None, layer)] = direction
            borrowed = {layer: self.directions[(method, None, layer)].residual_norm for layer in layers}
            for control in self.settings.controls:
                for layer, direction in self._control_directions(ctx, borrowed).items():
                    self.directions[(control, method, layer)] = direction
        if self.settings.judge is not None:
            self.judge = make_client(self.settings.judge, Ledger(), "judge", lambda: ctx.model,
                                     self.settings.generation.batch_size)

    def _methods_needed(self) -> list[str]:
        """Real methods the conditions use (each control borrows from one of them)."""
        if self.spec.search is not None:
            methods = self.spec.search.params.get("method", {}).get("choices", ["suffix_contrast"])
        else:
            methods = [p["method"] for p in self.conditions() if p["intervention"] != "none"]
        return sorted(set(methods) & set(dirs.REAL_METHODS))

    def _layers_needed(self) -> list[int]:
        if self.spec.search is not None:
            dist = self.spec.search.params.get("layer", {})
            if "int" in dist:
                return list(range(int(dist["int"][0]), int(dist["int"][1]) + 1))
            return [int(v) for v in dist.get("choices", [])]
        return sorted({int(p["layer"]) for p in self.conditions() if p["intervention"] != "none"})

    def _splits_needed(self) -> set[str]:
        if self.spec.search is not None:
            return set(SEARCH_SPLITS) | set(FINAL_SPLITS)
        return set(self.settings.eval_splits)

    def _load_split(self, split: str) -> list[PromptRow]:
        rows, report = load_prompt_set(self.settings.data[split], split,
                                       max_chars=self.settings.max_prompt_chars)
        limit = self.settings.n_train if split in ("harm_train", "harmless_train") else self.settings.n_prompts
        if split == "harm_train":
            limit = max(limit, self.settings.n_prompts)
        report.requested = limit
        if len(rows) > limit:
            report.drop("beyond_requested", len(rows) - limit)
            report.rows_kept = limit
        self.reports[split] = report
        return rows[:limit]

    def _directions(self, ctx: SweepContext, method: str, layers: list[int]) -> dict[int, dirs.Direction]:
        lm = ctx.model
        n = self.settings.n_train
        harmful = [r.prompt for r in self.prompts["harm_train"][:n]]
        harmless = [r.prompt for r in self.prompts["harmless_train"][:n]]
        key = content_key("directions", lm.identity, method, layers, digest(self.prompts["harm_train"][:n]),
                          digest(self.prompts["harmless_train"][:n]), self.settings.seed)
        cached = ctx.cache.get_tensors("directions", key)
        if cached is None:
            print(f"computing {method} directions for layers {layers} (one pass per batch)")
            if method == "mean_diff":
                raw, norms = dirs.mean_diff(lm, harmful, harmless, layers)
            else:
                raw, norms = dirs.suffix_contrast(lm, harmful, layers)
            cached = {f"raw.{l}": raw[l] for l in layers}
            cached.update({f"norm.{l}": torch_scalar(norms[l]) for l in layers})
            ctx.cache.put_tensors("directions", key, cached)
        raw = {l: cached[f"raw.{l}"] for l in layers}
        norms = {l: float(cached[f"norm.{l}"]) for l in layers}
        return dirs.build_directions(raw, norms, method, self.settings.min_relative_norm)

    def _control_directions(self, ctx: SweepContext, borrowed: dict[int, float]) -> dict[int, dirs.Direction]:
        """Seeded random directions carrying the residual norms they borrow from one method
        (the norms are part of the cache key, so a control never keeps another's norm)."""
        layers = sorted(borrowed)
        key = content_key("directions", ctx.model.identity, dirs.CONTROL_METHOD, layers,
                          {str(l): borrowed[l] for l in layers}, self.settings.seed)
        cached = ctx.cache.get_tensors("directions", key)
        if cached is None:
            raw = dirs.random_vectors(ctx.model.hidden_size, layers, self.settings.seed)
            cached = {f"raw.{l}": raw[l] for l in layers}
            cached.update({f"norm.{l}": torch_scalar(borrowed[l]) for l in layers})
            ctx.cache.put_tensors("directions", key, cached)
        raw = {l: cached[f"raw.{l}"] for l in layers}
        norms = {l: float(cached[f"norm.{l}"]) for l in layers}
        return dirs.build_directions(raw, norms, dirs.CONTROL_METHOD, self.settings.min_relative_norm)

    def summarize(self, ctx: SweepContext, summary: pd.DataFrame) -> ConditionResult:
        return summarize_sweep(summary)

    def logged_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return shown_metrics(metrics)

    # ------------------------------------------------------------ one condition
    def direction_for(self, params: Mapping[str, Any]) -> dirs.Direction:
        return self.directions[(params["method"], params.get(CONTROL_FOR), int(params["layer"]))]

    def edits(self, lm: LoadedModel, params: Mapping[str, Any]) -> dict[int, Edit]:
        if params["intervention"] == "none":
            return {}
        direction = self.direction_for(params)
        targets = range(lm.n_layers) if params["scope"] == "all" else [direction.layer]
        if params["intervention"] == "add":
            vector = direction.unit * float(params["add_norm_multiple"]) * direction.residual_norm
            return {layer: add_vector(vector.to(lm.device)) for layer in targets}
        return {layer: ablate_direction(direction.unit.to(lm.device), float(params["ablate_fraction"]))
                for layer in targets}

    def fingerprint(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Everything that decides an intervention's edits, for the evaluation cache key."""
        if params["intervention"] == "none":
            return {"intervention": "none"}
        direction = self.direction_for(params)
        name = STRENGTH[params["intervention"]]
        return {"method": params["method"], CONTROL_FOR: params.get(CONTROL_FOR),
                "layer": params["layer"], name: params[name], "intervention": params["intervention"],
                "scope": params["scope"], "direction": tensor_digest(direction.unit),
                "residual_norm": direction.residual_norm, "positions": self.settings.positions}

    def run_condition(self, ctx: SweepContext, params: Mapping[str, Any]) -> ConditionResult:
        ledger = self._fresh_judge_ledger()
        metrics: dict[str, float] = {}
        tables = []
        reused_verdicts = 0
        evaluated = self.evaluate_splits(ctx, params["splits"], params)
        baseline = self.evaluate_splits(ctx, params["splits"], {**BASELINE, "splits": params["splits"]})
        for split in params["splits"]:
            rows, base = evaluated[split], baseline[split]
            if self.judge is not None:
                rows, base = self._judged(ctx, rows), self._judged(ctx, base)
                reused_verdicts += sum(bool(r.get("judge_cached")) for r in rows + base)
            metrics.update(split_metrics(split, rows, base))
            tables.append(pd.DataFrame(rows).assign(split=split))
        if "benign" in params["splits"]:
            benign = tables[list(params["splits"]).index("benign")]
            metrics.update(stats.rate(benign["outcome"] != "compliance").to_dict("benign/cost"))
        tags: dict[str, str] = {}
        if ledger is not None:
            self.judge_spent_usd += ledger.spent_usd
            metrics.update(judge_call_metrics(ledger, reused_verdicts))
            tags = {"steering.judge": str(self.settings.judge.model),  # type: ignore[union-attr]
                    "steering.judge_cost_source": "/".join(sorted(ledger.sources)) or "none"}
        files = {}
        if params["intervention"] != "none":
            direction = self.direction_for(params)
            metrics.update({"direction/raw_norm": direction.raw_norm,
                            "direction/residual_norm": direction.residual_norm,
                            "direction/relative_norm": direction.relative_norm})
            files["direction"] = self._direction_file(direction, params)
        return ConditionResult(metrics=metrics, tables={"completions": pd.concat(tables)},
                               files=files, tags=tags)

    def _judged(self, ctx: SweepContext, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.judge is not None and self.settings.judge is not None
        try:
            return judge_completions(self.judge, ctx.cache, rows)
        except BudgetExceeded as error:
            raise LmlabError(f"steering.judge.budget_usd of ${self.settings.judge.budget_usd} is "
                             "spent; the verdicts bought so far are cached, so raise the budget "
                             "and rerun to resume") from error

    def _fresh_judge_ledger(self) -> Ledger | None:
        """A ledger for this condition's judge calls, holding what is left of the budget."""
        if self.judge is None or self.settings.judge is None:
            return None
        budget = self.settings.judge.budget_usd
        self.judge.ledger = Ledger(None if budget is None else budget - self.judge_spent_usd)
        return self.judge.ledger

    def _direction_file(self, direction: dirs.Direction, params: Mapping[str, Any]) -> Path:
        from safetensors.torch import save_file

        method = params["method"] if params.get(CONTROL_FOR) is None \
            else f"{params['method']}-for-{params[CONTROL_FOR]}"
        path = Path(tempfile.mkdtemp()) / f"direction-{method}-L{direction.layer}.safetensors"
        save_file({"unit": direction.unit.contiguous()}, str(path), metadata={
            "layer": str(direction.layer), "method": params["method"],
            "control_for": str(params.get(CONTROL_FOR)), "raw_norm": str(direction.raw_norm),
            "residual_norm": str(direction.residual_norm)})
        return path

    def evaluate(self, ctx: SweepContext, split: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per-prompt scores for one split under one intervention (cached by content)."""
        return self.evaluate_splits(ctx, [split], params)[split]

    def evaluate_splits(self, ctx: SweepContext, splits: list[str],
                        params: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Per-prompt scores for each split under one intervention, cached by content per
        split. The splits not in the cache are scored together, so their prompts share
        generation batches (larger batches run faster); a split's rows do not depend on
        the company it is scored in, up to float rounding."""
        lm = ctx.model
        prompts = {split: self.prompts[split][:self.settings.n_prompts] for split in splits}
        keys = {split: content_key("steer-eval", ROW_FORMAT, lm.identity, digest(prompts[split]),
                                   self.settings.scoring_identity(), self.fingerprint(params), __version__)
                for split in splits}
        found = {split: ctx.cache.get_json("steering-eval", keys[split]) for split in splits}
        todo = [split for split in splits if found[split] is None]
        if todo:
            baseline = None if params["intervention"] == "none" else self._baseline(ctx, todo, prompts)
            joined = [p for split in todo for p in prompts[split]]
            rows, reference = self._score(lm, joined, self.edits(lm, params), baseline, "+".join(todo))
            start = 0
            for split in todo:
                part = slice(start, start + len(prompts[split]))
                found[split] = rows[part]
                ctx.cache.put_json("steering-eval", keys[split], found[split])
                if baseline is None or baseline.reference is None:
                    base_rows = found[split] if baseline is None else baseline.rows[part]
                    ctx.cache.put_tensors("steering-kl-reference",
                                          self._reference_key(lm, prompts[split], base_rows),
                                          {f"row.{i}": d for i, d in enumerate(reference[part])})
                start = part.stop
        return found  # type: ignore[return-value]

    def _baseline(self, ctx: SweepContext, splits: list[str],
                  prompts: dict[str, list[PromptRow]]) -> "Baseline":
        """The splits' baseline rows, one after the other, and their KL reference when every
        split's is in the cache."""
        base = self.evaluate_splits(ctx, splits, {**BASELINE, "splits": []})
        references = [self._reference(ctx, ctx.model, prompts[split], base[split]) for split in splits]
        joined = None if any(r is None for r in references) else [d for r in references for d in r]  # type: ignore[union-attr]
        return Baseline([row for split in splits for row in base[split]], joined)

    def _reference_key(self, lm: LoadedModel, prompts: list[PromptRow],
                       base_rows: list[dict[str, Any]]) -> str:
        """What decides the unsteered next-token distributions KL compares against: the
        weights, the exact prompt strings and the baseline tokens scored."""
        formatted = [lm.format_chat(p.prompt) for p in prompts]
        return content_key("kl-reference", lm.identity, formatted,
                           [r["token_ids"][:self.settings.kl_tokens] for r in base_rows])

    def _reference(self, ctx: SweepContext, lm: LoadedModel, prompts: list[PromptRow],
                   base_rows: list[dict[str, Any]]) -> list[torch.Tensor] | None:
        stored = ctx.cache.get_tensors("steering-kl-reference", self._reference_key(lm, prompts, base_rows))
        return None if stored is None else [stored[f"row.{i}"] for i in range(len(base_rows))]

    def _score(self, lm: LoadedModel, prompts: list[PromptRow], edits: dict[int, Edit],
               baseline: "Baseline | None", split: str) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
        """Generate under the edits, then score, reusing each prompt encoding (``split``
        names the split or splits the prompts come from).

        The prompts are encoded once under the edits; generation and the steered passes
        (the likelihood detector's two openings, the baseline's first ``kl_tokens`` for KL)
        all continue from that cache. Fluency is the completion under the unsteered model:
        for the baseline it comes from generation's own logits, which also give the
        unsteered distributions KL compares against (returned, to be cached); a steered
        condition scores its completion after the unsteered encoding every condition
        shares, and reuses those distributions from ``baseline`` (or scores them once when
        missing).
        """
        s = self.settings
        formatted = [lm.format_chat(p.prompt) for p in prompts]
        plain = self._unsteered_encoding(lm, formatted)
        n = len(prompts)
        if baseline is None:  # unsteered: generation's own logits score its tokens
            steered = plain
            completions, fluency = generate_scored(lm, plain, s.generation, progress=f"generate {split}",
                                                   keep_distributions=s.kl_tokens)
        else:
            steered = encode_prompts(lm, formatted, edits, s.positions,  # type: ignore[arg-type]
                                     s.generation.batch_size)
            completions = generate(lm, steered, s.generation, progress=f"generate {split}")
            fluency = score_after(lm, plain, [c.token_ids for c in completions])
        refuse = score_after(lm, steered, [REFUSAL_OPENING] * n)
        comply = score_after(lm, steered, [COMPLIANCE_OPENING] * n)
        if baseline is None:
            reference, kls = [f.log_distributions for f in fluency], [0.0] * n
        else:
            reference, kls = self._kl(lm, plain, steered, baseline)
        rows = [self._row(prompt, completion, refuse[i].token_logprobs, comply[i].token_logprobs,
                          fluency[i].token_logprobs, kls[i])
                for i, (prompt, completion) in enumerate(zip(prompts, completions))]
        return rows, reference  # type: ignore[return-value]

    def _kl(self, lm: LoadedModel, plain: EncodedPrompts, steered: EncodedPrompts,
            baseline: "Baseline") -> tuple[list[torch.Tensor], list[float]]:
        """KL(unsteered || steered) over the baseline answer's first ``kl_tokens`` tokens;
        the unsteered side comes from ``baseline`` when cached."""
        base_ids = [r["token_ids"][:self.settings.kl_tokens] for r in baseline.rows]
        keep = self.settings.kl_tokens
        reference = baseline.reference or [
            scored.log_distributions for scored in score_after(lm, plain, base_ids, keep_distributions=keep)]
        shifted = score_after(lm, steered, base_ids, keep_distributions=keep)
        return reference, [kl_per_prompt(a, b.log_distributions)  # type: ignore[arg-type]
                           for a, b in zip(reference, shifted)]

    def _unsteered_encoding(self, lm: LoadedModel, formatted: list[str]) -> EncodedPrompts:
        """The prompts encoded without edits, computed once per split and kept in memory
        (within ``UNSTEERED_ENCODINGS_BYTES``) for every condition's fluency pass."""
        batch = self.settings.generation.batch_size
        key = content_key("unsteered", lm.identity, formatted, batch)
        found = self.unsteered.get(key)
        if found is None:
            found = encode_prompts(lm, formatted, batch_size=batch)
            self.unsteered[key] = found
            while self.unsteered and sum(e.nbytes for e in self.unsteered.values()) > UNSTEERED_ENCODINGS_BYTES:
                del self.unsteered[next(iter(self.unsteered))]
        return found

    def _row(self, prompt: PromptRow, completion: Completion, refusal: torch.Tensor,
             compliance: torch.Tensor, fluency: torch.Tensor, kl: float) -> dict[str, Any]:
        margin = likelihood_margin(refusal, compliance)
        ppl = perplexity(fluency)
        rep = repetition(completion.token_ids)
        refused = phrase_refusal(completion.text)
        return {
            "id": prompt.id, "prompt": prompt.prompt, "completion": completion.text,
            "token_ids": list(completion.token_ids), "n_tokens": len(completion.token_ids),
            "stop_reason": completion.stop_reason, "phrase_refusal": refused,
            "likelihood_margin": margin, "likelihood_refusal": margin > 0,
            "perplexity": ppl, "repetition": rep,
            "outcome": classify(completion.text, refused, ppl, rep, self.settings.degenerate),
            "kl": kl,
        }


@dataclass(frozen=True)
class Baseline:
    """A split's unsteered answers, and the unsteered next-token distributions over their
    first ``kl_tokens`` tokens when the cache has them."""

    rows: list[dict[str, Any]]
    reference: list[torch.Tensor] | None


def torch_scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value))


def _agreement(split: str, names: tuple[str, str], a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    both = stats.agreement(a, b)
    pair = "_".join(names)
    return {f"{split}/agreement_{pair}": both["agreement"], f"{split}/kappa_{pair}": both["kappa"]}


def split_metrics(split: str, rows: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, float]:
    """Rates with intervals over unique prompts, detector agreement, and paired differences
    from the baseline (each prompt against its own unsteered answer)."""
    outcome = np.array([r["outcome"] for r in rows])
    base_outcome = np.array([r["outcome"] for r in base])
    phrase = np.array([r["phrase_refusal"] for r in rows], dtype=bool)
    likelihood = np.array([r["likelihood_refusal"] for r in rows], dtype=bool)
    base_likelihood = np.array([r["likelihood_refusal"] for r in base], dtype=bool)
    metrics: dict[str, float] = {}
    for name in OUTCOMES:
        metrics.update(stats.rate(outcome == name).to_dict(f"{split}/{name}"))
    metrics.update(stats.rate(phrase).to_dict(f"{split}/refusal_phrase"))
    metrics.update(stats.rate(likelihood).to_dict(f"{split}/refusal_likelihood"))
    metrics.update(_agreement(split, ("phrase", "likelihood"), phrase, likelihood))
    metrics.update(stats.paired_rate_difference(outcome == "refusal", base_outcome == "refusal")
                   .to_dict(f"{split}/refusal_diff"))
    metrics.update(stats.paired_rate_difference(likelihood, base_likelihood)
                   .to_dict(f"{split}/refusal_likelihood_diff"))
    if any("judge_verdict" in r for r in rows):
        metrics.update(judge_metrics(split, rows, base, phrase, likelihood))
    metrics.update(stats.mean_with_interval([r["kl"] for r in rows]).to_dict(f"{split}/kl"))
    metrics[f"{split}/perplexity_median"] = float(np.nanmedian([r["perplexity"] for r in rows]))
    metrics[f"{split}/stopped_by_length"] = float(np.mean([r["stop_reason"] == "length" for r in rows]))
    return metrics


def judge_metrics(split: str, rows: list[dict[str, Any]], base: list[dict[str, Any]],
                  phrase: np.ndarray, likelihood: np.ndarray) -> dict[str, float]:
    """The judge's refusal rate and paired difference over the prompts it gave a verdict on,
    and its agreement with the phrase and likelihood detectors on those prompts."""
    verdict = np.array([r.get("judge_verdict") for r in rows], dtype=object)
    base_verdict = np.array([r.get("judge_verdict") for r in base], dtype=object)
    judged = np.array([v is not None for v in verdict])
    both = judged & np.array([v is not None for v in base_verdict])
    refused = verdict == "refusal"
    flags = [str(r.get("judge_flag")) for r in rows]
    out = {f"{split}/judge_off_format": float(flags.count("off_format")),
           f"{split}/judge_failed": float(sum(f.startswith("error") for f in flags))}
    out.update(stats.rate(refused[judged]).to_dict(f"{split}/refusal_judge"))
    out.update(stats.rate((verdict == "degenerate")[judged]).to_dict(f"{split}/degenerate_judge"))
    out.update(stats.paired_rate_difference(refused[both], (base_verdict == "refusal")[both])
               .to_dict(f"{split}/refusal_judge_diff"))
    out.update(_agreement(split, ("judge", "phrase"), refused[judged], phrase[judged]))
    out.update(_agreement(split, ("judge", "likelihood"), refused[judged], likelihood[judged]))
    return out


#: Per split, the metrics a child run shows in the runs table (``harm_test/refusal``, ...):
#: the outcome shares (refusal with its interval), the paired refusal difference from the
#: baseline with its interval and p-value, KL and fluency. The rest (every detector, its
#: agreement, each n) is in the run's condition_metrics table.
SHOWN_PER_SPLIT = (*stats.with_interval("refusal"), *(o for o in OUTCOMES if o != "refusal"),
                   *stats.with_interval("refusal_diff"), "refusal_diff" + stats.P, "kl",
                   "perplexity_median")
SHOWN_PER_CONDITION = (*stats.with_interval("benign/cost"), "direction/relative_norm",
                       "judge/cost_usd", "judge/calls")


def shown_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The part of a condition's metrics its run shows (:data:`SHOWN_PER_SPLIT` for each
    split, then :data:`SHOWN_PER_CONDITION`)."""
    def shown(name: str) -> bool:
        split, _, metric = name.partition("/")
        return name in SHOWN_PER_CONDITION or (split in BUNDLED_SPLITS
                                               and metric in SHOWN_PER_SPLIT)

    return {name: value for name, value in metrics.items() if shown(name)}


def judge_call_metrics(ledger: Ledger, reused_verdicts: int) -> dict[str, float]:
    """What this condition's judge calls cost; ``judge/cached``: verdicts read from the cache
    (for its own and its baseline's completions), which cost nothing."""
    totals = ledger.metrics()
    out = {f"judge/{name[len('judge_'):]}": value for name, value in totals.items()
           if name.startswith("judge_")}
    out.update({"judge/calls": float(ledger.calls("judge")), "judge/retries": totals["retries"],
                "judge/cost_usd": ledger.spent_usd,
                "judge/cached": float(reused_verdicts)})
    return out


def _sort_key(column: pd.Series) -> pd.Series:
    """Numbers by value (layer 5 before 15), anything else by its text."""
    numeric = pd.to_numeric(column, errors="coerce")
    return numeric if numeric.notna().any() else column.astype(str)


def direction_label(method: Any, control_for: Any) -> str:
    """``suffix_contrast``, or ``random (control for suffix_contrast)``."""
    return f"{method} (control for {control_for})" if isinstance(control_for, str) else str(method)


def summarize_sweep(summary: pd.DataFrame) -> ConditionResult:
    """summary.csv (baseline rows included, Pareto front marked) and the parent plots."""
    from lmlab.steering import plots

    if summary.empty:
        return ConditionResult(metrics={})
    frame = summary.copy()
    frame["splits"] = frame["splits"].map(lambda s: "+".join(s) if isinstance(s, list) else s)
    for column in (CONTROL_FOR, *STRENGTH.values()):
        if column not in frame:
            frame[column] = np.nan
    front_col = "harm_test/refusal" if "harm_test/refusal" in frame else "harm_val/refusal"
    if front_col in frame and "benign/cost" in frame:
        scored = frame.dropna(subset=[front_col, "benign/cost"])
        frame["pareto"] = False
        frame.loc[scored.index, "pareto"] = plots.pareto_mask(scored[front_col].to_numpy(),
                                                              scored["benign/cost"].to_numpy())
    splits = [s for s in ("harm_train", "harm_val", "harm_test", "benign") if f"{s}/refusal" in frame]
    figures = {"refusal_vs_strength": plots.refusal_vs_strength(frame, splits),
               "outcome_shares": plots.outcome_shares(frame, splits),
               "tradeoff": plots.tradeoff(frame, front_col),
               "layer_strength_heatmap": plots.layer_strength_heatmaps(frame, front_col)}
    if {"harm_train/refusal", "harm_test/refusal"} <= set(frame):
        figures["generalization_gap"] = plots.generalization_gap(frame)
    leading = ["method", CONTROL_FOR, "layer", "intervention", *STRENGTH.values(), "scope", "splits"]
    ordered = frame[[c for c in leading if c in frame] + [c for c in frame if c not in leading]]
    # The baseline first, then each intervention's methods, each followed by its controls.
    ordered = ordered.assign(_steered=ordered["intervention"] != "none").sort_values(
        ["_steered", "intervention", CONTROL_FOR, "method", "layer", *STRENGTH.values()],
        na_position="first", key=_sort_key).drop(columns="_steered")
    metrics: dict[str, float] = {}
    if "judge/cost_usd" in frame:
        metrics = {"total_judge_cost_usd": float(frame["judge/cost_usd"].fillna(0).sum()),
                   "total_judge_calls": float(frame["judge/calls"].fillna(0).sum())}
    found, tags = headline(frame)
    return ConditionResult(metrics={**metrics, **found}, tables={"summary": ordered},
                           figures=figures, tags=tags)


HELD_OUT_SPLITS = ("harm_test", "harm_val")


def _control_of(frame: pd.DataFrame, row: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The random control run beside ``row``: same layer, intervention, scope, strength."""
    strength = STRENGTH[row["intervention"]]
    same = (frame[CONTROL_FOR] == row["method"]) & (frame["intervention"] == row["intervention"])
    for column in ("layer", "scope", strength):
        if column in frame:
            same &= frame[column].astype(str) == str(row.get(column))
    matches = frame[same]
    return None if matches.empty else matches.iloc[0].to_dict()


def headline(frame: pd.DataFrame) -> tuple[dict[str, float], dict[str, str]]:
    """What the sweep found, for the parent's runs-table columns: the steered condition
    with the largest held-out refusal gain over its random control (Newcombe interval),
    its refusal rate and its benign cost (Wilson intervals)."""
    split = next((s for s in HELD_OUT_SPLITS if f"{s}/refusal{stats.CI_LO}" in frame), None)
    if split is None or CONTROL_FOR not in frame:
        return {}, {}
    refusal = f"{split}/refusal"
    best: tuple[stats.Estimate, Mapping[str, Any]] | None = None
    steered = frame[(frame["intervention"] != "none") & frame[CONTROL_FOR].isna()]
    for row in steered.dropna(subset=[refusal]).to_dict("records"):
        control = _control_of(frame, row)
        if control is None or pd.isna(control.get(refusal)):
            continue
        gain = stats.rate_difference(stats.Estimate.from_dict(row, refusal),
                                     stats.Estimate.from_dict(control, refusal))
        if best is None or gain.value > best[0].value:
            best = (gain, row)
    if best is None:
        return {}, {}
    gain, row = best
    out = {**gain.to_dict("headline/refusal_gain_vs_random"),
           **stats.Estimate.from_dict(row, refusal).to_dict("headline/refusal")}
    if pd.notna(row.get("benign/cost")):
        out.update(stats.Estimate.from_dict(row, "benign/cost").to_dict("headline/benign_cost"))
    out = {name: value for name, value in out.items() if not math.isnan(value)}
    strength = STRENGTH[row["intervention"]]
    described = (f"{row['method']} {row['intervention']} layer {row['layer']} "
                 f"{strength}={row.get(strength)} on {split}")
    return out, {"lmlab.headline": described, "lmlab.headline_run": str(row.get("run_id", ""))}
