"""Prompt sets for steering: bundled splits or the user's own files.

A source is ``bundled:<split>`` or a path to one of the formats researchers have:
an AdvBench CSV (``goal`` column), a JSON list of ``{"instruction", "category"}`` or a
JSONL file of ``{"id", "prompt"}`` rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.identity import file_digest

BUNDLED_DIR = Path(__file__).parent / "prompts"
BUNDLED_SPLITS = ("harm_train", "harmless_train", "harm_val", "harm_test", "benign")


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    category: str = ""


def _rows_from_jsonl(path: Path) -> list[PromptRow]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise LmlabError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        text = item.get("prompt") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise LmlabError(f"{path}:{number}: each row needs a string 'prompt'")
        rows.append(PromptRow(str(item.get("id", f"{path.stem}-{number}")), text,
                              str(item.get("category", ""))))
    return rows


def _rows_from_json(path: Path) -> list[PromptRow]:
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LmlabError(f"{path}: not valid JSON ({error.msg})") from error
    if not isinstance(items, list):
        raise LmlabError(f"{path}: expected a JSON list of {{instruction, category}} objects")
    rows = []
    for index, item in enumerate(items):
        text = item.get("instruction", item.get("prompt")) if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise LmlabError(f"{path}: item {index} has no string 'instruction'")
        rows.append(PromptRow(str(item.get("id", f"{path.stem}-{index}")), text,
                              str(item.get("category", ""))))
    return rows


def _rows_from_csv(path: Path) -> list[PromptRow]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        column = next((c for c in ("goal", "prompt", "instruction") if c in (reader.fieldnames or [])), None)
        if column is None:
            raise LmlabError(f"{path}: CSV needs a 'goal' (AdvBench), 'prompt' or 'instruction' column")
        return [PromptRow(f"{path.stem}-{i}", row[column], row.get("category", "") or "")
                for i, row in enumerate(reader)]


def source_path(source: str) -> Path:
    """The file behind a prompt source (``bundled:<split>`` or a path)."""
    if source.startswith("bundled:"):
        split = source.split(":", 1)[1]
        if split not in BUNDLED_SPLITS:
            raise LmlabError(f"unknown bundled split {split!r}; known: {BUNDLED_SPLITS}")
        return BUNDLED_DIR / f"{split}.jsonl"
    return Path(source).expanduser()


def load_prompt_set(source: str, name: str = "prompts") -> tuple[list[PromptRow], DataReport]:
    """Load a prompt set and say what happened to every row.

    Empty prompts and duplicates (after whitespace/case folding) are dropped, order kept.
    """
    path = source_path(source)
    if not path.is_file():
        raise LmlabError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    loaders = {".jsonl": _rows_from_jsonl, ".json": _rows_from_json, ".csv": _rows_from_csv}
    if suffix not in loaders:
        raise LmlabError(f"{path}: unsupported prompt format {suffix!r} (use .jsonl, .json or .csv)")
    report = DataReport(name=name, source=source, digest=file_digest(path), unit="prompts")
    read = loaders[suffix](path)
    report.rows_read = len(read)
    rows = [r for r in read if r.prompt.strip()]
    report.drop("empty", len(read) - len(rows))
    if not rows:
        raise LmlabError(f"{path}: the prompt file is empty")
    unique = deduplicate(rows)
    report.drop("duplicate", len(rows) - len(unique))
    report.rows_kept = len(unique)
    return unique, report


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
