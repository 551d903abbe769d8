"""Annotated reasoning chains: parse inline tags, align spans, label tokens.

Input format (the backtracking data as users have it): a JSON list of
``{"task_id", "problem", "reasoning_chain", "annotated_chain"}`` where labels are inline
tags in ``annotated_chain``: ``["backtracking"]Wait, that is wrong.["end-section"]``.
Text between an end tag and the next open tag sits outside every span.

Annotators dropped and re-spaced sentences, so tag-stripped annotations rarely equal the
chain. Each span is located in the *original* ``reasoning_chain`` by character alignment
(never re-spacing it), and each chain records its coverage: the share of the chain's
non-space characters that the annotation accounts for.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmlab.errors import LmlabError

KNOWN_LABELS: tuple[str, ...] = (
    "initializing", "deduction", "adding-knowledge", "example-testing",
    "uncertainty-estimation", "backtracking",
)
END_TAG = "end-section"
_TAG = re.compile(r'\["([^"\]\n]*)"\]')
_REQUIRED_KEYS = ("task_id", "problem", "reasoning_chain", "annotated_chain")
SAMPLE_PATH = Path(__file__).resolve().parents[1] / "data" / "chains" / "sample_chains.json"
# Matching runs shorter than this are coincidences between unrelated sentences.
_MIN_BLOCK = 4


@dataclass(frozen=True)
class Span:
    """A labelled character range ``[start, end)`` of ``reasoning_chain``."""

    label: str
    start: int
    end: int
    matched: float  # share of the annotated span's characters found in the chain


@dataclass(frozen=True)
class Chain:
    task_id: str
    problem: str
    text: str
    spans: tuple[Span, ...]
    coverage: float
    dropped_spans: int = 0  # annotated spans that could not be located in the chain


@dataclass(frozen=True)
class TokenizedChain:
    """One chain as the model reads it: ids, per-label token labels, prompt boundary.

    ``labels[name]`` is an int8 vector over all tokens (prompt tokens are 0 and must be
    excluded with ``chain_start``).
    """

    task_id: str
    input_ids: np.ndarray
    labels: dict[str, np.ndarray]
    chain_start: int

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def ids_hash(self) -> str:
        return hashlib.sha256(self.input_ids.astype(np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ChainsConfig:
    """How to read a chain file.

    min_coverage: chains whose annotation covers less of the chain are dropped.
    min_span_match: an annotated span counts only if this share of it aligns.
    extra_labels: labels accepted besides KNOWN_LABELS (the real data has rare strays).
    max_chains: keep only the first N chains (after filtering); None keeps all.
    """

    min_coverage: float = 0.7
    min_span_match: float = 0.6
    extra_labels: tuple[str, ...] = ()
    max_chains: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_coverage", "min_span_match"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise LmlabError(f"probes.{name} must be a number in [0, 1], got {value!r}")
        if self.max_chains is not None and (not isinstance(self.max_chains, int)
                                            or self.max_chains < 1):
            raise LmlabError(f"probes.max_chains must be a positive integer, got {self.max_chains!r}")

    @property
    def labels(self) -> tuple[str, ...]:
        return KNOWN_LABELS + tuple(self.extra_labels)


@dataclass
class ChainSet:
    """Chains kept after filtering, with the counts a user needs to trust them."""

    chains: list[Chain]
    digest: str
    n_read: int
    n_low_coverage: int
    coverage: list[float] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {"chains_read": self.n_read, "chains_kept": len(self.chains),
                "chains_dropped_low_coverage": self.n_low_coverage,
                "mean_coverage": float(np.mean(self.coverage)) if self.coverage else 0.0,
                "dataset_digest": self.digest}


# ------------------------------------------------------------------------------ parsing

def parse_annotation(annotated: str, allowed: Sequence[str], where: str = "chain"
                     ) -> tuple[str, list[tuple[str, int, int]]]:
    """Strip tags; return the plain annotation text and ``(label, start, end)`` in it."""
    plain: list[str] = []
    spans: list[tuple[str, int, int]] = []
    open_label: str | None = None
    open_at = 0
    cursor = 0
    length = 0
    for match in _TAG.finditer(annotated):
        piece = annotated[cursor:match.start()]
        plain.append(piece)
        length += len(piece)
        cursor = match.end()
        label = match.group(1)
        if label == END_TAG:
            if open_label is None:
                raise LmlabError(f"{where}: [\"end-section\"] at character {match.start()} "
                                 "closes no open tag (unbalanced tags)")
            spans.append((open_label, open_at, length))
            open_label = None
        elif label not in allowed:
            raise LmlabError(f"{where}: unknown label {label!r}; known: {list(allowed)} "
                             "(add it to probes.extra_labels to accept it)")
        elif open_label is not None:
            raise LmlabError(f"{where}: tag [{label!r}] opens inside the still-open "
                             f"[{open_label!r}] (unbalanced tags: missing [\"end-section\"])")
        else:
            open_label, open_at = label, length
    if open_label is not None:
        raise LmlabError(f"{where}: tag [{open_label!r}] is never closed with [\"end-section\"]")
    plain.append(annotated[cursor:])
    if not spans:
        raise LmlabError(f"{where}: the annotation has no labelled spans")
    return "".join(plain), spans


def _char_map(source: str, target: str) -> np.ndarray:
    """For each character of ``source``, its index in ``target`` or -1 (not aligned)."""
    mapping = np.full(len(source), -1, dtype=np.int64)
    matcher = difflib.SequenceMatcher(None, source, target, autojunk=False)
    for block in matcher.get_matching_blocks():
        if block.size >= _MIN_BLOCK:
            mapping[block.a:block.a + block.size] = np.arange(block.b, block.b + block.size)
    return mapping


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def align_chain(record: dict[str, Any], config: ChainsConfig, where: str) -> Chain:
    """Locate each annotated span in ``reasoning_chain`` and measure coverage."""
    text = record["reasoning_chain"]
    plain, raw_spans = parse_annotation(record["annotated_chain"], config.labels, where)
    mapping = _char_map(plain, text)
    spans, dropped = [], 0
    for label, a0, a1 in raw_spans:
        hits = mapping[a0:a1]
        hits = hits[hits >= 0]
        wanted = sum(1 for ch in plain[a0:a1] if not ch.isspace())
        matched = sum(1 for i in hits if not text[i].isspace()) / max(wanted, 1)
        if hits.size == 0 or matched < config.min_span_match:
            dropped += 1
            continue
        start, end = _trim(text, int(hits.min()), int(hits.max()) + 1)
        spans.append(Span(label, start, end, round(matched, 4)))
    covered = np.zeros(len(text), dtype=bool)
    covered[mapping[mapping >= 0]] = True
    visible = np.array([not ch.isspace() for ch in text], dtype=bool)
    coverage = float(covered[visible].mean()) if visible.any() else 0.0
    return Chain(str(record["task_id"]), record["problem"], text, tuple(spans), coverage, dropped)


def _check_record(record: Any, index: int) -> str:
    where = f"chain #{index}"
    if not isinstance(record, dict):
        raise LmlabError(f"{where}: each item must be an object with keys {list(_REQUIRED_KEYS)}")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise LmlabError(f"{where}: missing key(s) {missing}")
    where = f"chain #{index} (task_id {record['task_id']!r})"
    for key in _REQUIRED_KEYS[1:]:
        if not isinstance(record[key], str) or not record[key].strip():
            raise LmlabError(f"{where}: {key!r} must be a non-empty string")
    return where


def read_records(path: Path) -> tuple[list[dict[str, Any]], str]:
    """The JSON list as stored, and a digest of its bytes."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"chain file not found: {path}")
    data = path.read_bytes()
    try:
        records = json.loads(data)
    except json.JSONDecodeError as error:
        raise LmlabError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(records, list):
        raise LmlabError(f"{path}: expected a JSON list of annotated chains")
    return records, hashlib.sha256(data).hexdigest()[:16]


