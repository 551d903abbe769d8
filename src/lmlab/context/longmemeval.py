"""LongMemEval, focused vs full, as a paired design.

Inputs: the official JSON (a list of instances with ``question_id``, ``question_type``,
``question``, ``answer``, ``question_date``, ``haystack_session_ids``, ``haystack_dates``,
``haystack_sessions``, ``answer_session_ids``) or the earlier project's CSVs
(``custom_id``, ``question``, ``answer``, ``token_count`` and ``focused_prompt`` or
``full_prompt``). The focused prompt holds only the evidence sessions, the full prompt
every session. Questions whose id ends in ``_abs`` cannot be answered from the history:
the right answer is to say so. Each question is asked in both variants, so the two
accuracies are compared per question (paired difference with a bootstrap interval).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd

from lmlab.cache import content_key
from lmlab.llm.clients import Client, Reply, Request
from lmlab.context.engine import Item, JudgeQuestion
from lmlab.context.rows import cell_id
from lmlab.context.scoring import contains_answer
from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.identity import file_digest
from lmlab.stats import CI_HI, CI_LO, paired_difference, rate

TASK = "longmemeval"
RECIPE_VERSION = 1
BUNDLED = "bundled"
VARIANTS = ("focused", "full")
_REQUIRED = ("question_id", "question_type", "question", "answer", "haystack_sessions")
_ABSTAIN = re.compile(r"\b(not (been )?mentioned|no (information|mention|record)|don't know|do not "
                      r"know|not sure|cannot (tell|determine|answer|find)|can't (tell|determine|"
                      r"answer|find)|unknown|not (specified|provided|available|stated)|"
                      r"didn't (mention|say|tell)|did not (mention|say|tell))\b", re.IGNORECASE)
_INSTRUCTION = ("I will give you several history chats between you and a user. Please answer the "
                "question based on the relevant chat history. If the history does not contain "
                "the answer, say that you do not know.")


@dataclass(frozen=True)
class Question:
    question_id: str
    question_type: str
    question: str
    answer: str
    prompts: Mapping[str, str]  # variant -> full prompt text

    @property
    def abstention(self) -> bool:
        return self.question_id.endswith("_abs")


def bundled_path() -> Path:
    return Path(str(resources.files("lmlab") / "data" / "context" / "longmemeval_sample.json"))


def _history(sessions: Sequence[Sequence[Mapping[str, Any]]], dates: Sequence[str]) -> str:
    parts = []
    for number, (session, date) in enumerate(zip(sessions, dates), start=1):
        turns = "\n".join(f"[{turn['role']}]: {turn['content']}" for turn in session)
        parts.append(f"### Session {number}:\nSession Date: {date}\nSession Content:\n{turns}")
    return "\n\n".join(parts)


def render(instance: Mapping[str, Any], variant: str) -> str:
    sessions = instance["haystack_sessions"]
    ids = instance.get("haystack_session_ids") or [str(i) for i in range(len(sessions))]
    dates = instance.get("haystack_dates") or [""] * len(sessions)
    if variant == "focused":
        evidence = set(instance.get("answer_session_ids") or [])
        keep = [i for i, sid in enumerate(ids) if sid in evidence]
        sessions, dates = [sessions[i] for i in keep], [dates[i] for i in keep]
    history = _history(sessions, dates) or "(no history)"
    return (f"{_INSTRUCTION}\n\nHistory Chats:\n\n{history}\n\n"
            f"Current Date: {instance.get('question_date', '')}\nQuestion: {instance['question']}\n"
            "Answer:")


def instance_problem(instance: Any) -> tuple[str, str] | None:
    """Why an official instance cannot be used, as (reason, detail); None when it can."""
    if not isinstance(instance, Mapping):
        return "malformed", "not an object"
    missing = [key for key in _REQUIRED if key not in instance]
    if missing:
        return "malformed", f"lacks {', '.join(missing)}"
    sessions = instance["haystack_sessions"]
    if not isinstance(sessions, list) or not all(
            isinstance(s, list) and all(isinstance(t, Mapping) and "role" in t and "content" in t
                                        for t in s) for s in sessions):
        return "malformed", ("haystack_sessions must be a list of sessions, each a list of "
                             "{role, content} turns")
    for key in ("haystack_session_ids", "haystack_dates", "answer_session_ids"):
        if key in instance and not isinstance(instance[key], list):
            return "malformed", f"{key} must be a list"
    for key in ("haystack_session_ids", "haystack_dates"):
        if key in instance and len(instance[key]) != len(sessions):
            return "malformed", f"{key} has {len(instance[key])} entries for {len(sessions)} sessions"
    if not str(instance["question"]).strip() or not str(instance["answer"]).strip():
        return "empty", "empty question or answer"
    return None


def _decode(path: Path, what: str) -> str:
    if not path.is_file():
        raise LmlabError(f"{what} not found: {path}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LmlabError(f"{what} {path} is not UTF-8 text (byte {error.object[error.start]:#04x} "
                         f"at offset {error.start}); re-save it as UTF-8") from error


def _skip_notes(report: DataReport, origin: str, first: Mapping[str, str]) -> None:
    report.notes += [f"warning: {origin}: skipped {report.dropped[reason]} {reason} "
                     f"{report.unit}, first {detail}" for reason, detail in first.items()]


def _no_usable(origin: str, report: DataReport, first: Mapping[str, str]) -> LmlabError:
    why = "; ".join(f"{report.dropped[r]} {r} (first {d})" for r, d in first.items())
    return LmlabError(f"{origin} has no usable {report.unit} ({why or 'empty'})")


def read_official(path: Path, name: str = "longmemeval") -> tuple[list[Question], str, DataReport]:
    """Questions of an official JSON file, its digest, and what happened to each instance.

    A malformed or empty instance, or a repeated ``question_id``, is skipped with a counted
    reason; only a file that is not a JSON list, or has no usable instance, is an error.
    """
    # Newlines read as open() in text mode does, so the digest is the one read_text gives.
    text = _decode(path, "LongMemEval file").replace("\r\n", "\n").replace("\r", "\n")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise LmlabError(f"LongMemEval file {path} is not valid JSON: {error}") from error
    if not isinstance(raw, list):
        raise LmlabError(f"LongMemEval file {path} must be a non-empty JSON list of instances")
    report = DataReport(name=name, source=str(path), digest=file_digest(path),
                        rows_read=len(raw), unit="instances")
    questions: list[Question] = []
    seen: set[str] = set()
    first: dict[str, str] = {}
    for index, instance in enumerate(raw):
        problem = instance_problem(instance)
        if problem is None and str(instance["question_id"]) in seen:
            problem = "duplicate", f"question_id {instance['question_id']!r} repeated"
        if problem is not None:
            report.drop(problem[0])
            first.setdefault(problem[0], f"instance {index}: {problem[1]}")
            continue
        seen.add(str(instance["question_id"]))
        questions.append(Question(str(instance["question_id"]), str(instance["question_type"]),
                                  str(instance["question"]), str(instance["answer"]),
                                  {v: render(instance, v) for v in VARIANTS}))
    report.rows_kept = len(questions)
    _skip_notes(report, f"LongMemEval file {path}", first)
    if not questions:
        raise _no_usable(f"LongMemEval file {path} (a non-empty JSON list of instances)",
                         report, first)
    return questions, content_key(text), report


def load_official(path: Path) -> list[Question]:
    """The questions of :func:`read_official`, for callers that need no report."""
    return read_official(path)[0]


@dataclass
class _CsvRows:
    rows: dict[str, dict[str, str]]  # custom_id -> row, first occurrence kept
    report: DataReport
    first: dict[str, str]  # reason -> first example


def _csv_records(text: str) -> Iterator[tuple[int, list[str] | None]]:
    """(line number, fields) of each CSV record; fields None for a record csv cannot parse."""
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield reader.line_num, None
            continue
        yield reader.line_num, fields


def _read_variant_csv(path: Path, variant: str) -> _CsvRows:
    """One of the earlier project's CSVs: every record counted, bad ones skipped."""
    text = _decode(path, "LongMemEval CSV")
    column = f"{variant}_prompt"
    report = DataReport(name=f"longmemeval_{variant}", source=str(path), digest=file_digest(path),
                        unit="rows")
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # full prompts exceed csv's 128 KiB default
    try:
        records = _csv_records(text)
        header = next(([f.strip() for f in fields] for _, fields in records if fields), None)
        missing = [c for c in ("custom_id", "question", "answer", column) if c not in (header or [])]
        if header is None or missing:
            raise LmlabError(f"LongMemEval CSV {path} lacks column(s) {missing or [column]}")
        out = _CsvRows({}, report, {})
        for line, fields in records:
            if fields == []:
                continue  # a blank line is no record
            report.rows_read += 1
            reason, detail = _csv_problem(fields, header, column, out.rows)
            if reason:
                report.drop(reason)
                out.first.setdefault(reason, f"line {line}: {detail}")
                continue
            assert fields is not None
            row = dict(zip(header, fields))
            out.rows[row["custom_id"].strip()] = row
    finally:
        csv.field_size_limit(limit)
    return out


