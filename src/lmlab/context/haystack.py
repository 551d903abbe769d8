"""Haystack text and prompt sizing with the subject model's own tokenizer.

A haystack is a folder of ``.txt`` files (or the bundled prose written for lmlab), read
as paragraphs in file order and optionally shuffled with a seed. Prompts are sized by
binary search over whole words so the full prompt, chat template included, lands
within 1% of the target; needles and distractors sit on sentence boundaries.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from lmlab.errors import LmlabError

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


def load_haystack(source: str = BUNDLED) -> Haystack:
    folder = bundled_dir() if source == BUNDLED else Path(source).expanduser()
    if not folder.is_dir():
        raise LmlabError(f"haystack folder not found: {folder}")
    files = sorted(folder.glob("*.txt"))
    digest = hashlib.sha256()
    paragraphs: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise LmlabError(f"haystack file {path} is not UTF-8 text: {error}") from error
        digest.update(path.name.encode() + b"\0" + text.encode())
        paragraphs += [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        raise LmlabError(f"haystack folder {folder} has no text: put .txt files with prose in it")
    return Haystack(source, digest.hexdigest()[:16], tuple(paragraphs))


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


def place(text: str, needle: str, depth: float, distractors: Sequence[str], seed_key: str) -> Placement:
    """Put the needle on the sentence boundary nearest ``depth`` (0-100) and the
    distractors on other boundaries chosen with ``seed_key``."""
    bounds = sentence_boundaries(text)
    goal = len(text) * depth / 100
    needle_at = min(bounds, key=lambda b: (abs(b - goal), b))
    others = [b for b in bounds if b != needle_at]
    rng = random.Random(seed_key)
    spots = rng.sample(others, k=min(len(distractors), len(others)))
    inserts = sorted([(needle_at, needle)] + list(zip(spots, distractors)), reverse=True)
    context = text
    for position, sentence in inserts:  # back to front keeps earlier offsets valid
        context = insert_at(context, position, sentence)
    start = context.find(needle)
    return Placement(context, start)


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
