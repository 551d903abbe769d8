"""Diffing benchmark: one resident base with adapter switching versus reloading the base per
organism, capture throughput versus a plain ``output_hidden_states`` forward, and the bytes
a token takes at a layer in the activation store.

Prints the figures and logs them to the MLflow experiment ``bench`` (run ``diffing``).

* **Switching vs reloading** (3 organisms): each arm does, per organism, the work a
  same_text condition needs: the organism reads its token ids, then the clean model reads
  the same ids (one pass over ``--prompts`` sequences each). The resident arm loads the base
  once and switches adapters with ``set_adapter`` / ``disable_adapter``; the reload arm
  loads the base and the adapter for every organism and loads the base again for every
  replay, as the audit pipeline did. Goal: resident at least 3x faster.
* **Capture vs plain forward**: the activation store (one pass per batch stopping after
  the deepest layer, written to disk: raw float16 and stream-through scores) against a
  forward pass over the same batches that returns every hidden state and stores nothing.
  The arms alternate; each keeps its fastest round. Goal: at least 0.9x.
* **Bytes per token-layer**: data bytes in the raw store's shards over stored tokens x
  layers; expected width x 2 (float16) = 1,152 for the embedded model.

Organisms: the bundled adapters when ``lmlab.diffing.organisms`` is installed, otherwise
three seeded random LoRA adapters made here (the timing does not depend on what they learnt).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch

from lmlab.activations import ExtractionConfig, _batches, _right_padded, extract, stored_data_bytes
from lmlab.cache import DiskCache
from lmlab.diffing.capture import (CaptureItem, ResidentBase, TraitProjection, capture_items,
                                   generate_responses)
from lmlab.diffing.prompt_sets import load_prompt_set
from lmlab.diffing.variants import Organism
from lmlab.generation import GenerationConfig
from lmlab.hooks import capture_residuals
from lmlab.models import ModelSpec, load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 15, 20])
    parser.add_argument("--prompts", type=int, default=12, help="sequences per read")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating capture rounds")
    parser.add_argument("--skip-switching", action="store_true")
    return parser.parse_args()


def organisms(base: ModelSpec, folder: Path) -> list[Organism]:
    try:
        from lmlab.diffing.variants import bundled_organism

        return [bundled_organism(q, base) for q in ("flattery", "brand", "pep")]
    except Exception as error:  # not merged or not trainable here: random adapters time the same
        print(f"bundled organisms unavailable ({type(error).__name__}); using random adapters")
    from peft import LoraConfig, get_peft_model

    out = []
    for seed in range(3):
        lm = load_model(base)
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(lm.model, config).save_pretrained(str(folder / f"random{seed}"))
        out.append(Organism(f"random{seed}", folder / f"random{seed}", None, "random"))
    return out


def _read(view, items: list[CaptureItem], layers: list[int], batch_size: int) -> None:
    pad = view.tokenizer.pad_token_id
    for batch in _batches(items, batch_size):
        ids, mask = _right_padded(batch, pad)
        capture_residuals(view, ids, mask, layers)


def switching(base: ModelSpec, chosen: list[Organism], items: list[CaptureItem],
              layers: list[int], batch_size: int) -> dict[str, float]:
    from peft import PeftModel

    start = time.perf_counter()
    resident = ResidentBase(load_model(base))
    for organism in chosen:
        with resident.use(organism) as view:
            _read(view, items, layers, batch_size)
        with resident.use(None) as clean:
            _read(clean, items, layers, batch_size)
    resident_s = time.perf_counter() - start
    start = time.perf_counter()
    for organism in chosen:
        lm = load_model(base)
        lm.model = PeftModel.from_pretrained(lm.model, str(organism.adapter))
        _read(lm, items, layers, batch_size)
        _read(load_model(base), items, layers, batch_size)  # a fresh base for the replay
    reload_s = time.perf_counter() - start
    return {"switch_resident_s": resident_s, "switch_reload_s": reload_s,
            "switch_speedup": reload_s / resident_s}


def _plain(lm, items: list[CaptureItem], batch_size: int) -> float:
    pad = lm.tokenizer.pad_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in _batches(items, batch_size):
            ids, mask = _right_padded(batch, pad)
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    return time.perf_counter() - start


def _store(lm, items, layers, batch_size, projection=None) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache, _ = extract(lm, items, "bench", ExtractionConfig(tuple(layers), "float16",
                                                                batch_size),
                           Path(tmp), log=False, projection=projection)
        seconds = time.perf_counter() - start
        stored = sum(stored_data_bytes(p) for p in (cache.directory / "shards").glob("*"))
    return seconds, stored


def capture_speed(lm, items: list[CaptureItem], layers: list[int], batch_size: int,
                  rounds: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    projection = TraitProjection({layer: torch.randn(14, lm.hidden_size, generator=generator)
                                  for layer in layers}, "bench")
    tokens = sum(item.n_tokens for item in items)
    _plain(lm, items[:2], batch_size)  # warm-up
    plain, raw, scores = [], [], []
    stored = 0
    for _ in range(rounds):
        plain.append(_plain(lm, items, batch_size))
        seconds, stored = _store(lm, items, layers, batch_size)
        raw.append(seconds)
        scores.append(_store(lm, items, layers, batch_size, projection)[0])
    return {"capture_tokens": tokens, "plain_tok_s": tokens / min(plain),
            "capture_raw_tok_s": tokens / min(raw), "capture_scores_tok_s": tokens / min(scores),
            "capture_raw_ratio": min(plain) / min(raw),
            "capture_scores_ratio": min(plain) / min(scores),
            "bytes_per_token_layer": stored / (tokens * len(layers))}


def main() -> None:
    args = parse_args()
    base = ModelSpec()
    load_before = os.getloadavg()[0]
    lm = load_model(base)
    prompt_set = load_prompt_set("bundled:everyday_advice", args.prompts)
    start = time.perf_counter()
    responses = generate_responses(lm, "clean", prompt_set,
                                   GenerationConfig(args.new_tokens, 16),
                                   DiskCache(Path(tempfile.mkdtemp())))
    generation_s = time.perf_counter() - start
    new_tokens = sum(len(r.response_ids) for r in responses)
    items = capture_items(responses, response_only=False)
    metrics: dict[str, float] = {"generation_tok_s": new_tokens / generation_s}
    print(f"generation: {new_tokens} new tokens in {generation_s:.1f} s = "
          f"{metrics['generation_tok_s']:.0f} tok/s (batch 16)")
    metrics.update(capture_speed(lm, items, args.layers, args.batch_size, args.rounds))
    print(f"capture: raw store {metrics['capture_raw_tok_s']:.0f} tok/s, stream-through scores "
          f"{metrics['capture_scores_tok_s']:.0f} tok/s vs plain output_hidden_states "
          f"{metrics['plain_tok_s']:.0f} tok/s = {metrics['capture_raw_ratio']:.2f}x / "
          f"{metrics['capture_scores_ratio']:.2f}x; {metrics['bytes_per_token_layer']:.0f} bytes "
          f"per token-layer (width {lm.hidden_size} x 2 = {lm.hidden_size * 2})")
    if not args.skip_switching:
        with tempfile.TemporaryDirectory() as tmp:
            chosen = organisms(base, Path(tmp))
            del lm
            metrics.update(switching(base, chosen, items, args.layers, args.batch_size))
        print(f"3 organisms: resident base with switching {metrics['switch_resident_s']:.1f} s vs "
              f"reloading per organism and replay {metrics['switch_reload_s']:.1f} s = "
              f"{metrics['switch_speedup']:.1f}x faster")
    metrics["load_avg_1min_start"] = load_before
    metrics["load_avg_1min_end"] = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, 1-min load "
          f"average {load_before:.1f} at start and {metrics['load_avg_1min_end']:.1f} at the end")
    mlflow.set_experiment("bench")
    with mlflow.start_run(run_name="diffing"):
        mlflow.log_params({"model": base.name, "layers": args.layers, "prompts": args.prompts,
                           "new_tokens": args.new_tokens, "batch_size": args.batch_size,
                           "torch_threads": torch.get_num_threads()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})


if __name__ == "__main__":
    main()
