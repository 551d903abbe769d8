"""The steering sweep family: one condition = (method, layer, alpha, intervention, scope).

Every sweep starts with the unsteered baseline; each steered condition is paired with a
``random`` control of the same norm unless ``controls: []``. A condition generates
completions for each evaluation split, scores them with both refusal detectors and the
degeneracy check, and compares every prompt with its own baseline answer.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from lmlab import __version__, stats
from lmlab.cache import content_key, tensor_digest
from lmlab.config import from_mapping
from lmlab.data.prompts import BUNDLED_SPLITS, PromptRow, digest, load_prompt_set, source_path
from lmlab.data.report import DataReport
from lmlab.identity import strip_operational
from lmlab.errors import LmlabError
from lmlab.generation import GenerationConfig, generate, score_continuations
from lmlab.hooks import POSITIONS, Edit, ablate_direction, add_vector, check_layers
from lmlab.models import LoadedModel
from lmlab.steering import directions as dirs
from lmlab.steering.evaluation import (COMPLIANCE_OPENING, REFUSAL_OPENING,
                                       DegeneracyThresholds, classify, kl_per_prompt,
                                       perplexity, phrase_refusal, repetition)
from lmlab.sweeps.family import ConditionResult, Family, SweepContext, register

INTERVENTIONS = ("add", "ablate")
SCOPES = ("layer", "all")
GRID_KEYS = {"method", "layer", "alpha", "intervention", "scope"}
BASELINE = {"method": "none", "layer": None, "alpha": 0, "intervention": "none", "scope": "layer"}
SEARCH_SPLITS = ["harm_val", "benign"]
FINAL_SPLITS = ["harm_test", "benign"]


@dataclass(frozen=True)
class SteeringSettings:
    """Settings under ``steering:`` in a spec.

    Operational (left out of condition keys): ``eval_splits`` (which splits to report;
    a finished run that has the splits asked for is reused) and ``generation.batch_size``.
    ``data`` paths are replaced by the files' content digests.
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
        return from_mapping(cls, raw, "steering", **converted)

    def __post_init__(self) -> None:
        if self.n_prompts < 1 or self.n_train < 2:
            raise LmlabError("steering.n_prompts must be >= 1 and n_train >= 2")
        unknown = set(self.eval_splits) - set(BUNDLED_SPLITS)
        if unknown:
            raise LmlabError(f"steering.eval_splits has unknown split(s) {sorted(unknown)}")
        if set(self.controls) - {"random"}:
            raise LmlabError("steering.controls may only contain 'random'")
        if self.positions not in POSITIONS:
            raise LmlabError(f"steering.positions must be one of {POSITIONS}")
        if not self.min_relative_norm >= 0:
            raise LmlabError("steering.min_relative_norm must be >= 0")

    def identity(self) -> dict[str, Any]:
        """Result-changing settings: everything but the operational ones and data paths."""
        return strip_operational(asdict(self), SteeringFamily.operational_settings + ("data",))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        self.directions: dict[tuple[str, int], dirs.Direction] = {}

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

    def conditions(self) -> list[dict[str, Any]]:
        splits = list(self.settings.eval_splits)
        out = [{**BASELINE, "splits": splits}]
        for point in self.spec.grid_points():
            condition = {"method": point.get("method", "suffix_contrast"),
                         "layer": point.get("layer"), "alpha": point.get("alpha"),
                         "intervention": point.get("intervention", "add"),
                         "scope": point.get("scope", "layer"), "splits": splits}
            variants = [condition] + [{**condition, "method": c} for c in self.settings.controls
                                      if c != condition["method"]]
            out.extend(v for v in variants if v not in out)
        return out

    def search_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"method": params.get("method", "suffix_contrast"), "layer": params.get("layer"),
                "alpha": params.get("alpha"), "intervention": params.get("intervention", "add"),
                "scope": params.get("scope", "layer"), "splits": SEARCH_SPLITS}

    def final_conditions(self, chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        finals = [{**BASELINE, "splits": FINAL_SPLITS}]
        for params in chosen:
            finals.append({**params, "splits": FINAL_SPLITS})
            finals += [{**params, "method": c, "splits": FINAL_SPLITS} for c in self.settings.controls]
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
        if params["method"] not in dirs.METHODS:
            raise LmlabError(f"unknown direction method {params['method']!r}; known: {dirs.METHODS}")
        if params["intervention"] not in INTERVENTIONS:
            raise LmlabError(f"intervention must be one of {INTERVENTIONS}, not {params['intervention']!r}")
        if params["scope"] not in SCOPES:
            raise LmlabError(f"scope must be one of {SCOPES}, not {params['scope']!r}")
        layer, alpha = params["layer"], params["alpha"]
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise LmlabError(f"layer must be an integer, got {layer!r}")
        if not _is_number(alpha) or not math.isfinite(alpha) or alpha < 0:
            raise LmlabError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if params["intervention"] == "ablate" and alpha > 1:
            raise LmlabError(f"ablate alpha is the fraction removed and must be in [0, 1], got {alpha} "
                             "(above 1 would reflect the component instead of removing it)")
        for split in params["splits"]:
            if split not in self.settings.data:
                raise LmlabError(f"no data for split {split!r}")

    def run_name(self, params: Mapping[str, Any]) -> str:
        splits = "+".join(params["splits"])
        if params["intervention"] == "none":
            return f"baseline [{splits}]"
        scope = "all-layers" if params["scope"] == "all" else f"L{params['layer']}"
        return f"{params['method']} {params['intervention']} {scope} a={params['alpha']} [{splits}]"

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
        # Real methods first: the random control borrows their residual norms.
        methods = sorted({p["method"] for p in self._all_params() if p["intervention"] != "none"},
                         key=lambda m: (m == "random", m))
        for method in methods:
            for layer, direction in self._directions(ctx, method, layers).items():
                self.directions[(method, layer)] = direction

    def _all_params(self) -> list[dict[str, Any]]:
        if self.spec.search is None:
            return self.conditions()
        methods = self.spec.search.params.get("method", {}).get("choices", ["suffix_contrast"])
        return [{"method": m, "intervention": "add"} for m in list(methods) + list(self.settings.controls)]

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
        rows, report = load_prompt_set(self.settings.data[split], split)
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
            elif method == "suffix_contrast":
                raw, norms = dirs.suffix_contrast(lm, harmful, layers)
            else:
                norms = self._matched_norms(ctx, layers)
                raw = dirs.random_vectors(lm.hidden_size, layers, self.settings.seed)
            cached = {f"raw.{l}": raw[l] for l in layers}
            cached.update({f"norm.{l}": torch_scalar(norms[l]) for l in layers})
            ctx.cache.put_tensors("directions", key, cached)
        raw = {l: cached[f"raw.{l}"] for l in layers}
        norms = {l: float(cached[f"norm.{l}"]) for l in layers}
        return dirs.build_directions(raw, norms, method, self.settings.min_relative_norm)

    def _matched_norms(self, ctx: SweepContext, layers: list[int]) -> dict[int, float]:
        """The control reuses the real method's residual norm so both add the same norm."""
        norms = {}
        for layer in layers:
            known = [d.residual_norm for (m, l), d in self.directions.items() if l == layer and m != "random"]
            norms[layer] = known[0] if known else math.nan
        missing = [l for l, v in norms.items() if math.isnan(v)]
        if missing:
            harmful = [r.prompt for r in self.prompts["harm_train"][:self.settings.n_train]]
            harmless = [r.prompt for r in self.prompts["harmless_train"][:self.settings.n_train]]
            norms.update(dirs.mean_diff(ctx.model, harmful, harmless, missing)[1])
        return norms

    def summarize(self, ctx: SweepContext, summary: pd.DataFrame) -> ConditionResult:
        return summarize_sweep(summary)

    # ------------------------------------------------------------ one condition
    def edits(self, lm: LoadedModel, params: Mapping[str, Any]) -> dict[int, Edit]:
        if params["intervention"] == "none":
            return {}
        direction = self.directions[(params["method"], int(params["layer"]))]
        targets = range(lm.n_layers) if params["scope"] == "all" else [direction.layer]
        if params["intervention"] == "add":
            vector = direction.unit * float(params["alpha"]) * direction.residual_norm
            return {layer: add_vector(vector.to(lm.device)) for layer in targets}
        return {layer: ablate_direction(direction.unit.to(lm.device), float(params["alpha"]))
                for layer in targets}

    def fingerprint(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if params["intervention"] == "none":
            return {"intervention": "none"}
        direction = self.directions[(params["method"], int(params["layer"]))]
        return {k: params[k] for k in ("method", "layer", "alpha", "intervention", "scope")} | {
            "direction": tensor_digest(direction.unit), "positions": self.settings.positions}

    def run_condition(self, ctx: SweepContext, params: Mapping[str, Any]) -> ConditionResult:
        lm = ctx.model
        metrics: dict[str, float] = {}
        tables = []
        for split in params["splits"]:
            rows = self.evaluate(ctx, split, params)
            base = self.evaluate(ctx, split, {**BASELINE, "splits": params["splits"]})
            metrics.update(split_metrics(split, rows, base))
            tables.append(pd.DataFrame(rows).assign(split=split))
        if "benign" in params["splits"]:
            benign = tables[list(params["splits"]).index("benign")]
            metrics.update(stats.rate(benign["outcome"] != "compliance").to_dict("benign/cost"))
        files = {}
        if params["intervention"] != "none":
            direction = self.directions[(params["method"], int(params["layer"]))]
            metrics.update({"direction/raw_norm": direction.raw_norm,
                            "direction/residual_norm": direction.residual_norm,
                            "direction/relative_norm": direction.relative_norm})
            files["direction"] = self._direction_file(direction, params)
        return ConditionResult(metrics=metrics, tables={"completions": pd.concat(tables)}, files=files)

    def _direction_file(self, direction: dirs.Direction, params: Mapping[str, Any]) -> Path:
        from safetensors.torch import save_file

        path = Path(tempfile.mkdtemp()) / f"direction-{params['method']}-L{direction.layer}.safetensors"
        save_file({"unit": direction.unit.contiguous()}, str(path), metadata={
            "layer": str(direction.layer), "method": params["method"],
            "raw_norm": str(direction.raw_norm), "residual_norm": str(direction.residual_norm)})
        return path

    def evaluate(self, ctx: SweepContext, split: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per-prompt scores for one split under one intervention (cached by content)."""
        lm = ctx.model
        prompts = self.prompts[split][:self.settings.n_prompts]
        key = content_key("steer-eval", lm.identity, digest(prompts), self.settings.identity(),
                          self.fingerprint(params), __version__)
        cached = ctx.cache.get_json("steering-eval", key)
        if cached is not None:
            return cached
        is_baseline = params["intervention"] == "none"
        base_rows = None if is_baseline else self.evaluate(ctx, split, {**BASELINE, "splits": []})
        rows = self._score(lm, prompts, self.edits(lm, params), base_rows, split)
        ctx.cache.put_json("steering-eval", key, rows)
        return rows

    def _score(self, lm: LoadedModel, prompts: list[PromptRow], edits: dict[int, Edit],
               base_rows: list[dict[str, Any]] | None, split: str) -> list[dict[str, Any]]:
        s = self.settings
        formatted = [lm.format_chat(p.prompt) for p in prompts]
        completions = generate(lm, formatted, s.generation, edits, s.positions,  # type: ignore[arg-type]
                               progress=f"generate {split}")
        n = len(prompts)
        refuse = score_continuations(lm, formatted, [REFUSAL_OPENING] * n, edits, s.positions)  # type: ignore[arg-type]
        comply = score_continuations(lm, formatted, [COMPLIANCE_OPENING] * n, edits, s.positions)  # type: ignore[arg-type]
        fluency = score_continuations(lm, formatted, [c.token_ids for c in completions])
        kls = [0.0] * n
        if base_rows is not None:
            base_ids = [r["token_ids"][:s.kl_tokens] for r in base_rows]
            plain = score_continuations(lm, formatted, base_ids, keep_distributions=True)
            steered = score_continuations(lm, formatted, base_ids, edits, s.positions,  # type: ignore[arg-type]
                                          keep_distributions=True)
            kls = [kl_per_prompt(a.log_distributions, b.log_distributions)  # type: ignore[arg-type]
                   for a, b in zip(plain, steered)]
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            llr = float(refuse[i].token_logprobs.sum() - comply[i].token_logprobs.sum())
            ppl = perplexity(fluency[i].token_logprobs)
            rep = repetition(completion.token_ids)
            refused = phrase_refusal(completion.text)
            rows.append({
                "id": prompt.id, "prompt": prompt.prompt, "completion": completion.text,
                "token_ids": list(completion.token_ids), "n_tokens": len(completion.token_ids),
                "stop_reason": completion.stop_reason, "phrase_refusal": refused,
                "llr": llr, "llr_refusal": llr > 0, "perplexity": ppl, "repetition": rep,
                "outcome": classify(completion.text, refused, ppl, rep, s.degenerate),
                "kl": kls[i],
            })
        return rows


def torch_scalar(value: float):  # type: ignore[no-untyped-def]
    import torch

    return torch.tensor(float(value))


def split_metrics(split: str, rows: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, float]:
    """Rates with intervals over unique prompts, and paired differences from the baseline."""
    outcome = np.array([r["outcome"] for r in rows])
    base_outcome = np.array([r["outcome"] for r in base])
    phrase = np.array([r["phrase_refusal"] for r in rows], dtype=bool)
    llr = np.array([r["llr_refusal"] for r in rows], dtype=bool)
    metrics: dict[str, float] = {}
    for name in ("refusal", "compliance", "degenerate"):
        metrics.update(stats.rate(outcome == name).to_dict(f"{split}/{name}"))
    metrics.update(stats.rate(phrase).to_dict(f"{split}/refusal_phrase"))
    metrics.update(stats.rate(llr).to_dict(f"{split}/refusal_likelihood"))
    agree = stats.agreement(phrase, llr)
    metrics[f"{split}/detector_agreement"] = agree["agreement"]
    metrics[f"{split}/detector_kappa"] = agree["kappa"]
    metrics.update(stats.paired_difference(outcome == "refusal", base_outcome == "refusal")
                   .to_dict(f"{split}/refusal_diff"))
    metrics.update(stats.mean_with_interval([r["kl"] for r in rows]).to_dict(f"{split}/kl"))
    metrics[f"{split}/perplexity_median"] = float(np.nanmedian([r["perplexity"] for r in rows]))
    metrics[f"{split}/stopped_by_length"] = float(np.mean([r["stop_reason"] == "length" for r in rows]))
    return metrics


def summarize_sweep(summary: pd.DataFrame) -> ConditionResult:
    """summary.csv (baseline rows included, Pareto front marked) and the parent plots."""
    from lmlab.steering import plots

    if summary.empty:
        return ConditionResult(metrics={})
    frame = summary.copy()
    frame["splits"] = frame["splits"].map(lambda s: "+".join(s) if isinstance(s, list) else s)
    front_col = "harm_test/refusal" if "harm_test/refusal" in frame else "harm_val/refusal"
    if front_col in frame and "benign/cost" in frame:
        scored = frame.dropna(subset=[front_col, "benign/cost"])
        frame["pareto"] = False
        frame.loc[scored.index, "pareto"] = plots.pareto_mask(scored[front_col].to_numpy(),
                                                              scored["benign/cost"].to_numpy())
    splits = [s for s in ("harm_train", "harm_val", "harm_test", "benign") if f"{s}/refusal" in frame]
    figures = {"refusal_vs_alpha": plots.refusal_vs_alpha(frame, splits),
               "tradeoff": plots.tradeoff(frame, front_col),
               "layer_alpha_heatmap": plots.layer_alpha_heatmaps(frame, front_col)}
    if {"harm_train/refusal", "harm_test/refusal"} <= set(frame):
        figures["generalization_gap"] = plots.generalization_gap(frame)
    leading = ["method", "layer", "alpha", "intervention", "scope", "splits"]
    ordered = frame[[c for c in leading if c in frame] + [c for c in frame if c not in leading]]
    ordered = ordered.sort_values(["intervention", "method", "layer", "alpha"], na_position="first",
                                  key=lambda col: col.astype(str))
    return ConditionResult(metrics={}, tables={"summary": ordered}, figures=figures)