def load_chains(path: Path | str, config: ChainsConfig = ChainsConfig()) -> ChainSet:
    """Read, validate, align and filter chains; raises LmlabError when nothing is left."""
    records, file_digest = read_records(Path(path))
    chains, coverage, low = [], [], 0
    seen: set[str] = set()
    for index, record in enumerate(records):
        where = _check_record(record, index)
        if str(record["task_id"]) in seen:
            raise LmlabError(f"{where}: duplicate task_id")
        seen.add(str(record["task_id"]))
        chain = align_chain(record, config, where)
        coverage.append(chain.coverage)
        if chain.coverage < config.min_coverage or not chain.spans:
            low += 1
            continue
        chains.append(chain)
    if config.max_chains is not None:
        chains = chains[:config.max_chains]
    if not chains:
        raise LmlabError(f"{path}: no chains left after filtering ({len(records)} read, {low} "
                         f"below coverage {config.min_coverage})")
    digest = hashlib.sha256(json.dumps(
        [file_digest, config.min_coverage, config.min_span_match, config.max_chains]
    ).encode()).hexdigest()[:16]
    return ChainSet(chains, digest, len(records), low, coverage)


# ----------------------------------------------------------------------------- tokens

def model_text(lm: Any, chain: Chain) -> tuple[str, int]:
    """The exact string the model reads (chat template + problem, then the chain) and the
    character where the chain starts."""
    prompt = lm.format_chat(chain.problem)
    return prompt + chain.text, len(prompt)


def tokenize_chain(lm: Any, chain: Chain, labels: Sequence[str]) -> TokenizedChain:
    """Token ids and per-token labels from the tokenizer's offsets on the model's string.

    A token carries a label when any of its characters lies inside a span of that label.
    Tokens that start before the chain (template, problem, and a token straddling the
    boundary) are prompt tokens.
    """
    text, prompt_chars = model_text(lm, chain)
    encoded = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if offsets.shape[0] != ids.size:
        raise LmlabError(f"chain {chain.task_id}: tokenizer gave {ids.size} ids but "
                         f"{offsets.shape[0]} offsets")
    in_chain = offsets[:, 0] >= prompt_chars
    if not in_chain.any():
        raise LmlabError(f"chain {chain.task_id}: no chain tokens after the prompt")
    chain_start = int(np.argmax(in_chain))
    starts = offsets[:, 0] - prompt_chars
    ends = offsets[:, 1] - prompt_chars
    out: dict[str, np.ndarray] = {}
    for label in labels:
        vector = np.zeros(ids.size, dtype=np.int8)
        for span in chain.spans:
            if span.label == label:
                vector |= ((starts < span.end) & (ends > span.start)).astype(np.int8)
        vector[:chain_start] = 0
        out[label] = vector
    return TokenizedChain(chain.task_id, ids, out, chain_start)


def tokenize_chains(lm: Any, chains: Sequence[Chain], labels: Sequence[str]) -> list[TokenizedChain]:
    return [tokenize_chain(lm, chain, labels) for chain in chains]
