"""Annotated reasoning chains: parse inline tags, align spans, label tokens.

Input format (the backtracking data as users have it): a JSON list of
``{"task_id", "problem", "reasoning_chain", "annotated_chain"}`` where labels are inline
tags in ``annotated_chain``: ``["backtracking"]Wait, that is wrong.["end-section"]``.
Text between an end tag and the next open tag sits outside every span.

Annotators dropped and re-spaced sentences, so tag-stripped annotations rarely equal the
chain. Each span is located in the *original* ``reasoning_chain`` by character alignment
(never re-spacing it), and each chain records its coverage: the share of the chain's
non-space characters that the annotation accounts for.

The published files hold a few malformed chains per hundred. One bad chain never rejects
a file: it is skipped with its reason (see MALFORMED and FILTERED) and counted; the load
stops only when the malformed share passes ``max_malformed_share``. One defect is
repaired instead, because it has a single reading: a tag of a known label (or the end
tag) missing one or both quotes, as in ``["end-section]``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from lmlab.errors import LmlabError

KNOWN_LABELS: tuple[str, ...] = (
    "initializing", "deduction", "adding-knowledge", "example-testing",
    "uncertainty-estimation", "backtracking",
)
END_TAG = "end-section"
# A bracketed name with optional quotes; which of them are tags is decided per match.
_TAG = re.compile(r'\[("?)([^"\[\]\n]{1,60})("?)\]')
_REQUIRED_KEYS = ("task_id", "problem", "reasoning_chain", "annotated_chain")
SAMPLE_PATH = Path(__file__).resolve().parents[1] / "data" / "chains" / "sample_chains.json"
# Matching runs shorter than this are coincidences between unrelated sentences.
_MIN_BLOCK = 4

# Why a chain is skipped. MALFORMED: the record itself is broken (these count against
# max_malformed_share). FILTERED: a sound record the settings or the model leave out.
MALFORMED: dict[str, str] = {
    "not_an_object": "the item is not a JSON object",
    "missing_key": "a required key is missing",
    "not_a_string": "a required field is not a string",
    "empty": "a required field is empty",
    "duplicate": "a task_id already read earlier in the file (the first is kept)",
    "broken_tag": "a half-quoted tag of an unknown name",
    "stray_end_tag": "an end tag that closes no open tag (its opener was lost)",
    "nested_open_tag": "a tag opens while another is still open",
    "unclosed_tag": "a tag is never closed",
    "unknown_label": "a label outside the known set (see probes.extra_labels)",
    "no_tags": "the annotation has no labelled spans",
}
FILTERED: dict[str, str] = {
    "no_spans_located": "no annotated span could be located in the chain",
    "low_coverage": "the annotation covers less than probes.min_coverage of the chain",
    "beyond_max_chains": "not read: probes.max_chains chains were already kept",
    "too_long": "longer than the model's context (prompt and chain)",
}


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
    index: int = -1  # position of its record in the file


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
    max_chains: keep only the first N chains (after filtering); None keeps all. Chains are
        aligned only until N are kept.
    max_malformed_share: the load stops when more than this share of the file's records
        are malformed (each one is otherwise skipped and counted).
    """

    min_coverage: float = 0.7
    min_span_match: float = 0.6
    extra_labels: tuple[str, ...] = ()
    max_chains: int | None = None
    max_malformed_share: float = 0.2

    def __post_init__(self) -> None:
        for name in ("min_coverage", "min_span_match", "max_malformed_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not 0.0 <= value <= 1.0:
                raise LmlabError(f"probes.{name} must be a number in [0, 1], got {value!r}")
        if self.max_chains is not None and (not isinstance(self.max_chains, int)
                                            or self.max_chains < 1):
            raise LmlabError(f"probes.max_chains must be a positive integer, got {self.max_chains!r}")

    @property
    def labels(self) -> tuple[str, ...]:
        return KNOWN_LABELS + tuple(self.extra_labels)


class MalformedChain(LmlabError):
    """A chain that cannot be read; ``reason`` is a key of MALFORMED."""

    def __init__(self, reason: str, message: str, label: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.label = label  # the stray label, for unknown_label


@dataclass(frozen=True)
class Skipped:
    """A record left out: where it was, why, and how much text it held.

    chars: characters of its reasoning_chain (0 when that is not a string).
    tokens: the same text in model tokens, once a tokenizer is known (None before).
    """

    index: int
    task_id: str
    reason: str
    detail: str
    chars: int
    tokens: int | None = None


@dataclass(frozen=True)
class Annotation:
    """An annotation with its tags stripped: the plain text, ``(label, start, end)`` in
    it, and how many tags were read despite a missing quote."""

    plain: str
    spans: tuple[tuple[str, int, int], ...]
    repaired: int = 0


@dataclass
class ChainSet:
    """Chains kept after filtering, with the counts a user needs to trust them."""

    chains: list[Chain]
    digest: str
    n_read: int
    skipped: list[Skipped] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)  # of every aligned chain
    repaired_tags: int = 0
    stray_labels: Counter = field(default_factory=Counter)
    kept_tokens: int | None = None  # reasoning_chain tokens of the kept chains

    @property
    def dropped(self) -> Counter:
        return Counter(s.reason for s in self.skipped)

    @property
    def n_low_coverage(self) -> int:
        return self.dropped["low_coverage"]

    @property
    def n_malformed(self) -> int:
        return sum(1 for s in self.skipped if s.reason in MALFORMED)

    def drop(self, task_ids: dict[str, str], reason: str, tokens: dict[str, int]) -> None:
        """Move kept chains (task_id -> detail) to the skipped list under ``reason``."""
        index = {c.task_id: i for i, c in enumerate(self.chains)}
        for task_id, detail in task_ids.items():
            chain = self.chains[index[task_id]]
            self.skipped.append(Skipped(chain.index, task_id, reason, detail, len(chain.text),
                                        tokens.get(task_id)))
            if self.kept_tokens is not None and task_id in tokens:
                self.kept_tokens -= tokens[task_id]
        self.chains = [c for c in self.chains if c.task_id not in task_ids]
        self.skipped.sort(key=lambda s: s.index)

    def skip_table(self) -> pd.DataFrame:
        """One row per reason: chains, characters and tokens skipped, and the first case."""
        rows = []
        for reason in [*MALFORMED, *FILTERED]:
            cases = [s for s in self.skipped if s.reason == reason]
            if not cases:
                continue
            tokens = [s.tokens for s in cases]
            rows.append({"reason": reason, "kind": "malformed" if reason in MALFORMED else "filtered",
                         "chains": len(cases), "share_of_read": len(cases) / max(self.n_read, 1),
                         "characters": sum(s.chars for s in cases),
                         "tokens": sum(tokens) if None not in tokens else None,
                         "meaning": {**MALFORMED, **FILTERED}[reason], "first": cases[0].detail})
        return pd.DataFrame(rows, columns=["reason", "kind", "chains", "share_of_read",
                                           "characters", "tokens", "meaning", "first"])

    def skipped_frame(self) -> pd.DataFrame:
        """Every skipped record, for fixing the file."""
        return pd.DataFrame([{"index": s.index, "task_id": s.task_id, "reason": s.reason,
                              "characters": s.chars, "tokens": s.tokens, "detail": s.detail}
                             for s in self.skipped],
                            columns=["index", "task_id", "reason", "characters", "tokens", "detail"])

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "chains_read": self.n_read, "chains_kept": len(self.chains),
            "chains_malformed": self.n_malformed,
            "chains_malformed_share": self.n_malformed / max(self.n_read, 1),
            "chains_dropped_low_coverage": self.n_low_coverage,
            "chains_repaired_tags": self.repaired_tags,
            "mean_coverage": float(np.mean(self.coverage)) if self.coverage else 0.0,
            "dataset_digest": self.digest}
        for reason, count in self.dropped.items():
            cases = [s for s in self.skipped if s.reason == reason]
            out[f"chains_skipped_{reason}"] = count
            out[f"chains_skipped_chars_{reason}"] = sum(s.chars for s in cases)
            if all(s.tokens is not None for s in cases):
                out[f"chains_skipped_tokens_{reason}"] = sum(s.tokens for s in cases)
        if self.kept_tokens is not None:
            out["chains_kept_tokens"] = self.kept_tokens
        return out

    def console_table(self) -> str:
        """The skip table as aligned text (empty when nothing was skipped)."""
        table = self.skip_table()
        if table.empty:
            return ""
        shown = table.drop(columns=["meaning", "first"]).assign(
            share_of_read=lambda t: (100 * t["share_of_read"]).round(1).astype(str) + "%")
        return shown.to_string(index=False)


