"""The random control: one per (method, layer), each with the norm of the method it controls."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lmlab.cache import DiskCache
from lmlab.models import LoadedModel
from lmlab.steering.family import SteeringFamily
from lmlab.sweeps.spec import parse_spec


def family_for(methods: list[str], layers: list[int] = [1, 2], **grid: Any) -> SteeringFamily:
    return SteeringFamily(parse_spec({
        "family": "steering", "name": "controls", "model": {"name": "tiny:llama"},
        "grid": {"method": methods, "layer": layers, "alpha": [0.5], **grid},
        "steering": {"n_prompts": 2, "n_train": 4, "eval_splits": ["benign"]}}))


def prepared(family: SteeringFamily, lm: LoadedModel, cache_dir: Path) -> SteeringFamily:
    family.prepare(SimpleNamespace(model=lm, cache=DiskCache(cache_dir)))  # type: ignore[arg-type]
    return family


def controls(family: SteeringFamily) -> list[dict[str, Any]]:
    return [c for c in family.conditions() if c["method"] == "random"]


def test_each_method_at_a_layer_gets_its_own_control() -> None:
    found = controls(family_for(["suffix_contrast", "mean_diff"], layers=[1]))
    assert sorted(c["control_for"] for c in found) == ["mean_diff", "suffix_contrast"]


def test_each_control_carries_the_norm_of_the_method_it_controls(llama_lm: LoadedModel,
                                                                 tmp_path: Path) -> None:
    family = prepared(family_for(["suffix_contrast", "mean_diff"]), llama_lm, tmp_path)
    norms = set()
    for control in controls(family):
        real = {**control, "method": control["control_for"]}
        del real["control_for"]
        assert family.direction_for(control).residual_norm == family.direction_for(real).residual_norm
        norms.add((control["layer"], family.direction_for(control).residual_norm))
    assert len(norms) == 4, "the two methods measure different norms at each of the two layers"


def test_a_cached_control_is_not_reused_with_another_methods_norm(llama_lm: LoadedModel,
                                                                  tmp_path: Path) -> None:
    first = prepared(family_for(["suffix_contrast"]), llama_lm, tmp_path)
    later = prepared(family_for(["mean_diff"]), llama_lm, tmp_path)  # same direction cache
    [control] = [c for c in controls(later) if c["layer"] == 1]
    mean_diff = later.direction_for({**control, "method": "mean_diff", "control_for": None})
    suffix = first.direction_for({**control, "method": "suffix_contrast", "control_for": None})
    assert mean_diff.residual_norm != suffix.residual_norm
    assert later.direction_for(control).residual_norm == mean_diff.residual_norm


def test_controls_of_two_methods_have_different_evaluation_fingerprints(llama_lm: LoadedModel,
                                                                        tmp_path: Path) -> None:
    family = prepared(family_for(["suffix_contrast", "mean_diff"], layers=[1]), llama_lm, tmp_path)
    first, second = controls(family)
    assert family.fingerprint(first) != family.fingerprint(second)


def test_controls_and_methods_have_distinct_condition_params() -> None:
    conditions = family_for(["suffix_contrast", "mean_diff"], layers=[1]).conditions()
    assert len(conditions) == 5  # baseline + 2 methods + 2 controls
    assert len({tuple(sorted((k, str(v)) for k, v in c.items())) for c in conditions}) == 5


@pytest.mark.parametrize("intervention, name", [("add", "add_norm_multiple"),
                                                ("ablate", "ablate_fraction")])
def test_the_grid_alpha_becomes_the_interventions_named_strength(intervention: str, name: str) -> None:
    [_, steered, control] = family_for(["suffix_contrast"], layers=[1],
                                       intervention=[intervention]).conditions()
    assert steered[name] == control[name] == 0.5
    assert "alpha" not in steered and "alpha" not in control
    assert name in family_for(["suffix_contrast"]).run_name({**steered, "splits": ["benign"]})
