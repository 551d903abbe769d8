"""Shared per-condition metrics: deterministic accuracy, judge accuracy and agreement."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from lmlab.stats import agreement, rate


_NUMBERS = dict((w, str(i)) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split()))


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, small number words to digits ('six' == '6')."""
    words = re.sub(r"[^0-9a-z\-]+", " ", (text or "").lower()).split()
    return " ".join(_NUMBERS.get(word, word) for word in words)


def contains_answer(response: str, answers: Sequence[str]) -> bool:
    """A key answer appears at the start of a word of the normalised response."""
    body = normalize(response)
    return any(re.search(rf"(?<![0-9a-z]){re.escape(normalize(a))}", body) for a in answers if a)


def accuracy_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy over scored rows; judge accuracy, agreement and kappa where judged."""
    done = [r for r in rows if r.get("status") == "done"]
    out = rate([bool(r.get("correct")) for r in done]).to_dict("accuracy")
    judged = [r for r in done if r.get("judge_verdict") is not None]
    if any("judge_flag" in r or "judge_verdict" in r for r in done):
        out.update(rate([bool(r["judge_verdict"]) for r in judged]).to_dict("judge_accuracy"))
        both = agreement([bool(r.get("correct")) for r in judged],
                         [bool(r["judge_verdict"]) for r in judged])
        out.update(judge_agreement=both["agreement"], judge_kappa=both["kappa"],
                   judge_off_format=float(sum(r.get("judge_flag") == "off_format" for r in done)))
    return out


def mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return float(np.mean(values)) if values else float("nan")