def _csv_problem(fields: list[str] | None, header: list[str], column: str,
                 kept: Mapping[str, Any]) -> tuple[str, str]:
    if fields is None or len(fields) != len(header):
        count = "unparsable" if fields is None else f"{len(fields)} fields for {len(header)} columns"
        return "malformed", count
    row = dict(zip(header, fields))
    empty = [c for c in ("custom_id", "question", "answer", column) if not row[c].strip()]
    if empty:
        return "empty", f"empty {', '.join(empty)}"
    if row["custom_id"].strip() in kept:
        return "duplicate", f"custom_id {row['custom_id'].strip()!r} repeated"
    return "", ""


def read_csvs(paths: Mapping[str, str]) -> tuple[list[Question], str, list[DataReport]]:
    """The earlier project's CSVs: one per variant, joined on ``custom_id``.

    Rows whose id is missing from another variant's CSV are dropped as ``unpaired``
    (the design compares variants on the same questions)."""
    read: dict[str, _CsvRows] = {}
    for variant, path in paths.items():
        if variant not in VARIANTS:
            raise LmlabError(f"LongMemEval CSVs are keyed focused/full, not {variant!r}")
        read[variant] = _read_variant_csv(Path(path).expanduser(), variant)
    ids = sorted(set.intersection(*(set(r.rows) for r in read.values())))
    for variant, part in read.items():
        unpaired = [qid for qid in part.rows if qid not in ids]
        if unpaired:
            part.report.drop("unpaired", len(unpaired))
            part.first.setdefault("unpaired", f"custom_id {unpaired[0]!r} (not in the other CSV)")
        part.report.rows_kept = len(ids)
        _skip_notes(part.report, f"LongMemEval CSV {paths[variant]}", part.first)
    if not ids:
        first = next(iter(read.values()))
        raise _no_usable(f"LongMemEval CSVs {', '.join(map(str, paths.values()))} (joined on "
                         "custom_id)", first.report, first.first)
    base = next(iter(read.values())).rows
    questions = [Question(qid, base[qid].get("question_type", "").strip() or "unknown",
                          base[qid]["question"], base[qid]["answer"],
                          {v: part.rows[qid][f"{v}_prompt"] for v, part in read.items()})
                 for qid in ids]
    digest = content_key([(q.question_id, dict(q.prompts)) for q in questions])
    return questions, digest, [part.report for part in read.values()]


