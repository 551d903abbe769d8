"""Prompt sets for steering: bundled splits or the user's own files.

A source is ``bundled:<split>`` or a path to a UTF-8 file (a byte-order mark and CRLF line
endings are fine) in one of the formats researchers have:

* ``.csv`` / ``.tsv`` with a header row: AdvBench (``goal``, ``target``), JailbreakBench
  (``Goal``, ``Target``, ``Behavior``, ``Category``), HarmBench (``Behavior``,
  ``SemanticCategory``, ``BehaviorID``), or any table with a ``prompt`` column.
* ``.json``: a list of objects (the refusal-direction paper's ``{"instruction",
  "category"}`` splits), a list of plain strings, or an object holding such a list under
  ``prompts`` or ``data`` (lmlab's organism prompt sets). A ``.json`` file that really holds
  one value per line is read as JSON Lines, and says so.
* ``.jsonl`` / ``.ndjson``: one object (``{"id", "prompt"}``) or one string per line.

Field names match ignoring case, spaces, ``_`` and ``-``. A record's text is its first
present field of ``prompt``, ``instruction``, ``goal``, ``behavior``, ``text`` (so
JailbreakBench's ``Goal``, the request, wins over its ``Behavior``, a short title); its id
is ``id``, ``prompt_id`` or ``behavior_id``; its category ``category`` or
``semantic_category``. Text is stripped of surrounding whitespace; ids and categories that
are numbers become strings.

Every record read is either kept or dropped with a counted reason, in this order:
``malformed`` (a line or item that is not JSON, or not an object or string; a CSV row the
csv module cannot parse), ``no_text`` (no text field, or one that is not a string),
``empty``, ``too_long`` (over ``max_chars``), ``duplicate`` (same text as an earlier row
after case and whitespace folding; the first is kept). Blank lines are not records.

Ids. A row without an id gets ``p-`` and 12 hex digits of the sha256 of its folded text:
the id names the prompt, not its position, so deleting, inserting or reordering other rows
never relabels it, and it changes exactly when the prompt's text changes (which is when
results stop being comparable). A given id that repeats an earlier kept row's id is made
unique the same way (``<id>-<8 hex>``) and counted in a note.

The whole file is refused, with one :class:`~lmlab.errors.LmlabError`, only when it cannot
be used at all: not found, unsupported suffix, not UTF-8 (the message names the file and
the line and byte), not parseable as a whole (a ``.json`` file), no recognised text field
(the message lists the fields seen), AdvBench ``goal``/``target`` headers swapped (most
texts open like a target, "Sure, here is ..."), or no usable rows left.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.identity import file_digest

BUNDLED_DIR = Path(__file__).parent / "prompts"
BUNDLED_SPLITS = ("harm_train", "harmless_train", "harm_val", "harm_test", "benign")

# Folded field names (see _fold_key), in order of preference.
TEXT_FIELDS = ("prompt", "instruction", "goal", "behavior", "text")
ID_FIELDS = ("id", "promptid", "behaviorid")
CATEGORY_FIELDS = ("category", "semanticcategory")
LIST_KEYS = ("prompts", "data")
PLAIN_STRING = ""  # the field name recorded for a record that is a bare string
DROP_REASONS = ("malformed", "no_text", "empty", "too_long", "duplicate")
# How an AdvBench target (the answer the attack hopes for) opens.
TARGET_OPENING = re.compile(r"\s*sure,?\s+here\b", re.IGNORECASE)


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    category: str = ""


@dataclass(frozen=True)
class _Record:
    """One record as read: where it is in the file and its fields (None if unreadable)."""

    where: str
    fields: dict[str, Any] | None
    names: Mapping[str, str]  # folded field name -> name as written


def _fold_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _record(where: str, value: Any) -> _Record:
    if isinstance(value, str):
        return _Record(where, {"text": value}, {"text": PLAIN_STRING})
    if not isinstance(value, dict):
        return _Record(where, None, {})
    folded: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, field_value in value.items():
        if key is None:  # csv puts a row's surplus cells under None
            continue
        folded.setdefault(_fold_key(str(key)), field_value)
        names.setdefault(_fold_key(str(key)), str(key).strip())
    return _Record(where, folded, names)


# ------------------------------------------------------------------ reading
def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LmlabError(_not_utf8_message(path, data, error)) from None


def _not_utf8_message(path: Path, data: bytes, error: UnicodeDecodeError) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return f"{path}: not UTF-8 (it starts with a UTF-16 byte-order mark); re-save it as UTF-8"
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return (f"{path}: not UTF-8: byte 0x{data[error.start]:02x} at line {line}, column {column} "
            f"(byte offset {error.start}) cannot be decoded; re-save the file as UTF-8 "
            f"(from Latin-1 or Windows-1252: iconv -f cp1252 -t utf-8 IN > OUT)")


def _line_records(text: str) -> Iterator[_Record]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield _record(f"line {number}", json.loads(line))
        except json.JSONDecodeError:
            yield _Record(f"line {number}", None, {})


def _list_records(path: Path, value: Any, notes: list[str]) -> Iterator[_Record]:
    if isinstance(value, dict):
        key = next((k for k, v in value.items()
                    if _fold_key(str(k)) in LIST_KEYS and isinstance(v, list)), None)
        if key is None:
            raise LmlabError(f"{path}: expected a JSON list of prompts, or an object with a "
                             f"'prompts' list; found an object with keys {sorted(value)[:20]}")
        if value.get("system_prompt"):
            notes.append(f"the file's system_prompt is not applied (only its '{key}' are read)")
        value = value[key]
    if not isinstance(value, list):
        raise LmlabError(f"{path}: expected a JSON list of prompts; found {type(value).__name__}")
    return (_record(f"item [{index}]", item) for index, item in enumerate(value))


def _json_records(path: Path, text: str, notes: list[str]) -> Iterator[_Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            notes.append("the file holds one JSON value per line; read as JSON Lines")
            return _line_records(text)
        raise LmlabError(f"{path}: not valid JSON at line {error.lineno}, column {error.colno} "
                         f"({error.msg})") from None
    return _list_records(path, value, notes)


def _jsonl_records(path: Path, text: str, notes: list[str]) -> Iterator[_Record]:
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return _line_records(text)
        notes.append("the file holds one JSON list, not one value per line; read as a list")
        return _list_records(path, value, notes)
    return _line_records(text)


def _table_records(path: Path, text: str, delimiter: str) -> Iterator[_Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise LmlabError(f"{path}: no header row (the file is empty)")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield _Record(f"line {reader.line_num}", None, {})
            continue
        yield _record(f"line {reader.line_num}", row)


def _records(path: Path, notes: list[str]) -> list[_Record]:
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix in (".jsonl", ".ndjson"):
        return list(_jsonl_records(path, text, notes))
    if suffix == ".json":
        return list(_json_records(path, text, notes))
    return list(_table_records(path, text, "\t" if suffix == ".tsv" else ","))


# ----------------------------------------------------------- interpreting
def _first_field(fields: dict[str, Any], candidates: tuple[str, ...]) -> str | None:
    return next((name for name in candidates if name in fields), None)


def _text_field(record: _Record) -> str | None:
    return None if record.fields is None else _first_field(record.fields, TEXT_FIELDS)


def _as_label(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _check_has_text_field(path: Path, records: list[_Record]) -> None:
    readable = [r for r in records if r.fields is not None]
    if readable and not any(_text_field(r) for r in readable):
        seen = sorted({name for r in readable for name in r.names.values()})
        raise LmlabError(f"{path}: no prompt text field; expected one of {list(TEXT_FIELDS)} "
                         f"(any case); found {seen[:30]}")


def _opens_like_target(value: Any) -> bool:
    return isinstance(value, str) and TARGET_OPENING.match(value) is not None


def _texts(records: list[_Record]) -> list[tuple[_Record, str]]:
    """(record, text field) for the records whose text field holds a non-blank string."""
    out = []
    for record in records:
        field = _text_field(record)
        value = record.fields.get(field) if field and record.fields else None
        if field and isinstance(value, str) and value.strip():
            out.append((record, field))
    return out


def _check_not_targets(path: Path, records: list[_Record]) -> None:
    """Refuse a file whose prompt texts are AdvBench targets ("Sure, here is ...")."""
    texts = _texts(records)
    opening = [(r, f) for r, f in texts if _opens_like_target((r.fields or {})[f])]
    if not texts or len(opening) * 2 <= len(texts):
        return
    record, field = opening[0]
    column = record.names[field]
    share = f"{len(opening)} of {len(texts)} '{column}' values start with \"Sure, here\""
    targets = [(r.fields or {})["target"] for r, _ in texts if "target" in (r.fields or {})]
    if targets and sum(map(_opens_like_target, targets)) * 2 <= len(targets):
        other = record.names["target"]
        raise LmlabError(f"{path}: columns '{column}' and '{other}' look swapped: {share} (how an "
                         f"AdvBench target opens) while '{other}' holds the requests; swap the "
                         f"two names in the file ('{column}' <-> '{other}') and run again")
    raise LmlabError(f"{path}: {share}: these look like AdvBench targets (the answer an attack "
                     f"hopes for), not requests; point the source at the file's requests")


def _content_id(folded_text: str, digits: int = 12) -> str:
    return hashlib.sha256(folded_text.encode()).hexdigest()[:digits]


class _Keeper:
    """Applies the drop rules in order and gives every kept row a stable, unique id."""

    def __init__(self, report: DataReport, max_chars: int | None) -> None:
        self.report, self.max_chars = report, max_chars
        self.rows: list[PromptRow] = []
        self.first_seen: dict[str, str] = {}  # folded text -> where it was kept
        self.ids: set[str] = set()
        self.renamed_ids = 0

    def offer(self, record: _Record) -> None:
        text, reason = self._screen(record)
        if reason == "duplicate":
            first = self.first_seen[normalise(text)]
            self.report.drop(reason, where=f"{record.where} repeats {first}")
        elif reason is not None:
            self.report.drop(reason, where=record.where)
        else:
            self._keep(record, text)

    def _screen(self, record: _Record) -> tuple[str, str | None]:
        """The record's stripped text and why it is dropped (None when it is kept)."""
        if record.fields is None:
            return "", "malformed"
        field = _text_field(record)
        value = record.fields.get(field) if field else None
        if not isinstance(value, str):
            return "", "no_text"
        text = value.strip()
        if not text:
            return text, "empty"
        if self.max_chars is not None and len(text) > self.max_chars:
            return text, "too_long"
        if normalise(text) in self.first_seen:
            return text, "duplicate"
        return text, None

    def _keep(self, record: _Record, text: str) -> None:
        fields = record.fields or {}
        folded = normalise(text)
        self.first_seen[folded] = record.where
        category = _as_label(fields.get(_first_field(fields, CATEGORY_FIELDS) or ""))
        given = _as_label(fields.get(_first_field(fields, ID_FIELDS) or ""))
        row_id = given or f"p-{_content_id(folded)}"
        if row_id in self.ids:
            self.renamed_ids += 1
            row_id = f"{row_id}-{_content_id(folded, 8)}"
        self.ids.add(row_id)
        self.rows.append(PromptRow(row_id, text, category))


