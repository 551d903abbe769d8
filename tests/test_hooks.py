"""Residual hooks do exactly what they claim, only where they claim it, then undo it.

Layer convention under test: layer L is ``output_hidden_states[L + 1]``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.hooks import (
    ablate_direction,
    add_vector,
    capture_residuals,
    decoder_layers,
    residual_hooks,
)
from lmlab.models import LoadedModel

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog."]


def encode(lm: LoadedModel, prompts=PROMPTS):
    return lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def final_norm(lm: LoadedModel) -> nn.Module:
    return lm.model.transformer.ln_f if hasattr(lm.model, "transformer") else lm.model.model.norm


@torch.no_grad()
def forward(lm: LoadedModel, batch, **kwargs):
    return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    use_cache=False, **kwargs)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def unit(width: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


# ------------------------------------------------------------------ layer addressing

def test_decoder_layers_finds_one_block_per_layer(any_lm: LoadedModel) -> None:
    blocks = decoder_layers(any_lm.model)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == any_lm.n_layers == 3


def test_decoder_layers_of_a_model_without_blocks_raises() -> None:
    with pytest.raises(LmlabError):
        decoder_layers(nn.Linear(2, 2))


@pytest.mark.parametrize("layer", [0, 1])
def test_captured_layer_equals_the_next_hidden_state(any_lm: LoadedModel, layer: int) -> None:
    batch = encode(any_lm)
    with residual_hooks(any_lm, capture=[layer]) as captured:
        out = forward(any_lm, batch, output_hidden_states=True)
    assert len(captured[layer]) == 1
    assert torch.equal(captured[layer][0], out.hidden_states[layer + 1])


def test_last_layer_capture_is_the_hidden_state_before_the_final_norm(any_lm: LoadedModel) -> None:
    last = any_lm.n_layers - 1
    batch = encode(any_lm)
    with residual_hooks(any_lm, capture=[last]) as captured:
        out = forward(any_lm, batch, output_hidden_states=True)
    with torch.no_grad():
        normed = final_norm(any_lm)(captured[last][0])
    assert torch.equal(normed, out.hidden_states[-1])
    assert not torch.equal(captured[last][0], out.hidden_states[-1])


def test_capture_residuals_matches_hidden_states_for_every_requested_layer(any_lm: LoadedModel) -> None:
    batch = encode(any_lm, PROMPTS[1:])  # one unpadded row: position ids are unambiguous
    acts = capture_residuals(any_lm, batch.input_ids, batch.attention_mask, [0, 1])
    out = forward(any_lm, batch, output_hidden_states=True)
    assert sorted(acts) == [0, 1]
    for layer in (0, 1):
        assert torch.equal(acts[layer], out.hidden_states[layer + 1])


def test_capture_residuals_stops_after_the_deepest_requested_layer(llama_lm: LoadedModel) -> None:
    batch = encode(llama_lm)
    ran: list[int] = []
    blocks = decoder_layers(llama_lm.model)
    handles = [blocks[i].register_forward_hook(lambda *a, i=i: ran.append(i)) for i in range(3)]
    try:
        capture_residuals(llama_lm, batch.input_ids, batch.attention_mask, [1])
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0, 1]


def test_capture_residuals_leaves_no_hooks(llama_lm: LoadedModel) -> None:
    before = hook_count(llama_lm.model)
    batch = encode(llama_lm)
    capture_residuals(llama_lm, batch.input_ids, batch.attention_mask, [0, 2])
    assert hook_count(llama_lm.model) == before


# ------------------------------------------------------------------ add edits

def test_adding_a_zero_vector_leaves_logits_bit_identical(any_lm: LoadedModel) -> None:
    batch = encode(any_lm)
    plain = forward(any_lm, batch).logits
    with residual_hooks(any_lm, edits={1: add_vector(torch.zeros(any_lm.hidden_size))}):
        hooked = forward(any_lm, batch).logits
    assert torch.equal(plain, hooked)


def test_logits_after_the_block_equal_logits_before_it(any_lm: LoadedModel) -> None:
    batch = encode(any_lm)
    before = forward(any_lm, batch).logits
    with residual_hooks(any_lm, edits={1: add_vector(10 * unit(any_lm.hidden_size))}):
        during = forward(any_lm, batch).logits
    after = forward(any_lm, batch).logits
    assert not torch.equal(before, during)
    assert torch.equal(before, after)


def test_hooks_exist_inside_the_block_and_none_remain_after_it(any_lm: LoadedModel) -> None:
    before = hook_count(any_lm.model)
    with residual_hooks(any_lm, edits={0: add_vector(torch.ones(any_lm.hidden_size))}, capture=[2]):
        inside = hook_count(any_lm.model)
    assert inside > before
    assert hook_count(any_lm.model) == before


def test_an_exception_inside_the_block_still_removes_the_hooks(llama_lm: LoadedModel) -> None:
    before = hook_count(llama_lm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with residual_hooks(llama_lm, edits={1: add_vector(torch.ones(64))}, capture=[0]):
            raise RuntimeError("boom")
    assert hook_count(llama_lm.model) == before


def test_add_edit_changes_the_patched_layer_by_exactly_the_vector(any_lm: LoadedModel) -> None:
    batch = encode(any_lm)
    vector = 3 * unit(any_lm.hidden_size)
    base = forward(any_lm, batch, output_hidden_states=True).hidden_states
    # The capture is taken after the edit. (transformers records output_hidden_states
    # before user hooks run, so hidden_states[L + 1] itself does not show an edit at L.)
    with residual_hooks(any_lm, edits={1: add_vector(vector)}, capture=[1]) as captured:
        forward(any_lm, batch)
    assert torch.equal(captured[1][0], base[2] + vector)


def test_add_edit_leaves_layers_before_the_patch_bit_identical(any_lm: LoadedModel) -> None:
    batch = encode(any_lm)
    base = forward(any_lm, batch, output_hidden_states=True).hidden_states
    with residual_hooks(any_lm, edits={1: add_vector(3 * unit(any_lm.hidden_size))}):
        edited = forward(any_lm, batch, output_hidden_states=True).hidden_states
    assert torch.equal(edited[0], base[0])  # embeddings
    assert torch.equal(edited[1], base[1])  # layer 0
    assert not torch.equal(edited[3], base[3])  # layer 2, downstream of the patch


# ------------------------------------------------------------------ ablation

def _component(lm: LoadedModel, edit, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection on ``direction`` of layer 1's residual, unedited and edited."""
    batch = encode(lm)
    with residual_hooks(lm, capture=[1]) as plain:
        forward(lm, batch)
    with residual_hooks(lm, edits={1: edit}, capture=[1]) as edited:
        forward(lm, batch)
    return plain[1][0] @ direction, edited[1][0] @ direction


