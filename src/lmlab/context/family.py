"""The ``context`` sweep family: one condition per grid cell, several samples per cell.

A condition is e.g. (length, depth) for the needle task, (variant) for LongMemEval or
(words, position) for repeated words. Inside a condition the engine sends only cells
the row store has not finished, so a re-run of a completed grid makes zero calls. Test
mode keeps a stratified subset of the same conditions and samples: the same cell ids,
so test rows are ordinary rows and can never overwrite anything; the condition params
carry ``subset: test`` so their MLflow runs stay apart from full runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from lmlab.context import longmemeval, niah, repeated_words
from lmlab.llm.accounting import Ledger
from lmlab.llm.clients import LOCAL, LOCAL_SAMPLER, Client, LiteLLMClient, make_client
from lmlab.context.engine import EngineSettings, run_items, status_counts
from lmlab.context.rows import RowStore
from lmlab.context.scoring import SCORING_VERSION, accuracy_metrics, mean_of
from lmlab.context.settings import ContextSettings, build_task_settings
from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.stats import CI_HI, CI_LO, N
from lmlab.sweeps.family import ConditionResult, Family, SweepContext, register
from lmlab.tracking import condition_key

_ROW_COLUMNS = ("cell_id", "status", "flag", "target_tokens", "built_tokens", "reported_tokens",
                "depth", "depth_actual", "distractor_depths", "needle", "question_id",
                "question_type", "variant", "abstention", "words", "index", "correct",
                "judge_verdict", "judge_flag", "levenshtein_score", "modified_word_present",
                "correct_position", "delta", "modified_word_position", "category", "stop_reason",
                "error_kind", "response")


def stratified_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A deterministic subset in which every value of every grid key appears."""
    uncovered = {(k, repr(v)) for p in points for k, v in p.items()}
    chosen = []
    for point in sorted(points, key=lambda p: condition_key(p)):
        gain = {(k, repr(v)) for k, v in point.items()} & uncovered
        if gain:
            chosen.append(point)
            uncovered -= gain
    return [p for p in points if p in chosen]  # keep the spec's order


def make_task(settings: ContextSettings, grid: Mapping[str, list[Any]] | None) -> Any:
    raw = settings.task_settings
    if settings.task == "niah":
        return niah.NiahTask(build_task_settings(niah.NiahSettings, raw, "niah"))
    if settings.task == "longmemeval":
        return longmemeval.LongMemEvalTask(
            build_task_settings(longmemeval.LongMemEvalSettings, raw, "longmemeval"))
    positions = list((grid or {}).get("position") or [0.0, 0.5, 1.0])
    return repeated_words.RepeatedWordsTask(
        build_task_settings(repeated_words.RepeatedWordsSettings, raw, "repeated_words"), positions)


