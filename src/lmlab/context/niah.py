"""Needle in a haystack: context length x needle depth, several needles per cell.

Each row keeps a compact recipe (haystack source and digest, order, seed, length, depth,
needle id, number of distractors) from which :func:`build_prompt` rebuilds the exact
prompt with the same tokenizer; the prompt itself is never stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from lmlab.cache import content_key
from lmlab.llm.clients import Client, Reply, Request
from lmlab.context.engine import Item, JudgeQuestion
from lmlab.context.haystack import BUNDLED, Haystack, bundled_dir, Placement, Sized, load_haystack, place, size_prompt
from lmlab.context.rows import cell_id
from lmlab.context.scoring import contains_answer
from lmlab.errors import LmlabError
from lmlab.stats import rate

TASK = "niah"
RECIPE_VERSION = 1
PROMPT = ("Read the document below, then answer the question after it.\n\n"
          "<document>\n{context}\n</document>\n\n"
          "Question: {question}\nAnswer in a few words.")


@dataclass(frozen=True)
class Needle:
    id: str
    needle: str
    question: str
    answers: tuple[str, ...]
    distractors: tuple[str, ...] = ()


def bundled_needles_path() -> Path:
    return Path(str(resources.files("lmlab") / "data" / "context" / "needles.json"))


def load_needles(path: str | None = None) -> tuple[list[Needle], str]:
    """Needles from ``path`` (same JSON shape as the bundled file) and their digest."""
    source = Path(path) if path else bundled_needles_path()
    if not source.is_file():
        raise LmlabError(f"needles file not found: {source}")
    try:
        raw = json.loads(source.read_text())
        needles = [Needle(str(n["id"]), str(n["needle"]), str(n["question"]),
                          tuple(str(a) for a in n["answers"]),
                          tuple(str(d) for d in n.get("distractors", ())))
                   for n in raw["needles"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise LmlabError(f"needles file {source} is malformed (need {{'needles': [{{id, needle, "
                         f"question, answers, distractors?}}]}}): {error}") from error
    if not needles or len({n.id for n in needles}) != len(needles):
        raise LmlabError(f"needles file {source} needs at least one needle and unique ids")
    if any(not n.answers for n in needles):
        raise LmlabError(f"every needle in {source} needs at least one key answer")
    return needles, content_key(raw["needles"])


@dataclass(frozen=True)
class NiahSettings:
    haystack: str = BUNDLED
    order: str = "sequential"  # or 'shuffle' (paragraphs, seeded)
    seed: int = 0
    distractors: int = 0
    needles: str | None = None

    def __post_init__(self) -> None:
        if self.order not in ("sequential", "shuffle"):
            raise LmlabError(f"context.order must be sequential or shuffle, not {self.order!r}")
        if self.distractors < 0:
            raise LmlabError("context.distractors must be >= 0")


def validate_params(params: Mapping[str, Any]) -> None:
    length, depth = params.get("length"), params.get("depth")
    if not isinstance(length, int) or length < 16:
        raise LmlabError(f"niah grid 'length' must be an integer >= 16 tokens, got {length!r}")
    if not isinstance(depth, (int, float)) or not 0 <= depth <= 100:
        raise LmlabError(f"niah grid 'depth' must be a percentage in 0..100, got {depth!r}")


def distractor_sentences(needle: Needle, needles: Sequence[Needle], count: int) -> list[str]:
    """The needle's own near-misses first, then other needles' ones, in a fixed order."""
    pool = list(needle.distractors) + [d for n in needles if n.id != needle.id for d in n.distractors]
    return pool[:count]


def build_prompt(recipe: Mapping[str, Any], haystack: Haystack, needles: Sequence[Needle],
                 count: Callable[[str], int]) -> tuple[Sized, Needle]:
    """The exact prompt a recipe stands for, sized with ``count`` (user text -> tokens)."""
    needle = next((n for n in needles if n.id == recipe["needle"]), None)
    if needle is None:
        raise LmlabError(f"recipe names needle {recipe['needle']!r}, which the needles file lacks")
    text = haystack.text(recipe["order"], recipe["seed"])
    distractors = distractor_sentences(needle, needles, recipe["distractors"])
    seed_key = f"{recipe['seed']}:{needle.id}:{recipe['length']}:{recipe['depth']}"

    def render(prefix: str) -> tuple[str, Placement]:
        placement = place(prefix, needle.needle, float(recipe["depth"]), distractors, seed_key)
        return PROMPT.format(context=placement.context, question=needle.question), placement

    return size_prompt(text, int(recipe["length"]), count, render), needle


def score(needle: Needle) -> Callable[[Reply], dict[str, Any]]:
    def scorer(reply: Reply) -> dict[str, Any]:
        return {"correct": contains_answer(reply.text, needle.answers)}

    return scorer


class NiahTask:
    name = TASK

    def __init__(self, settings: NiahSettings) -> None:
        self.settings = settings
        self.haystack = load_haystack(settings.haystack)
        self.needles, self.needles_digest = load_needles(settings.needles)

    validate_params = staticmethod(validate_params)

    def data_inputs(self) -> dict[str, Path]:
        s = self.settings
        return {"haystack": bundled_dir() if s.haystack == BUNDLED else Path(s.haystack).expanduser(),
                "needles": Path(s.needles).expanduser() if s.needles else bundled_needles_path()}

    def sample_ids(self, n: int) -> list[str]:
        if n > len(self.needles):
            raise LmlabError(f"samples={n} but only {len(self.needles)} needles exist")
        return [needle.id for needle in self.needles[:n]]

    def recipe(self, params: Mapping[str, Any], needle_id: str) -> dict[str, Any]:
        s = self.settings
        return {"task": TASK, "v": RECIPE_VERSION, "source": self.haystack.source_id,
                "needles": self.needles_digest, "order": s.order, "seed": s.seed,
                "length": int(params["length"]), "depth": params["depth"], "needle": needle_id,
                "distractors": s.distractors}

    def items(self, params: Mapping[str, Any], client: Client, max_tokens: int,
              subject: Mapping[str, Any], decoding: Mapping[str, Any]) -> list[Item]:
        out = []
        for needle_id in self.sample_ids(int(params["samples"])):
            recipe = self.recipe(params, needle_id)
            sized, needle = build_prompt(recipe, self.haystack, self.needles,
                                         client.count_prompt_tokens)
            # Share of the haystack (needle excluded) that precedes the needle.
            rest = len(sized.placement.context) - len(needle.needle)
            fields = {"recipe": recipe, "target_tokens": recipe["length"], "depth": recipe["depth"],
                      "depth_actual": round(100 * sized.placement.needle_start / max(rest, 1), 2),
                      "needle": needle.id, "prompt_sha": content_key(sized.prompt)}
            key = cell_id(recipe, subject, decoding)
            out.append(Item(key, TASK, Request(key, sized.prompt, max_tokens), sized.tokens, fields,
                            score(needle), JudgeQuestion(needle.question, needle.answers[0])))
        return out

    def estimate_tokens(self, params: Mapping[str, Any], max_tokens: int) -> tuple[int, int]:
        n = int(params["samples"])
        return n * int(params["length"]), n * max_tokens


# ---------------------------------------------------------------- parent plots


def _pooled(frame: pd.DataFrame) -> Any:
    k = int(round(float((frame["accuracy"] * frame["accuracy_n"]).sum())))
    n = int(frame["accuracy_n"].sum())
    return rate([True] * k + [False] * (n - k))


def effective_length(summary: pd.DataFrame, threshold: float) -> float:
    """Longest length whose accuracy, and every shorter length's, is at least ``threshold``."""
    best = 0.0
    for length, frame in sorted(summary.groupby("length"), key=lambda kv: kv[0]):
        estimate = _pooled(frame)
        if estimate.n == 0 or not estimate.value >= threshold:
            break
        best = float(length)
    return best