def test_full_ablation_removes_the_component_along_the_direction(any_lm: LoadedModel) -> None:
    d = unit(any_lm.hidden_size, seed=1)
    before, after = _component(any_lm, ablate_direction(5 * d, fraction=1.0), d)
    assert before.abs().max() > 1e-2
    assert (after.abs() / before.abs().max()).max() < 1e-4


def test_half_ablation_halves_the_component_along_the_direction(any_lm: LoadedModel) -> None:
    d = unit(any_lm.hidden_size, seed=1)
    before, after = _component(any_lm, ablate_direction(d, fraction=0.5), d)
    torch.testing.assert_close(after, 0.5 * before, rtol=1e-4, atol=1e-5)


def test_ablation_keeps_the_orthogonal_part(llama_lm: LoadedModel) -> None:
    d = unit(64, seed=1)
    batch = encode(llama_lm)
    with residual_hooks(llama_lm, capture=[1]) as plain:
        forward(llama_lm, batch)
    with residual_hooks(llama_lm, edits={1: ablate_direction(d)}, capture=[1]) as edited:
        forward(llama_lm, batch)
    h, e = plain[1][0], edited[1][0]
    orthogonal = h - (h @ d)[..., None] * d
    torch.testing.assert_close(e, orthogonal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_ablation_fraction_outside_zero_one_raises(fraction: float) -> None:
    with pytest.raises(LmlabError):
        ablate_direction(torch.ones(4), fraction=fraction)


# ------------------------------------------------------------------ positions

def _edited_columns(lm: LoadedModel, positions: str, prompt_len: int | None) -> list[int]:
    batch = encode(lm)
    with residual_hooks(lm, capture=[1]) as plain:
        forward(lm, batch)
    with residual_hooks(lm, edits={1: add_vector(torch.ones(lm.hidden_size))}, capture=[1],
                        positions=positions, prompt_len=prompt_len) as edited:
        forward(lm, batch)
    changed = (plain[1][0] != edited[1][0]).any(-1).all(0)  # (columns,): changed in every row
    unchanged = (plain[1][0] == edited[1][0]).all(-1).all(0)
    assert bool((changed | unchanged).all()), "a column changed in some rows only"
    return changed.nonzero().flatten().tolist()


def test_prompt_positions_edit_only_columns_before_prompt_len(any_lm: LoadedModel) -> None:
    width = encode(any_lm).input_ids.shape[1]
    assert _edited_columns(any_lm, "prompt", prompt_len=6) == list(range(6))
    assert width > 6


def test_generation_positions_edit_the_last_prompt_column_and_after(any_lm: LoadedModel) -> None:
    width = encode(any_lm).input_ids.shape[1]
    assert _edited_columns(any_lm, "generation", prompt_len=6) == list(range(5, width))


def test_all_positions_edit_every_column(any_lm: LoadedModel) -> None:
    width = encode(any_lm).input_ids.shape[1]
    assert _edited_columns(any_lm, "all", prompt_len=None) == list(range(width))


@pytest.mark.parametrize("positions", ["prompt", "generation"])
def test_prompt_relative_positions_without_prompt_len_raise(llama_lm: LoadedModel,
                                                            positions: str) -> None:
    before = hook_count(llama_lm.model)
    with pytest.raises(LmlabError):
        with residual_hooks(llama_lm, edits={1: add_vector(torch.ones(64))}, positions=positions):
            forward(llama_lm, encode(llama_lm))
    assert hook_count(llama_lm.model) == before


def test_unknown_positions_raise(llama_lm: LoadedModel) -> None:
    with pytest.raises(LmlabError):
        with residual_hooks(llama_lm, edits={1: add_vector(torch.ones(64))}, positions="middle"):
            pass


def _decode_step_edited(lm: LoadedModel, positions: str, pass_mask: bool) -> bool:
    """Prefill a 1-row prompt with a cache, run one cached decode step, report if it was edited.

    The edit and the capture are both at layer 0, whose keys and values come from the
    (unedited) embeddings, so the decode column differs from the unedited run iff it was edited.
    """
    ids = lm.tokenizer(["The quick brown fox"], return_tensors="pt",
                       add_special_tokens=False).input_ids
    prompt_len = ids.shape[1]
    step = torch.tensor([[5]])
    runs = []
    for edits in (None, {0: add_vector(torch.ones(lm.hidden_size))}):
        with torch.no_grad(), residual_hooks(lm, edits, capture=[0], positions=positions,
                                             prompt_len=prompt_len) as captured:
            past = lm.model(input_ids=ids, use_cache=True).past_key_values
            mask = torch.ones(1, prompt_len + 1, dtype=torch.long) if pass_mask else None
            lm.model(input_ids=step, past_key_values=past, attention_mask=mask, use_cache=True)
        runs.append(captured[0][1])
    return not torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("positions, expected", [("generation", True), ("prompt", False)])
def test_a_cached_decode_step_with_a_mask_counts_as_a_generated_column(
        any_lm: LoadedModel, positions: str, expected: bool) -> None:
    assert _decode_step_edited(any_lm, positions, pass_mask=True) is expected


@pytest.mark.parametrize("positions, expected", [("generation", True), ("prompt", False)])
def test_a_cached_decode_step_without_a_mask_counts_as_a_generated_column(
        any_lm: LoadedModel, positions: str, expected: bool) -> None:
    assert _decode_step_edited(any_lm, positions, pass_mask=False) is expected


# ------------------------------------------------------------------ layer checks

@pytest.mark.parametrize("layer", [-1, 3, 10])
def test_an_edit_at_a_layer_outside_the_model_raises(llama_lm: LoadedModel, layer: int) -> None:
    with pytest.raises(LmlabError, match="outside the model"):
        with residual_hooks(llama_lm, edits={layer: add_vector(torch.ones(64))}):
            pass


def test_a_capture_at_a_layer_outside_the_model_raises(llama_lm: LoadedModel) -> None:
    batch = encode(llama_lm)
    with pytest.raises(LmlabError, match="outside the model"):
        capture_residuals(llama_lm, batch.input_ids, batch.attention_mask, [0, 3])


# ------------------------------------------------------------------ padding

def test_left_padding_does_not_change_captured_activations_of_real_tokens(
        any_lm: LoadedModel) -> None:
    alone = encode(any_lm, [PROMPTS[0]])
    padded = encode(any_lm, PROMPTS)
    n = alone.input_ids.shape[1]
    assert padded.input_ids.shape[1] > n
    single = capture_residuals(any_lm, alone.input_ids, alone.attention_mask, [2])[2][0]
    batched = capture_residuals(any_lm, padded.input_ids, padded.attention_mask, [2])[2][0, -n:]
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ PEFT adapters

def with_lora_adapter(lm: LoadedModel) -> LoadedModel:
    """The same weights wrapped in a PEFT LoRA adapter (a separate copy of the model)."""
    import copy
    import dataclasses

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # non-zero B: the adapter really changes outputs
    return dataclasses.replace(lm, model=get_peft_model(copy.deepcopy(lm.model), config).eval())


def columns_edited_during_generate(lm: LoadedModel, positions: str, new_tokens: int = 4
                                   ) -> tuple[list[int], int, int]:
    """Absolute columns the layer-1 edit touched while ``generate`` ran on one prompt.

    Block 1's own output (a hook registered before the steering hooks, so it runs first)
    is compared with what block 2 receives (block 1's output after the edit).
    Returns (edited columns, prompt length, total columns seen).
    """
    from lmlab.generation import GenerationConfig, generate

    prompt = lm.format_chat("How do I bake bread?")
    prompt_len = len(lm.tokenizer(prompt, add_special_tokens=False).input_ids)
    produced: list[torch.Tensor] = []
    received: list[torch.Tensor] = []
    blocks = decoder_layers(lm.model)

    def keep_output(module: nn.Module, args: tuple, output) -> None:  # type: ignore[no-untyped-def]
        produced.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        received.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [blocks[1].register_forward_hook(keep_output),
               blocks[2].register_forward_pre_hook(keep_input, with_kwargs=True)]
    try:
        generate(lm, [prompt], GenerationConfig(max_new_tokens=new_tokens),
                 edits={1: add_vector(torch.ones(lm.hidden_size))}, positions=positions)  # type: ignore[arg-type]
    finally:
        for handle in handles:
            handle.remove()
    changed = torch.cat([(p != r).any(-1)[0] for p, r in zip(produced, received)])
    return changed.nonzero().flatten().tolist(), prompt_len, int(changed.numel())


@pytest.mark.parametrize("positions", ["all", "prompt", "generation"])
def test_steering_during_generate_with_a_lora_adapter_edits_exactly_the_right_columns(
        llama_lm: LoadedModel, positions: str) -> None:
    adapted = with_lora_adapter(llama_lm)
    columns, prompt_len, seen = columns_edited_during_generate(adapted, positions)
    assert seen > prompt_len + 1, "generation must run several decode steps"
    expected = {"all": list(range(seen)), "prompt": list(range(prompt_len)),
                "generation": list(range(prompt_len - 1, seen))}[positions]
    assert columns == expected


def test_the_lora_adapter_changes_the_model(llama_lm: LoadedModel) -> None:
    batch = encode(llama_lm)
    adapted = with_lora_adapter(llama_lm)
    assert not torch.equal(forward(llama_lm, batch).logits, forward(adapted, batch).logits)