def load_csvs(paths: Mapping[str, str]) -> list[Question]:
    """The questions of :func:`read_csvs`, for callers that need no report."""
    return read_csvs(paths)[0]


def read_questions(data: Any) -> tuple[list[Question], str, list[DataReport]]:
    """Questions, their digest and one report per input file."""
    if data in (None, BUNDLED):
        questions, digest, report = read_official(bundled_path())
        report.source = BUNDLED
        return questions, digest, [report]
    if isinstance(data, Mapping):
        return read_csvs({str(k): str(v) for k, v in data.items()})
    questions, digest, report = read_official(Path(str(data)).expanduser())
    return questions, digest, [report]


def load_questions(data: Any) -> tuple[list[Question], str]:
    questions, digest, _ = read_questions(data)
    return questions, digest


def stratified(questions: Sequence[Question], n: int) -> list[Question]:
    """First ``n`` questions taking question types round-robin (0 = all)."""
    if n <= 0 or n >= len(questions):
        return list(questions)
    by_type: dict[str, list[Question]] = {}
    for question in sorted(questions, key=lambda q: q.question_id):
        by_type.setdefault(question.question_type, []).append(question)
    order: list[Question] = []
    while len(order) < n:
        for bucket in by_type.values():
            if bucket and len(order) < n:
                order.append(bucket.pop(0))
    return order


def score(question: Question) -> Callable[[Reply], dict[str, Any]]:
    def scorer(reply: Reply) -> dict[str, Any]:
        if question.abstention:
            return {"correct": bool(_ABSTAIN.search(reply.text or ""))}
        return {"correct": contains_answer(reply.text, [question.answer])}

    return scorer


@dataclass(frozen=True)
class LongMemEvalSettings:
    # 'bundled', an official JSON path, or {focused: csv, full: csv}
    data: str | Mapping[str, str] | None = BUNDLED


