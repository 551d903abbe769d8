"""Capture and replay on one resident base: exact zeros, same ids, loud mismatches, 4-bit,
resume, stored sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmlab.activations as activations
import lmlab.diffing.capture as capture
from lmlab.activations import stored_data_bytes
from lmlab.cache import DiskCache
from lmlab.diffing import pipeline
from lmlab.diffing.capture import (CaptureItem, ReplayMismatch, ResidentBase, capture_items,
                                   check_replay, generate_responses, paired_difference)
from lmlab.diffing.prompt_sets import load_prompt_set
from lmlab.diffing.settings import DiffingSettings
from lmlab.diffing.traits import TraitVector
from lmlab.diffing.variants import Organism
from lmlab.generation import GenerationConfig
from lmlab.hooks import capture_residuals
from lmlab.models import ModelSpec, load_model

from .conftest import fresh_lm, write_prompts

LAYERS = (0, 2)


def organism(name, path, trait=None):
    return Organism(name, path, trait, str(path))


def settings(**capture_settings) -> DiffingSettings:
    return DiffingSettings.from_dict({"layers": list(LAYERS), "generation": {"max_new_tokens": 5,
                                      "batch_size": 2}, "capture": {"batch_size": 2,
                                                                    **capture_settings}})


def projector(width: int = 64) -> pipeline.Projector:
    generator = torch.Generator().manual_seed(0)
    vectors = [TraitVector(name, "mean_diff", layer, torch.randn(width, generator=generator))
               for layer in LAYERS for name in ("a", "b")]
    return pipeline.Projector.build(vectors, LAYERS, width, "test-vectors")


@pytest.fixture
def prompt_set(tmp_path):
    return load_prompt_set(str(write_prompts(tmp_path / "set.json", n=4)))


def test_the_clean_view_is_the_base_model_bit_for_bit_with_adapters_loaded(adapters):
    resident = ResidentBase(fresh_lm())
    for name in ("alpha", "beta"):
        resident.add(organism(name, adapters[name]))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    mask = torch.ones_like(ids)
    untouched = fresh_lm()
    expected = capture_residuals(untouched, ids, mask, list(LAYERS))
    with resident.use(None) as clean:
        got = capture_residuals(clean, ids, mask, list(LAYERS))
    with resident.use(organism("alpha", adapters["alpha"])) as view:
        shifted = capture_residuals(view, ids, mask, list(LAYERS))
        with resident.peft.disable_adapter():
            disabled = capture_residuals(view, ids, mask, list(LAYERS))
    for layer in LAYERS:
        assert torch.equal(got[layer], expected[layer])
        assert torch.equal(disabled[layer], expected[layer])  # adapter off: diff exactly zero
        assert not torch.equal(shifted[layer], expected[layer])  # the adapter does something
    assert resident.loads == 2


def test_the_same_text_shift_is_exactly_zero_when_the_adapter_changes_nothing(tmp_path, prompt_set):
    from peft import LoraConfig, get_peft_model

    silent = tmp_path / "silent"
    lm = fresh_lm()
    # PEFT's default init sets B = 0: the adapter is present but adds exactly nothing.
    get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                        task_type="CAUSAL_LM")).save_pretrained(str(silent))
    resident = ResidentBase(fresh_lm())
    data = pipeline.run_captures(resident, organism("silent", silent), prompt_set, settings(),
                                 projector(), DiskCache(tmp_path / "cache"))
    table = pipeline.projection_table(data, projector())
    shift = table[table["convention"] == "same_text"]
    assert len(shift) > 0 and (shift["score"] == 0).all()
    assert (table[(table["reading"] == "organism")]["score"] != 0).any()


def test_the_replay_reads_exactly_the_organisms_generated_ids(adapters, tmp_path, prompt_set):
    resident = ResidentBase(fresh_lm())
    alpha = organism("alpha", adapters["alpha"])
    data = pipeline.run_captures(resident, alpha, prompt_set, settings(), projector(),
                                 DiskCache(tmp_path / "cache"))
    assert data.pairs_checked == len(prompt_set.prompts)
    for response, item in zip(data.organism_responses, data.replay.items):
        assert tuple(item.input_ids) == response.prompt_ids + response.response_ids
        assert data.replay.cache.items[item.task_id]["ids_hash"] == response.ids_hash
        assert data.own.cache.items[item.task_id]["ids_hash"] == response.ids_hash
    # Greedy generation re-run gives the same ids (kept from the cache, not re-tokenized).
    with resident.use(alpha) as view:
        again = generate_responses(view, "alpha", prompt_set, settings().generation,
                                   DiskCache(tmp_path / "other"))
    assert [r.response_ids for r in again] == [r.response_ids for r in data.organism_responses]


def test_a_replay_that_reads_other_ids_fails_loudly(adapters, tmp_path, prompt_set, monkeypatch):
    real = pipeline.replay_of

    def one_token_off(items):
        replay = real(items)
        replay[1].input_ids[-1] = (replay[1].input_ids[-1] + 1) % 300
        return replay

    monkeypatch.setattr(pipeline, "replay_of", one_token_off)
    with pytest.raises(ReplayMismatch, match=r"other token ids .* never compared or truncated"):
        pipeline.run_captures(ResidentBase(fresh_lm()), organism("alpha", adapters["alpha"]),
                              prompt_set, settings(), projector(), DiskCache(tmp_path / "c"))


def test_pairs_of_different_lengths_are_refused_never_truncated():
    ids = np.arange(3, 12)
    mine = [CaptureItem("s/p", ids, 0, 4)]
    shorter = [CaptureItem("s/p", ids[:-1], 0, 4)]
    manifest = {"s/p": {"ids_hash": mine[0].ids_hash}}
    with pytest.raises(ReplayMismatch, match="9 tokens"):
        check_replay("alpha", mine, shorter, manifest, {"s/p": {"ids_hash": shorter[0].ids_hash}})
    with pytest.raises(ReplayMismatch, match="never truncated"):
        paired_difference("s/p", np.zeros((9, 3)), np.zeros((8, 3)))


def test_four_bit_base_with_an_adapter_runs_on_cpu(adapters, tmp_path, prompt_set):
    lm = fresh_lm()
    lm.model.save_pretrained(tmp_path / "base")
    lm.tokenizer.save_pretrained(tmp_path / "base")
    quantized = load_model(ModelSpec(name=str(tmp_path / "base"), quantization="4bit", device="cpu"))
    assert type(quantized.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    resident = ResidentBase(quantized)
    data = pipeline.run_captures(resident, organism("alpha", adapters["alpha"]), prompt_set,
                                 settings(), projector(), DiskCache(tmp_path / "cache"))
    wrapped = resident.peft.base_model.model.model.layers[0].self_attn.q_proj
    assert "Linear4bit" in type(wrapped).__name__ and hasattr(wrapped, "lora_A")
    table = pipeline.projection_table(data, projector())
    assert np.isfinite(table["score"]).all()
    assert (table[table["convention"] == "same_text"]["score"] != 0).any()


def test_an_interrupted_condition_resumes_without_recomputing_finished_items(
        adapters, tmp_path, prompt_set, monkeypatch):
    cache = DiskCache(tmp_path / "cache")
    alpha = organism("alpha", adapters["alpha"])
    generated: list[int] = []
    real_generate = capture.generate

    def counting_generate(lm, prompts, config, **kwargs):
        generated.append(len(prompts))
        return real_generate(lm, prompts, config, **kwargs)

    passes: list[int] = []
    real_capture = activations.capture_residuals

    def dies_on_the_replay(lm, ids, mask, layers, dtype=None):
        passes.append(ids.shape[0])
        if len(passes) == 4:  # organism: 2 batches; the replay's second batch dies
            raise KeyboardInterrupt
        return real_capture(lm, ids, mask, layers, dtype)

    monkeypatch.setattr(capture, "generate", counting_generate)
    monkeypatch.setattr(activations, "capture_residuals", dies_on_the_replay)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_captures(ResidentBase(fresh_lm()), alpha, prompt_set, settings(), projector(),
                              cache)
    assert generated == [2, 2, 2, 2]  # clean and organism, two batches each
    generated.clear()
    passes.clear()
    monkeypatch.setattr(activations, "capture_residuals",
                        lambda *a, **k: passes.append(a[1].shape[0]) or real_capture(*a, **k))
    data = pipeline.run_captures(ResidentBase(fresh_lm()), alpha, prompt_set, settings(),
                                 projector(), cache)
    assert generated == []  # every response came from the cache
    # Only the replay's unfinished batch and the clean model's own reading ran again.
    assert passes == [2, 2, 2] and data.pairs_checked == 4
    passes.clear()
    pipeline.run_captures(ResidentBase(fresh_lm()), alpha, prompt_set, settings(), projector(), cache)
    assert passes == [] and generated == []


def test_stored_bytes_per_token_and_layer_are_width_times_dtype(adapters, tmp_path, prompt_set):
    cache = DiskCache(tmp_path / "cache")
    raw = pipeline.run_captures(ResidentBase(fresh_lm()), organism("alpha", adapters["alpha"]),
                                prompt_set, settings(store="activations", dtype="bfloat16"),
                                projector(), cache)
    streamed = pipeline.run_captures(ResidentBase(fresh_lm()), organism("alpha", adapters["alpha"]),
                                     prompt_set, settings(), projector(), cache)
    for readings, row_bytes in ((raw.own, 64 * 2), (streamed.own, (2 + 1) * 4)):
        shards = list((readings.cache.directory / "shards").glob("*.safetensors"))
        stored = sum(stored_data_bytes(p) for p in shards)
        tokens = sum(item.n_tokens - item.store_from for item in readings.items)
        assert stored == tokens * len(LAYERS) * row_bytes
    # The same shifts either way (float16 storage against float32 streaming).
    a = pipeline.projection_table(raw, projector())
    b = pipeline.projection_table(streamed, projector())
    np.testing.assert_allclose(a["score"], b["score"], atol=0.05)


def test_response_only_capture_stores_the_response_and_reads_the_prompt(adapters, tmp_path,
                                                                        prompt_set):
    data = pipeline.run_captures(ResidentBase(fresh_lm()), organism("alpha", adapters["alpha"]),
                                 prompt_set, settings(response_only=True), projector(),
                                 DiskCache(tmp_path / "cache"))
    full = pipeline.run_captures(ResidentBase(fresh_lm()), organism("alpha", adapters["alpha"]),
                                 prompt_set, settings(), projector(), DiskCache(tmp_path / "c2"))
    for item, array, full_array in zip(data.own.items, data.own.by_layer[2], full.own.by_layer[2]):
        assert array.shape[0] == item.n_tokens - item.response_start
        np.testing.assert_allclose(array, full_array[item.response_start:], atol=1e-4)
    table = pipeline.projection_table(data, projector())
    assert table["token_index"].min() == 0


def test_capture_items_leave_out_responses_without_tokens():
    from lmlab.diffing.capture import Response

    empty = Response("m", "s", "p0", "q", "q", (1, 2), (), "", "eos", "2025-01-01")
    full = Response("m", "s", "p1", "q", "q", (1, 2), (5,), "x", "eos", "2025-01-01")
    assert [i.task_id for i in capture_items([empty, full], response_only=True)] == ["s/p1"]


def test_the_system_prompt_reaches_the_model_through_the_chat_template(tmp_path):
    path = write_prompts(tmp_path / "sys.json", n=1, system="Answer like a pirate.")
    prompt_set = load_prompt_set(str(path))
    responses = generate_responses(fresh_lm(), "clean", prompt_set, GenerationConfig(3, 2),
                                   DiskCache(tmp_path / "cache"))
    assert responses[0].formatted.startswith("<|im_start|>system\nAnswer like a pirate.")
    tokenizer = fresh_lm().tokenizer
    assert tokenizer.decode(list(responses[0].prompt_ids)) == responses[0].formatted
