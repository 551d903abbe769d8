"""Repeated words: copy a run of one common word with one modified word inside it.

The four metrics are those of the earlier "context rot" project, kept exactly:
normalised character Levenshtein score (0 when either text is empty), modified word
present (``"word "`` or, at the last index, ``" word"``), position accuracy (the
modified word starts at the same character offset as in the gold text) and word-count
delta (gold words minus output words). Added here: the word position of the modified
word in the output and an output category, because the earlier output cap (twice the
input tokens) produced a Levenshtein "floor" of about 0.5 from models that ran to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from lmlab.llm.clients import Client, Reply, Request
from lmlab.context.engine import Item
from lmlab.context.rows import cell_id
from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.stats import CI_HI, CI_LO, mean_with_interval, rate

TASK = "repeated_words"
RECIPE_VERSION = 1
PROMPT = "Simply replicate the following text, output the exact same text: {text}"
REFUSAL_COMMON_WORD_COUNT = 15  # the earlier project's refusal filter threshold
CATEGORIES = ("exact", "ran_to_cap", "refused", "cut_short", "different")


@dataclass(frozen=True)
class RepeatedWordsSettings:
    common_word: str = "apple"
    modified_word: str = "apples"
    output_cap: float = 2.0  # max new tokens = output_cap x prompt tokens (earlier: 2)

    def __post_init__(self) -> None:
        for name in ("common_word", "modified_word"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value.split()) != 1:
                raise LmlabError(f"context.{name} must be a single word, got {value!r}")
        if self.common_word == self.modified_word:
            raise LmlabError("context.common_word and modified_word must differ")
        if not self.output_cap > 0:
            raise LmlabError("context.output_cap must be positive")


def gold_text(common: str, modified: str, n_words: int, index: int) -> str:
    return " ".join(modified if j == index else common for j in range(n_words))


def levenshtein_score(gold: str, pred: str) -> float:
    if not gold or not pred:
        return 0.0
    try:
        from rapidfuzz.distance import Levenshtein
    except ImportError as error:
        raise LmlabError("repeated words needs rapidfuzz: pip install rapidfuzz") from error
    return 1 - Levenshtein.distance(gold, pred) / max(len(gold), len(pred))


def word_count_delta(output: str, gold: str) -> int:
    return len(gold.split()) - len(output.split())


def _marker(modified: str, index: int, n_words: int) -> str:
    return " " + modified if index == n_words - 1 else modified + " "


def modified_word_present(output: str, modified: str, index: int, n_words: int) -> bool:
    return bool(output) and _marker(modified, index, n_words) in output


def correct_position(output: str, gold: str, modified: str, index: int, n_words: int) -> bool:
    if not modified_word_present(output, modified, index, n_words):
        return False
    marker = _marker(modified, index, n_words)
    return gold.index(marker) == output.index(marker)


def modified_word_position(output: str, modified: str) -> int | None:
    """Word index of the first exact occurrence of the modified word, None when absent."""
    return next((i for i, word in enumerate(output.split()) if word == modified), None)


def refused(output: str, common: str, modified: str) -> bool:
    """The earlier project's filter: a foreign word present and the common word rare."""
    foreign = any(word not in (common, modified) for word in output.split())
    return foreign and output.count(common) < REFUSAL_COMMON_WORD_COUNT


def category(output: str, gold: str, stop_reason: str, common: str, modified: str) -> str:
    if output.strip() == gold:
        return "exact"
    if stop_reason == "length":
        return "ran_to_cap"
    if refused(output, common, modified):
        return "refused"
    if len(output.split()) < len(gold.split()):
        return "cut_short"
    return "different"


def score_output(output: str, stop_reason: str, common: str, modified: str, n_words: int,
                 index: int) -> dict[str, Any]:
    gold = gold_text(common, modified, n_words, index)
    return {"levenshtein_score": levenshtein_score(gold, output),
            "modified_word_present": modified_word_present(output, modified, index, n_words),
            "correct_position": correct_position(output, gold, modified, index, n_words),
            "delta": word_count_delta(output, gold),
            "modified_word_position": modified_word_position(output, modified),
            "category": category(output, gold, stop_reason, common, modified),
            "correct": output.strip() == gold}


def stratum_indices(n_words: int, position: float, positions: Sequence[float], samples: int) -> list[int]:
    """Indices whose relative position is nearest ``position`` among the grid's positions,
    thinned to ``samples`` evenly spaced ones."""
    grid = sorted(float(p) for p in positions)
    scale = max(n_words - 1, 1)
    stratum = [i for i in range(n_words)
               if min(grid, key=lambda p: (abs(i / scale - p), p)) == float(position)]
    if not stratum:
        return []
    picks = np.linspace(0, len(stratum) - 1, num=min(samples, len(stratum)))
    return sorted({stratum[int(round(p))] for p in picks})


