"""Batched, steered generation and teacher-forced scoring behave like one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from lmlab import generation
from lmlab.errors import LmlabError
from lmlab.generation import (GenerationConfig, encode_prompts, generate, generate_scored,
                              score_after, score_continuations)
from lmlab.hooks import add_vector, residual_hooks
from lmlab.models import LoadedModel

# Different token lengths, deliberately not sorted by length.
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "How do I bake bread?"]
FORCED_TOKEN = 150  # an ordinary (non-special) token id of the tiny vocabulary


def greedy(max_new_tokens: int = 6, **kwargs) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, **kwargs)


def toward_token(lm: LoadedModel, token: int, scale: float = 1000.0) -> dict:
    """A huge add at the last layer along ``token``'s unembedding row: that token wins argmax."""
    row = lm.model.get_output_embeddings().weight[token].detach()
    return {lm.n_layers - 1: add_vector(scale * row / row.norm())}


def moderate_edit(lm: LoadedModel) -> dict:
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    return {1: add_vector(2.0 * vector)}


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"batch_size": 0},
                                    {"do_sample": True, "temperature": 0.0}])
def test_invalid_generation_config_raises(kwargs: dict) -> None:
    with pytest.raises(LmlabError):
        GenerationConfig(**kwargs)


# ------------------------------------------------------------------ steering reaches every token

# gemma and gpt2 tie input and output embeddings: once the forced token is fed back, the
# unsteered model repeats it anyway, so only untied models can show a missed decode step.
@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generation_steering_reaches_every_token_of_a_lone_prompt(
        tiny_lm_of, arch: str, use_cache: bool) -> None:
    lm = tiny_lm_of(arch)
    [out] = generate(lm, [PROMPTS[1]], greedy(use_cache=use_cache),
                     edits=toward_token(lm, FORCED_TOKEN), positions="generation")
    assert out.token_ids == (FORCED_TOKEN,) * 6


@pytest.mark.parametrize("use_cache", [False, True])
def test_generation_steering_reaches_every_token_of_a_padded_batch(
        any_lm: LoadedModel, use_cache: bool) -> None:
    outs = generate(any_lm, PROMPTS, greedy(use_cache=use_cache),
                    edits=toward_token(any_lm, FORCED_TOKEN), positions="generation")
    assert [o.token_ids for o in outs] == [(FORCED_TOKEN,) * 6] * len(PROMPTS)


def test_generation_steering_changes_the_first_generated_token_score(any_lm: LoadedModel) -> None:
    prefix, continuation = PROMPTS[2], " Mix flour"
    [plain] = score_continuations(any_lm, [prefix], [continuation])
    [steered] = score_continuations(any_lm, [prefix], [continuation], edits=moderate_edit(any_lm),
                                    positions="generation")
    assert abs(float(steered.token_logprobs[0] - plain.token_logprobs[0])) > 1e-3


def test_prompt_steering_at_the_last_layer_changes_only_the_first_generated_token_score(
        any_lm: LoadedModel) -> None:
    """The last prompt column predicts the first generated token; later ones are not touched."""
    prefix, continuation = PROMPTS[2], " Mix flour, water"
    # Not a constant vector: GPT-2's final LayerNorm subtracts the mean and would erase it.
    edits = {any_lm.n_layers - 1: add_vector(torch.linspace(-2, 2, any_lm.hidden_size))}
    [plain] = score_continuations(any_lm, [prefix], [continuation])
    [steered] = score_continuations(any_lm, [prefix], [continuation], edits=edits,
                                    positions="prompt")
    assert steered.token_logprobs[0] != plain.token_logprobs[0]
    assert torch.equal(steered.token_logprobs[1:], plain.token_logprobs[1:])


# ------------------------------------------------------------------ cache, padding, order

def test_steered_greedy_generation_is_the_same_with_and_without_cache(any_lm: LoadedModel) -> None:
    edits = moderate_edit(any_lm)
    cached = generate(any_lm, PROMPTS, greedy(use_cache=True), edits=edits, positions="generation")
    uncached = generate(any_lm, PROMPTS, greedy(use_cache=False), edits=edits,
                        positions="generation")
    assert [c.token_ids for c in cached] == [u.token_ids for u in uncached]


