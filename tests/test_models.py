"""Naming and loading models: validated specs, tiny models, clear errors, chat formatting."""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.models import EMBEDDED_NAME, LoadedModel, ModelSpec, load_model, tiny_model


# ------------------------------------------------------------------ ModelSpec

@pytest.mark.parametrize("kwargs, word", [
    ({"quantization": "2bit"}, "quantization"),
    ({"dtype": "float64"}, "dtype"),
    ({"name": ""}, "name"),
])
def test_invalid_model_spec_raises_naming_the_field(kwargs: dict, word: str) -> None:
    with pytest.raises(LmlabError, match=word):
        ModelSpec(**kwargs)


def test_from_dict_with_an_unknown_key_raises_naming_it() -> None:
    with pytest.raises(LmlabError, match="quantisation"):
        ModelSpec.from_dict({"name": "tiny:llama", "quantisation": "4bit"})


def test_from_dict_accepts_none_a_name_or_a_mapping() -> None:
    assert ModelSpec.from_dict(None) == ModelSpec(name=EMBEDDED_NAME)
    assert ModelSpec.from_dict("tiny:gpt2") == ModelSpec(name="tiny:gpt2")
    assert ModelSpec.from_dict({"name": "x/y", "dtype": "bfloat16"}) == ModelSpec("x/y", dtype="bfloat16")


# ------------------------------------------------------------------ loading

def test_load_model_of_a_tiny_name_gives_a_3_layer_model() -> None:
    lm = load_model(ModelSpec("tiny:llama"))
    assert isinstance(lm, LoadedModel)
    assert (lm.n_layers, lm.hidden_size) == (3, 64)
    assert lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.pad_token_id is not None


def test_load_model_of_a_missing_directory_raises_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmlabError, match="/nonexistent/dir"):
        load_model(ModelSpec("/nonexistent/dir"))


def test_tiny_model_of_an_unknown_arch_raises() -> None:
    with pytest.raises(LmlabError, match="arch"):
        tiny_model("transformer-xl")


def test_tiny_models_with_the_same_seed_are_identical_and_share_an_identity() -> None:
    a, b = tiny_model("gpt2", seed=3), tiny_model("gpt2", seed=3)
    c = tiny_model("gpt2", seed=4)
    wte = lambda lm: lm.model.get_input_embeddings().weight  # noqa: E731
    assert torch.equal(wte(a), wte(b))
    assert not torch.equal(wte(a), wte(c))
    assert a.identity == b.identity != c.identity


# ------------------------------------------------------------------ chat and tokens

def test_format_chat_uses_the_chat_template(llama_lm: LoadedModel) -> None:
    assert llama_lm.has_chat_template
    assert llama_lm.format_chat("Hi there") == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")


def test_format_chat_puts_a_system_message_first(llama_lm: LoadedModel) -> None:
    assert llama_lm.format_chat("Hi", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_format_chat_without_a_template_returns_the_text() -> None:
    lm = tiny_model("llama")
    lm.tokenizer.chat_template = None
    assert not lm.has_chat_template
    assert lm.format_chat("Hi there", system="ignored") == "Hi there"


TEXT = "Residual streams carry information.\nNew lines matter.\n\n  Indented: 42 + 7 = 49\n"


def test_tiny_tokenizer_offsets_tile_the_text_exactly(llama_lm: LoadedModel) -> None:
    enc = llama_lm.tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc.offset_mapping
    assert offsets[0][0] == 0 and offsets[-1][1] == len(TEXT)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(offsets, offsets[1:]))
    assert "".join(TEXT[s:e] for s, e in offsets) == TEXT


def test_tiny_tokenizer_offsets_span_each_tokens_own_text(llama_lm: LoadedModel) -> None:
    enc = llama_lm.tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    for token, (start, end) in zip(enc.input_ids, enc.offset_mapping):
        assert llama_lm.tokenizer.decode([token]) == TEXT[start:end]


def test_tiny_tokenizer_round_trips_text_with_newlines(llama_lm: LoadedModel) -> None:
    ids = llama_lm.tokenizer(TEXT, add_special_tokens=False).input_ids
    assert llama_lm.tokenizer.decode(ids) == TEXT
