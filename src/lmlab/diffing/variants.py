"""Which organisms a sweep diffs, and whether each adapter fits the base model.

An organism is the base model plus one PEFT adapter: a bundled quirk (made by
``lmlab.diffing.organisms``), an adapter folder or Hub id named in the spec, or a variant
of a trait-interp ``config.json``::

    {"model_variants": {"base": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                        "flattery": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                     "lora": "adapters/flattery", "trait": "flattery"}},
     "quantization": "4bit"}

A variant without ``lora`` is the clean model and is not an organism; a relative ``lora``
path is read from the file's folder; ``trait`` and ``control`` (optional, lmlab
extensions) name the planted trait for blind detection, or mark a control organism. ``quantization`` may be ``4bit``, ``8bit``, ``none``,
``{"load_in_4bit": true}``, ``{"load_in_8bit": true}`` or ``{"bits": 4}``.

:func:`check_adapter` runs before any generation: an adapter made for another base (other
architecture, other hidden size, modules the base lacks) is one clear error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.models import ModelSpec

ADAPTER_CONFIG = "adapter_config.json"
_QUANT_WORDS = {"4bit": "4bit", "8bit": "8bit", "none": "none", "": "none"}


@dataclass(frozen=True)
class Organism:
    """A resolved organism: a name, a local adapter folder and the trait planted in it."""

    name: str
    adapter: Path
    trait: str | None  # None: nothing planted (a control) or not known
    source: str  # how the spec named it: bundled:<quirk>, a path, variants:<file>#<name>
    control: bool = False  # trained like the others with nothing planted: false detections


def bundled_organism(quirk: str, base: ModelSpec, cache_dir: Path | None = None) -> Organism:
    """A quirk organism from ``lmlab.diffing.organisms`` (shipped or trained once, cached)."""
    try:
        from lmlab.diffing import organisms
    except ImportError as error:
        raise LmlabError(f"organism {quirk!r} names a bundled quirk, but the bundled organisms "
                         f"(lmlab.diffing.organisms) are not available: {error}") from error
    if quirk not in organisms.QUIRKS:
        raise LmlabError(f"unknown bundled organism {quirk!r}; bundled quirks: "
                         f"{sorted(organisms.QUIRKS)}; or give {{name, adapter}}")
    adapter = Path(organisms.organism_adapter(quirk, base, cache_dir=cache_dir))
    control = bool(getattr(organisms.QUIRKS[quirk], "is_control", quirk == "control"))
    return Organism(quirk, adapter, None if control else quirk, f"bundled:{quirk}", control)


def resolve_adapter(name: str, adapter: str, relative_to: Path | None = None) -> Path:
    """A local adapter folder for a path or a Hub id (from the local Hub cache)."""
    path = Path(adapter).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    if path.exists():
        if not (path / ADAPTER_CONFIG).is_file():
            raise LmlabError(f"organism {name!r}: {path} is not a PEFT adapter folder "
                             f"({ADAPTER_CONFIG} missing)")
        return path.resolve()
    if adapter.count("/") == 1 and not adapter.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(adapter))
        except Exception as error:  # offline, unknown repo, no access: all mean "not here"
            raise LmlabError(f"organism {name!r}: adapter {adapter!r} is neither a local folder "
                             f"nor a Hub repo available here ({type(error).__name__})") from error
    raise LmlabError(f"organism {name!r}: adapter folder not found: {path}")


# ---------------------------------------------------------------- variants file


@dataclass(frozen=True)
class VariantsFile:
    path: Path
    organisms: tuple[Organism, ...]
    quantization: str | None
    base_models: tuple[str, ...]  # the ``model`` the variants name
    n_variants: int


def _quantization(raw: Any, path: Path) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, str) and raw.lower() in _QUANT_WORDS:
        return _QUANT_WORDS[raw.lower()]
    if isinstance(raw, Mapping):
        if raw.get("load_in_4bit") or raw.get("bits") == 4:
            return "4bit"
        if raw.get("load_in_8bit") or raw.get("bits") == 8:
            return "8bit"
        if not any(raw.values()):
            return "none"
    raise LmlabError(f"variants file {path}: quantization {raw!r} is not 4bit, 8bit, none, "
                     "{load_in_4bit: true}, {load_in_8bit: true} or {bits: 4|8}")


def load_variants(path: str | Path) -> VariantsFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmlabError(f"variants file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LmlabError(f"variants file {path} is not readable JSON: {error}") from error
    variants = raw.get("model_variants") if isinstance(raw, dict) else None
    if not isinstance(variants, Mapping) or not variants:
        raise LmlabError(f"variants file {path} needs a 'model_variants' mapping of name -> "
                         "{model, lora?}")
    organisms, models = [], []
    for name, entry in variants.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
            raise LmlabError(f"variants file {path}: variant {name!r} needs a 'model' string")
        models.append(entry["model"])
        if not entry.get("lora"):
            continue
        if name == "clean":
            raise LmlabError(f"variants file {path}: 'clean' names the base model; rename it")
        adapter = resolve_adapter(str(name), str(entry["lora"]), relative_to=path.parent)
        trait = entry.get("trait")
        organisms.append(Organism(str(name), adapter, str(trait) if trait else None,
                                  f"variants:{path.name}#{name}", bool(entry.get("control"))))
    if not organisms:
        raise LmlabError(f"variants file {path} has no variant with a 'lora' adapter")
    return VariantsFile(path, tuple(organisms), _quantization(raw.get("quantization"), path),
                        tuple(dict.fromkeys(models)), len(variants))


# ---------------------------------------------------------------- compatibility


def _adapter_tensors(adapter: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter's tensors, read without loading them when possible."""
    safetensors = adapter / "adapter_model.safetensors"
    if safetensors.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors), "pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    binary = adapter / "adapter_model.bin"
    if binary.is_file():
        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise LmlabError(f"adapter {adapter} has no adapter_model.safetensors or adapter_model.bin")