def test_left_padding_does_not_change_unsteered_results(any_lm: LoadedModel) -> None:
    batched = generate(any_lm, PROMPTS, greedy())
    alone = [generate(any_lm, [p], greedy())[0] for p in PROMPTS]
    assert batched == alone


@pytest.mark.parametrize("use_cache", [False, True])
def test_left_padding_does_not_change_steered_results(any_lm: LoadedModel, use_cache: bool) -> None:
    edits = moderate_edit(any_lm)
    config = greedy(use_cache=use_cache)
    batched = generate(any_lm, PROMPTS, config, edits=edits, positions="generation")
    alone = [generate(any_lm, [p], config, edits=edits, positions="generation")[0]
             for p in PROMPTS]
    assert batched == alone


def test_results_come_back_in_the_callers_order_across_batches(llama_lm: LoadedModel) -> None:
    alone = [generate(llama_lm, [p], greedy())[0] for p in PROMPTS]
    outs = generate(llama_lm, PROMPTS, greedy(batch_size=2))
    assert [o.prompt for o in outs] == PROMPTS
    assert outs == alone


def test_hitting_max_new_tokens_stops_with_length(llama_lm: LoadedModel) -> None:
    [out] = generate(llama_lm, [PROMPTS[1]], greedy(max_new_tokens=4),
                     edits=toward_token(llama_lm, FORCED_TOKEN), positions="generation")
    assert out.stop_reason == "length"
    assert len(out.token_ids) == 4


def test_producing_eos_stops_with_eos_and_drops_it(any_lm: LoadedModel) -> None:
    eos = any_lm.tokenizer.eos_token_id
    [out] = generate(any_lm, [PROMPTS[1]], greedy(), edits=toward_token(any_lm, eos),
                     positions="generation")
    assert out.stop_reason == "eos"
    assert out.token_ids == ()
    assert out.text == ""


def test_seeded_sampling_is_reproducible(llama_lm: LoadedModel) -> None:
    config = greedy(max_new_tokens=8, do_sample=True, temperature=1.0, seed=7)
    first = generate(llama_lm, PROMPTS, config)
    second = generate(llama_lm, PROMPTS, config)
    other = generate(llama_lm, PROMPTS, greedy(max_new_tokens=8, do_sample=True, seed=8))
    assert first == second
    assert [o.token_ids for o in other] != [f.token_ids for f in first]


# ------------------------------------------------------------------ scoring

@torch.no_grad()
def manual_logprobs(lm: LoadedModel, prefix: str, continuation: str) -> torch.Tensor:
    p = lm.tokenizer(prefix, add_special_tokens=False).input_ids
    c = lm.tokenizer(continuation, add_special_tokens=False).input_ids
    logits = lm.model(input_ids=torch.tensor([p + c]), use_cache=False).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return torch.stack([log_probs[len(p) - 1 + k, tok] for k, tok in enumerate(c)])


def test_scores_of_one_row_equal_a_manual_log_softmax(any_lm: LoadedModel) -> None:
    prefix, continuation = PROMPTS[1], " Sure, here is how"
    [scored] = score_continuations(any_lm, [prefix], [continuation])
    expected = manual_logprobs(any_lm, prefix, continuation)
    assert scored.token_logprobs.shape == expected.shape
    torch.testing.assert_close(scored.token_logprobs, expected, rtol=0, atol=1e-5)


def test_prefix_padding_does_not_change_scores(any_lm: LoadedModel) -> None:
    prefixes = ["Hi", PROMPTS[1]]
    continuations = [" there, friend", " Sure"]
    batched = score_continuations(any_lm, prefixes, continuations)
    for row, (prefix, continuation) in enumerate(zip(prefixes, continuations)):
        [alone] = score_continuations(any_lm, [prefix], [continuation])
        torch.testing.assert_close(batched[row].token_logprobs, alone.token_logprobs,
                                   rtol=0, atol=1e-5)


def test_token_id_continuations_score_like_their_text(llama_lm: LoadedModel) -> None:
    ids = llama_lm.tokenizer(" Mix flour", add_special_tokens=False).input_ids
    [as_text] = score_continuations(llama_lm, ["Bread:"], [" Mix flour"])
    [as_ids] = score_continuations(llama_lm, ["Bread:"], [ids])
    assert torch.equal(as_text.token_logprobs, as_ids.token_logprobs)