@register
class ContextFamily(Family):
    name = "context"
    work_unit_name = "prompts"
    operational_settings = ("row_store", "batch_size", "test_samples")

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.settings = ContextSettings.from_dict(spec.settings)
        self.task = make_task(self.settings, spec.grid)
        self.client: Client | None = None
        self.judge: Client | None = None
        self.store: RowStore | None = None
        self.spent_usd = 0.0

    # ------------------------------------------------------------ conditions
    def settings_identity(self) -> Any:
        """The settings, plus the versions of the methods that turn them into results
        (scoring, the task's layout of samples and distractors, the local sampler), so a
        run computed under an older method is not reused as if it were current."""
        methods: dict[str, Any] = {"scoring": SCORING_VERSION, **self.task.identity()}
        subject = self.settings.subject
        if subject.model == LOCAL and subject.temperature > 0:
            methods["local_sampler"] = LOCAL_SAMPLER
        return {**self.settings.identity(), "methods": methods}

    def data_inputs(self) -> dict[str, Path]:
        return self.task.data_inputs()

    def data_reports(self) -> list[DataReport]:
        """One report per input: haystack files and needles (niah), LongMemEval instances
        or CSV rows; read, kept and dropped by reason, with a warning per skipped kind."""
        reports = self.task.data_reports()
        samples = self.settings.test_samples if self.spec.test_mode else self.settings.samples
        for report in reports:
            if report.name == "needles" or (report.name.startswith("longmemeval") and samples):
                report.requested = samples
        return reports

    def conditions(self) -> list[dict[str, Any]]:
        points = self.spec.grid_points()
        if not points and self.settings.task == "longmemeval":
            points = [{"variant": v} for v in longmemeval.VARIANTS]
        if not points:
            raise LmlabError(f"context task {self.settings.task} needs a grid "
                             "(niah: length, depth; repeated_words: words, position)")
        for point in points:
            self.validate_condition({**point, "samples": 1})
        if self.spec.test_mode:
            return [{**p, "samples": self.settings.test_samples, "subset": "test"}
                    for p in stratified_points(points)]
        return [{**p, "samples": self.settings.samples} for p in points]

    def validate_condition(self, params: Mapping[str, Any]) -> None:
        self.task.validate_params(params)

    def run_name(self, params: Mapping[str, Any]) -> str:
        cell = ",".join(f"{k}={v}" for k, v in params.items() if k not in ("samples", "subset"))
        return f"{self.settings.task} {cell}" + (" [test]" if params.get("subset") == "test" else "")

    def work_units(self, params: Mapping[str, Any]) -> int:
        if self.settings.task == "longmemeval":
            return len(self.task.selected(params))
        return int(params.get("samples", 0))

    def estimate_seconds(self, params: Mapping[str, Any]) -> float:
        if self.settings.subject.model != "local":
            return 0.0
        prompt, output = self.task.estimate_tokens(params, self.settings.max_tokens)
        return prompt / 300 + output / 30  # CPU figures from DESIGN.md section 2

    # ------------------------------------------------------------ setup
    @property
    def decoding(self) -> dict[str, Any]:
        return {"max_tokens": self.settings.max_tokens,
                "temperature": self.settings.subject.temperature}

    def prepare(self, ctx: SweepContext) -> None:
        s = self.settings
        self.client = make_client(s.subject, Ledger(), "subject", lambda: ctx.model, s.batch_size)
        if s.judge is not None:
            self.judge = make_client(s.judge, Ledger(), "judge", lambda: ctx.model, s.batch_size)
        path = Path(s.row_store) if s.row_store else Path(ctx.store_dir) / "context" / "rows.sqlite"
        self.store = RowStore(path)
        conditions = self.conditions()
        self._check_context_window(conditions)
        if isinstance(self.client, LiteLLMClient):
            self._announce(conditions)

    def _check_context_window(self, conditions: list[dict[str, Any]]) -> None:
        assert self.client is not None
        window = self.client.context_window
        if window is None or self.settings.task != "niah":
            return
        for params in conditions:
            needed = int(params["length"]) + self.settings.max_tokens
            if needed > window:
                raise LmlabError(f"niah length {params['length']} plus max_tokens "
                                 f"{self.settings.max_tokens} exceeds the subject's context of "
                                 f"{window} tokens; drop that length from the grid")

    def _announce(self, conditions: list[dict[str, Any]]) -> None:
        assert isinstance(self.client, LiteLLMClient)
        prompt = output = 0
        for params in conditions:
            p, o = self.task.estimate_tokens(params, self.settings.max_tokens)
            prompt, output = prompt + p, output + o
        cost, source = self.client.estimate_cost(prompt, output)
        budget = self.settings.subject.budget_usd
        print(f"context: subject {self.settings.subject.model}: at most {prompt} prompt + {output} "
              f"output tokens, estimated cost ${cost:.4f} ({source})"
              + (f", budget cap ${budget:.4f}" if budget else "") +
              "; cells already in the row store are not sent again")
        if self.client.tokenizer_source != "own":
            print("context: prompts are sized with LiteLLM's token counter, not the model's own "
                  "tokenizer; set context.subject.tokenizer to the model's tokenizer directory")

    # ------------------------------------------------------------ one condition
    def run_condition(self, ctx: SweepContext, params: Mapping[str, Any]) -> ConditionResult:
        if self.client is None or self.store is None:
            self.prepare(ctx)
        assert self.client is not None and self.store is not None
        budget = self.settings.subject.budget_usd
        ledger = Ledger(None if budget is None else budget - self.spent_usd)
        self.client.ledger = ledger
        if self.judge is not None:
            self.judge.ledger = ledger
        items = self.task.items(params, self.client, self.settings.max_tokens,
                                self.client.identity, self.decoding)
        try:
            outcome = run_items(items, self.client, self.store,
                                EngineSettings(self.settings.truncation_tolerance,
                                               progress=self.run_name(params)), self.judge)
        finally:
            self.spent_usd += ledger.spent_usd
        rows = outcome.rows
        metrics = {**status_counts(rows), **ledger.metrics(), "rows_reused": float(outcome.reused),
                   "rows_sent": float(outcome.sent), "rows_rescored": float(outcome.rescored),
                   **self._task_metrics(rows)}
        print(f"{self.run_name(params)}: {len(rows)} rows ({outcome.reused} reused, "
              f"{outcome.sent} sent) | {ledger.line()}")
        tags = {"context.task": self.settings.task, "context.subject": self.settings.subject.model,
                "context.row_store": str(self.store.path)}
        if isinstance(self.client, LiteLLMClient):
            tags["context.tokenizer"] = self.client.tokenizer_source
        return ConditionResult(metrics=metrics, tables={"rows": rows_frame(rows)}, tags=tags,
                               incomplete=incomplete_reason(rows))

    def _task_metrics(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = accuracy_metrics(rows)
        done = [r for r in rows if r.get("status") == "done"]
        out.update(built_tokens_mean=mean_of(rows, "built_tokens"),
                   reported_tokens_mean=mean_of(done, "reported_tokens"))
        if self.settings.task == "niah":
            errors = [abs(r["built_tokens"] - r["target_tokens"]) / r["target_tokens"] for r in rows]
            out.update(size_error_max=max(errors) if errors else float("nan"),
                       depth_actual_mean=mean_of(rows, "depth_actual"))
        if self.settings.task == "repeated_words":
            out.update(repeated_words.condition_metrics(rows))
        return out

    # ------------------------------------------------------------ parent
    def summarize(self, ctx: SweepContext, summary: pd.DataFrame) -> ConditionResult:
        metrics: dict[str, float] = {}
        for name in ("calls_made", "cost_usd", "subject_prompt_tokens", "subject_completion_tokens",
                     "judge_calls", "rows_truncated", "rows_error"):
            if name in summary:
                metrics[f"total_{name}"] = float(summary[name].fillna(0).sum())
        if summary.empty:
            return ConditionResult(metrics=metrics)
        if self.settings.task == "niah":
            extra, figures, tables = niah.summarize(summary, self._stored_rows(ctx, summary),
                                                    self.settings.accuracy_threshold)
        elif self.settings.task == "repeated_words":
            extra, figures, tables = repeated_words.summarize(summary)
        else:
            extra, figures, tables = self._summarize_longmemeval(ctx, summary)
        found, tags = headline(extra, tables)
        return ConditionResult(metrics={**metrics, **extra, **found}, figures=figures,
                               tables=tables, tags=tags)

    def _summarised_conditions(self, summary: pd.DataFrame) -> list[dict[str, Any]]:
        """The spec's conditions (with their exact param types, which the cell ids hash)
        that appear in the summary; numbers compare by value (a table may turn 50 into 50.0)."""
        def point(values: Mapping[str, Any], keys: list[str]) -> tuple[Any, ...]:
            return tuple(float(values[k]) if isinstance(values[k], (int, float))
                         and not isinstance(values[k], bool) else values[k] for k in keys)

        conditions = self.conditions()
        keys = [k for k in conditions[0] if k in summary.columns] if conditions else []
        present = {point(row, keys) for row in summary[keys].to_dict("records")}
        return [c for c in conditions if point(c, keys) in present]

    def _stored_rows(self, ctx: SweepContext, summary: pd.DataFrame) -> list[dict[str, Any]]:
        """Every stored row of the summarised conditions (the parent pools them)."""
        if self.client is None or self.store is None:
            self.prepare(ctx)
        assert self.client is not None and self.store is not None
        ids: list[str] = []
        for params in self._summarised_conditions(summary):
            ids += self.task.cell_ids(params, self.client.identity, self.decoding)
        rows = self.store.get(ids)
        if len(rows) < len(ids):
            print(f"warning: {len(ids) - len(rows)} of {len(ids)} rows of the summarised conditions "
                  f"are not in the row store {self.store.path}; the parent's pooled rates use "
                  f"the {len(rows)} found")
        return list(rows.values())

    def _summarize_longmemeval(self, ctx: SweepContext, summary: pd.DataFrame):  # type: ignore[no-untyped-def]
        metrics, per_type = longmemeval.paired_summary(self._stored_rows(ctx, summary))
        if per_type.empty:
            return metrics, {}, {}
        return metrics, {"longmemeval_per_type": longmemeval.summary_figure(per_type)}, \
            {"longmemeval_per_type": per_type}


def incomplete_reason(rows: list[dict[str, Any]]) -> str | None:
    """Why a condition's rows are not all answered: calls (or judge calls) that failed
    after their retries. Those rows are sent again by the next run; None when complete."""
    from collections import Counter

    failed = Counter(str(r.get("error_kind") or "error") for r in rows if r.get("status") == "error")
    judged = sum(1 for r in rows if str(r.get("judge_flag") or "").startswith("error"))
    parts = []
    if failed:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(failed.items()))
        parts.append(f"{sum(failed.values())} of {len(rows)} rows failed ({kinds})")
    if judged:
        parts.append(f"{judged} judge call(s) failed")
    return "; ".join(parts) or None


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The condition's rows for MLflow: outcome columns and call accounting, no prompts."""
    records = []
    for row in rows:
        record = {k: row.get(k) for k in _ROW_COLUMNS if k in row}
        if isinstance(record.get("response"), str):
            record["response"] = record["response"][:300]
        if isinstance(record.get("distractor_depths"), list):
            record["distractor_depths"] = " ".join(f"{d:g}" for d in record["distractor_depths"])
        for k, v in (row.get("call") or {}).items():
            record[f"call_{k}"] = v
        records.append(record)
    return pd.DataFrame(records)


