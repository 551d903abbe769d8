"""The ``diffing`` sweep family: one child run per (organism, prompt set).

``prepare`` keeps one base model resident (``model:`` in the spec), checks every adapter
against it before any work, and builds the trait vectors (contrastive data, random
controls, steering directions, registered probes) on the clean model. A condition generates
the organism's and the clean model's responses, captures the organism on its own tokens,
replays exactly those ids through the clean model (hash-checked), projects every token on
every trait and summarises both conventions (``same_text``, ``own_text``) with bootstrap
intervals over responses. ``summarize`` removes the shift all organisms share, ranks the
traits for each organism, runs blind detection and writes ``summary.md``.

Condition keys: the organism's adapter digest and the prompt set's digest are params of
their own condition; the trait data, vectors and variants file enter every key.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from lmlab.cache import content_key
from lmlab.data.report import DataReport
from lmlab.diffing import analysis, pipeline, plots, report
from lmlab.diffing.capture import CONVENTIONS, ResidentBase
from lmlab.diffing.prompt_sets import PromptSet, load_prompt_set
from lmlab.diffing.settings import DiffingSettings, VectorSource
from lmlab.diffing.traits import (RANDOM, TraitData, TraitVector, available_traits, check_width,
                                  contrastive_vectors, load_trait, random_controls,
                                  read_direction_file, read_probe_folder,
                                  registered_probe_files, steering_run_direction, trait_root,
                                  vector_digest)
from lmlab.diffing.variants import (Organism, VariantsFile, bundled_organism, check_adapter,
                                    load_variants, resolve_adapter)
from lmlab.errors import LmlabError
from lmlab.hooks import check_layers
from lmlab.identity import path_digest
from lmlab.models import LoadedModel, load_model
from lmlab.stats import CI_HI, CI_LO, N, with_interval
from lmlab.sweeps.family import ConditionResult, Family, SweepContext, register

ARTIFACT_DIR = "diffing"
#: What a condition's run shows in the runs table besides each trait's mean shift (with its
#: interval) in the detection cell and the behaviour rates; every other statistic, layer
#: and convention is in its condition_metrics table.
SHOWN = ("replay/pairs_checked", "responses", "responses_empty", "tokens/organism_mean",
         "tokens/clean_mean", "stop/organism_eos_share", "stop/clean_eos_share")
SHOWN_STAT = "mean"
# Plan estimates for the embedded model on a shared 2-core CPU (bench/bench_diffing.py):
# greedy generation at batch 16 and a forward pass through every layer, in tokens/s.
GENERATION_TOKENS_PER_S = 60.0
FORWARD_TOKENS_PER_S = 240.0
PROMPT_TOKENS = 45  # chat template + a short question, SmolLM2's tokenizer
EMBEDDED_LAYERS = 30


@register
class DiffingFamily(Family):
    name = "diffing"
    work_unit_name = "responses"
    operational_settings = ("generation.batch_size", "capture.batch_size", "analysis.top_k")

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        if spec.grid is not None or spec.search is not None:
            raise LmlabError("a diffing sweep lists its conditions as diffing.organisms x "
                             "diffing.prompt_sets; remove 'grid' / 'search'")
        self.settings = DiffingSettings.from_dict(spec.settings)
        limit = self.settings.test_prompts if spec.test_mode else self.settings.max_prompts
        self.prompt_sets: dict[str, PromptSet] = {}
        for source in self.settings.prompt_sets:
            loaded = load_prompt_set(source, limit)
            if loaded.name in self.prompt_sets:
                raise LmlabError(f"two prompt sets are named {loaded.name!r}")
            self.prompt_sets[loaded.name] = loaded
        self.traits: list[TraitData] = self._load_traits()
        self.variants: VariantsFile | None = load_variants(self.settings.variants) \
            if self.settings.variants else None
        self._resident: ResidentBase | None = None
        self._projector: pipeline.Projector | None = None
        self._vectors: list[TraitVector] = []
        self._values: dict[tuple[str, str], pd.DataFrame] = {}
        self._trajectories: dict[tuple[str, str], pd.DataFrame] = {}
        self._plan_printed = False

    # ------------------------------------------------------------------ inputs
    def _load_traits(self) -> list[TraitData]:
        traits = self.settings.traits
        root = trait_root(traits.data)
        names = list(traits.names) if traits.names is not None else available_traits(root)
        if not names and not traits.vectors:
            raise LmlabError(f"no traits: {root} holds no trait data and no vectors are given")
        if any(analysis.is_random(name) for name in names):
            raise LmlabError(f"{RANDOM!r} and {RANDOM}_<k> name the random control traits; "
                             "rename that trait")
        return [load_trait(root, name, traits.context_prompt) for name in names]

    @cached_property
    def organisms(self) -> dict[str, Organism]:
        """Every organism of the sweep, resolved to a local adapter (bundled ones made once)."""
        out: dict[str, Organism] = {}
        entries = self.settings.organisms
        if entries is None and self.variants is None:
            from lmlab.diffing.settings import DEFAULT_ORGANISMS, OrganismEntry

            entries = tuple(OrganismEntry(name) for name in DEFAULT_ORGANISMS)
        for entry in entries or ():
            if entry.adapter is None:
                organism = bundled_organism(entry.name, self.spec.model)
                if entry.trait is not None or entry.control:
                    organism = replace(organism, trait=entry.trait, control=entry.control)
            else:
                organism = Organism(entry.name, resolve_adapter(entry.name, entry.adapter),
                                    entry.trait, entry.adapter, entry.control)
            out[organism.name] = organism
        for organism in self.variants.organisms if self.variants else ():
            if organism.name in out:
                raise LmlabError(f"organism {organism.name!r} is named twice (spec and variants "
                                 "file)")
            out[organism.name] = organism
        known = {t.name for t in self.traits} | {v.name for v in self.settings.traits.vectors}
        for organism in out.values():
            if organism.trait and organism.trait not in known:
                raise LmlabError(f"organism {organism.name!r}: planted trait {organism.trait!r} "
                                 f"is not among the traits {sorted(known)}")
        return out

    @cached_property
    def _vector_files(self) -> dict[str, Path]:
        """Local files of the trait vectors made elsewhere (downloaded once per sweep)."""
        from lmlab.tracking import store_dir

        out = {}
        for source in self.settings.traits.vectors:
            into = store_dir() / "cache" / "diffing-vectors" / content_key(source.source)
            if source.direction:
                out[source.name] = Path(source.direction).expanduser()
            elif source.steering_run:
                out[source.name] = steering_run_direction(source.steering_run, source.name, into)
            else:
                out[source.name] = registered_probe_files(str(source.probe), source.name, into)
        return out

    def data_inputs(self) -> dict[str, Path]:
        inputs: dict[str, Path] = {f"prompts:{n}": p.path for n, p in self.prompt_sets.items()}
        inputs.update({f"trait:{t.name}": t.path for t in self.traits})
        inputs.update({f"vector:{n}": p for n, p in self._vector_files.items()})
        inputs.update({f"adapter:{n}": o.adapter for n, o in self.organisms.items()})
        if self.variants is not None:
            inputs["variants"] = self.variants.path
        return inputs

    def key_inputs(self) -> list[str]:
        """Inputs every condition reads (traits, vectors, variants); each condition's own
        adapter and prompt set enter its key as the params ``adapter_digest`` and
        ``prompts_digest``, so adding an organism recomputes no other one."""
        return [name for name in self.data_inputs()
                if not name.startswith(("adapter:", "prompts:"))]

    def settings_identity(self) -> Any:
        identity = self.settings.identity(self.operational_settings)
        # Paths are replaced by content digests (data_inputs, params); names stay.
        for name in ("organisms", "variants", "prompt_sets", "max_prompts", "test_prompts"):
            identity.pop(name, None)
        identity["traits"].pop("data", None)
        identity["traits"]["vectors"] = [v.name for v in self.settings.traits.vectors]
        identity["traits"]["names"] = [t.name for t in self.traits]
        identity["conventions"] = CONVENTIONS
        return identity

    def data_reports(self) -> list[DataReport]:
        reports = [p.report for p in self.prompt_sets.values()] + [t.report for t in self.traits]
        if self.variants is not None:
            report = DataReport(name="variants", source=str(self.variants.path),
                                digest=path_digest(self.variants.path), unit="variants",
                                rows_read=self.variants.n_variants,
                                rows_kept=len(self.variants.organisms))
            report.drop("no_lora", self.variants.n_variants - len(self.variants.organisms))
            if self.variants.quantization:
                report.notes.append(f"quantization {self.variants.quantization} (from the file)")
            reports.append(report)
        return reports

    # ------------------------------------------------------------------ conditions
    def conditions(self) -> list[dict[str, Any]]:
        self._check_layers_early()
        # Controls first, then the spec's order.
        organisms = sorted(self.organisms.values(), key=lambda o: not o.control)
        out = []
        for organism in organisms:
            for name, prompt_set in self.prompt_sets.items():
                params = {"organism": organism.name, "prompt_set": name,
                          "planted_trait": organism.trait or ("none (control)" if organism.control
                                                              else "unknown"),
                          "adapter_digest": path_digest(organism.adapter),
                          "prompts_digest": prompt_set.report.digest,
                          "n_prompts": len(prompt_set.prompts)}
                if self.spec.test_mode:
                    params["subset"] = "test"
                out.append(params)
        return out

    def validate_condition(self, params: Mapping[str, Any]) -> None:
        if params["organism"] not in self.organisms:
            raise LmlabError(f"unknown organism {params['organism']!r}")
        if params["prompt_set"] not in self.prompt_sets:
            raise LmlabError(f"unknown prompt set {params['prompt_set']!r}")

    def _check_layers_early(self) -> None:
        """Refuse layers outside the model before any adapter is trained or loaded."""
        layers = _config_layers(self.spec.model)
        if layers is None:
            return
        for layer in self.settings.layers:
            if not 0 <= layer < layers:
                raise LmlabError(f"diffing.layers: layer {layer} is outside the model "
                                 f"{self.spec.model.name!r} (valid: 0..{layers - 1})")

    def run_name(self, params: Mapping[str, Any]) -> str:
        test = " [test]" if params.get("subset") == "test" else ""
        return f"{params['organism']} x {params['prompt_set']}{test}"

    def work_units(self, params: Mapping[str, Any]) -> int:
        return int(params.get("n_prompts", 0))

    def estimate_seconds(self, params: Mapping[str, Any]) -> float:
        """Generation and three captures of one condition (the clean model's share split
        over the organisms), at the embedded model's measured CPU rates."""
        self._print_plan()
        n = int(params.get("n_prompts", 0))
        new = self.settings.generation.max_new_tokens
        depth = min((max(self.settings.layers) + 1) / EMBEDDED_LAYERS, 1.0)
        capture = n * (PROMPT_TOKENS + new) * depth / FORWARD_TOKENS_PER_S
        generation = n * new / GENERATION_TOKENS_PER_S
        share = 1.0 / max(len(self.organisms), 1)
        return generation * (1 + share) + capture * (2 + share)

    def _print_plan(self) -> None:
        if self._plan_printed:
            return
        self._plan_printed = True
        prompts = sum(len(p.prompts) for p in self.prompt_sets.values())
        tokens = prompts * (PROMPT_TOKENS + self.settings.generation.max_new_tokens)
        columns = (len(self.traits) * len(self.settings.traits.methods)
                   + self.settings.traits.random * len(self.settings.traits.methods)
                   + len(self.settings.traits.vectors) + 1)
        reads = 2 * len(self.organisms) + 1
        layers = len(self.settings.layers)
        scores = tokens * reads * layers * columns * 4
        raw = tokens * reads * layers * 576 * 2
        stored = scores if self.settings.capture.store == "scores" else scores + raw
        print(f"diffing plan: {len(self.organisms)} organisms x {len(self.prompt_sets)} prompt "
              f"sets ({prompts} prompts), up to {self.settings.generation.max_new_tokens} new "
              f"tokens each; {reads} reads of about {tokens:,} tokens at {layers} layers; store "
              f"{self.settings.capture.store}: about {stored / 1e6:.1f} MB on disk (raw "
              f"activations would be {raw / 1e6:.1f} MB at width 576, float16)")

    # ------------------------------------------------------------------ prepare
    def _base(self, ctx: SweepContext) -> LoadedModel:
        wanted = self.variants.quantization if self.variants else None
        have = self.spec.model.quantization
        if wanted is None or wanted == have:
            return ctx.model
        if have != "none":
            raise LmlabError(f"the variants file asks for {wanted} but model.quantization is "
                             f"{have}: make them agree")
        print(f"diffing: loading the base model with {wanted} quantization (variants file)")
        return load_model(replace(self.spec.model, quantization=wanted))

    def prepare(self, ctx: SweepContext) -> None:
        if self._resident is not None:
            return
        lm = self._base(ctx)
        check_layers(lm, self.settings.layers)
        for organism in self.organisms.values():
            for note in check_adapter(organism, lm.model):
                print(f"note: {note}")
        self._resident = ResidentBase(lm)
        with self._resident.use(None) as clean:
            self._vectors = self._trait_vectors(ctx, clean)
        self._projector = pipeline.Projector.build(self._vectors, self.settings.layers,
                                                   lm.hidden_size, vector_digest(self._vectors))
        for organism in self.organisms.values():
            self._resident.add(organism)
        print(f"diffing: {len(self._vectors)} trait vectors over {len(self.settings.layers)} "
              f"layers; {len(self.organisms)} adapters loaded on one resident base model")

    def _trait_vectors(self, ctx: SweepContext, clean: LoadedModel) -> list[TraitVector]:
        traits = self.settings.traits
        layers = list(self.settings.layers)
        key = content_key("diffing-traits", clean.identity, [t.report.digest for t in self.traits],
                          traits.context_prompt, layers, traits.methods, traits.probe_c, traits.seed)
        names = ctx.cache.get_json("diffing-traits", key)
        stored = ctx.cache.get_tensors("diffing-traits", key)
        if names is None or stored is None:
            built = contrastive_vectors(clean, self.traits, layers, traits.methods,
                                        traits.probe_c, traits.seed)
            ctx.cache.put_tensors("diffing-traits", key,
                                  {str(i): v.vector for i, v in enumerate(built)})
            ctx.cache.put_json("diffing-traits", key,
                               [[v.trait, v.method, v.layer, v.source] for v in built])
        else:
            built = [TraitVector(trait, method, int(layer), stored[str(i)], source)
                     for i, (trait, method, layer, source) in enumerate(names)]
        vectors = built + random_controls(clean.hidden_size, layers, traits.random, traits.seed,
                                          built, traits.methods)
        vectors += [self._external(source, layers) for source in traits.vectors]
        for vector in vectors:
            check_width(vector, clean.hidden_size)
        return vectors

    def _external(self, source: VectorSource, layers: list[int]) -> TraitVector:
        path = self._vector_files[source.name]
        if source.probe:
            layer, vector = read_probe_folder(path, source.name)
            method = "registered_probe"
        else:
            layer, vector, kind = read_direction_file(path, source.name)
            method = f"steering_{kind}"
        if layer not in layers:
            raise LmlabError(f"trait vector {source.name!r} ({source.source}) is for layer "
                             f"{layer}, which is not among diffing.layers {layers}")
        return TraitVector(source.name, method, layer, vector, source.source)

    # ------------------------------------------------------------------ one condition
    def run_condition(self, ctx: SweepContext, params: Mapping[str, Any]) -> ConditionResult:
        self.prepare(ctx)
        assert self._resident is not None and self._projector is not None
        settings, projector = self.settings, self._projector
        organism = self.organisms[params["organism"]]
        prompt_set = self.prompt_sets[params["prompt_set"]]
        data = pipeline.run_captures(self._resident, organism, prompt_set, settings, projector,
                                     ctx.cache)
        unit, analysis_settings = settings.analysis.unit, settings.analysis
        values = pipeline.response_values(data, projector, unit)
        trajectory = pipeline.trajectory_table(
            data, projector, unit, analysis_settings.trajectory_bins, analysis_settings.bootstrap,
            analysis_settings.seed, self._ranked_methods())
        layer, method = settings.detect_layer, analysis_settings.detect_method
        clauses = pipeline.clause_table(data, projector, layer, method, unit, analysis_settings.top_k)
        shifts = analysis.estimates(values, analysis.CELL_KEYS, analysis_settings.bootstrap,
                                    analysis_settings.seed)
        self._values[(organism.name, prompt_set.name)] = values
        self._trajectories[(organism.name, prompt_set.name)] = trajectory
        metrics = self._metrics(data, shifts)
        shown = trajectory[(trajectory["layer"] == layer)
                           & (~trajectory["trait"].map(analysis.is_random)
                              | (trajectory["trait"] == RANDOM))]
        figures = {f"trajectory_{organism.name}": plots.trajectories(shown, organism.name,
                                                                      organism.trait, unit)}
        if ctx.run_id:
            with tempfile.TemporaryDirectory() as tmp:
                folder = self._write_files(Path(tmp), data, projector, values, trajectory,
                                           clauses, layer, method, unit)
                ctx.tracker.client.log_artifacts(ctx.run_id, str(folder), ARTIFACT_DIR)
        tags = {"diff_conventions": json.dumps(CONVENTIONS), "projection_unit": report.UNIT_WORDS[unit],
                "metric_names": "<convention>/<unit>/L<layer>/<trait>/<stat> (method "
                                f"{method} and vectors from other families)",
                "planted_trait": params["planted_trait"], "adapter": str(organism.adapter),
                "layer_convention": "layer L = output of decoder block L = hidden_states[L + 1]"}
        return ConditionResult(metrics=metrics, tables={"trait_shifts": shifts, "clauses": clauses},
                               figures=figures, tags=tags)

    def _ranked_methods(self) -> list[str]:
        """The detection method's traits and every vector from another family."""
        methods = {v.method for v in self._vectors} - set(self.settings.traits.methods)
        return [self.settings.analysis.detect_method, *sorted(methods)]

    def logged_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """:data:`SHOWN`, the organism's and the clean model's behaviour rates, and every
        trait's mean shift with its interval at the detection layer and convention."""
        analysis_settings = self.settings.analysis
        cell = (f"{analysis_settings.detect_convention}/{analysis_settings.unit}/"
                f"L{self.settings.detect_layer}/")

        def shown(name: str) -> bool:
            if name.startswith(cell):
                return name.rsplit("/", 1)[-1] in with_interval(SHOWN_STAT)
            if name.startswith("behaviour/"):
                return name.endswith(("_rate_organism", "_rate_clean"))
            return name in SHOWN

        return {name: value for name, value in metrics.items() if shown(name)}

    def _metrics(self, data: pipeline.ConditionData, shifts: pd.DataFrame) -> dict[str, float]:
        unit = self.settings.analysis.unit
        metrics: dict[str, float] = {"replay/pairs_checked": float(data.pairs_checked),
                                     "responses": float(len(data.own.items)),
                                     "responses_empty": float(len(data.organism_responses)
                                                              - len(data.own.items))}
        for who, responses in (("organism", data.organism_responses), ("clean", data.clean_responses)):
            lengths = [len(r.response_ids) for r in responses]
            metrics[f"tokens/{who}_mean"] = float(sum(lengths) / max(len(lengths), 1))
            metrics[f"stop/{who}_eos_share"] = float(sum(r.stop_reason == "eos" for r in responses)
                                                     / max(len(responses), 1))
        for layer, norm in data.residual_norm.items():
            metrics[f"residual_norm/L{layer}"] = norm
        chosen = shifts[shifts["method"].isin(self._ranked_methods())
                        & (~shifts["trait"].map(analysis.is_random) | (shifts["trait"] == RANDOM))]
        for row in chosen.itertuples():
            name = f"{row.convention}/{unit}/L{row.layer}/{row.trait}/{row.stat}"
            metrics.update({name: row.estimate, name + CI_LO: row.estimate_ci_lo,
                            name + CI_HI: row.estimate_ci_hi})
        metrics.update(pipeline.behaviour_rates(data))
        return metrics

    def _write_files(self, folder: Path, data: pipeline.ConditionData,
                     projector: pipeline.Projector, values: pd.DataFrame,
                     trajectory: pd.DataFrame, clauses: pd.DataFrame, layer: int, method: str,
                     unit: str) -> Path:
        """The condition's artifacts (under ``diffing/`` on its run)."""
        pipeline.projection_table(data, projector).to_parquet(folder / "projections.parquet",
                                                              index=False)
        values.to_parquet(folder / "responses.parquet", index=False)
        trajectory.to_parquet(folder / "trajectory.parquet", index=False)
        with open(folder / "generations.jsonl", "w") as handle:
            for record in pipeline.generation_records(data):
                handle.write(json.dumps(record) + "\n")
        (folder / "activations_manifest.json").write_text(json.dumps(pipeline.manifests(data),
                                                                     indent=1, default=str))
        vectors = pd.DataFrame([{"trait": v.trait, "method": v.method, "layer": v.layer,
                                 "norm": float(v.vector.norm()), "source": v.source}
                                for v in self._vectors])
        vectors.to_csv(folder / "trait_vectors.csv", index=False)
        (folder / "top_activating.html").write_text(self._page(data, projector, values, clauses,
                                                               layer, method, unit))
        return folder

    def _page(self, data: pipeline.ConditionData, projector: pipeline.Projector,
              values: pd.DataFrame, clauses: pd.DataFrame, layer: int, method: str,
              unit: str) -> str:
        top_k = self.settings.analysis.top_k
        chosen = values[(values["convention"] == "same_text") & (values["layer"] == layer)
                        & (values["method"] == method) & (values["stat"] == "mean")]
        scale = data.residual_norm[layer] if unit == "scaled" else 1.0
        index = {item.task_id: i for i, item in enumerate(data.own.items)}
        columns = projector.columns[layer]
        shown = []
        for trait, rows in chosen.groupby("trait", sort=False):
            column = columns.index((trait, method))
            for row in rows.sort_values("value", ascending=False).head(top_k).itertuples():
                task_id = f"{row.prompt_set}/{row.prompt_id}"
                shift = pipeline._shift(data, layer, index[task_id])[:, column] / scale
                pieces = data.pieces[f"{data.organism.name}:{task_id}"]
                shown.append((str(trait), row.prompt_id, pieces, shift, float(row.value)))
        return report.top_activating_html(data.organism.name, data.prompt_set.name, layer, method,
                                          unit, shown, clauses)

    # ------------------------------------------------------------------ parent
    def _condition_tables(self, ctx: SweepContext, summary: pd.DataFrame
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
        values, trajectories = [], []
        for row in summary.itertuples():
            key = (str(row.organism), str(row.prompt_set))
            if key in self._values:
                values.append(self._values[key])
                trajectories.append(self._trajectories[key])
                continue
            run_id = getattr(row, "run_id", None)
            if not run_id:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                client = ctx.tracker.client
                for name, bucket in (("responses", values), ("trajectory", trajectories)):
                    path = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{name}.parquet", tmp)
                    bucket.append(pd.read_parquet(path))
        if not values:
            raise LmlabError("no finished diffing condition to summarise")
        return pd.concat(values, ignore_index=True), pd.concat(trajectories, ignore_index=True)

    def summarize(self, ctx: SweepContext, summary: pd.DataFrame) -> ConditionResult:
        if summary is None or summary.empty or "organism" not in summary:
            return ConditionResult(metrics={})
        values, trajectories = self._condition_tables(ctx, summary)
        settings = self.settings.analysis
        methods = self._ranked_methods()
        ranked = analysis.ranked(values[values["method"].isin(methods)], settings.bootstrap,
                                 settings.seed)
        planted = {name: self.organisms[name].trait if name in self.organisms else None
                   for name in dict.fromkeys(values["organism"])}
        controls = [n for n in planted if n in self.organisms and self.organisms[n].control]
        randoms = sorted({t for t in values["trait"] if analysis.is_random(t)})
        layer, method, convention = self.settings.detect_layer, settings.detect_method, \
            settings.detect_convention
        found = analysis.findings(ranked, planted, convention, layer, method,
                                  settings.detect_stats, randoms)
        other = next(c for c in ("same_text", "own_text") if c != convention)
        other_found = analysis.findings(ranked, planted, other, layer, method,
                                        settings.detect_stats, randoms)
        detection = analysis.detection_table(found)
        cell = ranked[(ranked["convention"] == convention) & (ranked["layer"] == layer)
                      & (ranked["method"] == method)]
        pooled = analysis.random_pooled(cell, randoms, settings.bootstrap, settings.seed)
        random_rows = analysis.outside_zero(pooled)
        behaviour = self._behaviour_table(summary)
        text = report.summary_markdown(found, planted, controls, settings.detect_stats,
                                       convention, layer, method, settings.unit, pooled,
                                       cell["trait"].nunique(), behaviour,
                                       cross_check=(other, other_found) if other_found else None)
        ctx.tracker.log_text(ctx.tracker.parent_run_id, text, "summary.md")
        known = [o for o, t in planted.items() if t]
        detected = {f.organism for f in found if f.detected}
        metrics = {"detected": float(len(detected)), "organisms_with_planted_trait": float(len(known)),
                   "control_false_detections": float(sum(f.found for f in found
                                                         if f.organism in controls)),
                   "random_intervals_excluding_0": float(len(random_rows)),
                   f"detected_{other}": float(len({f.organism for f in other_found if f.detected})),
                   f"control_false_detections_{other}": float(sum(
                       f.found for f in other_found if f.organism in controls)),
                   "random_directions": float(len(randoms)),
                   "random_largest_shift": float(pooled["largest_abs"].max())
                   if not pooled.empty else float("nan")}
        figures = {}
        shown = cell[~cell["trait"].map(analysis.is_random) | (cell["trait"] == RANDOM)]
        for stat in ("mean", "trend"):
            rows = shown[shown["stat"] == stat]
            for kind in ("adjusted", "raw"):
                label = "shared shift removed" if kind == "adjusted" else "raw (shared shift kept)"
                figures[f"heatmap_{stat}_{kind}"] = plots.shift_heatmap(
                    rows, kind, f"{convention} {stat} shift ({settings.unit}), layer {layer}, "
                                f"{method}: {label}")
        for (organism, prompt_set), rows in trajectories[
                (trajectories["layer"] == layer)
                & trajectories["method"].isin(methods)
                & (~trajectories["trait"].map(analysis.is_random)
                   | (trajectories["trait"] == RANDOM))].groupby(
                    ["organism", "prompt_set"]):
            figures[f"trajectory_{organism}_{prompt_set}"] = plots.trajectories(
                rows, f"{organism} ({prompt_set})", planted.get(organism), settings.unit)
        tags = {"detected": ", ".join(sorted(detected)) or "none",
                "ranking": f"{convention}, layer {layer}, {method}, {settings.unit}"}
        return ConditionResult(metrics=metrics, figures=figures, tags=tags,
                               tables={"blind_detection": detection,
                                       "shift_ranking": cell.reset_index(drop=True),
                                       "random_control": pooled})

    def _behaviour_table(self, summary: pd.DataFrame) -> pd.DataFrame | None:
        columns = [c for c in summary.columns if c.startswith("behaviour/")
                   and not c.endswith((CI_LO, CI_HI, N))]
        if not columns:
            return None
        frame = summary.groupby("organism")[columns].mean().reset_index()
        return frame.rename(columns=lambda c: c.removeprefix("behaviour/"))


def _config_layers(spec: Any) -> int | None:
    """Decoder blocks of ``spec``'s model from its config alone (None when unknown)."""
    from lmlab.models import EMBEDDED_NAME, TINY_PREFIX

    if spec.name.startswith(TINY_PREFIX):
        return 3
    if spec.name == EMBEDDED_NAME:
        return EMBEDDED_LAYERS
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec.name, local_files_only=True)
    except Exception:  # the model load reports what is wrong with it
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    return int(layers) if layers else None