# ------------------------------------------------------------------------------ parsing

def parse_annotation(annotated: str, allowed: Sequence[str], where: str = "chain") -> Annotation:
    """Strip tags; return the plain annotation text and its spans, or raise MalformedChain.

    A tag of a known name missing a quote (``["end-section]``) is read as that tag and
    counted in ``repaired``; a half-quoted unknown name is malformed; a bracketed word
    without any quotes that is not a known name is text.
    """
    plain: list[str] = []
    spans: list[tuple[str, int, int]] = []
    open_label: str | None = None
    open_at = cursor = length = repaired = 0
    known = set(allowed) | {END_TAG}
    for match in _TAG.finditer(annotated):
        left, name, right = match.groups()
        label = name.strip()
        exact = bool(left and right) and label == name
        if not exact and label not in known:
            if left or right:
                raise MalformedChain("broken_tag", f"{where}: half-quoted tag {match.group(0)!r} "
                                     f"at character {match.start()}")
            continue  # an ordinary bracketed word
        repaired += int(not exact)
        piece = annotated[cursor:match.start()]
        plain.append(piece)
        length += len(piece)
        cursor = match.end()
        if label == END_TAG:
            if open_label is None:
                raise MalformedChain("stray_end_tag", f"{where}: [\"end-section\"] at character "
                                     f"{match.start()} closes no open tag (unbalanced tags)")
            spans.append((open_label, open_at, length))
            open_label = None
        elif label not in allowed:
            raise MalformedChain("unknown_label", f"{where}: unknown label {label!r}; known: "
                                 f"{list(allowed)} (add it to probes.extra_labels to accept it)",
                                 label)
        elif open_label is not None:
            raise MalformedChain("nested_open_tag", f"{where}: tag [{label!r}] opens inside the "
                                 f"still-open [{open_label!r}] (unbalanced tags: missing "
                                 "[\"end-section\"])")
        else:
            open_label, open_at = label, length
    if open_label is not None:
        raise MalformedChain("unclosed_tag", f"{where}: tag [{open_label!r}] is never closed with "
                             "[\"end-section\"]")
    plain.append(annotated[cursor:])
    if not spans:
        raise MalformedChain("no_tags", f"{where}: the annotation has no labelled spans")
    return Annotation("".join(plain), tuple(spans), repaired)


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