def _text_field_note(records: list[_Record]) -> str | None:
    used = Counter(r.names[f] for r in records if (f := _text_field(r)) and f in r.names)
    if not used or set(used) <= {"prompt", PLAIN_STRING}:
        return None
    sources = [(f"'{name}'" if name else "plain strings", n) for name, n in used.most_common()]
    return "text from " + ", ".join(f"{source} ({_rows(n)})" for source, n in sources)


def _rows(count: int) -> str:
    return f"{count} row" + ("" if count == 1 else "s")


# ------------------------------------------------------------------- public
def source_path(source: str) -> Path:
    """The file behind a prompt source (``bundled:<split>`` or a path)."""
    if source.startswith("bundled:"):
        split = source.split(":", 1)[1]
        if split not in BUNDLED_SPLITS:
            raise LmlabError(f"unknown bundled split {split!r}; known: {BUNDLED_SPLITS}")
        return BUNDLED_DIR / f"{split}.jsonl"
    return Path(source).expanduser()


SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson")


def load_prompt_set(source: str, name: str = "prompts",
                    max_chars: int | None = None) -> tuple[list[PromptRow], DataReport]:
    """Load a prompt set and say what happened to every record (see the module docstring).

    max_chars: drop rows whose stripped text is longer, with reason ``too_long``.
    """
    if max_chars is not None and max_chars < 1:
        raise LmlabError(f"max_chars must be a positive number of characters, not {max_chars}")
    path = source_path(source)
    if not path.is_file():
        raise LmlabError(f"prompt file not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise LmlabError(f"{path}: unsupported prompt format {path.suffix!r} "
                         f"(use {', '.join(SUFFIXES)})")
    report = DataReport(name=name, source=source, digest=file_digest(path), unit="prompts")
    records = _records(path, report.notes)
    _check_has_text_field(path, records)
    _check_not_targets(path, records)
    for reason in DROP_REASONS:
        if reason != "too_long" or max_chars is not None:
            report.drop(reason, 0)  # logged as 0, so "none dropped" is visible in the run
    keeper = _Keeper(report, max_chars)
    for record in records:
        keeper.offer(record)
    report.rows_read, report.rows_kept = len(records), len(keeper.rows)
    if (note := _text_field_note(records)) is not None:
        report.notes.append(note)
    if keeper.renamed_ids:
        report.notes.append(f"{_rows(keeper.renamed_ids)} repeated an earlier row's id; "
                            f"each keeps it with a suffix from its text (<id>-<hash>)")
    if not keeper.rows:
        raise LmlabError(f"{path}: no usable prompts: {report.summary()}")
    return keeper.rows, report


def load_prompts(source: str) -> list[PromptRow]:
    """The rows of :func:`load_prompt_set`, for callers that need no report."""
    return load_prompt_set(source)[0]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def deduplicate(rows: list[PromptRow]) -> list[PromptRow]:
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = normalise(row.prompt)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def digest(rows: list[PromptRow]) -> str:
    payload = json.dumps([[r.id, r.prompt] for r in rows])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
