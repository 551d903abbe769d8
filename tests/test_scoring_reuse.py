"""Steering scoring reuses work: each prompt is encoded once per (condition, split), every
scored continuation continues from that cache, and the unsteered KL reference is computed
once per split and cached by content. The figures stay those of the former scoring, which
this module keeps as a reference implementation (one full pass per score)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Sequence

import pytest
import torch
from torch import nn

from lmlab.cache import DiskCache
from lmlab.generation import Completion, GenerationConfig, _eos_ids, _split_completion
from lmlab.hooks import decoder_backbone, decoder_layers, padded_positions, residual_hooks
from lmlab.models import LoadedModel
from lmlab.steering.evaluation import (COMPLIANCE_OPENING, REFUSAL_OPENING, classify,
                                       kl_per_prompt, likelihood_margin, perplexity,
                                       phrase_refusal, repetition)
from lmlab.steering.family import BASELINE, SteeringFamily
from lmlab.sweeps.spec import parse_spec

N_PROMPTS = 4
BATCH = 3  # two prompt batches of different padding
KL_TOKENS = 4


# ------------------------------------------------------------------ the former scoring

@torch.inference_mode()
def reference_generate(lm: LoadedModel, prompts: Sequence[str], config: GenerationConfig,
                       edits: Mapping | None, positions: str) -> list[Completion]:
    """Greedy generation as before: the whole prompt in generate's first step."""
    tokenizer = lm.tokenizer
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    eos = _eos_ids(lm)
    results = {}
    for start in range(0, len(order), config.batch_size):
        rows = order[start:start + config.batch_size]
        batch = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        prompt_len = batch.input_ids.shape[1]
        with residual_hooks(lm, edits, positions=positions, prompt_len=prompt_len):  # type: ignore[arg-type]
            out = lm.model.generate(**batch, max_new_tokens=config.max_new_tokens, use_cache=True,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos),
                                    do_sample=False, temperature=None, top_p=None, top_k=None)
        for row, index in enumerate(rows):
            ids, reason = _split_completion(out[row, prompt_len:].tolist(), eos)
            results[index] = Completion(prompts[index], tokenizer.decode(ids, skip_special_tokens=True),
                                        tuple(ids), reason)
    return [results[i] for i in range(len(prompts))]