def _module_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like module (Linear, bnb Linear4bit/8bit, Conv1D)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return int(weight.shape[0]), int(weight.shape[1])
    if isinstance(module, nn.Embedding):
        return int(module.num_embeddings), int(module.embedding_dim)
    return None


def _base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module names as an adapter saved on the bare model would name them."""
    root = model
    if hasattr(model, "peft_config"):  # a PeftModel: look through its wrappers
        root = model.base_model.model
    out = {}
    for name, module in root.named_modules():
        out[name] = getattr(module, "base_layer", module)
    return out


def _config_of(name: str) -> Any | None:
    """The config of the base an adapter says it was made for, when it is available here
    (lmlab's embedded model by its name, a local folder, the Hub cache)."""
    from lmlab.models import EMBEDDED_NAME, TINY_PREFIX

    if not name or name.startswith(TINY_PREFIX):
        return None
    from transformers import AutoConfig

    try:
        if name == EMBEDDED_NAME:
            from lmlab.models import embedded_model_dir

            return AutoConfig.from_pretrained(embedded_model_dir())
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # not a local folder nor in the Hub cache: checked by shapes only
        return None


def check_adapter(organism: Organism, model: nn.Module) -> list[str]:
    """Refuse an adapter made for another base; returns notes on what could not be checked."""
    config_path = organism.adapter / ADAPTER_CONFIG
    if not config_path.is_file():
        raise LmlabError(f"organism {organism.name!r}: no PEFT adapter at {organism.adapter} "
                         f"({ADAPTER_CONFIG} missing)")
    adapter_config = json.loads(config_path.read_text())
    base_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    notes = []
    claimed = _config_of(str(adapter_config.get("base_model_name_or_path") or ""))
    if claimed is not None:
        claimed_text = claimed.get_text_config() if hasattr(claimed, "get_text_config") else claimed
        for field in ("model_type", "hidden_size"):
            mine, theirs = getattr(base_config, field, None), getattr(claimed_text, field, None)
            if mine is not None and theirs is not None and mine != theirs:
                raise LmlabError(
                    f"organism {organism.name!r}: adapter {organism.adapter} was made for "
                    f"{adapter_config.get('base_model_name_or_path')!r} ({field} {theirs}), but "
                    f"the base model has {field} {mine}: use the adapter's own base")
    else:
        notes.append(f"organism {organism.name}: the adapter's base "
                     f"{adapter_config.get('base_model_name_or_path')!r} is not available here; "
                     "checked by tensor shapes only")
    modules = _base_modules(model)
    for key, shape in _adapter_tensors(organism.adapter).items():
        _check_tensor(organism, key, shape, modules, base_config)
    return notes


def _check_tensor(organism: Organism, key: str, shape: tuple[int, ...],
                  modules: Mapping[str, nn.Module], base_config: Any) -> None:
    for marker, side in ((".lora_A.", "in"), (".lora_B.", "out")):
        if marker not in key:
            continue
        module_name = key.split(marker)[0].removeprefix("base_model.model.")
        module = modules.get(module_name)
        hidden = getattr(base_config, "hidden_size", "?")
        if module is None:
            raise LmlabError(
                f"organism {organism.name!r}: adapter {organism.adapter} adapts module "
                f"{module_name!r}, which the base model ({getattr(base_config, 'model_type', '?')}, "
                f"hidden size {hidden}) does not have: it was made for another base")
        dims = _module_dims(module)
        if dims is None or len(shape) != 2:
            return
        wanted = dims[0] if side == "in" else dims[1]
        got = shape[1] if side == "in" else shape[0]
        if wanted != got:
            raise LmlabError(
                f"organism {organism.name!r}: adapter {organism.adapter} was made for another "
                f"base: module {module_name!r} has {side}_features {wanted} here (hidden size "
                f"{hidden}) but the adapter expects {got}")
