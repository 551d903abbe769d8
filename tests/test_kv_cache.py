"""The growing KV cache layer: the same keys and values as transformers' DynamicLayer, each
step written in place, and every other cache operation keeping its meaning."""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from lmlab import generation as gen
from lmlab.generation import GenerationConfig, encode_prompts, generate, score_after
from lmlab.kv_cache import GrowingLayer, growing


def states(batch: int = 3, columns: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, columns, 4, generator=g), torch.randn(batch, 2, columns, 4, generator=g))


def both_layers(steps: list[int]) -> tuple[DynamicLayer, GrowingLayer]:
    plain, grown = DynamicLayer(), GrowingLayer()
    for seed, columns in enumerate(steps):
        k, v = states(columns=columns, seed=seed)
        plain.update(k, v)
        grown.update(k, v)
    return plain, grown


def assert_same(plain: DynamicLayer, grown: GrowingLayer) -> None:
    assert torch.equal(plain.keys, grown.keys) and torch.equal(plain.values, grown.values)
    assert plain.get_seq_length() == grown.get_seq_length()


def test_updates_give_the_keys_and_values_of_a_dynamic_layer():
    plain, grown = both_layers([5, 1, 1, 3] + [1] * 70)
    assert_same(plain, grown)


def test_a_step_writes_in_place_until_the_spare_room_is_used():
    layer = GrowingLayer()
    buffers = set()
    for seed in range(200):
        layer.update(*states(seed=seed))
        buffers.add(layer._key_buffer.data_ptr())  # type: ignore[union-attr]
    assert len(buffers) <= 4  # grown by half, at least 64 columns: 64, 96, 144, 216


def test_batch_select_then_update_matches_a_dynamic_layer():
    plain, grown = both_layers([4, 1])
    index = torch.tensor([2, 0])
    plain.batch_select_indices(index)
    grown.batch_select_indices(index)
    k, v = states(batch=2, seed=9)
    plain.update(k, v)
    grown.update(k, v)
    assert_same(plain, grown)


def test_crop_then_update_overwrites_the_cropped_columns():
    plain, grown = both_layers([6, 1, 1])
    plain.crop(-3)
    grown.crop(-3)
    k, v = states(seed=7)
    plain.update(k, v)
    grown.update(k, v)
    assert_same(plain, grown)


def test_a_deep_copy_holds_only_the_filled_part_and_grows_on_its_own():
    _, grown = both_layers([5, 1])
    fork = copy.deepcopy(grown)
    assert fork.keys.is_contiguous() and fork.keys.shape[-2] == 6
    fork.update(*states(seed=3))
    assert grown.get_seq_length() == 6 and fork.get_seq_length() == 7
    assert torch.equal(fork.keys[..., :6, :], grown.keys)


def test_growing_replaces_only_plain_dynamic_layers():
    cache = DynamicCache()
    cache.update(*states(), layer_idx=0)
    growing(cache)
    assert type(cache.layers[0]) is GrowingLayer
    cache.update(*states(seed=1), layer_idx=1)  # a layer added later grows too
    assert type(cache.layers[1]) is GrowingLayer


def test_generation_and_scoring_are_token_for_token_those_of_plain_dynamic_layers(any_lm, monkeypatch):
    prompts = [any_lm.format_chat(p) for p in ("Say hello.", "Name a colour and a fruit.", "Count to five.")]
    config = GenerationConfig(max_new_tokens=12, batch_size=2)

    def run() -> tuple[list, list]:
        encoded = encode_prompts(any_lm, prompts, batch_size=2)
        completions = generate(any_lm, encoded, config)
        scored = score_after(any_lm, encoded, [c.token_ids for c in completions])
        return completions, scored

    grown_out, grown_scores = run()
    assert all(type(layer) is GrowingLayer
               for layer in encode_prompts(any_lm, prompts, batch_size=2).batches[0].cache.layers)
    monkeypatch.setattr(gen, "growing", lambda cache: cache)
    plain_out, plain_scores = run()
    assert [c.token_ids for c in grown_out] == [c.token_ids for c in plain_out]
    for a, b in zip(grown_scores, plain_scores):
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs)
