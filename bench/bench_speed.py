"""Speed of the steering pipeline on the embedded model, before and after, in one run.

    python bench/bench_speed.py                      # all parts, before = --before's commit
    python bench/bench_speed.py --parts limit,generation
    python bench/bench_speed.py --tiny               # a seconds-long check on a tiny model

Parts (each figure with the 1-minute load average when it was taken):

* ``limit``: the compute limit: a 2048 x 2048 fp32 matmul (GFLOPS, wall clock, best of
  10; also per thread in CPU time) and the model's FLOPs per generated token, counted
  from its config (2 x the weights every token multiplies), so tokens/s at the limit.
* ``generation``: greedy tokens/s at each batch size (every row forced to ``--new-tokens``
  new tokens), new tokens only, and the share of the limit; also the share counting the
  prompt's FLOPs, which the machine spends too.
* ``options``: what the ecosystem offers, at one batch size, on plain ``model.generate``:
  static KV cache, eager attention, bf16 weights, one thread; ``--compile`` adds
  ``torch.compile``.
* ``sweep``: the default smoke sweep (``sweeps/smoke.yaml`` of each source tree) in a
  fresh process with a fresh tracking store and ``.lmlab`` cache (model weights cache
  warm), split into load, directions, generation, scoring, tracking, summary and other,
  with the scoring passes per split evaluation. It runs once on the ``--before`` commit
  (extracted with ``git archive``) and once on the working tree.

Writes ``bench/out/speed.json`` and ``bench/out/speed.md``. No GPU is used or assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("limit", "generation", "options", "sweep")


def load() -> float:
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------ compute limit

def matmul_gflops(dtype_name: str = "float32", size: int = 2048, repeats: int = 10) -> dict[str, float]:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        a @ b
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    flops = 2 * size ** 3
    return {"gflops": flops / wall / 1e9, "gflops_per_thread_cpu_time": flops / cpu / 1e9,
            "threads": torch.get_num_threads(), "load": load()}


def flops_per_token(config: Any) -> float:
    """2 x the weights one token multiplies (attention projections, MLP, output head);
    the attention scores add 4 x layers x hidden per token of context (left out, under 2%
    at these lengths)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * kv)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return 2.0 * (c.num_hidden_layers * (attention + mlp) + c.hidden_size * c.vocab_size)


def limit_figures(model: str) -> dict[str, Any]:
    lm = load_lm(model)
    per_token = flops_per_token(lm.model.config)
    fp32 = matmul_gflops("float32")
    return {"matmul_fp32": fp32, "matmul_bf16": matmul_gflops("bfloat16"),
            "gflop_per_token": per_token / 1e9,
            "limit_tokens_per_s": fp32["gflops"] * 1e9 / per_token,
            "limit_tokens_per_s_per_thread_cpu": fp32["gflops_per_thread_cpu_time"] * 1e9 / per_token}


# ------------------------------------------------------------------ generation

def load_lm(model: str, dtype: str = "auto"):  # type: ignore[no-untyped-def]
    from lmlab.models import ModelSpec, load_model

    return load_model(ModelSpec(name=model, dtype=dtype))


