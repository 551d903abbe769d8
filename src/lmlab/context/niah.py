"""Needle in a haystack: context length x needle depth, several needles per cell.

Design: every cell of the grid asks the same needles (the first ``samples`` of a seeded
order of the needles file), so within a cell the samples are distinct needles and across
cells depth and length are crossed with the needle rather than confounded with it. The
distractors of a needle sit at the same relative places in every cell (their positions
are drawn from the seed and the needle, never from depth or length). Because the same
needle appears in many cells, the parent's pooled rates (by length, by depth, effective
length) get cluster-bootstrap intervals with the needle as the cluster.

Each row keeps a compact recipe (haystack source and digest, order, seed, length, depth,
needle id, number of distractors) from which :func:`build_prompt` rebuilds the exact
prompt with the same tokenizer; the prompt itself is never stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from lmlab.cache import content_key
from lmlab.context.engine import Item, JudgeQuestion
from lmlab.context.haystack import BUNDLED, Haystack, Placement, Sized, bundled_dir, place, \
    read_haystack, size_prompt
from lmlab.context.rows import cell_id
from lmlab.context.scoring import contains_answer
from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.identity import file_digest
from lmlab.llm.clients import Client, Reply, Request
from lmlab.stats import CI_HI, CI_LO, N, Estimate, cluster_bootstrap

TASK = "niah"
RECIPE_VERSION = 1
# Recipes with distractors name the placement rule (relative positions drawn from the
# seed and needle); recipes without distractors build the same prompt as before.
PLACEMENT_VERSION = 2
#: How the needles of a cell are chosen; part of every niah condition's identity.
NEEDLE_SELECTION = "seeded order, same needles in every cell"
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


_NEEDLE_SHAPE = "{'needles': [{id, needle, question, answers, distractors?}]} or a list of them"


def _texts(value: Any) -> tuple[str, ...] | None:
    """A string or a list of strings as a tuple of stripped non-empty strings (None if neither)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        return None
    return tuple(str(v).strip() for v in value if str(v).strip())


def parse_needle(entry: Any) -> tuple[Needle | None, str, str]:
    """One entry of a needles file: (needle, '', '') or (None, reason, detail)."""
    if not isinstance(entry, Mapping):
        return None, "malformed", "not an object"
    missing = [k for k in ("id", "needle", "question", "answers") if k not in entry]
    if missing:
        return None, "malformed", f"lacks {', '.join(missing)}"
    answers, distractors = _texts(entry["answers"]), _texts(entry.get("distractors", []))
    if not all(isinstance(entry[k], str) for k in ("needle", "question")) \
            or answers is None or distractors is None:
        return None, "malformed", "needle and question must be strings, answers and " \
                                  "distractors strings or lists of strings"
    if not entry["needle"].strip() or not entry["question"].strip():
        return None, "empty", "empty needle or question"
    if not answers:
        return None, "no_answer", "no key answer"
    return Needle(str(entry["id"]), " ".join(entry["needle"].split()), entry["question"].strip(),
                  answers, distractors), "", ""


