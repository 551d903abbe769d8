"""The ``probes`` sweep family: one child run per (label, layer, lag).

``prepare`` reads and aligns the chains (skipping and counting malformed ones), tokenizes
them as the model reads them, splits them by problem and fills the activation cache (one
forward pass per batch for every grid layer). The first condition of a (label, layer)
fits every grid lag of that layer at once (each fit independent of the others); the other
lags reuse that fit from memory or from the disk cache. ``summarize`` writes the parent's
table and figures, logs each probe as a pyfunc model on its child run and registers it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from lmlab.cache import content_key
from lmlab.config import from_mapping
from lmlab.data.report import DataReport
from lmlab.identity import path_digest, strip_operational
from lmlab.errors import LmlabError
from lmlab.probes import plots
from lmlab.activations import ActivationCache, ExtractionConfig, extract
from lmlab.probes.chains import SAMPLE_PATH, ChainsConfig, ChainSet, TokenizedChain, load_chains, \
    problem_key, scan_chains, tokenize_chains
from lmlab.probes.registry import (CHAMPION, artifact_name, existing_version, log_probe,
                                   register_probe, registered_name, save_probe)
from lmlab.probes.train import LayerResult, Probe, TrainConfig, build_layer_data, split_groups, \
    train_layer
from lmlab.stats import CI_HI, CI_LO, current_names, with_interval
from lmlab.sweeps.family import ConditionResult, Family, SweepContext, register

GRID_KEYS = ("label", "layer", "lag")
PROBE_KEY_TAG = "probe_key"
LEAD_COLUMNS = ["label", "layer", "lag", "train_accuracy", "val_accuracy", "test_accuracy",
                "train_f1", "val_f1", "test_f1", "train_auroc", "val_auroc", "test_auroc",
                "train_pr_auc", "val_pr_auc", "test_pr_auc", "n_train", "n_val", "n_test",
                "positives_train", "positives_val", "positives_test", "pos_ratio_train",
                "pos_ratio_val", "pos_ratio_test", "token_test_auroc", "token_test_pr_auc",
                "token_test_f1", "persistence_test_auroc", "persistence_test_pr_auc",
                "persistence_test_f1", "shuffled_test_auroc", "shuffled_test_pr_auc",
                "shuffled_test_f1", "probe_minus_token_test_pr_auc",
                "probe_minus_token_test_pr_auc_ci_lo", "probe_minus_persistence_test_pr_auc",
                "probe_minus_persistence_test_pr_auc_ci_lo", "beats_baselines", "converged",
                "fits_unconverged", "chains_test", "problems_test"]
PLOTTED = ("test_auroc", "test_pr_auc", "test_f1")
#: What a probe's child run shows in the runs table: the probe's scores (test with their
#: problem-bootstrap intervals), the baselines' and the control's test PR-AUC, the paired
#: gains over the baselines, convergence and the test split's size. Every other metric
#: (each split of each scorer, thresholds, fit diagnostics) is in its condition_metrics table.
SHOWN = ("train_pr_auc", "val_pr_auc", *with_interval("test_pr_auc"), *with_interval("test_auroc"),
         "test_f1", "token_test_pr_auc", "persistence_test_pr_auc", "shuffled_test_pr_auc",
         *with_interval("probe_minus_token_test_pr_auc"),
         *with_interval("probe_minus_persistence_test_pr_auc"), "beats_baselines", "converged",
         "fits_unconverged", "n_test", "pos_ratio_test", "C")
# Plan estimates. The plan is printed before the model loads, so they start from the
# chain file's characters: 3.0 characters per token and 30 chat-template tokens per chain
# (SmolLM2-135M's tokenizer on the bundled sample). Rates: the embedded model on a 2-core
# CPU. A full forward pass ran at about 360 tokens/s on an idle machine (DESIGN.md) and at
# 120 tokens/s here with the load average at 2.3; 240 is used. One L-BFGS iteration cost
# 4.4e-10 s per (train row x width x output), 57 iterations per output on average (layers
# 6 and 14, 60 sample chains, 7 lags, C 0.001-1); evaluating one lag (4 scorers, 500
# problem resamples) 3.5e-5 s per chain token; logging and registering a child ~0.5 s.
CHARS_PER_TOKEN = 3.0
TEMPLATE_TOKENS = 30
FORWARD_TOKENS_PER_S = 240.0
EMBEDDED_LAYERS, EMBEDDED_WIDTH = 30, 576
FIT_SECONDS_PER_UNIT = 4.4e-10
FIT_ITERATIONS = 57
EVAL_SECONDS_PER_TOKEN = 3.5e-5
LOG_SECONDS_PER_CONDITION = 0.5


@dataclass(frozen=True)
class ProbeSettings:
    """The ``probes:`` block of a sweep spec.

    data: path to a chain JSON list, or ``sample`` for the bundled sample chains.
    dtype / batch_size: activation storage precision and chains per forward pass.
    register: log the best probe of each label (by val PR-AUC) as a pyfunc model on its
        child run and register it as a version under the alias ``champion``.
    register_all: log and register every probe, not only each label's champion.
    Other keys: see ChainsConfig and TrainConfig.
    """

    data: str = "sample"
    min_coverage: float = 0.7
    min_span_match: float = 0.6
    extra_labels: tuple[str, ...] = ()
    max_chains: int | None = None
    max_malformed_share: float = 0.2
    dtype: str = "float16"
    batch_size: int = 8
    strengths: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    bootstrap: int = 500
    max_iter: int = 300
    tolerance: float = 1e-4
    fit_threads: int | None = None
    register: bool = True
    register_all: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ProbeSettings":
        return from_mapping(cls, raw, "probes")

    @property
    def data_path(self) -> Path:
        return SAMPLE_PATH if self.data == "sample" else Path(self.data).expanduser()

    def chains_config(self) -> ChainsConfig:
        return ChainsConfig(self.min_coverage, self.min_span_match, tuple(self.extra_labels),
                            self.max_chains, self.max_malformed_share)

    def train_config(self, lags: tuple[int, ...]) -> TrainConfig:
        return TrainConfig(lags, tuple(self.strengths), tuple(self.split), self.seed,
                           self.bootstrap, self.max_iter, self.fit_threads, self.tolerance)


@dataclass
class _Prepared:
    chains: ChainSet
    tokens: list[TokenizedChain]
    cache: ActivationCache
    split: np.ndarray
    groups: np.ndarray  # problem group of each chain (split unit, bootstrap cluster)


def _int(value: Any, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LmlabError(f"{name} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise LmlabError(f"{name} must be an integer, got {value!r}")
    return int(number)


@register
class ProbesFamily(Family):
    name = "probes"
    # max_malformed_share only decides whether a load stops, never what it keeps.
    operational_settings = ("batch_size", "fit_threads", "register", "register_all",
                            "max_malformed_share")

    def __init__(self, spec) -> None:  # type: ignore[no-untyped-def]
        super().__init__(spec)
        self.settings = ProbeSettings.from_dict(spec.settings)
        if not spec.grid or set(spec.grid) != set(GRID_KEYS):
            raise LmlabError(f"a probes sweep needs a grid with exactly the keys {list(GRID_KEYS)}")
        self.lags = tuple(sorted(_int(v, "grid.lag") for v in spec.grid["lag"]))
        self.train_config = self.settings.train_config(self.lags)
        self._labels = self.settings.chains_config().labels
        for params in self.conditions():
            self.validate_condition(params)
        self._prepared: _Prepared | None = None
        self._layers: dict[tuple[str, int], LayerResult] = {}
        self._plan_tokens: tuple[float, float] | None = None

    # ------------------------------------------------------------------ conditions
    def conditions(self) -> list[dict[str, Any]]:
        points = [{"label": str(p["label"]), "layer": _int(p["layer"], "grid.layer"),
                   "lag": _int(p["lag"], "grid.lag")} for p in self.spec.grid_points()]
        # Lags of one layer run back to back so they share one joint fit in memory.
        return sorted(points, key=lambda p: (p["label"], p["layer"], p["lag"]))

    def validate_condition(self, params: Mapping[str, Any]) -> None:
        if params["label"] not in self._labels:
            raise LmlabError(f"label {params['label']!r} is not a chain label; "
                             f"known: {list(self._labels)}")
        if _int(params["layer"], "layer") < 0:
            raise LmlabError(f"layer must be >= 0, got {params['layer']}")

    def settings_identity(self) -> Any:
        """Result-changing settings; the chain file enters the key by its content digest."""
        return strip_operational(asdict(self.settings), self.operational_settings + ("data",))

    def data_inputs(self) -> dict[str, Path]:
        return {"chains": self.settings.data_path}

    def data_reports(self) -> list[DataReport]:
        if self._prepared is None:
            return []
        chains = self._prepared.chains
        report = DataReport(name="chains", source=str(self.settings.data), digest=path_digest(
            self.settings.data_path), rows_read=chains.n_read, rows_kept=len(chains.chains),
            dropped=chains.dropped, requested=self.settings.max_chains, unit="chains")
        if chains.repaired_tags:
            report.notes.append(f"note: chains: {chains.repaired_tags} tag(s) missing a quote "
                                "(such as [\"end-section]) were read as that tag")
        if chains.stray_labels:
            strays = ", ".join(f"{label!r} x{n}" for label, n in chains.stray_labels.most_common())
            report.notes.append(f"note: chains: labels outside the known set: {strays} (chains "
                                "skipped; add them to probes.extra_labels to keep them)")
        return [report]

    work_unit_name = "probe fits"

    def work_units(self, params: Mapping[str, Any]) -> int:
        """Logistic fits behind one condition: the probe and its shuffled control at every
        strength (token and persistence baselines are counts, not fits)."""
        return 2 * len(self.settings.strengths)

    def estimate_seconds(self, params: Mapping[str, Any]) -> float:
        """This condition's share of the activation extraction plus its fits.

        Based on the chain file's characters (tokens = characters / CHARS_PER_TOKEN +
        TEMPLATE_TOKENS per chain, over the chains a load would align), the grid's deepest
        layer and the measured CPU rates above for the embedded model; a cached extraction
        or another model makes it wrong by a constant factor.
        """
        tokens, chain_tokens = self._planned_tokens()
        depth = (max(_int(v, "grid.layer") for v in self.spec.grid["layer"]) + 1) / EMBEDDED_LAYERS
        extraction = tokens * min(depth, 1.0) / FORWARD_TOKENS_PER_S
        train_rows = chain_tokens * self.settings.split[0]
        fits = train_rows * EMBEDDED_WIDTH * self.work_units(params) * FIT_ITERATIONS \
            * FIT_SECONDS_PER_UNIT
        evaluation = chain_tokens * EVAL_SECONDS_PER_TOKEN
        return extraction / len(self.conditions()) + fits + evaluation + LOG_SECONDS_PER_CONDITION

    def _planned_tokens(self) -> tuple[float, float]:
        """(all tokens, chain tokens) the sweep will read, estimated from characters."""
        if self._plan_tokens is None:
            pairs = scan_chains(self.settings.data_path, self.settings.chains_config())
            chain = sum(len(text) for _, text in pairs) / CHARS_PER_TOKEN
            prompt = sum(len(problem) for problem, _ in pairs) / CHARS_PER_TOKEN \
                + TEMPLATE_TOKENS * len(pairs)
            self._plan_tokens = (chain + prompt, chain)
            print(f"probes plan: {len(pairs)} chains, about {chain + prompt:,.0f} tokens to run "
                  f"through the model (file characters / {CHARS_PER_TOKEN}), fits on about "
                  f"{chain * self.settings.split[0]:,.0f} train tokens; times use the embedded "
                  "model's CPU rates")
        return self._plan_tokens

    def run_name(self, params: Mapping[str, Any]) -> str:
        return f"{params['label']}-layer{params['layer']}-lag{params['lag']}"

    def objectives(self) -> list[tuple[str, str]]:
        return [("val_pr_auc", "maximize")]

    def logged_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {name: value for name, value in metrics.items() if name in SHOWN}

    # ------------------------------------------------------------------ work
    def prepare(self, ctx: SweepContext) -> None:
        self._prepare(ctx)

    def _prepare(self, ctx: SweepContext) -> _Prepared:
        if self._prepared is not None:
            return self._prepared
        lm = ctx.model

        def count_tokens(text: str) -> int:
            return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])

        chains = load_chains(self.settings.data_path, self.settings.chains_config(), count_tokens)
        tokens = self._drop_too_long(lm, chains, tokenize_chains(lm, chains.chains, self._labels))
        table = chains.console_table()
        if table:
            print(f"lmlab: chains skipped ({chains.n_malformed} malformed of {chains.n_read}, "
                  f"{chains.n_malformed / max(chains.n_read, 1):.1%}; the load stops past "
                  f"{self.settings.max_malformed_share:.0%}):\n{table}")
        self._check_grid_against_data(tokens)
        layers = sorted({_int(v, "grid.layer") for v in self.spec.grid["layer"]})
        config = ExtractionConfig(tuple(layers), self.settings.dtype, self.settings.batch_size)
        cache, report = extract(lm, tokens, chains.digest, config, Path(ctx.cache.root) / "activations")
        keys = [problem_key(c.problem) for c in chains.chains]
        groups = np.unique(keys, return_inverse=True)[1]
        split = split_groups(groups, self.settings.split, self.settings.seed)
        self._prepared = _Prepared(chains, tokens, cache, split, groups)
        self._log_data(ctx, chains, cache, report.to_dict())
        return self._prepared

    @staticmethod
    def _drop_too_long(lm: Any, chains: ChainSet, tokens: list[TokenizedChain]
                       ) -> list[TokenizedChain]:
        """Leave out chains the model cannot read whole (prompt and chain past its context)."""
        config = lm.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text_config, "max_position_embeddings", None)
        if not limit:
            return tokens
        long = {t.task_id: f"task_id {t.task_id!r}: {t.n_tokens} tokens > the model's {limit}"
                for t in tokens if t.n_tokens > limit}
        if long:
            chains.drop(long, "too_long", {t.task_id: t.n_tokens - t.chain_start for t in tokens})
        return [t for t in tokens if t.task_id not in long]

    def _data(self) -> _Prepared:
        if self._prepared is None:
            raise RuntimeError("probes family used before prepare()")
        return self._prepared

    def _check_grid_against_data(self, tokens: list[TokenizedChain]) -> None:
        if not tokens:
            raise LmlabError("no chains left: every kept chain is longer than the model's context")
        longest = max(t.n_tokens - t.chain_start for t in tokens)
        for lag in self.lags:
            if abs(lag) >= longest:
                raise LmlabError(f"lag {lag} is longer than every chain (longest chain: {longest} "
                                 "tokens)")
        for label in {str(v) for v in self.spec.grid["label"]}:
            if not any(t.labels[label].any() for t in tokens):
                raise LmlabError(f"label {label!r} never occurs in the kept chains")

    def _log_data(self, ctx: SweepContext, chains: ChainSet, cache: ActivationCache,
                  extraction: Mapping[str, Any]) -> None:
        run_id = ctx.tracker.parent_run_id
        report = chains.report()
        ctx.tracker.log_metrics(run_id, {k: v for k, v in {**report, **extraction}.items()
                                         if isinstance(v, (int, float))})
        ctx.tracker.set_tags(run_id, {"dataset_digest": chains.digest,
                                      "activation_cache_key": cache.key})
        ctx.tracker.log_text(run_id, json.dumps(cache.manifest(), indent=1),
                             "activations/manifest.json")
        coverage = pd.DataFrame({"task_id": [c.task_id for c in chains.chains],
                                 "coverage": [c.coverage for c in chains.chains],
                                 "spans": [len(c.spans) for c in chains.chains],
                                 "dropped_spans": [c.dropped_spans for c in chains.chains]})
        ctx.tracker.log_table(run_id, coverage, "chain_coverage")
        ctx.tracker.log_table(run_id, chains.skip_table(), "chains_skipped_by_reason")
        ctx.tracker.log_table(run_id, chains.skipped_frame(), "chains_skipped")

    def _probe_key(self, label: str, layer: int, lag: int | None = None) -> str:
        """One probe (``lag`` given) or one layer's stored fits (all grid lags).

        A lag's probe does not depend on the other lags, so the lag set is only part of
        the layer's key; the model, data, precision and training settings are in both.
        """
        prepared = self._data()
        train = asdict(self.train_config)
        train.pop("fit_threads")
        if lag is not None:
            train.pop("lags")
        return content_key("probe", prepared.cache.info["model"], prepared.chains.digest,
                           prepared.cache.info["dtype"], label, layer, lag, train)

    def layer_result(self, ctx: SweepContext, label: str, layer: int) -> LayerResult:
        """All lags of one layer, fitted once and cached on disk."""
        if (label, layer) in self._layers:
            return self._layers[(label, layer)]
        prepared = self._prepare(ctx)
        key = self._probe_key(label, layer)
        result = self._load_layer(ctx, key, label, layer)
        if result is None:
            tokens = prepared.tokens
            data = build_layer_data(prepared.cache.layer(layer, tokens),
                                    [t.labels[label] for t in tokens],
                                    [t.input_ids for t in tokens], [t.chain_start for t in tokens],
                                    self.lags, prepared.split, prepared.groups)
            result = train_layer(data, layer, label, self.train_config)
            self._store_layer(ctx, key, result)
        for warning in result.convergence_warnings():
            print(warning)
        self._layers[(label, layer)] = result
        return result

    def _store_layer(self, ctx: SweepContext, key: str, result: LayerResult) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for lag, probe in result.probes.items():
            tensors[f"{lag}/weight"] = torch.from_numpy(probe.weight)
            tensors[f"{lag}/mean"] = torch.from_numpy(probe.mean)
            tensors[f"{lag}/scale"] = torch.from_numpy(probe.scale)
        ctx.cache.put_tensors("probes", key, tensors)
        scalars = {str(lag): {"bias": p.bias, "threshold": p.threshold, "strength": p.strength}
                   for lag, p in result.probes.items()}
        ctx.cache.put_json("probes", key, {"metrics": {str(k): v for k, v in result.metrics.items()},
                                           "scalars": scalars})

    def _load_layer(self, ctx: SweepContext, key: str, label: str, layer: int) -> LayerResult | None:
        stored, tensors = ctx.cache.get_json("probes", key), ctx.cache.get_tensors("probes", key)
        if stored is None or tensors is None:
            return None
        # Fits stored before intervals were named ``_ci_lo`` / ``_ci_hi`` read as current.
        result = LayerResult(layer, label, {int(k): current_names(v)
                                            for k, v in stored["metrics"].items()})
        for lag_text, scalars in stored["scalars"].items():
            lag = int(lag_text)
            result.probes[lag] = Probe(layer, lag, label, tensors[f"{lag}/weight"].numpy(),
                                       scalars["bias"], tensors[f"{lag}/mean"].numpy(),
                                       tensors[f"{lag}/scale"].numpy(), scalars["threshold"],
                                       scalars["strength"])
        return result

    def run_condition(self, ctx: SweepContext, params: Mapping[str, Any]) -> ConditionResult:
        label, layer, lag = params["label"], _int(params["layer"], "layer"), _int(params["lag"], "lag")
        result = self.layer_result(ctx, label, layer)
        prepared = self._data()
        tags = {PROBE_KEY_TAG: self._probe_key(label, layer, lag),
                "dataset_digest": prepared.chains.digest,
                "activation_cache_key": prepared.cache.key, "artifact": artifact_name(layer, lag),
                "fit_converged": "true" if result.metrics[lag].get("fits_unconverged", 0) == 0
                else "false"}
        run_id = getattr(ctx, "run_id", None)
        if run_id and self.settings.register:
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = save_probe(result.probes[lag], Path(tmp), self._model_metadata())
                log_probe(ctx.tracker.client, run_id, model_dir)
        return ConditionResult(metrics=dict(result.metrics[lag]), tags=tags)

    def _model_metadata(self) -> dict[str, str]:
        prepared = self._data()
        return {"model": self.spec.model.name, "model_identity": prepared.cache.info["model"],
                "dataset_digest": prepared.chains.digest, "activation_cache_key": prepared.cache.key}

    # ------------------------------------------------------------------ parent
    def results_table(self, ctx: SweepContext, conditions: list[dict[str, Any]]) -> pd.DataFrame:
        rows = []
        for params in conditions:
            result = self.layer_result(ctx, params["label"], params["layer"])
            rows.append({**params, **result.metrics[params["lag"]]})
        frame = pd.DataFrame(rows)
        lead = [c for c in LEAD_COLUMNS if c in frame]
        return frame[lead + sorted(c for c in frame if c not in lead)]

    def summarize(self, ctx: SweepContext, summary: pd.DataFrame) -> ConditionResult:
        conditions = self._conditions_from(summary)
        table = self.results_table(ctx, conditions)
        figures: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        for label, rows in table.groupby("label"):
            for metric in PLOTTED:
                figures[f"{label}_heatmap_{metric}"] = plots.heatmap(rows, metric, label)
                figures[f"{label}_lines_{metric}"] = plots.lines(rows, metric, label)
            figures[f"{label}_class_balance"] = plots.class_balance(rows, label)
            best = rows.loc[rows["val_pr_auc"].idxmax()]
            metrics[f"{label}_best_val_pr_auc"] = float(best["val_pr_auc"])
            metrics[f"{label}_best_test_pr_auc"] = float(best["test_pr_auc"])
            metrics[f"{label}_best_test_auroc"] = float(best["test_auroc"])
            tags[f"{label}_best"] = f"layer={int(best['layer'])},lag={int(best['lag'])}"
            metrics.update(headline(str(label), best))
        if "fits_unconverged" in table:
            failed = int(table["fits_unconverged"].sum())
            metrics["fits_unconverged"] = float(failed)
            tags["fit_converged"] = "all" if not failed else \
                f"{failed} of {int(table['fits'].sum())} fits did not converge"
        if self.settings.register:
            tags.update(self.register_all(ctx, table))
        return ConditionResult(metrics=metrics, tables={"probe_results": table}, figures=figures,
                               tags=tags)

    def _conditions_from(self, summary: pd.DataFrame) -> list[dict[str, Any]]:
        """Conditions named by the runner's summary rows (``params.`` prefixes accepted)."""
        if summary is None or summary.empty:
            return self.conditions()
        frame = summary.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith("params.") else c)
        if not set(GRID_KEYS) <= set(frame.columns):
            return self.conditions()
        seen = {(str(r["label"]), _int(r["layer"], "layer"), _int(r["lag"], "lag"))
                for _, r in frame.iterrows()}
        return [{"label": a, "layer": b, "lag": c} for a, b, c in sorted(seen)]

    # ------------------------------------------------------------------ registry
    def register_all(self, ctx: SweepContext, table: pd.DataFrame) -> dict[str, str]:
        """Log each label's best probe (every probe with ``register_all``) on its child
        run, register it and point ``champion`` at the best."""
        client = ctx.tracker.client
        prepared = self._data()
        tags: dict[str, str] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for label, rows in table.groupby("label"):
                name = registered_name(str(label), self.spec.model.name)
                versions: dict[tuple[int, int], str] = {}
                best = rows.loc[rows["val_pr_auc"].idxmax()]
                chosen = rows if self.settings.register_all else rows.loc[[best.name]]
                for _, row in chosen.iterrows():
                    layer, lag = int(row["layer"]), int(row["lag"])
                    run_id = self._child_run(ctx, self._probe_key(str(label), layer, lag))
                    if run_id is None:
                        continue
                    versions[(layer, lag)] = self._log_and_register(
                        ctx, Path(tmp), name, run_id, self._layers[(str(label), layer)].probes[lag],
                        float(row["val_pr_auc"]))
                if versions:
                    champion = versions.get((int(best["layer"]), int(best["lag"])))
                    if champion is not None:
                        client.set_registered_model_alias(name, CHAMPION, champion)
                        tags[f"{label}_champion"] = f"models:/{name}@{CHAMPION} (v{champion})"
        return tags

    def _child_run(self, ctx: SweepContext, key: str) -> str | None:
        runs = ctx.tracker.client.search_runs(
            [ctx.tracker.experiment_id], filter_string=f"tags.{PROBE_KEY_TAG} = '{key}'",
            order_by=["attributes.start_time DESC"], max_results=20)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        chosen = (finished or runs)
        return chosen[0].info.run_id if chosen else None

    def _log_and_register(self, ctx: SweepContext, tmp: Path, name: str, run_id: str, probe: Probe,
                          val_pr_auc: float) -> str:
        client = ctx.tracker.client
        known = existing_version(client, name, run_id)
        if known is not None:
            return known
        prepared = self._data()
        metadata = self._model_metadata()
        artifact = artifact_name(probe.layer, probe.lag)
        if not client.list_artifacts(run_id, artifact):
            model_dir = save_probe(probe, tmp / run_id, metadata)
            log_probe(client, run_id, model_dir)
        return register_probe(client, name, f"runs:/{run_id}/{artifact}", run_id,
                              {"layer": probe.layer, "lag": probe.lag, "label": probe.label,
                               "val_pr_auc": round(val_pr_auc, 6),
                               "dataset_digest": prepared.chains.digest})


BASELINES = ("token", "persistence")


def _with_interval(row: Mapping[str, Any], column: str, name: str) -> dict[str, float]:
    out = {name: float(row[column])}
    for end in (CI_LO, CI_HI):
        if column + end in row and pd.notna(row[column + end]):
            out[name + end] = float(row[column + end])
    return out


def headline(label: str, champion: Mapping[str, Any]) -> dict[str, float]:
    """The champion's (best val PR-AUC) test PR-AUC, the stronger baseline's on the same
    tokens, and the champion's paired gain over that baseline (problem bootstrap)."""
    prefix = f"headline/{label}"
    out = _with_interval(champion, "test_pr_auc", f"{prefix}_test_pr_auc")
    present = [b for b in BASELINES if pd.notna(champion.get(f"{b}_test_pr_auc"))]
    if not present:
        return out
    strongest = max(present, key=lambda b: float(champion[f"{b}_test_pr_auc"]))
    out[f"{prefix}_baseline_test_pr_auc"] = float(champion[f"{strongest}_test_pr_auc"])
    out.update(_with_interval(champion, f"probe_minus_{strongest}_test_pr_auc",
                              f"{prefix}_gain_over_baseline"))
    return out
