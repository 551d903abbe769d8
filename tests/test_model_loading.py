"""Loading from a local directory, with a PEFT adapter and with bitsandbytes 4-bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.generation import GenerationConfig, generate
from lmlab.hooks import capture_residuals, decoder_layers
from lmlab.models import ModelSpec, load_model, tiny_model


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def saved_adapter(saved_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model

    base = load_model(ModelSpec(name=str(saved_tiny), device="cpu"))
    peft_model = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    directory = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(directory)
    return directory


def logits_of(lm, text: str = "How do I bake bread?") -> torch.Tensor:  # type: ignore[no-untyped-def]
    batch = lm.tokenizer([lm.format_chat(text)], return_tensors="pt").to(lm.device)
    with torch.no_grad():
        return lm.model(**batch).logits


def test_a_local_directory_loads_with_left_padding_and_the_chat_template(saved_tiny: Path) -> None:
    lm = load_model(ModelSpec(name=str(saved_tiny), device="cpu"))
    assert lm.tokenizer.padding_side == "left"
    assert lm.format_chat("hi").endswith("<|im_start|>assistant\n")
    assert torch.equal(logits_of(lm), logits_of(tiny_model("llama")))


def test_an_adapter_changes_outputs_and_hooks_still_find_the_layers(saved_tiny: Path,
                                                                    saved_adapter: Path) -> None:
    base = load_model(ModelSpec(name=str(saved_tiny), device="cpu"))
    tuned = load_model(ModelSpec(name=str(saved_tiny), adapter=str(saved_adapter), device="cpu"))
    assert tuned.identity != base.identity
    assert not torch.allclose(logits_of(tuned), logits_of(base))
    assert len(decoder_layers(tuned.model)) == 3
    with tuned.model.disable_adapter():
        assert torch.allclose(logits_of(tuned), logits_of(base), atol=1e-6)
    batch = tuned.tokenizer(["hello"], return_tensors="pt")
    captured = capture_residuals(tuned, batch.input_ids, batch.attention_mask, [0, 2])
    assert captured[2].shape == (1, batch.input_ids.shape[1], 64)


def test_4bit_quantization_loads_linear4bit_layers_that_generate(saved_tiny: Path) -> None:
    pytest.importorskip("bitsandbytes")
    lm = load_model(ModelSpec(name=str(saved_tiny), quantization="4bit", device="cpu"))
    kinds = {type(m).__name__ for m in lm.model.modules()}
    assert "Linear4bit" in kinds
    [out] = generate(lm, [lm.format_chat("hi")], GenerationConfig(max_new_tokens=3))
    assert len(out.token_ids) <= 3


def test_a_missing_adapter_is_a_clear_error(saved_tiny: Path) -> None:
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="adapter"):
        load_model(ModelSpec(name=str(saved_tiny), adapter="/no/such/adapter", device="cpu"))