class RepeatedWordsTask:
    name = TASK

    def __init__(self, settings: RepeatedWordsSettings, positions: Sequence[float]) -> None:
        self.settings = settings
        self.positions = list(positions)

    def data_inputs(self) -> dict[str, Path]:
        return {}  # prompts are built from the settings alone

    def data_reports(self) -> list[DataReport]:
        return []

    def identity(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def validate_params(params: Mapping[str, Any]) -> None:
        words, position = params.get("words"), params.get("position")
        if not isinstance(words, int) or words < 2:
            raise LmlabError(f"repeated_words grid 'words' must be an integer >= 2, got {words!r}")
        if not isinstance(position, (int, float)) or not 0 <= position <= 1:
            raise LmlabError(f"repeated_words grid 'position' must be a fraction in 0..1, "
                             f"got {position!r}")

    def recipe(self, n_words: int, index: int) -> dict[str, Any]:
        s = self.settings
        return {"task": TASK, "v": RECIPE_VERSION, "common": s.common_word,
                "modified": s.modified_word, "words": n_words, "index": index,
                "output_cap": s.output_cap}

    def items(self, params: Mapping[str, Any], client: Client, max_tokens: int,
              subject: Mapping[str, Any], decoding: Mapping[str, Any]) -> list[Item]:
        s = self.settings
        n_words = int(params["words"])
        out = []
        for index in stratum_indices(n_words, params["position"], self.positions, int(params["samples"])):
            gold = gold_text(s.common_word, s.modified_word, n_words, index)
            prompt = PROMPT.format(text=gold)
            tokens = client.count_prompt_tokens(prompt)
            cap = max(1, math.ceil(s.output_cap * tokens))
            recipe = self.recipe(n_words, index)
            key = cell_id(recipe, subject, {**decoding, "max_tokens": "output_cap"})
            fields = {"recipe": recipe, "words": n_words, "index": index,
                      "position_actual": index / max(n_words - 1, 1)}
            out.append(Item(key, TASK, Request(key, prompt, cap), tokens, fields,
                            self._scorer(n_words, index)))
        return out

    def _scorer(self, n_words: int, index: int) -> Callable[[Reply], dict[str, Any]]:
        s = self.settings

        def scorer(reply: Reply) -> dict[str, Any]:
            scored = score_output(reply.text, reply.stop_reason, s.common_word, s.modified_word,
                                  n_words, index)
            gold_position = index
            found = scored["modified_word_position"]
            scored["position_error"] = None if found is None else abs(found - gold_position)
            return scored

        return scorer

    def estimate_tokens(self, params: Mapping[str, Any], max_tokens: int) -> tuple[int, int]:
        n = int(params["samples"])
        prompt = int(params["words"] * 1.5) + 20
        return n * prompt, int(n * prompt * self.settings.output_cap)


def condition_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Metrics over answered, non-refused rows (the earlier project filtered refusals)."""
    done = [r for r in rows if r.get("status") == "done"]
    kept = [r for r in done if r.get("category") != "refused"]
    out: dict[str, float] = {}
    out.update(mean_with_interval([r["levenshtein_score"] for r in kept]).to_dict("levenshtein_score"))
    out.update(rate([bool(r["modified_word_present"]) for r in kept]).to_dict("modified_word_present"))
    out.update(rate([bool(r["correct_position"]) for r in kept]).to_dict("position_accuracy"))
    out.update(mean_with_interval([r["delta"] for r in kept]).to_dict("word_count_delta"))
    out.update(rate([bool(r["correct"]) for r in done]).to_dict("exact"))
    errors = [r["position_error"] for r in kept if r.get("position_error") is not None]
    out["position_error_mean"] = float(np.mean(errors)) if errors else math.nan
    for name in CATEGORIES:
        out[f"share_{name}"] = (sum(r.get("category") == name for r in done) / len(done)) if done else math.nan
    return out


def summarize(summary: pd.DataFrame) -> tuple[dict[str, float], dict[str, Any], dict[str, pd.DataFrame]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if summary.empty or "levenshtein_score" not in summary:
        return {}, {}, {}
    frame = summary.sort_values(["words", "position"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for position, group in frame.groupby("position"):
        axes[0].errorbar(group["words"], group["levenshtein_score"],
                         yerr=[group["levenshtein_score"] - group["levenshtein_score" + CI_LO],
                               group["levenshtein_score" + CI_HI] - group["levenshtein_score"]],
                         marker="o", capsize=3, label=f"position {position:g}")
    axes[0].set_xscale("log")
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].set_xlabel("words")
    axes[0].set_ylabel("normalised Levenshtein score")
    axes[0].legend(fontsize=7)
    shares = frame.groupby("words")[[f"share_{c}" for c in CATEGORIES]].mean()
    bottom = np.zeros(len(shares))
    for name in CATEGORIES:
        values = shares[f"share_{name}"].fillna(0).to_numpy()
        axes[1].bar([str(w) for w in shares.index], values, bottom=bottom, label=name)
        bottom += values
    axes[1].set_xlabel("words")
    axes[1].set_ylabel("share of outputs")
    axes[1].set_title("output category (ran_to_cap = the cap's artefact)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return {}, {"repeated_words": fig}, {"repeated_words_by_cell": frame}