class LongMemEvalTask:
    name = TASK

    def __init__(self, settings: LongMemEvalSettings) -> None:
        self.settings = settings
        self.questions, self.digest, self.reports = read_questions(settings.data)

    def data_inputs(self) -> dict[str, Path]:
        data = self.settings.data
        if data in (None, BUNDLED):
            return {"longmemeval": bundled_path()}
        if isinstance(data, Mapping):
            return {f"longmemeval_{k}": Path(str(v)).expanduser() for k, v in data.items()}
        return {"longmemeval": Path(str(data)).expanduser()}

    def data_reports(self) -> list[DataReport]:
        return list(self.reports)

    def identity(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def validate_params(params: Mapping[str, Any]) -> None:
        if params.get("variant") not in VARIANTS:
            raise LmlabError(f"longmemeval grid 'variant' must be focused or full, "
                             f"got {params.get('variant')!r}")

    def selected(self, params: Mapping[str, Any]) -> list[Question]:
        return stratified(self.questions, int(params["samples"]))

    def recipe(self, question: Question, variant: str) -> dict[str, Any]:
        return {"task": TASK, "v": RECIPE_VERSION, "source": self.digest,
                "question_id": question.question_id, "variant": variant}

    def items(self, params: Mapping[str, Any], client: Client, max_tokens: int,
              subject: Mapping[str, Any], decoding: Mapping[str, Any]) -> list[Item]:
        variant = str(params["variant"])
        out = []
        for question in self.selected(params):
            if variant not in question.prompts:
                raise LmlabError(f"no {variant} prompt for question {question.question_id}")
            prompt = question.prompts[variant]
            recipe = self.recipe(question, variant)
            key = cell_id(recipe, subject, decoding)
            fields = {"recipe": recipe, "question_id": question.question_id, "variant": variant,
                      "question_type": question.question_type, "abstention": question.abstention}
            out.append(Item(key, TASK, Request(key, prompt, max_tokens),
                            client.count_prompt_tokens(prompt), fields, score(question),
                            JudgeQuestion(question.question, question.answer, question.abstention)))
        return out

    def cell_ids(self, params: Mapping[str, Any], subject: Mapping[str, Any],
                 decoding: Mapping[str, Any]) -> list[str]:
        return [cell_id(self.recipe(q, str(params["variant"])), subject, decoding)
                for q in self.selected(params)]

    def estimate_tokens(self, params: Mapping[str, Any], max_tokens: int) -> tuple[int, int]:
        questions = self.selected(params)
        chars = sum(len(q.prompts.get(str(params["variant"]), "")) for q in questions)
        return chars // 4, len(questions) * max_tokens


def paired_summary(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], pd.DataFrame]:
    """Focused and full accuracy on the questions answered in both, their paired
    difference (full - focused) and accuracy per question type."""
    frame = pd.DataFrame([r for r in rows if r.get("status") == "done"])
    if frame.empty:
        return {}, pd.DataFrame()
    wide = frame.pivot_table(index=["question_id", "question_type"], columns="variant",
                             values="correct", aggfunc="first").dropna()
    metrics: dict[str, float] = {"paired_questions": float(len(wide))}
    for variant in VARIANTS:
        if variant in wide:
            metrics.update(rate(wide[variant].astype(bool)).to_dict(f"{variant}_accuracy"))
    if set(VARIANTS) <= set(wide.columns):
        metrics.update(paired_difference(wide["full"].astype(float),
                                         wide["focused"].astype(float)).to_dict("full_minus_focused"))
    per_type = []
    for qtype, group in frame.groupby("question_type"):
        entry: dict[str, Any] = {"question_type": qtype}
        for variant in VARIANTS:
            picked = group[group["variant"] == variant]["correct"].astype(bool)
            entry.update(rate(picked).to_dict(variant))
        per_type.append(entry)
    return metrics, pd.DataFrame(per_type)


def summary_figure(per_type: pd.DataFrame) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    x = range(len(per_type))
    for offset, variant in ((-width / 2, "focused"), (width / 2, "full")):
        values = per_type[variant].fillna(0)
        err = [(per_type[variant] - per_type[variant + CI_LO]).fillna(0),
               (per_type[variant + CI_HI] - per_type[variant]).fillna(0)]
        ax.bar([i + offset for i in x], values, width, yerr=err, capsize=3, label=variant)
    ax.set_xticks(list(x), per_type["question_type"], rotation=25, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson)")
    ax.set_title("LongMemEval accuracy per question type")
    ax.legend()
    fig.tight_layout()
    return fig
