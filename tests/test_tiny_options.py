"""``tiny:<arch>`` models honour every ModelSpec option, or refuse it with a clear error.

Before, ``load_model`` built the random model and dropped adapter, quantization, dtype and
device on the floor: a spec asking for bfloat16 or a LoRA adapter silently got float32 and
no adapter, under an identity that said otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.models import ModelSpec, load_model, tiny_model


def logits(lm) -> torch.Tensor:  # type: ignore[no-untyped-def]
    batch = lm.tokenizer([lm.format_chat("How do I bake bread?")], return_tensors="pt").to(lm.device)
    with torch.no_grad():
        return lm.model(**batch).logits.float()


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter made on the tiny llama (weights initialised away from zero)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    tuned = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    directory = tmp_path_factory.mktemp("tiny-adapter")
    tuned.save_pretrained(directory)
    return directory


def test_dtype_is_applied_and_changes_the_identity() -> None:
    full = load_model(ModelSpec("tiny:llama", dtype="float32"))
    half = load_model(ModelSpec("tiny:llama", dtype="bfloat16"))
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    assert half.identity != full.identity


def test_an_explicit_cpu_device_loads_there() -> None:
    lm = load_model(ModelSpec("tiny:gpt2", device="cpu"))
    assert lm.device == torch.device("cpu")
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_where_there_is_none_is_a_clear_error() -> None:
    with pytest.raises(LmlabError, match="torch sees no CUDA device here"):
        load_model(ModelSpec("tiny:llama", device="cuda"))


def test_an_adapter_is_applied_and_can_be_switched_off(tiny_adapter: Path) -> None:
    base = load_model(ModelSpec("tiny:llama"))
    tuned = load_model(ModelSpec("tiny:llama", adapter=str(tiny_adapter)))
    assert not torch.allclose(logits(tuned), logits(base))
    with tuned.model.disable_adapter():
        assert torch.allclose(logits(tuned), logits(base), atol=1e-6)
    assert tuned.identity != base.identity


def test_4bit_quantization_gives_linear4bit_layers() -> None:
    pytest.importorskip("bitsandbytes")
    lm = load_model(ModelSpec("tiny:llama", quantization="4bit", device="cpu"))
    assert "Linear4bit" in {type(m).__name__ for m in lm.model.modules()}
    assert torch.isfinite(logits(lm)).all()


def test_a_revision_is_refused_when_the_spec_is_made() -> None:
    with pytest.raises(LmlabError, match="model.revision does not apply to 'tiny:llama'"):
        ModelSpec("tiny:llama", revision="main")


def test_an_unknown_tiny_arch_is_refused_when_the_spec_is_made() -> None:
    with pytest.raises(LmlabError, match="tiny model arch must be one of"):
        ModelSpec("tiny:bert")