def test_kept_distributions_are_normalised_and_contain_the_token_scores(
        llama_lm: LoadedModel) -> None:
    ids = llama_lm.tokenizer(" Mix flour", add_special_tokens=False).input_ids
    [scored] = score_continuations(llama_lm, ["Bread:"], [ids], keep_distributions=True)
    dist = scored.log_distributions
    assert dist.shape == (len(ids), len(llama_lm.tokenizer))
    torch.testing.assert_close(dist.exp().sum(-1), torch.ones(len(ids)))
    assert torch.equal(dist[torch.arange(len(ids)), torch.tensor(ids)], scored.token_logprobs)


def test_max_tokens_truncates_the_continuation(llama_lm: LoadedModel) -> None:
    [full] = score_continuations(llama_lm, ["Bread:"], [" Mix flour, water and salt"])
    [cut] = score_continuations(llama_lm, ["Bread:"], [" Mix flour, water and salt"], max_tokens=2)
    assert len(full.token_logprobs) > 2 and len(cut.token_logprobs) == 2
    # A shorter pass multiplies matrices of another shape: equal up to float rounding.
    torch.testing.assert_close(cut.token_logprobs, full.token_logprobs[:2], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ encoded prompts, reused

@torch.no_grad()
def full_pass_logprobs(lm: LoadedModel, prefix: str, continuation: str, edits: dict,
                       positions: str) -> torch.Tensor:
    """The continuation's scores from one uncached pass over prefix + continuation."""
    p = lm.tokenizer(prefix, add_special_tokens=False).input_ids
    c = lm.tokenizer(continuation, add_special_tokens=False).input_ids
    with residual_hooks(lm, edits, positions=positions, prompt_len=len(p)):
        logits = lm.model(input_ids=torch.tensor([p + c]), use_cache=False).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return torch.stack([log_probs[len(p) - 1 + k, tok] for k, tok in enumerate(c)])


def chat(lm: LoadedModel) -> list[str]:
    """PROMPTS in the chat template: they share the template's opening tokens."""
    return [lm.format_chat(p) for p in PROMPTS]


@pytest.mark.parametrize("chat_template", [False, True])
@pytest.mark.parametrize("positions", ["all", "prompt", "generation"])
def test_continuations_after_a_shared_encoding_are_steered_at_the_right_columns(
        any_lm: LoadedModel, positions: str, chat_template: bool) -> None:
    """The cache offset puts each continuation after the prompt: its columns are
    generation positions, and the held-back last prompt column is both; a shared start
    encoded once is steered like the rest of the prompt."""
    edits = moderate_edit(any_lm)
    prompts = chat(any_lm) if chat_template else PROMPTS
    encoded = encode_prompts(any_lm, prompts, edits, positions, batch_size=2)
    continuations = [" Mix flour", " Sure, here is how", " No"]
    scored = score_after(any_lm, encoded, continuations)
    for prefix, continuation, got in zip(prompts, continuations, scored):
        expected = full_pass_logprobs(any_lm, prefix, continuation, edits, positions)
        torch.testing.assert_close(got.token_logprobs, expected, rtol=0, atol=1e-4)


def test_one_encoding_serves_generation_and_later_scores_unchanged(llama_lm: LoadedModel) -> None:
    edits = moderate_edit(llama_lm)
    encoded = encode_prompts(llama_lm, PROMPTS, edits, "generation")
    before = score_after(llama_lm, encoded, [" Mix flour"] * 3)
    generated = generate(llama_lm, encoded, greedy())
    after = score_after(llama_lm, encoded, [" Mix flour"] * 3)
    assert generated == generate(llama_lm, PROMPTS, greedy(), edits=edits, positions="generation")
    for a, b in zip(before, after):
        assert torch.equal(a.token_logprobs, b.token_logprobs)


def test_generating_from_prompts_encoded_under_other_edits_is_refused(llama_lm: LoadedModel) -> None:
    encoded = encode_prompts(llama_lm, PROMPTS)
    with pytest.raises(ValueError, match="other edits"):
        generate(llama_lm, encoded, greedy(), edits=moderate_edit(llama_lm))


def test_scoring_in_row_chunks_gives_the_same_scores(llama_lm: LoadedModel,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = encode_prompts(llama_lm, PROMPTS, moderate_edit(llama_lm))
    whole = score_after(llama_lm, encoded, [" Mix flour, water"] * 3, keep_distributions=2)
    monkeypatch.setattr(generation, "MAX_PASS_LOGITS", 1)  # one row per pass
    chunked = score_after(llama_lm, encoded, [" Mix flour, water"] * 3, keep_distributions=2)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.log_distributions, b.log_distributions, rtol=0, atol=1e-5)


def test_row_chunks_stay_within_the_logits_budget_at_near_equal_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "MAX_PASS_LOGITS", 55 * 10 * 100)
    sizes = [c.stop - c.start for c in generation._row_chunks(60, 10, 100)]
    assert sizes == [30, 30]
    sizes = [c.stop - c.start for c in generation._row_chunks(111, 10, 100)]
    assert sum(sizes) == 111 and max(sizes) <= 55 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("chat_template", [True, False])  # plain: nothing shared, "Hi" one column
