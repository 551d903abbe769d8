"""Reading a spec file and applying command-line overrides, before any heavy import.

Kept apart from :mod:`lmlab.sweeps.spec` (which imports torch through the model spec) so a
missing file, a YAML error or a malformed override is reported at once: the sweep entry
point reads the file with this module first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from lmlab.errors import LmlabError


class _SpecLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                first = seen[key]
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {first.line + 1})",
                    key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """'line L, column C: problem (context at line L2, column C2)' from a PyYAML error."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return str(error).splitlines()[0]
    mark = error.problem_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    if error.context:
        context = error.context
        if error.context_mark is not None and error.context_mark.line != mark.line:
            context += (f" that starts at line {error.context_mark.line + 1}, "
                        f"column {error.context_mark.column + 1}")
        text += f" ({context})"
    return text


def read_yaml(path: Path, what: str = "sweep spec") -> Any:
    """A YAML file's content; every way it can fail is one LmlabError naming the file."""
    if path.is_dir():
        raise LmlabError(f"{what} {path} is a directory, not a YAML file")
    if not path.is_file():
        raise LmlabError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LmlabError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at "
                         f"offset {error.start})") from None
    except OSError as error:
        raise LmlabError(f"{what} {path} cannot be read: {error.strerror}") from None
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise LmlabError(f"{path}, {_yaml_problem(error)}: malformed YAML") from None


# ---------------------------------------------------------------- overrides (-P key=value)


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``['--context.max_tokens', '64', '--test_mode=true']`` -> ``{'context.max_tokens': 64,
    'test_mode': True}``: the extra ``-P key=value`` pairs ``mlflow run`` appends to an entry
    point's command as ``--key value``. Values are read as YAML scalars or flow lists, so
    ``64`` is a number, ``true`` a boolean and ``[1, 2]`` a list, exactly as in a spec."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) == 2:
            raise LmlabError(f"unexpected argument {token!r}; spec settings are given as "
                             "--key value (or -P key=value through mlflow run)")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise LmlabError(f"--{key} needs a value")
            value = tokens[index + 1]
            index += 1
        index += 1
        try:
            overrides[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as error:
            raise LmlabError(f"--{key} {value!r} is not a YAML value: {_yaml_problem(error)}") from None
    return overrides


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The spec with each dotted key (``context.subject.concurrency``) set to its value."""
    out = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not all(parts):
            raise LmlabError(f"override {dotted!r}: empty part in the dotted key")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                block = ".".join(parts[:depth + 1])
                raise LmlabError(f"override {dotted!r}: {block} is {child!r} in the spec, not a "
                                 f"mapping; set the whole block, e.g. {block}='{{...}}'")
            node = child
        node[parts[-1]] = value
    return out


def read_spec_file(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Any:
    """The spec file's content with the overrides applied (None values skipped)."""
    raw = read_yaml(Path(path))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(raw, Mapping) and given:
        raw = apply_overrides(raw, given)
    return raw
