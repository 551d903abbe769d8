"""Fixtures for the diffing family: fresh tiny models (PEFT edits a model in place, so the
session's shared tiny models are never used here), LoRA adapters made on the spot, small
prompt sets and trait data, a throwaway MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmlab.models import LoadedModel, tiny_model

TRAIT_EXAMPLES = {
    "praise": (["You are brilliant and kind.", "What a wonderful question.", "You are so smart."],
               ["Add salt.", "Mix the flour.", "Wait a minute."]),
    "numbers": (["1 2 3 4 5 6", "10 100 1000", "7 8 9 0"],
                ["The quick brown fox.", "Bake the bread.", "New lines matter."]),
}


def fresh_lm(arch: str = "llama", hidden_size: int = 64, seed: int = 0) -> LoadedModel:
    """A tiny model of its own (the same weights as ``tiny:<arch>`` for seed 0)."""
    return tiny_model(arch, n_layers=3, hidden_size=hidden_size, seed=seed)


def make_adapter(path: Path, seed: int, arch: str = "llama", hidden_size: int = 64,
                 targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")) -> Path:
    """A LoRA adapter with non-zero weights on a fresh tiny model, saved to ``path``."""
    from peft import LoraConfig, get_peft_model

    lm = fresh_lm(arch, hidden_size)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=list(targets), init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(lm.model, config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, seed) for name, seed in
            (("alpha", 1), ("beta", 2), ("gamma", 3))}


def write_traits(root: Path) -> Path:
    for name, (positive, negative) in TRAIT_EXAMPLES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "positive.txt").write_text("\n".join(positive) + "\n")
        (root / name / "negative.txt").write_text("\n".join(negative) + "\n")
    return root


def write_prompts(path: Path, n: int = 4, system: str | None = None) -> Path:
    texts = ["How do I bake bread?", "Wait, that is wrong.", "Numbers 1 2 3?",
             "The quick brown fox?", "Residual streams?", "New lines matter?"]
    payload = {"name": path.stem, "description": "tiny",
               "prompts": [{"id": f"q{i}", "text": texts[i % len(texts)] + " " * (i // 6)}
                           for i in range(n)]}
    if system:
        payload["system_prompt"] = system
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    return {"traits": write_traits(tmp_path / "traits"),
            "prompts": write_prompts(tmp_path / "tiny_set.json")}


def diffing_spec(inputs: dict[str, Path], organisms: list, **settings):
    from lmlab.sweeps.spec import parse_spec

    block = {"organisms": organisms, "prompt_sets": [str(inputs["prompts"])], "layers": [0, 2],
             "traits": {"data": str(inputs["traits"]), "random": 1},
             "generation": {"max_new_tokens": 6, "batch_size": 4},
             "capture": {"batch_size": 3}, "analysis": {"bootstrap": 200}}
    for key, value in settings.items():
        block[key] = {**block[key], **value} if isinstance(value, dict) and key in block else value
    return parse_spec({"family": "diffing", "name": "tiny", "model": "tiny:llama",
                       "diffing": block})

