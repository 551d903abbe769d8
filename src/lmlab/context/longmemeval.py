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

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from lmlab.cache import content_key
from lmlab.llm.clients import Client, Reply, Request
from lmlab.context.engine import Item, JudgeQuestion
from lmlab.context.rows import cell_id
from lmlab.context.scoring import contains_answer
from lmlab.errors import LmlabError
from lmlab.stats import paired_difference, rate

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


def _check_instance(instance: Any, index: int, origin: str) -> None:
    if not isinstance(instance, Mapping):
        raise LmlabError(f"{origin}: instance {index} is not an object")
    missing = [key for key in _REQUIRED if key not in instance]
    if missing:
        raise LmlabError(f"{origin}: instance {index} lacks {', '.join(missing)}")
    sessions = instance["haystack_sessions"]
    if not isinstance(sessions, list) or not all(
            isinstance(s, list) and all(isinstance(t, Mapping) and "role" in t and "content" in t
                                        for t in s) for s in sessions):
        raise LmlabError(f"{origin}: instance {index} haystack_sessions must be a list of "
                         "sessions, each a list of {role, content} turns")
    for key in ("haystack_session_ids", "haystack_dates"):
        if key in instance and len(instance[key]) != len(sessions):
            raise LmlabError(f"{origin}: instance {index} {key} has {len(instance[key])} "
                             f"entries for {len(sessions)} sessions")


def load_official(path: Path) -> list[Question]:
    if not path.is_file():
        raise LmlabError(f"LongMemEval file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LmlabError(f"LongMemEval file {path} is not valid JSON: {error}") from error
    if not isinstance(raw, list) or not raw:
        raise LmlabError(f"LongMemEval file {path} must be a non-empty JSON list of instances")
    questions = []
    for index, instance in enumerate(raw):
        _check_instance(instance, index, str(path))
        questions.append(Question(str(instance["question_id"]), str(instance["question_type"]),
                                  str(instance["question"]), str(instance["answer"]),
                                  {v: render(instance, v) for v in VARIANTS}))
    return questions


def load_csvs(paths: Mapping[str, str]) -> list[Question]:
    """The earlier project's CSVs: one per variant, joined on ``custom_id``."""
    frames = {}
    for variant, path in paths.items():
        if variant not in VARIANTS:
            raise LmlabError(f"LongMemEval CSVs are keyed focused/full, not {variant!r}")
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise LmlabError(f"LongMemEval CSV {path} could not be read: {error}") from error
        column = f"{variant}_prompt"
        missing = [c for c in ("custom_id", "question", "answer", column) if c not in frame]
        if missing:
            raise LmlabError(f"LongMemEval CSV {path} lacks column(s) {missing}")
        frames[variant] = frame.set_index("custom_id")
    ids = sorted(set.intersection(*(set(f.index.astype(str)) for f in frames.values())))
    if not ids:
        raise LmlabError("LongMemEval CSVs share no custom_id")
    first = next(iter(frames.values()))
    first.index = first.index.astype(str)
    for frame in frames.values():
        frame.index = frame.index.astype(str)
    return [Question(qid, str(first.loc[qid].get("question_type", "unknown")),
                     str(first.loc[qid, "question"]), str(first.loc[qid, "answer"]),
                     {v: str(f.loc[qid, f"{v}_prompt"]) for v, f in frames.items()})
            for qid in ids]


def load_questions(data: Any) -> tuple[list[Question], str]:
    if data in (None, BUNDLED):
        path = bundled_path()
        return load_official(path), content_key(path.read_text())
    if isinstance(data, Mapping):
        questions = load_csvs({str(k): str(v) for k, v in data.items()})
        return questions, content_key([(q.question_id, dict(q.prompts)) for q in questions])
    path = Path(str(data))
    return load_official(path), content_key(path.read_text(encoding="utf-8", errors="replace"))


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
    data: Any = BUNDLED  # 'bundled', an official JSON path, or {focused: csv, full: csv}


class LongMemEvalTask:
    name = TASK

    def __init__(self, settings: LongMemEvalSettings) -> None:
        self.settings = settings
        self.questions, self.digest = load_questions(settings.data)

    def data_inputs(self) -> dict[str, Path]:
        data = self.settings.data
        if data in (None, BUNDLED):
            return {"longmemeval": bundled_path()}
        if isinstance(data, Mapping):
            return {f"longmemeval_{k}": Path(str(v)).expanduser() for k, v in data.items()}
        return {"longmemeval": Path(str(data)).expanduser()}

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
        err = [(per_type[variant] - per_type[f"{variant}_lo"]).fillna(0),
               (per_type[f"{variant}_hi"] - per_type[variant]).fillna(0)]
        ax.bar([i + offset for i in x], values, width, yerr=err, capsize=3, label=variant)
    ax.set_xticks(list(x), per_type["question_type"], rotation=25, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson)")
    ax.set_title("LongMemEval accuracy per question type")
    ax.legend()
    fig.tight_layout()
    return fig
