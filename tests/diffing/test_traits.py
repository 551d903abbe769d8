"""Trait data and trait vectors: loaders that count what they skip, planted directions,
matched-norm random controls, vectors from steering and probe files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlab.diffing.traits import (BUNDLED_TRAITS, RANDOM, TraitVector, available_traits,
                                  contrastive_vectors, example_means, load_trait,
                                  probe_direction, random_controls, read_direction_file,
                                  read_probe_folder)
from lmlab.errors import LmlabError
from lmlab.hooks import capture_residuals

from .conftest import fresh_lm, write_traits


def test_the_bundled_traits_include_the_quirks_and_distractors():
    names = available_traits(BUNDLED_TRAITS)
    assert {"flattery", "brand", "pep", "formality", "refusal", "sadness"} <= set(names)
    for name in names:
        trait = load_trait(BUNDLED_TRAITS, name, "Tip?")
        assert len(trait.positive) >= 15 and len(trait.negative) >= 15
        assert trait.report.dropped["duplicate"] == 0
    brand = load_trait(BUNDLED_TRAITS, "brand", "Tip?")
    assert all("Zentrix" in text for _, text in brand.positive)
    assert not any("Zentrix" in text for _, text in brand.negative)


def test_text_traits_skip_duplicates_with_a_count_and_jsonl_pairs_skip_bad_lines(tmp_path):
    root = write_traits(tmp_path)
    (root / "praise" / "positive.txt").write_text("Great.\nGreat.\n\nSuper.\nNice.\n")
    trait = load_trait(root, "praise", "Tip?")
    assert [t for _, t in trait.positive] == ["Great.", "Super.", "Nice."]
    assert trait.report.dropped["duplicate"] == 1 and trait.report.rows_read == 4 + 3
    lines = [json.dumps({"positive": "Yes!", "negative": "No.", "prompt": "Really?"}),
             "{not json", json.dumps({"positive": "Only one side"}),
             json.dumps({"positive": "Sure!", "negative": "Maybe."})]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    pairs = load_trait(root, "pairs", "Tip?")
    assert pairs.positive == (("Really?", "Yes!"), ("Tip?", "Sure!"))
    assert pairs.report.dropped["malformed"] == 1 and pairs.report.dropped["missing_field"] == 1


def test_a_trait_with_too_few_examples_or_no_data_is_refused(tmp_path):
    root = write_traits(tmp_path)
    (root / "praise" / "negative.txt").write_text("Only one.\n")
    with pytest.raises(LmlabError, match="negative.txt .* has 1 usable example"):
        load_trait(root, "praise", "Tip?")
    with pytest.raises(LmlabError, match="trait 'absent' not found .* available"):
        load_trait(root, "absent", "Tip?")


def test_example_means_average_only_the_examples_own_tokens():
    lm = fresh_lm()
    examples = [("Tip?", "Wait, that is wrong."), ("How?", "Mix flour.")]
    means = example_means(lm, examples, [1], batch_size=2)[1]
    for row, (prompt, text) in enumerate(examples):
        prefix = lm.format_chat(prompt)
        enc = lm.tokenizer(prefix + text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        hidden = capture_residuals(lm, ids, torch.ones_like(ids), [1])[1][0].double()
        own = torch.tensor([start >= len(prefix) for start, _ in enc["offset_mapping"]])
        np.testing.assert_allclose(means[row], hidden[own].mean(0).numpy(), atol=1e-4)


def test_the_probe_direction_recovers_a_planted_direction_pointing_to_the_positives():
    rng = np.random.default_rng(0)
    planted = rng.normal(size=32)
    planted /= np.linalg.norm(planted)
    negative = rng.normal(size=(200, 32))
    positive = rng.normal(size=(200, 32)) + 2.0 * planted
    direction = probe_direction(positive, negative, c=1.0, seed=0)
    assert direction @ planted / np.linalg.norm(direction) > 0.8


def test_mean_diff_and_probe_vectors_separate_the_examples(tmp_path):
    lm = fresh_lm()
    trait = load_trait(write_traits(tmp_path), "numbers", "Tip?")
    vectors = contrastive_vectors(lm, [trait], [0, 2], ["mean_diff", "probe"], 1.0, 0)
    assert {(v.method, v.layer) for v in vectors} == {(m, l) for m in ("mean_diff", "probe")
                                                      for l in (0, 2)}
    pos = example_means(lm, trait.positive, [2])[2]
    neg = example_means(lm, trait.negative, [2])[2]
    for vector in (v for v in vectors if v.layer == 2):
        unit = vector.unit.double().numpy()
        assert (pos @ unit).mean() > (neg @ unit).mean()


def test_random_controls_have_the_mean_trait_norm_and_join_every_method():
    reference = [TraitVector("a", "mean_diff", 1, torch.full((8,), 1.0)),  # norm 2.83
                 TraitVector("b", "mean_diff", 1, torch.full((8,), 2.0))]  # norm 5.66
    controls = random_controls(8, [1], 2, seed=0, reference=reference,
                               methods=["mean_diff", "probe"])
    assert sorted({(c.trait, c.method) for c in controls}) == [
        (RANDOM, "mean_diff"), (RANDOM, "probe"), (f"{RANDOM}_2", "mean_diff"),
        (f"{RANDOM}_2", "probe")]
    expected = (np.sqrt(8) * 1.0 + np.sqrt(8) * 2.0) / 2
    for control in controls:
        assert float(control.vector.norm()) == pytest.approx(expected, rel=1e-5)
    first, second = controls[0].vector, controls[2].vector
    assert abs(float(first @ second) / expected ** 2) < 0.9  # two different draws


def test_direction_and_probe_files_give_their_layer_and_residual_direction(tmp_path):
    from safetensors.torch import save_file

    from lmlab.probes.registry import save_probe
    from lmlab.probes.train import Probe

    unit = torch.nn.functional.normalize(torch.arange(1.0, 9.0), dim=0)
    path = tmp_path / "direction-mean_diff-L3.safetensors"
    save_file({"unit": unit}, str(path), metadata={"layer": "3", "method": "mean_diff"})
    layer, vector, method = read_direction_file(path, "d")
    assert (layer, method) == (3, "mean_diff") and torch.equal(vector, unit)
    save_file({"other": unit}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LmlabError, match="not a steering direction"):
        read_direction_file(tmp_path / "bad.safetensors", "d")
    weight, scale = np.arange(1.0, 9.0), np.full(8, 4.0)
    folder = save_probe(Probe(5, 0, "x", weight, 0.0, np.zeros(8), scale, 0.5, 1.0),
                        tmp_path / "probe", {})
    layer, direction = read_probe_folder(folder, "p")
    assert layer == 5
    np.testing.assert_allclose(direction.numpy(), weight / 4.0, rtol=1e-6)
