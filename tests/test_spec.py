"""The spec and settings at the edge: strict types, dotted overrides, family names.

The one-line messages for bad input are the table in tests/test_errors.py; these tests
pin down the behaviour behind them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import pytest
import yaml

from lmlab.config import conforms, describe, from_mapping
from lmlab.errors import LmlabError
from lmlab.sweeps.spec import known_families, load_spec
from lmlab.sweeps.specfile import apply_overrides, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5


@dataclass(frozen=True)
class Outer:
    count: int = 1
    name: str | None = None
    mode: Literal["fast", "slow"] = "fast"
    sizes: tuple[int, ...] = ()
    pair: tuple[float, float] = (0.0, 1.0)
    prices: Mapping[str, float] | None = None
    inner: Inner = field(default_factory=Inner)


# ---------------------------------------------------------------- config.from_mapping


def test_values_of_the_right_type_build_the_dataclass_with_lists_as_tuples() -> None:
    built = from_mapping(Outer, {"count": 3, "name": None, "mode": "slow", "sizes": [1, 2],
                                 "pair": [0, 2.5], "prices": {"in": 1}, "inner": {"rate": 2}},
                         "outer")
    assert built == Outer(3, None, "slow", (1, 2), (0, 2.5), {"in": 1}, Inner(2))


@pytest.mark.parametrize("hint, value", [
    (int, True), (int, 1.0), (int, "1"), (float, "0.5"), (bool, "false"), (bool, 0),
    (str, 5), (Literal["fast", "slow"], "medium"), (tuple[int, ...], [1, "2"]),
    (tuple[float, float], [1.0]), (Mapping[str, float], {"a": "b"}), (int | None, "x"),
])
def test_a_value_of_the_wrong_type_does_not_conform(hint, value) -> None:
    assert not conforms(hint, value)


def test_an_integer_is_a_number_and_null_fits_an_optional() -> None:
    assert conforms(float, 3) and conforms(int | None, None) and conforms(str | None, None)


def test_a_wrong_type_is_named_with_its_setting_and_a_readable_type() -> None:
    with pytest.raises(LmlabError, match=r"^outer.inner.rate must be a number, got 'high'$"):
        from_mapping(Outer, {"inner": {"rate": "high"}}, "outer")
    assert describe(tuple[float, ...]) == "a list of numbers"
    assert describe(int | None) == "an integer or null"


# ---------------------------------------------------------------- overrides


def test_override_tokens_are_read_as_yaml_values() -> None:
    tokens = shlex.split("--context.max_tokens 64 --test_mode=true --grid.alpha '[0.1, 2]' "
                         "--name 'my run' --context.subject.model openai/x --grid.layer -1")
    assert parse_overrides(tokens) == {"context.max_tokens": 64, "test_mode": True,
                                       "grid.alpha": [0.1, 2], "name": "my run",
                                       "context.subject.model": "openai/x", "grid.layer": -1}


def test_overrides_set_nested_keys_and_create_missing_blocks() -> None:
    raw = {"family": "context", "context": {"task": "niah", "max_tokens": 4}}
    out = apply_overrides(raw, {"context.max_tokens": 8, "context.subject.concurrency": 2,
                                "runtime.threads": 1})
    assert out["context"] == {"task": "niah", "max_tokens": 8, "subject": {"concurrency": 2}}
    assert out["runtime"] == {"threads": 1}
    assert raw["context"]["max_tokens"] == 4, "the spec read from the file is not modified"


def test_an_override_changes_the_spec_identity_like_an_edit_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    base = yaml.safe_load((ROOT / "sweeps" / "niah.yaml").read_text())
    path.write_text(yaml.safe_dump(base))
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump({**base, "context": {**base["context"], "max_tokens": 64}}))
    overridden = load_spec(path, {"context.max_tokens": 64})
    assert overridden.settings["max_tokens"] == 64
    assert overridden.digest == load_spec(edited).digest != load_spec(path).digest


# ---------------------------------------------------------------- test mode


def _mlflow_sweep_argv(**params: str) -> list[str]:
    """The argv `mlflow run . -e sweep -P ...` gives entrypoints/sweep.py (MLflow's own builder)."""
    from mlflow.projects._project_spec import load_project

    command = load_project(str(ROOT)).get_entry_point("sweep").compute_command(params, None)
    tokens = shlex.split(command.split("&&")[-1])
    assert tokens[:2] == ["python", "entrypoints/sweep.py"]
    return tokens[2:]


def _sweep_module():  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_entry", ROOT / "entrypoints" / "sweep.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_mlflow_run_without_test_mode_keeps_the_spec_s_own_test_mode() -> None:
    sweep = _sweep_module()
    args, rest = sweep.parse_args(_mlflow_sweep_argv(spec="sweeps/niah.yaml"))
    assert rest == [] and sweep.test_mode_override(args.test_mode) is None
    args, _ = sweep.parse_args(_mlflow_sweep_argv(spec="sweeps/niah.yaml", test_mode="true"))
    assert sweep.test_mode_override(args.test_mode) is True


def test_a_quoted_false_in_a_spec_is_an_error_not_test_mode(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    raw = yaml.safe_load((ROOT / "sweeps" / "niah.yaml").read_text())
    path.write_text(yaml.safe_dump({**raw, "test_mode": "false"}))
    with pytest.raises(LmlabError, match="test_mode must be true or false, got 'false'"):
        load_spec(path)
    path.write_text(yaml.safe_dump({**raw, "test_mode": False}))
    assert load_spec(path).test_mode is False


# ---------------------------------------------------------------- families


def test_the_family_names_the_spec_knows_are_the_registered_families() -> None:
    from lmlab.sweeps.family import FAMILIES, _import_families

    _import_families()
    assert known_families() == sorted(FAMILIES)


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml")))
def test_every_shipped_spec_passes_the_strict_checks(spec: str) -> None:
    from lmlab.sweeps.family import family_for

    family_for(load_spec(ROOT / "sweeps" / spec))


def test_a_family_registered_in_process_is_a_known_family() -> None:
    from lmlab.sweeps.family import FAMILIES, Family, register
    from lmlab.sweeps.spec import parse_spec

    @register
    class Plugin(Family):
        name = "plugin-for-test"

    try:
        spec = parse_spec({"family": "plugin-for-test", "name": "p", "model": {"name": "tiny:llama"},
                           "grid": {"x": [1]}}, origin="spec")
        assert spec.family == "plugin-for-test"
    finally:
        FAMILIES.pop("plugin-for-test", None)
