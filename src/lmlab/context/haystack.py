"""Haystack text and prompt sizing with the subject model's own tokenizer.

A haystack is a folder of ``.txt`` files (or the bundled prose written for lmlab), read
as paragraphs in file-name order and optionally shuffled with a seed; files that cannot
be used are skipped with a counted reason. Prompts are sized by binary search over whole
words so the full prompt, chat template included, lands within 1% of the target; needles
and distractors sit on sentence boundaries.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.identity import path_digest

BUNDLED = "bundled"
SIZE_TOLERANCE = 0.01
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"\S+")

Counter = Callable[[str], int]


@dataclass(frozen=True)
class Haystack:
    source: str  # 'bundled' or the folder given
    digest: str  # content hash: a changed folder makes new cell ids
    paragraphs: tuple[str, ...]

    @property
    def source_id(self) -> str:
        return f"{self.source}@{self.digest}"

    def text(self, order: str, seed: int) -> str:
        paragraphs = list(self.paragraphs)
        if order == "shuffle":
            random.Random(seed).shuffle(paragraphs)
        return "\n\n".join(paragraphs)


def bundled_dir() -> Path:
    return Path(str(resources.files("lmlab") / "data" / "context" / "haystack"))


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _skip_notes(folder: Path, skipped: dict[str, list[str]]) -> list[str]:
    notes = []
    for reason, names in skipped.items():
        shown = "; ".join(names[:5]) + (f"; and {len(names) - 5} more" if len(names) > 5 else "")
        notes.append(f"warning: haystack {folder}: skipped {len(names)} {reason} file(s): {shown}")
    return notes


def read_haystack(source: str = BUNDLED) -> tuple[Haystack, DataReport]:
    """The haystack and what was done with each ``.txt`` file of the folder.

    A file that is not UTF-8, is empty or repeats another file's text is skipped with a
    counted reason and a warning naming it; only a folder with no usable file is an error.
    """
    folder = bundled_dir() if source == BUNDLED else Path(source).expanduser()
    if not folder.is_dir():
        raise LmlabError(f"haystack folder not found: {folder}")
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and p.suffix.lower() == ".txt"]
    report = DataReport(name="haystack", source=str(source), digest=path_digest(folder),
                        rows_read=len(files), unit="files")
    others = [p.name for p in entries if p not in files]
    if others:
        report.notes.append(f"haystack {folder}: {len(others)} entr(ies) without a .txt suffix "
                            f"ignored, e.g. {', '.join(others[:3])}")
    digest = hashlib.sha256()
    paragraphs: list[str] = []
    seen: dict[str, str] = {}
    skipped: dict[str, list[str]] = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            skipped.setdefault("not_utf8", []).append(
                f"{path.name} (byte {error.object[error.start]:#04x} at offset {error.start})")
            continue
        except OSError as error:
            skipped.setdefault("unreadable", []).append(f"{path.name} ({error.strerror})")
            continue
        found = _paragraphs(text)
        if not found:
            skipped.setdefault("empty", []).append(path.name)
            continue
        body = "\n\n".join(found)
        if body in seen:
            skipped.setdefault("duplicate", []).append(f"{path.name} (same text as {seen[body]})")
            continue
        seen[body] = path.name
        digest.update(path.name.encode() + b"\0" + text.encode())
        paragraphs += found
    for reason, names in skipped.items():
        report.drop(reason, len(names))
    report.notes += _skip_notes(folder, skipped)
    report.rows_kept = len(seen)
    if not paragraphs:
        why = "; ".join(f"{len(n)} {r}" for r, n in skipped.items()) or "no .txt files"
        raise LmlabError(f"haystack folder {folder} has no usable text ({why}): put UTF-8 .txt "
                         "files with prose in it")
    return Haystack(str(source), digest.hexdigest()[:16], tuple(paragraphs)), report


def load_haystack(source: str = BUNDLED) -> Haystack:
    """The haystack of :func:`read_haystack`, for callers that need no report."""
    return read_haystack(source)[0]


def sentence_boundaries(text: str) -> list[int]:
    """Offsets where a sentence starts (0 and len(text) included)."""
    starts = {0, len(text)} | {m.end() for m in _SENTENCE_END.finditer(text)}
    return sorted(s for s in starts if s <= len(text))


def insert_at(text: str, position: int, sentence: str) -> str:
    if position <= 0:
        return f"{sentence} {text}" if text else sentence
    if position >= len(text):
        return f"{text.rstrip()} {sentence}"
    return f"{text[:position]}{sentence} {text[position:]}"


@dataclass(frozen=True)
class Placement:
    context: str
    needle_start: int  # character offset of the needle inside context
    distractor_starts: tuple[int, ...] = ()  # character offsets of the distractors


def distractor_fractions(count: int, seed_key: str) -> list[float]:
    """Relative positions (0-1) of ``count`` distractors, drawn from ``seed_key`` alone."""
    rng = random.Random(seed_key)
    return [rng.random() for _ in range(count)]


def place(text: str, needle: str, depth: float, distractors: Sequence[str], seed_key: str) -> Placement:
    """Put the needle on the sentence boundary nearest ``depth`` (0-100) and each
    distractor on the boundary nearest its relative position.

    The distractors' positions come from ``seed_key`` alone (never from the depth or the
    length), so every cell of a needle has its distractors at the same relative places
    and a depth or length effect cannot be a distractor-placement effect. A distractor
    whose boundary is the needle's follows the needle there; two distractors never share
    a boundary (the later one takes the next nearest free one).
    """
    bounds = sentence_boundaries(text)
    goal = len(text) * depth / 100
    needle_at = min(bounds, key=lambda b: (abs(b - goal), b))
    groups: dict[int, list[str]] = {needle_at: [needle]}
    used: set[int] = set()
    for fraction, sentence in zip(distractor_fractions(len(distractors), seed_key), distractors):
        free = [b for b in bounds if b not in used]
        if not free:
            break
        spot = min(free, key=lambda b: (abs(b - len(text) * fraction), b))
        used.add(spot)
        groups.setdefault(spot, []).append(sentence)
    context = text
    for position in sorted(groups, reverse=True):  # back to front keeps earlier offsets valid
        context = insert_at(context, position, " ".join(groups[position]))
    starts = tuple(context.find(d) for d in distractors if any(d in g for g in groups.values()))
    return Placement(context, context.find(needle), starts)


@dataclass(frozen=True)
class Sized:
    prompt: str
    tokens: int
    words: int
    placement: Placement


def size_prompt(text: str, target: int, count: Counter,
                render: Callable[[str], tuple[str, Placement]]) -> Sized:
    """Largest whole-word prefix of ``text`` whose rendered prompt is nearest ``target``."""
    ends = [m.end() for m in _WORD.finditer(text)]

    def build(n_words: int, extra_chars: int = 0) -> Sized:
        end = (ends[n_words - 1] if n_words else 0) + extra_chars
        prompt, placement = render(text[:end].rstrip())
        return Sized(prompt, count(prompt), n_words, placement)

    empty = build(0)
    if empty.tokens > target:
        raise LmlabError(f"context length {target} is too small: the prompt without any "
                         f"haystack already takes {empty.tokens} tokens")
    full = build(len(ends))
    if full.tokens < target * (1 - SIZE_TOLERANCE):
        raise LmlabError(f"haystack too short for {target} tokens: all of it gives "
                         f"{full.tokens}; add .txt files to the haystack folder")
    low, high = 0, len(ends)  # build(low) fits, build(high) may not
    while high - low > 1:
        mid = (low + high) // 2
        if build(mid).tokens <= target:
            low = mid
        else:
            high = mid
    candidates = [build(low)] + ([build(low + 1)] if low + 1 <= len(ends) else [])
    best = min(candidates, key=lambda s: abs(s.tokens - target))
    if abs(best.tokens - target) > SIZE_TOLERANCE * target and low < len(ends):
        # Tokenizers with long words need a partial last word to land within 1%.
        start = ends[low - 1] if low else 0
        partial = [build(low, extra) for extra in range(1, ends[low] - start)]
        best = min([best] + partial, key=lambda s: abs(s.tokens - target))
    if abs(best.tokens - target) > SIZE_TOLERANCE * target:
        raise LmlabError(f"could not size a prompt within 1% of {target} tokens "
                         f"(nearest {best.tokens}); the target is too small for word steps")
    return best
