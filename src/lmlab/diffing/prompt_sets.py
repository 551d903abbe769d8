"""Prompt sets for organisms, read unmodified from the shape researchers already use:
``{"name", "description", "system_prompt"?, "prompts": [{"id", "text", "note"?}]}``.

A prompt without a usable ``text`` or repeating an earlier id or text is skipped with a
counted reason (``malformed``, ``empty``, ``duplicate_id``, ``duplicate``); a file that is
not JSON, is not an object, or has no ``prompts`` list is refused with one message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.identity import file_digest

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data" / "diffing" / "prompts"
BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    note: str = ""


@dataclass(frozen=True)
class PromptSet:
    name: str
    description: str
    system_prompt: str | None
    prompts: tuple[Prompt, ...]
    source: str
    path: Path
    report: DataReport


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.json"))


def prompt_set_path(source: str) -> Path:
    if source.startswith(BUNDLED_PREFIX):
        name = source[len(BUNDLED_PREFIX):]
        path = BUNDLED_DIR / f"{name}.json"
        if not path.is_file():
            raise LmlabError(f"no bundled prompt set {name!r}; bundled: {bundled_names()}")
        return path
    return Path(source).expanduser()


def load_prompt_set(source: str, limit: int | None = None) -> PromptSet:
    """Read one prompt set; ``limit`` keeps the first N usable prompts."""
    path = prompt_set_path(source)
    if not path.is_file():
        raise LmlabError(f"prompt set not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise LmlabError(f"prompt set {path} is not UTF-8 text ({error.reason} at byte "
                         f"{error.start})") from error
    except json.JSONDecodeError as error:
        raise LmlabError(f"prompt set {path} is not valid JSON: {error.msg} (line "
                         f"{error.lineno})") from error
    if not isinstance(raw, dict):
        raise LmlabError(f"prompt set {path} must be a JSON object {{name, description, "
                         f"system_prompt?, prompts: [...]}}, not a {type(raw).__name__}")
    if not isinstance(raw.get("prompts"), list):
        raise LmlabError(f"prompt set {path} has no 'prompts' list (keys: {sorted(raw)}); "
                         "expected {name, description, system_prompt?, prompts: [{id, text, note?}]}")
    name = str(raw.get("name") or path.stem)
    report = DataReport(name=f"prompts:{name}", source=source, digest=file_digest(path),
                        unit="prompts", requested=limit)
    prompts = _prompts(raw["prompts"], report)
    if limit is not None:
        prompts = prompts[:limit]
    report.rows_kept = len(prompts)
    if not prompts:
        raise LmlabError(f"prompt set {path} has no usable prompts ({report.summary()})")
    system = raw.get("system_prompt")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise LmlabError(f"prompt set {path}: system_prompt must be a non-empty string")
    return PromptSet(name, str(raw.get("description", "")), system, tuple(prompts), source,
                     path, report)


def _prompts(items: list[Any], report: DataReport) -> list[Prompt]:
    kept: list[Prompt] = []
    ids: set[str] = set()
    texts: set[str] = set()
    for index, item in enumerate(items):
        report.rows_read += 1
        where = f"prompts[{index}]"
        if not isinstance(item, dict) or "text" not in item or not isinstance(item["text"], str):
            report.drop("malformed", where=where)
            continue
        text = item["text"].strip()
        if not text:
            report.drop("empty", where=where)
            continue
        prompt_id = str(item.get("id") if item.get("id") is not None else f"p{index}")
        folded = " ".join(text.lower().split())
        if prompt_id in ids:
            report.drop("duplicate_id", where=f"{where} id {prompt_id!r}")
            continue
        if folded in texts:
            report.drop("duplicate", where=where)
            continue
        ids.add(prompt_id)
        texts.add(folded)
        kept.append(Prompt(prompt_id, text, str(item.get("note") or "")))
    for reason in ("malformed", "empty", "duplicate_id", "duplicate"):
        report.drop(reason, 0)
    return kept
