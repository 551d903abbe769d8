"""Candidate steering directions, computed for every requested layer in one pass.

Each method is a small function returning raw (unnormalised) vectors per layer:

* ``mean_diff``: mean residual over the post-instruction tokens (the chat template's
  tokens after the user's text) of harmful prompts minus that of harmless prompts.
* ``suffix_contrast``: mean residual over the suffix tokens of
  ``prompt + refusal suffix`` minus ``prompt + compliance suffix``, on harmful prompts.
  Reading *over the suffix* matters: the last prompt token is the same in both passes.
* ``random``: a seeded Gaussian vector per layer, the matched-norm control. It is never
  a method of its own: each real method at each layer gets its own control, which
  borrows that method's residual norm.

An ``add`` uses the unit direction scaled by ``add_norm_multiple`` times the layer's mean
residual norm (as measured by the method), so a method and its control add vectors of
the same norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lmlab.errors import LmlabError
from lmlab.hooks import capture_residuals
from lmlab.models import LoadedModel

REFUSAL_SUFFIX = "I'm sorry, but I can't help with that."
COMPLIANCE_SUFFIX = "Sure, here is how to do it step by step."
CONTROL_METHOD = "random"
REAL_METHODS = ("mean_diff", "suffix_contrast")
METHODS = REAL_METHODS + (CONTROL_METHOD,)


@dataclass(frozen=True)
class Direction:
    """A unit direction at one layer with the diagnostics that make it trustworthy."""

    layer: int
    unit: torch.Tensor  # (width,)
    raw_norm: float
    residual_norm: float  # mean token norm of the residual stream at this layer

    @property
    def relative_norm(self) -> float:
        return self.raw_norm / self.residual_norm if self.residual_norm else 0.0


@dataclass(frozen=True)
class SpanMeans:
    """Per-layer mean residual over selected tokens, and the mean token norm seen."""

    means: dict[int, torch.Tensor]
    token_norms: dict[int, float]


def _span_means(lm: LoadedModel, texts: Sequence[str], span_starts: Sequence[int],
                layers: Sequence[int], batch_size: int) -> SpanMeans:
    """Mean activation over tokens starting at or after ``span_starts[i]`` (characters)."""
    sums = {layer: torch.zeros(lm.hidden_size, dtype=torch.float64) for layer in layers}
    norm_sums = {layer: 0.0 for layer in layers}
    n_rows, n_tokens = 0, 0
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        enc = lm.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False,
                           return_offsets_mapping=True)
        acts = capture_residuals(lm, enc.input_ids, enc.attention_mask, layers)
        mask = enc.attention_mask.bool()
        first_real = mask.float().argmax(dim=1)
        norm_mask = mask.clone()
        norm_mask[torch.arange(len(chunk)), first_real] = False  # first token's norm is outsized
        span = (enc.offset_mapping[..., 0] >= torch.tensor(span_starts[start:start + len(chunk)])[:, None]) & mask
        if (span.sum(dim=1) == 0).any():
            raise LmlabError("a direction prompt has no tokens in its span (empty suffix?)")
        for layer in layers:
            h = acts[layer].float().cpu()
            row_means = (h * span[..., None]).sum(1) / span.sum(1, keepdim=True)
            sums[layer] += row_means.double().sum(0)
            norm_sums[layer] += float(h.norm(dim=-1)[norm_mask].sum())
        n_rows += len(chunk)
        n_tokens += int(norm_mask.sum())
    return SpanMeans({l: (s / n_rows).float() for l, s in sums.items()},
                     {l: v / max(n_tokens, 1) for l, v in norm_sums.items()})


def _instruction_end(formatted: str, prompt: str) -> int:
    index = formatted.rfind(prompt)
    return index + len(prompt) if index >= 0 else len(formatted) - 1


def mean_diff(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str],
              layers: Sequence[int], batch_size: int = 16) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    def post_instruction(prompts: Sequence[str]) -> SpanMeans:
        texts = [lm.format_chat(p) for p in prompts]
        # Without a chat template there are no post-instruction tokens: use the last token.
        starts = [_instruction_end(t, p) if lm.has_chat_template else len(t) - 1
                  for t, p in zip(texts, prompts)]
        return _span_means(lm, texts, starts, layers, batch_size)

    bad, good = post_instruction(harmful), post_instruction(harmless)
    return ({l: bad.means[l] - good.means[l] for l in layers},
            {l: (bad.token_norms[l] + good.token_norms[l]) / 2 for l in layers})


def suffix_contrast(lm: LoadedModel, harmful: Sequence[str], layers: Sequence[int],
                    batch_size: int = 16) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    prefixes = [lm.format_chat(p) for p in harmful]
    starts = [len(p) for p in prefixes]
    refuse = _span_means(lm, [p + REFUSAL_SUFFIX for p in prefixes], starts, layers, batch_size)
    comply = _span_means(lm, [p + COMPLIANCE_SUFFIX for p in prefixes], starts, layers, batch_size)
    return ({l: refuse.means[l] - comply.means[l] for l in layers},
            {l: (refuse.token_norms[l] + comply.token_norms[l]) / 2 for l in layers})


def random_vectors(width: int, layers: Sequence[int], seed: int) -> dict[int, torch.Tensor]:
    out = {}
    for layer in layers:
        generator = torch.Generator().manual_seed(seed * 1_000 + layer)
        out[layer] = torch.randn(width, generator=generator)
    return out


def build_directions(raw: dict[int, torch.Tensor], residual_norms: dict[int, float],
                     method: str, min_relative_norm: float) -> dict[int, Direction]:
    """Normalise raw vectors; refuse a direction that is noise next to the residual stream."""
    directions = {}
    for layer, vector in raw.items():
        norm = float(vector.norm())
        direction = Direction(layer, vector / norm if norm > 0 else vector, norm,
                              residual_norms[layer])
        if method != CONTROL_METHOD and direction.relative_norm < min_relative_norm:
            raise LmlabError(
                f"{method} direction at layer {layer} has raw norm {norm:.3g}, only "
                f"{direction.relative_norm:.2e} of the mean residual norm "
                f"{residual_norms[layer]:.3g} (minimum {min_relative_norm}): the contrast "
                f"does not separate the prompts, so it would steer along noise")
        directions[layer] = direction
    return directions


DirectionMethod = Callable[..., tuple[dict[int, torch.Tensor], dict[int, float]]]