def align_chain(record: dict[str, Any], config: ChainsConfig, where: str,
                annotation: Annotation | None = None, index: int = -1) -> Chain:
    """Locate each annotated span in ``reasoning_chain`` and measure coverage."""
    text = record["reasoning_chain"]
    if annotation is None:
        annotation = parse_annotation(record["annotated_chain"], config.labels, where)
    plain = annotation.plain
    mapping = _char_map(plain, text)
    spans, dropped = [], 0
    for label, a0, a1 in annotation.spans:
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
    return Chain(str(record["task_id"]), record["problem"], text, tuple(spans), coverage, dropped,
                 index)


def _check_record(record: Any, index: int) -> str:
    """Where the record is, for messages; raises MalformedChain for a broken record."""
    where = f"chain #{index}"
    if not isinstance(record, dict):
        raise MalformedChain("not_an_object", f"{where}: a {type(record).__name__}, not an object "
                             f"with keys {list(_REQUIRED_KEYS)}")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise MalformedChain("missing_key", f"{where}: missing key(s) {missing}")
    if not isinstance(record["task_id"], (str, int)) or isinstance(record["task_id"], bool):
        raise MalformedChain("not_a_string", f"{where}: 'task_id' must be a string or an integer, "
                             f"got {type(record['task_id']).__name__}")
    where = f"chain #{index} (task_id {record['task_id']!r})"
    for key in _REQUIRED_KEYS[1:]:
        if not isinstance(record[key], str):
            raise MalformedChain("not_a_string", f"{where}: {key!r} must be a string, got "
                                 f"{type(record[key]).__name__}")
        if not record[key].strip():
            raise MalformedChain("empty", f"{where}: {key!r} is empty")
    return where