def summarize(summary: pd.DataFrame, threshold: float) -> tuple[dict[str, float], dict[str, Any],
                                                                 dict[str, pd.DataFrame]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needed = {"length", "depth", "accuracy", "accuracy_lo", "accuracy_hi", "accuracy_n"}
    frame = summary.dropna(subset=[c for c in needed if c in summary]) if needed <= set(summary) \
        else pd.DataFrame()
    if frame.empty:
        return {}, {}, {}
    lengths = sorted(frame["length"].unique())
    depths = sorted(frame["depth"].unique())
    grid = np.full((len(depths), len(lengths)), np.nan)
    fig, ax = plt.subplots(figsize=(1.8 * len(lengths) + 2, 0.9 * len(depths) + 2))
    for _, row in frame.iterrows():
        i, j = depths.index(row["depth"]), lengths.index(row["length"])
        grid[i, j] = row["accuracy"]
        ax.text(j, i, f"{row['accuracy']:.2f}\n[{row['accuracy_lo']:.2f}, {row['accuracy_hi']:.2f}]"
                f"\nn={int(row['accuracy_n'])}", ha="center", va="center", fontsize=7)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(int(x)) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (target prompt tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title("needle accuracy (95% Wilson interval, n samples)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()

    per_length = []
    for length, group in frame.groupby("length"):
        estimate = _pooled(group)
        measured = group["reported_tokens_mean"].mean() if "reported_tokens_mean" in group else np.nan
        per_length.append({"length": length, "measured_tokens": measured, **estimate.to_dict("accuracy")})
    table = pd.DataFrame(per_length).sort_values("length")
    curve, cx = plt.subplots(figsize=(6, 4))
    x = table["measured_tokens"].where(table["measured_tokens"].notna(), table["length"])
    cx.errorbar(x, table["accuracy"], yerr=[table["accuracy"] - table["accuracy_lo"],
                                            table["accuracy_hi"] - table["accuracy"]],
                marker="o", capsize=3)
    cx.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
    cx.set_xscale("log")
    cx.set_ylim(-0.05, 1.05)
    cx.set_xlabel("measured prompt tokens (provider-reported)")
    cx.set_ylabel("accuracy")
    cx.set_title("accuracy vs measured context")
    curve.tight_layout()
    effective = effective_length(frame, threshold)
    return ({"effective_length": effective, "accuracy_threshold": threshold},
            {"niah_heatmap": fig, "niah_accuracy_vs_tokens": curve}, {"niah_by_length": table})