def _rate(source: Mapping[str, Any], name: str, as_name: str) -> dict[str, float]:
    return {as_name + end: float(source[name + end]) for end in ("", CI_LO, CI_HI, N)
            if name + end in source and pd.notna(source[name + end])}


def headline(metrics: Mapping[str, float], tables: Mapping[str, pd.DataFrame]
             ) -> tuple[dict[str, float], dict[str, str]]:
    """Accuracy at the shortest and the longest context, for the parent's runs-table
    columns: needle lengths pooled over depths (clustered by needle), or LongMemEval's
    focused (short) and full (long) haystacks on the questions answered in both."""
    by_length = tables.get("niah_by_length")
    if by_length is not None and not by_length.empty:
        ordered = by_length.sort_values("length")
        short, long = ordered.iloc[0], ordered.iloc[-1]
        return ({**_rate(short, "accuracy", "headline/accuracy_shortest"),
                 **_rate(long, "accuracy", "headline/accuracy_longest")},
                {"lmlab.headline": f"accuracy at {short['length']:g} and {long['length']:g} tokens"})
    if "focused_accuracy" in metrics and "full_accuracy" in metrics:
        return ({**_rate(metrics, "focused_accuracy", "headline/accuracy_shortest"),
                 **_rate(metrics, "full_accuracy", "headline/accuracy_longest")},
                {"lmlab.headline": "accuracy on the focused (shortest) and full (longest) haystack"})
    return {}, {}
