"""Batched generation and teacher-forced scoring, with optional residual edits.

Prompts are sorted by token length and left-padded, so every row's last prompt token
sits in the same column and generated tokens follow it directly. Results come back in
the caller's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from lmlab.hooks import Edit, Positions, padded_positions, residual_hooks
from lmlab.models import LoadedModel

StopReason = Literal["eos", "length"]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; part of every generation cache key."""

    max_new_tokens: int = 48
    batch_size: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    use_cache: bool = True

    def __post_init__(self) -> None:
        from lmlab.errors import LmlabError

        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise LmlabError("generation.max_new_tokens and batch_size must be positive")
        if self.do_sample and not self.temperature > 0:
            raise LmlabError("generation.temperature must be positive when sampling")


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str
    token_ids: tuple[int, ...]
    stop_reason: StopReason


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _batches(order: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start:start + size])


def _split_completion(ids: list[int], eos: set[int]) -> tuple[list[int], StopReason]:
    for index, token in enumerate(ids):
        if token in eos:
            return ids[:index], "eos"
    return ids, "length"


class RowSampler(LogitsProcessor):
    """Temperature sampling with one generator per row, as a processor before greedy choice.

    Gumbel-max: argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T). The
    noise comes from the row's own generator, one vocabulary-sized draw per step, so a
    row's tokens depend only on its seed and its own logits. Every other token is set to
    -inf, so the greedy step that follows picks the drawn one.
    """

    def __init__(self, seeds: Sequence[int], temperature: float) -> None:
        self.seeds = list(seeds)
        self.temperature = temperature
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.generators:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                               for g in self.generators])  # (rows, vocab)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
        picks = (scores.float() / self.temperature + gumbel).argmax(dim=-1)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter(1, picks[:, None], 0.0)


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    config: GenerationConfig = GenerationConfig(),
    edits: Mapping[int, Edit] | None = None,
    positions: Positions = "all",
    progress: str | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[Completion]:
    """Generate a completion for each already-formatted prompt string.

    ``row_seeds`` (sampling only): one seed per prompt. Each row then samples from its
    own generator, so its draws depend on its seed alone, not on the batch it lands in."""
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
    tokenizer = lm.tokenizer
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    eos = _eos_ids(lm)
    results: dict[int, Completion] = {}
    bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, leave=False)
    for batch_index, rows in enumerate(_batches(order, config.batch_size)):
        batch = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(lm.device)
        prompt_len = batch.input_ids.shape[1]
        sampling = {"do_sample": True, "temperature": config.temperature} if config.do_sample \
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if config.do_sample and row_seeds is not None:
            sampler = RowSampler([row_seeds[i] for i in rows], config.temperature)
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                        "logits_processor": LogitsProcessorList([sampler])}
        elif config.do_sample:
            torch.manual_seed(config.seed + batch_index)
        with residual_hooks(lm, edits, positions=positions, prompt_len=prompt_len):
            out = lm.model.generate(
                **batch, max_new_tokens=config.max_new_tokens, use_cache=config.use_cache,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos), **sampling,
            )
        for row, index in enumerate(rows):
            ids, reason = _split_completion(out[row, prompt_len:].tolist(), eos)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            results[index] = Completion(prompts[index], text, tuple(ids), reason)
        bar.update(len(rows))
    bar.close()
    return [results[i] for i in range(len(prompts))]


@dataclass(frozen=True)
class Scored:
    """Teacher-forced scores of one continuation after its prefix."""

    token_logprobs: torch.Tensor  # (n_tokens,) log p(token | everything before it)
    log_distributions: torch.Tensor | None  # (n_tokens, vocab) log-softmax, when asked


@torch.inference_mode()
def score_continuations(
    lm: LoadedModel,
    prefixes: Sequence[str],
    continuations: Sequence[str | Sequence[int]],
    edits: Mapping[int, Edit] | None = None,
    positions: Positions = "all",
    batch_size: int = 16,
    keep_distributions: bool = False,
    max_tokens: int | None = None,
) -> list[Scored]:
    """Log-probabilities of each continuation (text or token ids) after its prefix.

    Rows are laid out as ``[left pad | prefix | continuation | right pad]`` so the prefix
    ends in one column for the whole batch and ``positions`` act as during generation.
    """
    tokenizer = lm.tokenizer
    prefix_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prefixes]
    cont_ids = [list(c) if not isinstance(c, str) else tokenizer(c, add_special_tokens=False).input_ids
                for c in continuations]
    if max_tokens is not None:
        cont_ids = [c[:max_tokens] for c in cont_ids]
    pad = tokenizer.pad_token_id
    results: list[Scored] = []
    for rows in _batches(range(len(prefixes)), batch_size):
        width_p = max(len(prefix_ids[i]) for i in rows)
        width_c = max(max(len(cont_ids[i]) for i in rows), 1)
        ids = torch.full((len(rows), width_p + width_c), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            p, c = prefix_ids[i], cont_ids[i]
            ids[r, width_p - len(p):width_p] = torch.tensor(p, dtype=torch.long)
            ids[r, width_p:width_p + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, width_p - len(p):width_p + len(c)] = 1
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        with residual_hooks(lm, edits, positions=positions, prompt_len=width_p):
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=padded_positions(mask),
                              use_cache=False).logits
        # The token in column t is predicted by the logits in column t - 1.
        log_probs = torch.log_softmax(logits[:, width_p - 1:-1].float(), dim=-1)
        for r, i in enumerate(rows):
            n = len(cont_ids[i])
            dist = log_probs[r, :n]
            target = ids[r, width_p:width_p + n]
            token_lp = dist.gather(-1, target[:, None]).squeeze(-1).cpu()
            results.append(Scored(token_lp, dist.cpu() if keep_distributions else None))
    return results
