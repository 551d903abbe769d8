"""Shared per-condition metrics: deterministic accuracy, judge accuracy and agreement.

Answer matching works on normalised text: lower case, punctuation dropped, number words
turned into digits ('six' == '6', 'forty-two' == '42'), thousands separators removed
('60,000' == '60000') and decimals kept whole ('6.5' is one token). A key answer must
then stand as whole words: bounded on both sides by a space, a hyphen or the end, so
'90 jars' does not match '9', '420' does not match '42' and '60 hours' does not match
'six'. A word answer may carry a plural ending ('owls' answers 'owl') and a number an
ordinal one ('9th' answers '9').
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from lmlab.stats import agreement, rate

#: Bumped whenever :func:`contains_answer` or another deterministic scorer changes: rows
#: scored under an older version are rescored from their stored response on reuse.
SCORING_VERSION = 2

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A decimal number is one token; any other run of letters (any script), digits and inner
# hyphens is one.
_TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W_]+(?:-[^\W_]+)*")


def _number(word: str) -> int | None:
    """The value of a number word below a hundred ('six', 'forty', 'forty-two')."""
    if word in _UNITS:
        return _UNITS[word]
    if word in _TENS:
        return _TENS[word]
    tens, _, unit = word.partition("-")
    if tens in _TENS and 0 < _UNITS.get(unit, 0) < 10:
        return _TENS[tens] + _UNITS[unit]
    return None


def _merge_numbers(words: list[str]) -> list[str]:
    """Number words to digits; 'forty two' (tens then a unit) becomes '42'."""
    out: list[str] = []
    index = 0
    while index < len(words):
        value = _number(words[index])
        if value is None:
            out.append(words[index])
            index += 1
            continue
        following = _UNITS.get(words[index + 1]) if index + 1 < len(words) else None
        if words[index] in _TENS and following is not None and 0 < following < 10:
            value, index = value + following, index + 1
        out.append(str(value))
        index += 1
    return out


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, number words to digits ('six' == '6')."""
    lowered = _THOUSANDS.sub("", (text or "").lower())
    return " ".join(_merge_numbers(_TOKEN.findall(lowered)))


def _answer_pattern(answer: str) -> re.Pattern[str]:
    tail = r"(?:s|es)?" if answer[-1].isalpha() else r"(?:st|nd|rd|th)?"
    return re.compile(rf"(?:^|(?<=[ \-])){re.escape(answer)}{tail}(?=$|[ \-])")


def contains_answer(response: str, answers: Sequence[str]) -> bool:
    """A key answer appears as whole words of the normalised response."""
    body = normalize(response)
    keys = [normalize(a) for a in answers if a]
    return any(_answer_pattern(key).search(body) for key in keys if key)


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