@pytest.mark.parametrize("positions", ["all", "prompt", "generation"])
def test_a_batch_encoded_a_few_rows_at_a_time_gives_the_one_pass_results(any_lm: LoadedModel, positions: str,
                                                                          chat_template: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    texts = PROMPTS + ["Hi", "Write one long sentence about rivers and the sea."]
    prompts = [any_lm.format_chat(p) for p in texts] if chat_template else texts
    edits = moderate_edit(any_lm)

    def run() -> tuple[list, list]:
        encoded = encode_prompts(any_lm, prompts, edits, positions, batch_size=len(prompts))  # type: ignore[arg-type]
        completions = generate(any_lm, encoded, greedy())
        return completions, score_after(any_lm, encoded, [" Mix flour, water"] * len(prompts))

    monkeypatch.setattr(generation, "ENCODE_BUCKET_ROWS", 2)  # three buckets of different widths
    bucketed, bucketed_scores = run()
    monkeypatch.setattr(generation, "ENCODE_BUCKET_ROWS", 100)
    whole, whole_scores = run()
    assert [c.token_ids for c in bucketed] == [c.token_ids for c in whole]
    for a, b in zip(bucketed_scores, whole_scores):
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-5)


def test_the_start_all_prompts_share_is_encoded_once(llama_lm: LoadedModel) -> None:
    prompts = chat(llama_lm)
    lengths = [len(llama_lm.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    columns: list[int] = []
    handle = llama_lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: columns.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        encode_prompts(llama_lm, prompts, batch_size=1)
    finally:
        handle.remove()
    assert sum(columns) < sum(n - 1 for n in lengths)  # each prompt's own start not re-read


@pytest.mark.parametrize("edited", [False, True])
def test_generation_after_a_shared_start_matches_one_prompt_at_a_time(
        any_lm: LoadedModel, edited: bool) -> None:
    edits = moderate_edit(any_lm) if edited else None
    prompts = chat(any_lm)
    batched = generate(any_lm, prompts, greedy(), edits=edits, positions="generation")
    alone = [generate(any_lm, [p], greedy(), edits=edits, positions="generation")[0] for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("config", [greedy(max_new_tokens=6),
                                    greedy(max_new_tokens=6, do_sample=True, temperature=1.5),
                                    greedy(max_new_tokens=6, use_cache=False)])
def test_generated_token_scores_equal_teacher_forced_scores_of_the_completion(
        any_lm: LoadedModel, config: GenerationConfig) -> None:
    """The logits generation computed anyway give each token's score under the model,
    before any sampling processor (the temperature changes the draw, not the score)."""
    edits = moderate_edit(any_lm)
    prompts = chat(any_lm)
    completions, scores = generate_scored(any_lm, prompts, config, edits=edits,
                                          positions="generation", keep_distributions=3)
    forced = score_continuations(any_lm, prompts, [c.token_ids for c in completions], edits=edits,
                                 positions="generation", keep_distributions=True)
    assert completions == generate(any_lm, prompts, config, edits=edits, positions="generation")
    for own, teacher in zip(scores, forced):
        assert own.token_logprobs.shape == teacher.token_logprobs.shape
        torch.testing.assert_close(own.token_logprobs, teacher.token_logprobs, rtol=0, atol=1e-4)
        torch.testing.assert_close(own.log_distributions, teacher.log_distributions[:3],
                                   rtol=0, atol=1e-4)