@torch.inference_mode()
def reference_scores(lm: LoadedModel, prefixes: Sequence[str], continuations: Sequence[Any],
                     edits: Mapping | None = None, positions: str = "all",
                     keep_distributions: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One full pass over ``[left pad | prefix | continuation | right pad]`` per batch."""
    tokenizer = lm.tokenizer
    prefix_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prefixes]
    cont_ids = [list(c) if not isinstance(c, str) else tokenizer(c, add_special_tokens=False).input_ids
                for c in continuations]
    out = []
    for start in range(0, len(prefixes), 16):
        rows = list(range(start, min(start + 16, len(prefixes))))
        width_p = max(len(prefix_ids[i]) for i in rows)
        width_c = max(max(len(cont_ids[i]) for i in rows), 1)
        ids = torch.full((len(rows), width_p + width_c), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            p, c = prefix_ids[i], cont_ids[i]
            ids[r, width_p - len(p):width_p] = torch.tensor(p)
            ids[r, width_p:width_p + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, width_p - len(p):width_p + len(c)] = 1
        with residual_hooks(lm, edits, positions=positions, prompt_len=width_p):  # type: ignore[arg-type]
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=padded_positions(mask),
                              use_cache=False).logits
        log_probs = torch.log_softmax(logits[:, width_p - 1:-1].float(), dim=-1)
        for r, i in enumerate(rows):
            n = len(cont_ids[i])
            dist = log_probs[r, :n]
            token_lp = dist.gather(-1, ids[r, width_p:width_p + n, None]).squeeze(-1)
            out.append((token_lp, dist if keep_distributions else None))
    return out


def reference_rows(family: SteeringFamily, lm: LoadedModel, params: Mapping[str, Any],
                   base_rows: list[dict] | None) -> list[dict[str, Any]]:
    """The former ``SteeringFamily._score``: five full passes for a steered condition."""
    s = family.settings
    prompts = family.prompts["benign"][:s.n_prompts]
    edits = family.edits(lm, params)
    formatted = [lm.format_chat(p.prompt) for p in prompts]
    completions = reference_generate(lm, formatted, s.generation, edits, s.positions)
    n = len(prompts)
    refuse = reference_scores(lm, formatted, [REFUSAL_OPENING] * n, edits, s.positions)
    comply = reference_scores(lm, formatted, [COMPLIANCE_OPENING] * n, edits, s.positions)
    fluency = reference_scores(lm, formatted, [c.token_ids for c in completions])
    kls = [0.0] * n
    if base_rows is not None:
        base_ids = [r["token_ids"][:s.kl_tokens] for r in base_rows]
        plain = reference_scores(lm, formatted, base_ids, keep_distributions=True)
        shifted = reference_scores(lm, formatted, base_ids, edits, s.positions, keep_distributions=True)
        kls = [kl_per_prompt(a[1], b[1]) for a, b in zip(plain, shifted)]  # type: ignore[arg-type]
    rows = []
    for i, completion in enumerate(completions):
        margin = likelihood_margin(refuse[i][0], comply[i][0])
        ppl = perplexity(fluency[i][0])
        rep = repetition(completion.token_ids)
        refused = phrase_refusal(completion.text)
        rows.append({"token_ids": list(completion.token_ids), "completion": completion.text,
                     "likelihood_margin": margin, "perplexity": ppl, "kl": kls[i],
                     "outcome": classify(completion.text, refused, ppl, rep, s.degenerate)})
    return rows


# ------------------------------------------------------------------ helpers

def family_for(lm: LoadedModel, cache_dir: Path, splits: Sequence[str] = ("benign",),
               batch: int = BATCH) -> tuple[SteeringFamily, SimpleNamespace]:
    family = SteeringFamily(parse_spec({
        "family": "steering", "name": "reuse", "model": {"name": "tiny:llama"},
        "grid": {"method": ["suffix_contrast"], "layer": [1], "alpha": [0.5, 2.0]},
        "steering": {"n_prompts": N_PROMPTS, "n_train": 4, "eval_splits": list(splits),
                     "kl_tokens": KL_TOKENS,
                     "generation": {"max_new_tokens": 8, "batch_size": batch}}}))
    ctx = SimpleNamespace(model=lm, cache=DiskCache(cache_dir))
    family.prepare(ctx)  # type: ignore[arg-type]
    return family, ctx


def baseline_params() -> dict[str, Any]:
    return {**BASELINE, "splits": ["benign"]}


def steered_params(family: SteeringFamily, strength: float = 2.0) -> dict[str, Any]:
    [params] = [c for c in family.conditions()
                if c["method"] == "suffix_contrast" and c["add_norm_multiple"] == strength]
    return params


@dataclass(frozen=True)
class Pass:
    offset: int  # columns already in the cache
    rows: int
    columns: int
    edited: bool  # ran under an edit


@contextmanager
def forward_log(lm: LoadedModel) -> Iterator[list[Pass]]:
    """Records every forward pass of the model."""
    log: list[Pass] = []
    blocks = decoder_layers(lm.model)
    # transformers keeps hooks of its own on the blocks once output_hidden_states was asked
    # for (its output recorder): an edit is a hook beyond those present at the start.
    resident = [len(b._forward_hooks) for b in blocks]

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        offset = int(cache.get_seq_length()) if cache is not None else 0
        log.append(Pass(offset, int(ids.shape[0]), int(ids.shape[1]),
                        any(len(b._forward_hooks) > n for b, n in zip(blocks, resident))))

    handle = decoder_backbone(lm.model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield log
    finally:
        handle.remove()


def batch_widths(family: SteeringFamily, lm: LoadedModel, splits: Sequence[str], batch: int) -> list[tuple[int, int]]:
    """(rows, prompt length) of each prompt batch, as the prompts are batched: by length."""
    lengths = sorted((len(lm.tokenizer(lm.format_chat(p.prompt), add_special_tokens=False).input_ids)
                      for split in splits for p in family.prompts[split][:N_PROMPTS]), reverse=True)
    return [(len(lengths[i:i + batch]), lengths[i]) for i in range(0, len(lengths), batch)]


def prompt_columns(log: list[Pass], widths: list[tuple[int, int]], edited: bool) -> int:
    """Prompt columns computed by passes that start inside the prompts (every later pass
    starts at a batch's last prompt column or after it)."""
    first_last_column = min(width for _, width in widths) - 1
    return sum(p.rows * p.columns for p in log if p.offset < first_last_column and p.edited == edited)


def one_encoding(widths: list[tuple[int, int]]) -> int:
    """Columns that encoding every prompt once takes, all but each batch's last column."""
    return sum(rows * (width - 1) for rows, width in widths)


# ------------------------------------------------------------------ work is reused

def test_the_baseline_encodes_its_prompts_once_for_generation_and_every_score(
        llama_lm: LoadedModel, tmp_path: Path) -> None:
    family, ctx = family_for(llama_lm, tmp_path)
    widths = batch_widths(family, llama_lm, ["benign"], BATCH)
    with forward_log(llama_lm) as log:
        family.evaluate(ctx, "benign", baseline_params())  # type: ignore[arg-type]
    assert 0 < prompt_columns(log, widths, edited=False) <= one_encoding(widths)
    assert prompt_columns(log, widths, edited=True) == 0
    # After the prompts: generation, then the two openings; fluency and the KL reference
    # come from generation's own logits.
    last_columns = {width - 1 for _, width in widths}
    scoring_passes = [p for p in log if p.offset in last_columns and p.columns > 1]
    assert len(scoring_passes) == 2 * len(widths)


def test_a_steered_condition_encodes_its_prompts_once_under_its_edits(
        llama_lm: LoadedModel, tmp_path: Path) -> None:
    family, ctx = family_for(llama_lm, tmp_path)
    widths = batch_widths(family, llama_lm, ["benign"], BATCH)
    family.evaluate(ctx, "benign", baseline_params())  # type: ignore[arg-type]
    with forward_log(llama_lm) as log:
        family.evaluate(ctx, "benign", steered_params(family))  # type: ignore[arg-type]
    # Generation, both openings and the KL tokens continue from one steered encoding; the
    # unsteered encoding for fluency is the baseline's, kept in memory.
    assert 0 < prompt_columns(log, widths, edited=True) <= one_encoding(widths)
    assert prompt_columns(log, widths, edited=False) == 0


def test_the_unsteered_kl_reference_is_cached_by_content_and_not_scored_again(
        llama_lm: LoadedModel, tmp_path: Path) -> None:
    first, ctx = family_for(llama_lm, tmp_path)
    first.evaluate(ctx, "benign", baseline_params())  # type: ignore[arg-type]
    assert len(list((tmp_path / "steering-kl-reference").iterdir())) == 1
    fresh, ctx = family_for(llama_lm, tmp_path)  # a new process: nothing kept in memory
    widths = batch_widths(fresh, llama_lm, ["benign"], BATCH)
    with forward_log(llama_lm) as log:
        fresh.evaluate(ctx, "benign", steered_params(fresh))  # type: ignore[arg-type]
    last_columns = {width - 1 for _, width in widths}
    unsteered_after_prompt = [p for p in log if p.offset in last_columns and not p.edited]
    assert 0 < prompt_columns(log, widths, edited=False) <= one_encoding(widths)  # for fluency
    assert len(unsteered_after_prompt) == len(widths)  # fluency only: the reference was read


def test_a_conditions_uncached_splits_share_generation_batches(llama_lm: LoadedModel,
                                                               tmp_path: Path) -> None:
    splits = ["harm_test", "benign"]
    family, ctx = family_for(llama_lm, tmp_path / "together", splits, batch=2 * N_PROMPTS)
    family.evaluate_splits(ctx, splits, baseline_params())  # type: ignore[arg-type]
    with forward_log(llama_lm) as log:
        together = family.evaluate_splits(ctx, splits, steered_params(family))  # type: ignore[arg-type]
    widths = batch_widths(family, llama_lm, splits, 2 * N_PROMPTS)
    assert len(widths) == 1
    generation_steps = [p for p in log if p.columns == 1]
    assert generation_steps and all(p.rows == 2 * N_PROMPTS for p in generation_steps)
    for split in splits:
        alone, alone_ctx = family_for(llama_lm, tmp_path / split, [split], batch=2 * N_PROMPTS)
        expected = alone.evaluate(alone_ctx, split, steered_params(alone))  # type: ignore[arg-type]
        for new, old in zip(together[split], expected):
            assert new["token_ids"] == old["token_ids"] and new["outcome"] == old["outcome"]
            assert new["likelihood_margin"] == pytest.approx(old["likelihood_margin"], abs=1e-4)
            assert new["kl"] == pytest.approx(old["kl"], rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------ the same figures

@pytest.mark.parametrize("strength", [0.5, 2.0])
def test_scores_equal_the_former_full_pass_scoring(any_lm: LoadedModel, tmp_path: Path,
                                                   strength: float) -> None:
    family, ctx = family_for(any_lm, tmp_path)
    base = family.evaluate(ctx, "benign", baseline_params())  # type: ignore[arg-type]
    steered = family.evaluate(ctx, "benign", steered_params(family, strength))  # type: ignore[arg-type]
    expected_base = reference_rows(family, any_lm, baseline_params(), None)
    expected = reference_rows(family, any_lm, steered_params(family, strength), expected_base)
    assert any(r["kl"] > 1e-3 for r in expected), "the edit must change the distributions"
    for new, old in zip(base + steered, expected_base + expected):
        assert new["token_ids"] == old["token_ids"] and new["completion"] == old["completion"]
        assert new["outcome"] == old["outcome"]
        assert new["likelihood_margin"] == pytest.approx(old["likelihood_margin"], abs=1e-4)
        assert new["perplexity"] == pytest.approx(old["perplexity"], rel=1e-4, nan_ok=True)
        assert new["kl"] == pytest.approx(old["kl"], rel=1e-4, abs=1e-6)
