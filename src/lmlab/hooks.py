"""Read, add to, ablate or project the residual stream at any decoder layer.

Layer index convention (stated once, used everywhere): layer ``L`` is the output of
decoder block ``L`` (0-based), which is ``output_hidden_states[L + 1]``;
``hidden_states[0]`` is the embedding output.

Positions are absolute token columns of the (left-padded) batch:

* ``prompt``: columns before ``prompt_len``;
* ``generation``: every column whose output predicts a generated token, i.e. the last
  prompt column and all generated columns (so the *first* generated token is steered);
* ``all``: every column.

Hooks live exactly as long as a ``with`` block and are removed in ``finally``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.models import LoadedModel

Positions = Literal["all", "prompt", "generation"]
POSITIONS: tuple[str, ...] = ("all", "prompt", "generation")

#: An edit maps residual activations (batch, tokens, width) to new ones of the same shape.
Edit = Callable[[torch.Tensor], torch.Tensor]

_LAYER_LIST_PATHS = (
    "model.layers",  # Llama, Qwen, Mistral, Gemma
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # multimodal wrappers
)


def add_vector(vector: torch.Tensor) -> Edit:
    """h <- h + v at every selected position (v already in residual units)."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + vector.to(hidden.dtype)

    return edit


def ablate_direction(direction: torch.Tensor, fraction: float = 1.0) -> Edit:
    """h <- h - fraction * (h . d) d with unit d; fraction in [0, 1] (above 1 would reflect
    the component instead of removing it, so it is refused)."""
    if not 0.0 <= fraction <= 1.0:
        raise LmlabError(f"ablation fraction must be in [0, 1], got {fraction}")
    unit = direction / direction.norm()

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        d = unit.to(hidden.dtype)
        return hidden - fraction * (hidden @ d).unsqueeze(-1) * d

    return edit


def _layer_list_owner(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder backbone (the module that runs the blocks) and its block list, also
    through PEFT wrappers."""
    roots = [model]
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        roots.append(getattr(base, "model", base))
    for root in roots:
        for path in _LAYER_LIST_PATHS:
            owner: nn.Module | None = root
            *parents, name = path.split(".")
            for part in parents:
                owner = getattr(owner, part, None)
                if owner is None:
                    break
            found = getattr(owner, name, None) if owner is not None else None
            if isinstance(found, nn.ModuleList):
                return owner, found  # type: ignore[return-value]
    raise LmlabError(f"cannot find decoder layers in {type(model).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, also through PEFT wrappers."""
    return _layer_list_owner(model)[1]


def decoder_backbone(model: nn.Module) -> nn.Module:
    """The module whose forward runs the decoder blocks (``LlamaModel``, ``GPT2Model``...).

    It receives ``input_ids`` and ``past_key_values`` on every forward, whoever calls it:
    a PEFT wrapper's ``generate`` calls the base model's, which never enters the wrapper's
    own forward, so a hook on the wrapper would miss every decode step.
    """
    return _layer_list_owner(model)[0]


def check_layers(lm: LoadedModel, layers: Sequence[int]) -> None:
    for layer in layers:
        if not 0 <= int(layer) < lm.n_layers:
            raise LmlabError(f"layer {layer} is outside the model (valid: 0..{lm.n_layers - 1})")


def _position_mask(offset: int, length: int, positions: Positions, prompt_len: int | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask over this forward's columns, or None meaning every column."""
    if positions == "all":
        return None
    if prompt_len is None:
        raise LmlabError(f"positions={positions!r} needs prompt_len")
    columns = torch.arange(offset, offset + length, device=device)
    if positions == "prompt":
        return columns < prompt_len
    return columns >= prompt_len - 1


class _Offset:
    """Tracks how many columns precede the current forward call (the KV-cache length)."""

    def __init__(self) -> None:
        self.value = 0

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        length = (ids if ids is not None else embeds).shape[1]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and hasattr(cache, "get_seq_length"):
            self.value = int(cache.get_seq_length())
            return
        # Without a cache, generate() passes a mask covering past + current columns; it
        # drops an all-ones mask, in which case every forward starts at column 0.
        mask = kwargs.get("attention_mask")
        self.value = int(mask.shape[-1]) - length if mask is not None and mask.dim() == 2 else 0


@contextmanager
def residual_hooks(
    lm: LoadedModel,
    edits: Mapping[int, Edit] | None = None,
    capture: Sequence[int] = (),
    positions: Positions = "all",
    prompt_len: int | None = None,
    capture_dtype: torch.dtype | None = None,
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Apply ``edits`` and record the residual output of the ``capture`` layers.

    Yields ``{layer: [tensor per forward call]}``; captured tensors are detached and
    taken *after* that layer's edit. Edits touch only the selected ``positions``.
    """
    edits = dict(edits or {})
    check_layers(lm, list(edits) + list(capture))
    if positions not in POSITIONS:
        raise LmlabError(f"positions must be one of {POSITIONS}, not {positions!r}")
    blocks = decoder_layers(lm.model)
    captured: dict[int, list[torch.Tensor]] = {int(layer): [] for layer in capture}
    offset = _Offset()
    handles = []

    def make_hook(layer: int) -> Callable:
        edit = edits.get(layer)

        def hook(module: nn.Module, args: tuple, output):  # type: ignore[no-untyped-def]
            hidden = output[0] if isinstance(output, tuple) else output
            if edit is not None:
                mask = _position_mask(offset.value, hidden.shape[1], positions, prompt_len,
                                      hidden.device)
                edited = edit(hidden)
                hidden = edited if mask is None else torch.where(mask[None, :, None], edited, hidden)
            if layer in captured:
                kept = hidden.detach()
                captured[layer].append(kept if capture_dtype is None else kept.to(capture_dtype))
            if edit is None:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    try:
        handles.append(decoder_backbone(lm.model).register_forward_pre_hook(offset.pre_hook,
                                                                           with_kwargs=True))
        for layer in sorted(set(edits) | set(captured)):
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        yield captured
    finally:
        for handle in reversed(handles):
            handle.remove()


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the deepest needed layer ran."""


@torch.inference_mode()
def capture_residuals(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    dtype: torch.dtype | None = None,
) -> dict[int, torch.Tensor]:
    """One forward pass returning ``{layer: (batch, tokens, width)}`` for every layer asked.

    The pass stops after the deepest requested layer, so nothing above it is computed.
    """
    check_layers(lm, layers)
    deepest = max(layers)
    blocks = decoder_layers(lm.model)

    def stop(module: nn.Module, args: tuple, output) -> None:  # type: ignore[no-untyped-def]
        raise StopForward

    with residual_hooks(lm, capture=layers, capture_dtype=dtype) as captured:
        handle = blocks[deepest].register_forward_hook(stop)
        try:
            mask = attention_mask.to(lm.device)
            lm.model(input_ids=input_ids.to(lm.device), attention_mask=mask,
                     position_ids=padded_positions(mask), use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
    return {layer: tensors[0] for layer, tensors in captured.items()}