def read_needles(path: str | None = None) -> tuple[list[Needle], str, DataReport]:
    """Needles from ``path`` (the bundled file's JSON shape), their digest and a report.

    An entry that is malformed, empty, has no key answer or repeats an earlier id is
    skipped with a counted reason; only a file with no usable needle is an error.
    """
    source = Path(path).expanduser() if path else bundled_needles_path()
    if not source.is_file():
        raise LmlabError(f"needles file not found: {source}")
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise LmlabError(f"needles file {source} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise LmlabError(f"needles file {source} is malformed: not valid JSON ({error})") from error
    entries = raw.get("needles") if isinstance(raw, Mapping) else raw
    if not isinstance(entries, list):
        raise LmlabError(f"needles file {source} is malformed (need {_NEEDLE_SHAPE})")
    report = DataReport(name="needles", source=str(path or "bundled"), digest=file_digest(source),
                        rows_read=len(entries), unit="needles")
    needles: list[Needle] = []
    kept_raw: list[Any] = []
    first: dict[str, str] = {}
    for index, entry in enumerate(entries):
        needle, reason, detail = parse_needle(entry)
        if needle is not None and any(n.id == needle.id for n in needles):
            reason, detail = "duplicate", f"id {needle.id!r} repeated"
        if reason:
            report.drop(reason)
            first.setdefault(reason, f"entry {index}: {detail}")
            continue
        assert needle is not None
        needles.append(needle)
        kept_raw.append(entry)
    report.rows_kept = len(needles)
    report.notes += [f"warning: needles {source}: skipped {report.dropped[r]} {r} entr(ies), "
                     f"first {d}" for r, d in first.items()]
    if not needles:
        why = "; ".join(f"{report.dropped[r]} {r} (first {d})" for r, d in first.items())
        raise LmlabError(f"needles file {source} has no usable needle ({why or 'empty list'}); "
                         f"need {_NEEDLE_SHAPE}")
    return needles, content_key(kept_raw), report


def load_needles(path: str | None = None) -> tuple[list[Needle], str]:
    """Needles and digest of :func:`read_needles`, for callers that need no report."""
    needles, digest, _ = read_needles(path)
    return needles, digest


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


def distractor_seed_key(recipe: Mapping[str, Any], needle_id: str) -> str:
    """The seed of a needle's distractor positions: the spec's seed and the needle only."""
    return f"{recipe['seed']}:{needle_id}"


def build_prompt(recipe: Mapping[str, Any], haystack: Haystack, needles: Sequence[Needle],
                 count: Callable[[str], int]) -> tuple[Sized, Needle]:
    """The exact prompt a recipe stands for, sized with ``count`` (user text -> tokens)."""
    needle = next((n for n in needles if n.id == recipe["needle"]), None)
    if needle is None:
        raise LmlabError(f"recipe names needle {recipe['needle']!r}, which the needles file lacks")
    if recipe["distractors"] and recipe.get("placement") != PLACEMENT_VERSION:
        raise LmlabError(f"recipe places distractors by rule {recipe.get('placement', 1)}; this "
                         f"lmlab builds rule {PLACEMENT_VERSION} only")
    text = haystack.text(recipe["order"], recipe["seed"])
    distractors = distractor_sentences(needle, needles, recipe["distractors"])
    seed_key = distractor_seed_key(recipe, needle.id)

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
        self.haystack, haystack_report = read_haystack(settings.haystack)
        self.needles, self.needles_digest, needles_report = read_needles(settings.needles)
        self.reports = [haystack_report, needles_report]

    def validate_params(self, params: Mapping[str, Any]) -> None:
        validate_params(params)
        samples = params.get("samples")
        if isinstance(samples, int) and samples > len(self.needles):
            raise LmlabError(f"samples={samples} per cell but the needles file "
                             f"({self.reports[1].source}) has only {len(self.needles)} usable "
                             "needles; each sample of a cell is a different needle")

    def data_inputs(self) -> dict[str, Path]:
        s = self.settings
        return {"haystack": bundled_dir() if s.haystack == BUNDLED else Path(s.haystack).expanduser(),
                "needles": Path(s.needles).expanduser() if s.needles else bundled_needles_path()}

    def data_reports(self) -> list[DataReport]:
        return list(self.reports)

    def identity(self) -> dict[str, Any]:
        """How samples and distractors are laid out: part of every condition key."""
        return {"needle_selection": NEEDLE_SELECTION,
                "distractor_placement": PLACEMENT_VERSION if self.settings.distractors else None}

    def sample_ids(self, n: int) -> list[str]:
        """The cell's needles: the first ``n`` of a seeded order, the same in every cell.

        The order is a hash of (seed, needle id), so it does not follow the file's order
        and a smaller ``n`` (test mode) takes a subset of a larger one's needles."""
        if n > len(self.needles):
            raise LmlabError(f"samples={n} but only {len(self.needles)} needles exist")
        order = sorted(self.needles, key=lambda needle: content_key(self.settings.seed, needle.id))
        return [needle.id for needle in order[:n]]

    def recipe(self, params: Mapping[str, Any], needle_id: str) -> dict[str, Any]:
        s = self.settings
        recipe = {"task": TASK, "v": RECIPE_VERSION, "source": self.haystack.source_id,
                  "needles": self.needles_digest, "order": s.order, "seed": s.seed,
                  "length": int(params["length"]), "depth": params["depth"], "needle": needle_id,
                  "distractors": s.distractors}
        if s.distractors:
            recipe["placement"] = PLACEMENT_VERSION
        return recipe

    def cell_ids(self, params: Mapping[str, Any], subject: Mapping[str, Any],
                 decoding: Mapping[str, Any]) -> list[str]:
        return [cell_id(self.recipe(params, n), subject, decoding)
                for n in self.sample_ids(int(params["samples"]))]

    def items(self, params: Mapping[str, Any], client: Client, max_tokens: int,
              subject: Mapping[str, Any], decoding: Mapping[str, Any]) -> list[Item]:
        out = []
        for needle_id in self.sample_ids(int(params["samples"])):
            recipe = self.recipe(params, needle_id)
            sized, needle = build_prompt(recipe, self.haystack, self.needles,
                                         client.count_prompt_tokens)
            placement = sized.placement
            # Share of the haystack (needle excluded) that precedes the needle.
            rest = max(len(placement.context) - len(needle.needle), 1)
            fields = {"recipe": recipe, "target_tokens": recipe["length"], "depth": recipe["depth"],
                      "depth_actual": round(100 * placement.needle_start / rest, 2),
                      "distractor_depths": [round(100 * start / len(placement.context), 2)
                                            for start in placement.distractor_starts],
                      "needle": needle.id, "prompt_sha": content_key(sized.prompt)}
            key = cell_id(recipe, subject, decoding)
            out.append(Item(key, TASK, Request(key, sized.prompt, max_tokens), sized.tokens, fields,
                            score(needle), JudgeQuestion(needle.question, needle.answers[0])))
        return out

    def estimate_tokens(self, params: Mapping[str, Any], max_tokens: int) -> tuple[int, int]:
        n = int(params["samples"])
        return n * int(params["length"]), n * max_tokens


# ---------------------------------------------------------------- parent: pooled rates


@dataclass(frozen=True)
class Pooled:
    """Scored rows of many cells as arrays, with the needle of each row as its cluster."""

    correct: np.ndarray  # (rows,) 1.0 / 0.0
    length: np.ndarray  # (rows,) target tokens
    depth: np.ndarray  # (rows,) percent
    reported: np.ndarray  # (rows,) provider-reported prompt tokens (nan when unknown)
    clusters: list[np.ndarray]  # row indices of each needle

    @classmethod
    def of(cls, rows: Sequence[Mapping[str, Any]]) -> "Pooled":
        done = [r for r in rows if r.get("status") == "done"]
        by_needle: dict[str, list[int]] = {}
        for index, row in enumerate(done):
            by_needle.setdefault(str(row["needle"]), []).append(index)
        reported = [float(r["reported_tokens"]) if isinstance(r.get("reported_tokens"), (int, float))
                    else math.nan for r in done]
        return cls(np.array([bool(r.get("correct")) for r in done], dtype=float),
                   np.array([float(r["target_tokens"]) for r in done]),
                   np.array([float(r["depth"]) for r in done]), np.array(reported),
                   [np.array(v) for _, v in sorted(by_needle.items())])

    def rate(self, mask: np.ndarray) -> Estimate:
        """Accuracy of the rows in ``mask``, interval by resampling needles."""
        clusters = [c[mask[c]] for c in self.clusters]
        clusters = [c for c in clusters if c.size]
        if not clusters:
            return Estimate(math.nan, math.nan, math.nan, 0)
        correct = self.correct
        return cluster_bootstrap(lambda idx: float(correct[idx].mean()) if idx.size else math.nan,
                                 clusters)


def effective_length_of(correct: np.ndarray, length: np.ndarray, lengths: Sequence[float],
                        threshold: float) -> float:
    """Longest length whose accuracy, and every shorter length's, is at least ``threshold``
    (0 when the shortest already falls below it; a length without rows stops the walk)."""
    best = 0.0
    for value in sorted(lengths):
        picked = correct[length == value]
        if picked.size == 0 or not picked.mean() >= threshold:
            break
        best = float(value)
    return best


def effective_length(pooled: Pooled, threshold: float) -> Estimate:
    """Effective length with a needle-cluster bootstrap interval."""
    lengths = sorted(set(pooled.length.tolist()))
    if not pooled.clusters:
        return Estimate(math.nan, math.nan, math.nan, 0)
    return cluster_bootstrap(
        lambda idx: effective_length_of(pooled.correct[idx], pooled.length[idx], lengths, threshold),
        pooled.clusters)


def pooled_table(pooled: Pooled, by: str) -> pd.DataFrame:
    """Accuracy per length or per depth, pooled over the other axis, clustered by needle."""
    values = getattr(pooled, by)
    records = []
    for value in sorted(set(values.tolist())):
        mask = values == value
        reported = pooled.reported[mask]
        measured = float(np.nanmean(reported)) if np.isfinite(reported).any() else math.nan
        records.append({by: value, "rows": int(mask.sum()), "measured_tokens": measured,
                        **pooled.rate(mask).to_dict("accuracy")})
    return pd.DataFrame(records)


# ---------------------------------------------------------------- parent plots


def heatmap(frame: pd.DataFrame) -> Any:
    import matplotlib.pyplot as plt

    lengths = sorted(frame["length"].unique())
    depths = sorted(frame["depth"].unique())
    grid = np.full((len(depths), len(lengths)), np.nan)
    fig, ax = plt.subplots(figsize=(1.8 * len(lengths) + 2, 0.9 * len(depths) + 2))
    for _, row in frame.iterrows():
        i, j = depths.index(row["depth"]), lengths.index(row["length"])
        grid[i, j] = row["accuracy"]
        ax.text(j, i, f"{row['accuracy']:.2f}\n[{row['accuracy' + CI_LO]:.2f}, "
                f"{row['accuracy' + CI_HI]:.2f}]"
                f"\nn={int(row['accuracy_n'])}", ha="center", va="center", fontsize=7)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(int(x)) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (target prompt tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title("needle accuracy per cell (95% Wilson interval, n needles)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def accuracy_curve(table: pd.DataFrame, threshold: float) -> Any:
    import matplotlib.pyplot as plt

    curve, ax = plt.subplots(figsize=(6, 4))
    x = table["measured_tokens"].where(table["measured_tokens"].notna(), table["length"])
    ax.errorbar(x, table["accuracy"], yerr=[table["accuracy"] - table["accuracy" + CI_LO],
                                            table["accuracy" + CI_HI] - table["accuracy"]],
                marker="o", capsize=3)
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("measured prompt tokens (provider-reported)")
    ax.set_ylabel("accuracy over depths")
    ax.set_title("accuracy vs measured context (95% needle-cluster bootstrap)")
    curve.tight_layout()
    return curve


def summarize(summary: pd.DataFrame, rows: Sequence[Mapping[str, Any]], threshold: float,
              ) -> tuple[dict[str, float], dict[str, Any], dict[str, pd.DataFrame]]:
    """Heatmap of the cells (from their metrics) and the pooled rates (from the rows)."""
    import matplotlib

    matplotlib.use("Agg")

    needed = {"length", "depth", "accuracy", "accuracy" + CI_LO, "accuracy" + CI_HI, "accuracy" + N}
    frame = summary.dropna(subset=sorted(needed)) if needed <= set(summary) else pd.DataFrame()
    figures: dict[str, Any] = {"niah_heatmap": heatmap(frame)} if not frame.empty else {}
    pooled = Pooled.of(rows)
    if not pooled.clusters:
        return {}, figures, {}
    by_length, by_depth = pooled_table(pooled, "length"), pooled_table(pooled, "depth")
    figures["niah_accuracy_vs_tokens"] = accuracy_curve(by_length, threshold)
    metrics = {**effective_length(pooled, threshold).to_dict("effective_length"),
               "accuracy_threshold": threshold, "needles": float(len(pooled.clusters)),
               **pooled.rate(np.ones(pooled.correct.size, dtype=bool)).to_dict("accuracy_all")}
    return metrics, figures, {"niah_by_length": by_length, "niah_by_depth": by_depth}