def bench_prompts(lm: Any, count: int) -> list[str]:
    from lmlab.data.prompts import load_prompts

    rows = [r for split in ("harm_test", "benign", "harm_train", "harm_val")
            for r in load_prompts(f"bundled:{split}")]
    return [lm.format_chat(r.prompt) for r in rows[:count]]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def generation_figures(model: str, batches: list[int], new_tokens: int, limit: dict[str, Any] | None) -> dict[str, Any]:
    """Greedy generation by batch size: new tokens/s end to end (prompt encoding included),
    and over the decoding steps alone, with the columns the blocks actually computed."""
    from lmlab.generation import GenerationConfig, encode_prompts, generate

    lm = load_lm(model)
    lm.model.generation_config.min_new_tokens = new_tokens  # every row runs the full length
    per_token = flops_per_token(lm.model.config)
    generate(lm, bench_prompts(lm, 2), GenerationConfig(max_new_tokens=2))  # warm-up
    columns = ColumnCount(lm)
    rows = {}
    for size in batches:
        prompts = bench_prompts(lm, max(size, 8))
        prompt_tokens = sum(len(lm.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts)
        config = GenerationConfig(max_new_tokens=new_tokens, batch_size=size)
        columns.count = 0
        encoded: list[Any] = []
        encode_wall, _ = timed(lambda: encoded.append(encode_prompts(lm, prompts, batch_size=size)))
        encoded_columns = columns.count
        decode_wall, cpu = timed(lambda: generate(lm, encoded[0], config))
        wall = encode_wall + decode_wall
        made = len(prompts) * new_tokens
        row = {"prompts": len(prompts), "new_tokens": made, "prompt_tokens": prompt_tokens,
               "seconds": wall, "encode_seconds": encode_wall, "decode_seconds": decode_wall,
               "tokens_per_s": made / wall, "decode_tokens_per_s": made / decode_wall,
               "cpu_seconds": cpu, "load": load(), "prompt_columns_computed": encoded_columns,
               "gflops": columns.count * per_token / wall / 1e9}
        if limit is not None:
            row["share_of_limit"] = row["tokens_per_s"] / limit["limit_tokens_per_s"]
            row["decode_share_of_limit"] = row["decode_tokens_per_s"] / limit["limit_tokens_per_s"]
            row["flop_share_with_prompt"] = row["gflops"] / limit["matmul_fp32"]["gflops"]
        rows[str(size)] = row
        print(f"  batch {size:3d}: {row['tokens_per_s']:7.1f} new tok/s, decoding alone "
              f"{row['decode_tokens_per_s']:7.1f}  (load {row['load']})", flush=True)
    columns.close()
    best = max(rows, key=lambda k: rows[k]["tokens_per_s"])
    return {"by_batch": rows, "best_batch": int(best), "threads": threads()}


class ColumnCount:
    """Token columns (rows x positions) the first decoder block computes."""

    def __init__(self, lm: Any) -> None:
        from lmlab.hooks import decoder_layers

        self.count = 0
        self.handle = decoder_layers(lm.model)[0].register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        states = kwargs.get("hidden_states", args[0] if args else None)
        self.count += int(states.shape[0] * states.shape[1])

    def close(self) -> None:
        self.handle.remove()


def threads() -> int:
    import torch

    return torch.get_num_threads()


def option_figures(model: str, batch: int, new_tokens: int, compile_too: bool) -> dict[str, Any]:
    """Plain ``model.generate`` with each option, same prompts, best of two runs."""
    import torch

    variants: dict[str, tuple[str, dict[str, Any], Callable[[Any], None]]] = {
        "default (sdpa, dynamic cache, fp32)": ("auto", {}, lambda m: None),
        "static KV cache": ("auto", {"cache_implementation": "static"}, lambda m: None),
        "eager attention": ("auto", {}, lambda m: m.set_attn_implementation("eager")),
        "bf16 weights": ("bfloat16", {}, lambda m: None),
    }
    if compile_too:
        from transformers import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # generate() compiles on accelerators only otherwise
        variants["static cache + torch.compile"] = (
            "auto", {"cache_implementation": "static", "compile_config": compile_config}, lambda m: None)
    out = {}
    for name, (dtype, kwargs, setup) in variants.items():
        lm = load_lm(model, dtype)
        setup(lm.model)
        prompts = bench_prompts(lm, batch)
        batch_ids = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

        def run() -> None:
            with torch.inference_mode():
                lm.model.generate(**batch_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=lm.tokenizer.pad_token_id, **kwargs)

        first = timed(run)
        second = timed(run)
        wall = min(first[0], second[0])
        out[name] = {"tokens_per_s": batch * new_tokens / wall, "first_call_seconds": first[0],
                     "load": load()}
        print(f"  {name:38s} {out[name]['tokens_per_s']:7.1f} tok/s  (first call {first[0]:.1f} s)", flush=True)
    out["one thread (default otherwise)"] = one_thread(model, batch, new_tokens)
    return {"batch": batch, "variants": out}


def one_thread(model: str, batch: int, new_tokens: int) -> dict[str, float]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = load_lm(model)
        prompts = bench_prompts(lm, batch)
        ids = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            wall, _ = timed(lambda: lm.model.generate(**ids, max_new_tokens=new_tokens,
                                                      min_new_tokens=new_tokens, do_sample=False,
                                                      pad_token_id=lm.tokenizer.pad_token_id))
    finally:
        torch.set_num_threads(before)
    print(f"  {'one thread':38s} {batch * new_tokens / wall:7.1f} tok/s", flush=True)
    return {"tokens_per_s": batch * new_tokens / wall, "load": load()}


# ------------------------------------------------------------------ the sweep, instrumented

class Phases:
    """Wall and CPU seconds per phase; nested phases are subtracted from their parent."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.stack: list[str] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
            self.wall[name] = self.wall.get(name, 0.0) + wall
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu
            if self.stack:  # time in a nested phase is not the parent's own
                parent = self.stack[-1]
                self.wall[parent] = self.wall.get(parent, 0.0) - wall
                self.cpu[parent] = self.cpu.get(parent, 0.0) - cpu

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)


class PassCounter:
    """Every forward pass while scoring: prompt encodings (they start at column 0) and
    continuation-only passes, as rows (prompts) per pass, plus token columns computed."""

    def __init__(self, phases: Phases) -> None:
        self.phases = phases
        self.encoded_rows = 0
        self.continuation_rows = 0
        self.scoring_columns = 0
        self.split_evaluations = 0
        self.prompts_scored = 0
        # The work done, every pass of the sweep, padding included: token columns through
        # the decoder blocks, and columns through the output head (often only the last).
        self.all_columns = 0
        self.head_columns = 0
        self.gflop_per_token = float("nan")
        self.gflop_head = float("nan")

    def head_hook(self, module: Any, args: tuple) -> None:
        hidden = args[0]
        self.head_columns += int(hidden.numel() // hidden.shape[-1])

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        where = self.phases.stack[-1] if self.phases.stack else ""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.all_columns += int(ids.shape[0]) * int(ids.shape[1])
        if ids is None or where not in ("scoring", "generation"):
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        offset = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        rows, columns = int(ids.shape[0]), int(ids.shape[1])
        if offset == 0 and columns > 1:
            self.encoded_rows += rows  # a prompt encoded from scratch (generation's prefill too)
        elif where == "scoring" and columns > 1:
            self.continuation_rows += rows
        if where == "scoring":
            self.scoring_columns += rows * columns

    def figures(self) -> dict[str, float]:
        n = max(self.prompts_scored, 1)
        return {"split_evaluations": self.split_evaluations,
                "prompt_encodings_per_split_evaluation": self.encoded_rows / n,
                "continuation_passes_per_split_evaluation": self.continuation_rows / n,
                "scoring_token_columns_per_prompt": self.scoring_columns / n,
                "token_columns_computed": self.all_columns,
                "head_columns_computed": self.head_columns}


def sweep_child(spec_path: Path, tiny: bool) -> dict[str, Any]:
    """Run one instrumented sweep in this (fresh) process; the caller set up the store."""
    process_start = time.perf_counter()
    import mlflow

    import lmlab.steering.family as steering
    import lmlab.sweeps.family as sweeps_family
    from lmlab.hooks import decoder_backbone
    from lmlab.sweeps.runner import run_sweep
    from lmlab.sweeps.spec import load_spec, parse_spec

    phases = Phases()
    counter = PassCounter(phases)
    phases.wrap(sweeps_family, "load_model", "load")
    phases.wrap(steering.SteeringFamily, "_directions", "directions")
    phases.wrap(steering.SteeringFamily, "_control_directions", "directions")
    phases.wrap(steering, "generate", "generation")
    phases.wrap(steering.SteeringFamily, "summarize", "summary and plots")
    original_load = sweeps_family.load_model
    original_score = steering.SteeringFamily._score

    def counted_load(*args: Any, **kwargs: Any) -> Any:
        lm = original_load(*args, **kwargs)
        config = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
        counter.gflop_head = 2.0 * config.hidden_size * config.vocab_size / 1e9
        counter.gflop_per_token = flops_per_token(lm.model.config) / 1e9 - counter.gflop_head
        lm.model.get_output_embeddings().register_forward_pre_hook(counter.head_hook)
        decoder_backbone(lm.model).register_forward_pre_hook(counter.hook, with_kwargs=True)
        return lm

    def scored(self: Any, lm: Any, prompts: list, edits: Any, base: Any, split: str) -> Any:
        counter.split_evaluations += len(split.split("+"))
        counter.prompts_scored += len(prompts)
        with phases.phase("scoring"):
            return original_score(self, lm, prompts, edits, base, split)

    sweeps_family.load_model = counted_load
    steering.SteeringFamily._score = scored
    spec = parse_spec(tiny_spec()) if tiny else load_spec(spec_path)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    outcome = run_sweep(spec, experiment_name="bench-speed")
    wall = {k: v for k, v in phases.wall.items()}
    wall["tracking"] = outcome.tracking_seconds
    accounted = sum(wall.values())
    wall["other (runner, identity, data, plots' caller)"] = outcome.total_seconds - accounted
    return {"sweep_seconds": outcome.total_seconds,
            "process_seconds": time.perf_counter() - process_start,
            "phases_wall": wall, "phases_cpu": phases.cpu, "passes": counter.figures(),
            "conditions": len(outcome.summary), "threads": threads(), "load_end": load(),
            "gflop_per_token_blocks": counter.gflop_per_token, "gflop_head": counter.gflop_head,
            "lmlab": __import__("lmlab").__file__}


def tiny_spec() -> dict[str, Any]:
    return {"family": "steering", "name": "bench-tiny", "model": {"name": "tiny:llama"},
            "grid": {"method": ["suffix_contrast"], "layer": [1], "alpha": [0.25, 0.5],
                     "intervention": ["add"]},
            "steering": {"n_prompts": 4, "n_train": 4,
                         "eval_splits": ["harm_train", "harm_test", "benign"],
                         "generation": {"max_new_tokens": 8, "batch_size": 32}}}


def run_sweep_in(src_root: Path, tiny: bool) -> dict[str, Any]:
    """A fresh process on ``src_root``'s lmlab, fresh store and cache in a temp dir."""
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(src_root / "src"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "LMLAB_STORE_DIR": f"{tmp}/.lmlab", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "HF_HUB_OFFLINE": "1"}
        env.pop("MLFLOW_RUN_ID", None)
        result_file = Path(tmp) / "result.json"
        started = load()
        command = [sys.executable, str(Path(__file__).resolve()), "--child-sweep",
                   str(src_root / "sweeps" / "smoke.yaml"), "--child-result", str(result_file)]
        if tiny:
            command.append("--tiny")
        subprocess.run(command, env=env, cwd=tmp, check=True)
        result = json.loads(result_file.read_text())
    result["load_start"] = started
    return result


def extract(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def sweep_figures(before: str | None, tiny: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if before:
        with tempfile.TemporaryDirectory(prefix="bench-before-") as tmp:
            print(f"sweep on {before} ...", flush=True)
            out["before"] = {"revision": before, **run_sweep_in(extract(before, Path(tmp)), tiny)}
    print("sweep on the working tree ...", flush=True)
    out["after"] = {"revision": "working tree", **run_sweep_in(ROOT, tiny)}
    if before:
        out["sweep_time_ratio_before_over_after"] = (out["before"]["sweep_seconds"]
                                                     / out["after"]["sweep_seconds"])
    return out


# ------------------------------------------------------------------ report

def markdown(figures: dict[str, Any]) -> str:
    lines = [f"# bench_speed ({figures['machine']})", ""]
    if "limit" in figures:
        lim = figures["limit"]
        lines += [f"- matmul 2048x2048 fp32: {lim['matmul_fp32']['gflops']:.0f} GFLOPS "
                  f"(load {lim['matmul_fp32']['load']}); bf16: {lim['matmul_bf16']['gflops']:.0f}",
                  f"- {lim['gflop_per_token']:.3f} GFLOP per token; limit "
                  f"{lim['limit_tokens_per_s']:.0f} tokens/s", ""]
    if "generation" in figures:
        lines += ["| batch | new tok/s | share of limit | decoding alone: new tok/s, share | FLOP share, columns computed | load |",
                  "|---|---|---|---|---|---|"]
        for size, row in figures["generation"]["by_batch"].items():
            lines.append(f"| {size} | {row['tokens_per_s']:.1f} | {row.get('share_of_limit', float('nan')):.1%} "
                         f"| {row['decode_tokens_per_s']:.1f}, {row.get('decode_share_of_limit', float('nan')):.1%} "
                         f"| {row.get('flop_share_with_prompt', float('nan')):.1%} | {row['load']} |")
        lines.append(f"\nbest batch: {figures['generation']['best_batch']}\n")
    if "options" in figures:
        lines += [f"options at batch {figures['options']['batch']}:", ""]
        for name, row in figures["options"]["variants"].items():
            lines.append(f"- {name}: {row['tokens_per_s']:.1f} tok/s (load {row['load']})")
        lines.append("")
    if "sweep" in figures:
        lines += sweep_markdown(figures["sweep"])
        if "limit" in figures:
            lines += floor_markdown(figures["sweep"], figures["limit"])
    return "\n".join(lines) + "\n"


def sweep_markdown(sweep: dict[str, Any]) -> list[str]:
    runs = [k for k in ("before", "after") if k in sweep]
    phases = sorted({p for k in runs for p in sweep[k]["phases_wall"]})
    lines = ["| phase | " + " | ".join(f"{k} s (wall)" for k in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for name in phases:
        lines.append(f"| {name} | " + " | ".join(f"{sweep[k]['phases_wall'].get(name, 0):.1f}" for k in runs) + " |")
    lines.append("| **sweep** | " + " | ".join(f"**{sweep[k]['sweep_seconds']:.1f}**" for k in runs) + " |")
    lines.append("| process (imports included) | " + " | ".join(f"{sweep[k]['process_seconds']:.1f}" for k in runs) + " |")
    lines.append("| load average start / end | " + " | ".join(f"{sweep[k]['load_start']} / {sweep[k]['load_end']}" for k in runs) + " |")
    for name in sweep[runs[0]]["passes"]:
        lines.append(f"| {name} | " + " | ".join(f"{sweep[k]['passes'][name]:.2f}" for k in runs) + " |")
    if "sweep_time_ratio_before_over_after" in sweep:
        lines.append(f"\nsweep time before / after: {sweep['sweep_time_ratio_before_over_after']:.2f}x")
    return lines + [""]


def compute_floor_seconds(run: dict[str, Any], limit: dict[str, Any]) -> float:
    """The sweep's model work (token columns through the blocks and through the output
    head, x their FLOPs) at the matmul peak: no sweep doing that work is faster here."""
    work = (run["passes"]["token_columns_computed"] * run["gflop_per_token_blocks"]
            + run["passes"]["head_columns_computed"] * run["gflop_head"])
    return work / limit["matmul_fp32"]["gflops"]


def floor_markdown(sweep: dict[str, Any], limit: dict[str, Any]) -> list[str]:
    run = sweep["after"]
    if "token_columns_computed" not in run["passes"]:
        return []
    floor = compute_floor_seconds(run, limit)
    return [f"compute floor (the sweep's matmul FLOPs / the matmul peak): {floor:.1f} s; "
            f"the sweep ran at {floor / run['sweep_seconds']:.0%} of the peak", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--before", default="2907387",
                        help="git revision whose sweep is the 'before' (empty: skip)")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--options-batch", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also try torch.compile (slow to compile)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model: checks the script only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--child-sweep", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_sweep:
        apply_threads()
        result = sweep_child(Path(args.child_sweep), args.tiny)
        Path(args.child_result).write_text(json.dumps(result))
        return
    apply_threads()
    model = "tiny:llama" if args.tiny else "smollm2-135m"
    parts = args.parts.split(",")
    figures: dict[str, Any] = {"machine": machine(), "load_start": load()}
    if "limit" in parts:
        figures["limit"] = limit_figures(model)
    if "generation" in parts:
        batches = [int(b) for b in args.batches.split(",")]
        figures["generation"] = generation_figures(model, batches, args.new_tokens, figures.get("limit"))
    if "options" in parts:
        figures["options"] = option_figures(model, args.options_batch, args.new_tokens, args.compile)
    if "sweep" in parts:
        figures["sweep"] = sweep_figures(args.before or None, args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(figures, indent=2))
    (out / "speed.md").write_text(markdown(figures))
    print(markdown(figures))


def apply_threads() -> None:
    """The run's thread count as lmlab sets it (``LMLAB_THREADS`` or physical cores)."""
    import torch

    from lmlab.runtime import RuntimeSpec, resolve_threads

    torch.set_num_threads(resolve_threads(RuntimeSpec())[0])


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src")) if "--child-sweep" not in sys.argv else None
    main()