def read_records(path: Path) -> tuple[list[Any], str]:
    """The JSON list as stored, and a digest of its bytes."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"chain file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LmlabError(f"{path}: not UTF-8 text (byte {error.start} is "
                         f"{data[error.start:error.start + 1]!r}); save the file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise LmlabError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(records, list):
        raise LmlabError(f"{path}: expected a JSON list of annotated chains")
    return records, hashlib.sha256(data).hexdigest()[:16]


def _chars(record: Any) -> int:
    text = record.get("reasoning_chain") if isinstance(record, dict) else None
    return len(text) if isinstance(text, str) else 0


def _task_id(record: Any) -> str:
    return str(record.get("task_id", "")) if isinstance(record, dict) else ""


@dataclass
class _Parsed:
    """Records that parsed, in file order, and the ones that did not."""

    good: list[tuple[int, str, dict[str, Any], Annotation]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    repaired: int = 0
    strays: Counter = field(default_factory=Counter)


def _parse_records(records: Sequence[Any], config: ChainsConfig) -> _Parsed:
    """Validate and parse every record (cheap: no alignment)."""
    out = _Parsed()
    first_of: dict[str, int] = {}
    for index, record in enumerate(records):
        try:
            where = _check_record(record, index)
            annotation = parse_annotation(record["annotated_chain"], config.labels, where)
            task_id = str(record["task_id"])
            if task_id in first_of:
                raise MalformedChain("duplicate", f"{where}: duplicate task_id (chain "
                                     f"#{first_of[task_id]} has it and is kept)")
        except MalformedChain as bad:
            out.skipped.append(Skipped(index, _task_id(record), bad.reason, str(bad), _chars(record)))
            if bad.label:
                out.strays[bad.label] += 1
            continue
        first_of[task_id] = index
        out.repaired += annotation.repaired
        out.good.append((index, where, record, annotation))
    return out


def _check_malformed_share(path: Path, n_read: int, skipped: Sequence[Skipped],
                           config: ChainsConfig) -> None:
    malformed = [s for s in skipped if s.reason in MALFORMED]
    share = len(malformed) / max(n_read, 1)
    if n_read and share > config.max_malformed_share:
        counts = ", ".join(f"{n} {reason}" for reason, n in Counter(s.reason for s in malformed)
                           .most_common())
        raise LmlabError(f"{path}: {len(malformed)} of {n_read} chains ({share:.0%}) are malformed, "
                         f"more than probes.max_malformed_share ({config.max_malformed_share:.0%}): "
                         f"{counts}; first: {malformed[0].detail}")


def scan_chains(path: Path | str, config: ChainsConfig = ChainsConfig()) -> list[tuple[str, str]]:
    """``(problem, reasoning_chain)`` of the records a load would align, without aligning:
    the well-formed ones, at most ``max_chains`` (for estimates before any work)."""
    parsed = _parse_records(read_records(Path(path))[0], config)
    good = parsed.good[:config.max_chains] if config.max_chains else parsed.good
    return [(record["problem"], record["reasoning_chain"]) for _, _, record, _ in good]


def load_chains(path: Path | str, config: ChainsConfig = ChainsConfig(),
                count_tokens: Callable[[str], int] | None = None) -> ChainSet:
    """Read, validate, align and filter chains; skip (and count) what cannot be used.

    count_tokens: a tokenizer's length of a text; when given, every skipped and kept chain
    also counts its reasoning_chain in tokens. Raises LmlabError when the malformed share
    passes ``config.max_malformed_share`` or nothing is left.
    """
    path = Path(path)
    records, file_digest = read_records(path)
    parsed = _parse_records(records, config)
    _check_malformed_share(path, len(records), parsed.skipped, config)
    skipped, chains, coverage = list(parsed.skipped), [], []
    for index, where, record, annotation in parsed.good:
        if config.max_chains is not None and len(chains) >= config.max_chains:
            skipped.append(Skipped(index, str(record["task_id"]), "beyond_max_chains",
                                   f"{where}: after the first {config.max_chains} kept chains",
                                   _chars(record)))
            continue
        chain = align_chain(record, config, where, annotation, index)
        coverage.append(chain.coverage)
        if not chain.spans:
            skipped.append(Skipped(index, chain.task_id, "no_spans_located",
                                   f"{where}: none of its {len(annotation.spans)} spans matched "
                                   f"{config.min_span_match:.0%} of its text", len(chain.text)))
        elif chain.coverage < config.min_coverage:
            skipped.append(Skipped(index, chain.task_id, "low_coverage",
                                   f"{where}: coverage {chain.coverage:.2f} < "
                                   f"{config.min_coverage}", len(chain.text)))
        else:
            chains.append(chain)
    skipped.sort(key=lambda s: s.index)
    kept_tokens = None
    if count_tokens is not None:
        # A record without chain text has none to count: 0 tokens, as it has 0 characters.
        skipped = [Skipped(s.index, s.task_id, s.reason, s.detail, s.chars,
                           count_tokens(records[s.index]["reasoning_chain"]) if s.chars else 0)
                   for s in skipped]
        kept_tokens = sum(count_tokens(c.text) for c in chains)
    result = ChainSet(chains, "", len(records), skipped, coverage, parsed.repaired, parsed.strays,
                      kept_tokens)
    if not chains:
        counts = ", ".join(f"{n} {reason}" for reason, n in result.dropped.most_common())
        raise LmlabError(f"{path}: no chains left after filtering ({len(records)} read: {counts})")
    result.digest = hashlib.sha256(json.dumps(
        [file_digest, config.min_coverage, config.min_span_match, config.max_chains,
         sorted(config.extra_labels)]).encode()).hexdigest()[:16]
    return result


def problem_key(problem: str) -> str:
    """A problem's text as the split compares it: case and spacing do not matter."""
    return " ".join(problem.split()).casefold()


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
