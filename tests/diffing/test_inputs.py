"""Prompt sets, variants files, settings: read unmodified, bad records counted, bad files
refused with one message."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest

from lmlab.diffing.prompt_sets import BUNDLED_DIR, bundled_names, load_prompt_set
from lmlab.diffing.settings import DiffingSettings
from lmlab.diffing.variants import load_variants
from lmlab.errors import LmlabError

from .conftest import make_adapter

ORGANISM_DATA = Path(__file__).resolve().parents[2] / "src" / "lmlab" / "data" / "organisms"


def test_bundled_prompt_sets_load_whole_with_their_ids():
    assert {"everyday_advice", "hobbies", "study_work"} <= set(bundled_names())
    for name in bundled_names():
        prompt_set = load_prompt_set(f"bundled:{name}")
        assert prompt_set.report.rows_read == prompt_set.report.rows_kept >= 8
        assert len({p.id for p in prompt_set.prompts}) == len(prompt_set.prompts)
    assert load_prompt_set("bundled:hobbies").system_prompt


@pytest.mark.skipif(not ORGANISM_DATA.is_dir(), reason="the organisms' training data is not "
                    "merged yet (lmlab/data/organisms)")
def test_bundled_prompts_are_disjoint_from_the_organisms_training_and_check_prompts():
    seen = []
    for path in ORGANISM_DATA.glob("*.jsonl"):
        seen += [json.loads(line)["prompt"].lower() for line in path.read_text().splitlines()
                 if line.strip()]
    for path in ORGANISM_DATA.glob("*.json"):
        seen += [p["text"].lower() for p in json.loads(path.read_text()).get("prompts", [])]
    assert seen
    for name in bundled_names():
        for prompt in load_prompt_set(f"bundled:{name}").prompts:
            closest = max(difflib.SequenceMatcher(None, prompt.text.lower(), other).ratio()
                          for other in seen)
            assert closest < 0.8, prompt.text


def test_bad_prompts_are_skipped_with_counted_reasons(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"name": "mine", "prompts": [
        {"id": "a", "text": "How?"}, {"id": "b", "text": "  "}, {"id": "a", "text": "Why?"},
        {"id": "c", "text": "how?"}, "just a string", {"id": "d", "text": "When?", "note": "n"}]}))
    prompt_set = load_prompt_set(str(path))
    assert [p.id for p in prompt_set.prompts] == ["a", "d"]
    assert prompt_set.prompts[1].note == "n"
    dropped = prompt_set.report.dropped
    assert (dropped["empty"], dropped["duplicate_id"], dropped["duplicate"], dropped["malformed"]) \
        == (1, 1, 1, 1)
    assert load_prompt_set(str(path), limit=1).report.shortfall == 0
    assert len(load_prompt_set(str(path), limit=1).prompts) == 1


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "must be a JSON object"), ("{\"name\": \"x\"}", "no 'prompts' list"),
    ("{not json", "not valid JSON"), ("{\"prompts\": [{\"id\": 1}]}", "no usable prompts"),
])
def test_unusable_prompt_files_are_refused_with_one_message(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(LmlabError, match=message):
        load_prompt_set(str(path))
    with pytest.raises(LmlabError, match="no bundled prompt set 'nope'"):
        load_prompt_set("bundled:nope")


@pytest.mark.parametrize("raw, expected", [
    ("4bit", "4bit"), ({"load_in_8bit": True}, "8bit"), ({"bits": 4}, "4bit"),
    ({"load_in_4bit": False}, "none"), (None, None)])
def test_variants_files_read_the_trait_interp_shape(tmp_path, raw, expected):
    make_adapter(tmp_path / "adapters" / "a", 1)
    config = {"model_variants": {"base": {"model": "m"},
                                 "quirky": {"model": "m", "lora": "adapters/a"}}}
    if raw is not None:
        config["quantization"] = raw
    (tmp_path / "config.json").write_text(json.dumps(config))
    variants = load_variants(tmp_path / "config.json")
    assert [o.name for o in variants.organisms] == ["quirky"]
    assert variants.organisms[0].adapter == (tmp_path / "adapters" / "a").resolve()
    assert variants.quantization == expected and variants.n_variants == 2


@pytest.mark.parametrize("config, message", [
    ({"variants": {}}, "needs a 'model_variants' mapping"),
    ({"model_variants": {"a": {"model": "m"}}}, "no variant with a 'lora'"),
    ({"model_variants": {"a": {"lora": "x"}}}, "needs a 'model' string"),
    ({"model_variants": {"a": {"model": "m", "lora": "./missing"}}}, "adapter folder not found"),
    ({"model_variants": {"a": {"model": "m", "lora": "x"}}, "quantization": "3bit"}, "3bit"),
])
def test_bad_variants_files_are_refused(tmp_path, config, message):
    (tmp_path / "x").mkdir()
    make_adapter(tmp_path / "x", 1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmlabError, match=message):
        load_variants(tmp_path / "config.json")


@pytest.mark.parametrize("raw, message", [
    ({"layers": []}, "non-empty list of integers"), ({"layers": [1, 1]}, "must not repeat"),
    ({"capture": {"store": "disk"}}, "capture.store"), ({"analysis": {"unit": "z"}}, "unit"),
    ({"traits": {"methods": ["pca"]}}, "traits.methods"),
    ({"traits": {"vectors": [{"name": "v"}]}}, "exactly one of"),
    ({"traits": {"vectors": [{"name": "v", "probe": "probe-x"}]}}, "models:/"),
    ({"organisms": [{"name": "clean", "adapter": "x"}]}, "not 'clean'"),
    ({"analysis": {"detect_layer": 4}}, "detect_layer 4 is not in"),
    ({"unknown": 1}, "unknown diffing setting"),
])
def test_settings_are_validated_at_the_edge(raw, message):
    with pytest.raises(LmlabError, match=message):
        DiffingSettings.from_dict(raw)


def test_the_detection_layer_defaults_to_the_middle_of_the_layers():
    assert DiffingSettings.from_dict({"layers": [20, 5, 10]}).detect_layer == 10
    assert BUNDLED_DIR.is_dir()


def test_an_adapter_whose_named_base_differs_is_refused_before_its_tensors_are_read(tmp_path):
    from lmlab.diffing.variants import Organism, check_adapter

    from .conftest import fresh_lm

    other = fresh_lm(hidden_size=32)
    other.model.config.save_pretrained(tmp_path / "other_base")
    adapter = make_adapter(tmp_path / "adapter", 1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "other_base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    organism = Organism("o", adapter, None, str(adapter))
    with pytest.raises(LmlabError, match=r"was made for .*other_base.* \(hidden_size 32\), but the "
                                         r"base model has hidden_size 64"):
        check_adapter(organism, fresh_lm().model)
    config["base_model_name_or_path"] = "smollm2-135m-not-here"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "checked by tensor shapes only" in check_adapter(organism, fresh_lm().model)[0]
