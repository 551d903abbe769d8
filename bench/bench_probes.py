"""Probe benchmark: joint training of all lags versus one sklearn fit per (layer, lag), and
extraction throughput versus a plain forward pass with ``output_hidden_states``.

Prints the figures and logs them to the MLflow experiment ``bench`` (run ``probes``).

Training: on the same cached activations (bundled sample chains, embedded model), each
side fits every strength of ``--strengths`` for every (layer, lag), picks the strength by
val PR-AUC and reports test ROC-AUC. lmlab fits all lags and strengths of a layer in one
batch of independent L-BFGS problems sharing each matrix product; the reference fits one
``LogisticRegression`` per (layer, lag, strength). Chains are split by problem. Extraction: the activation cache (one pass per batch, stopping after the
deepest layer, fp16 shards written to disk) versus a forward pass over the same batches
that returns every hidden state and stores nothing.
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
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from lmlab.models import load_model
from lmlab.probes.activations import ExtractionConfig, _batches, _right_padded, extract
from lmlab.probes.chains import KNOWN_LABELS, SAMPLE_PATH, load_chains, problem_key, tokenize_chains
from lmlab.probes.train import build_layer_data, fit_joint, split_groups, standardizer

OUT = Path(__file__).parent / "out"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 10, 14, 18, 22])
    parser.add_argument("--lags", type=int, nargs="+", default=[-8, -4, -2, 0, 2, 4, 8])
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--label", default="backtracking")
    parser.add_argument("--extract-chains", type=int, default=32,
                        help="chains for the extraction throughput comparison")
    parser.add_argument("--rounds", type=int, default=3, help="alternating extraction rounds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-iter", type=int, default=300,
                        help="L-BFGS iterations per output (lmlab side)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the joint fit (default: torch's choice)")
    parser.add_argument("--skip-extraction", action="store_true",
                        help="only the training comparison")
    return parser.parse_args()


def _plain_pass(lm, tokens, batch_size: int) -> float:
    pad = lm.tokenizer.pad_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in _batches(tokens, batch_size):
            ids, mask = _right_padded(batch, pad)
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    return time.perf_counter() - start


def _cache_pass(lm, tokens, layers: list[int], batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract(lm, tokens, "bench", ExtractionConfig(tuple(layers), "float16", batch_size),
                Path(tmp), log=False)
        return time.perf_counter() - start


def extraction(lm, tokens, layers: list[int], batch_size: int, rounds: int) -> dict[str, float]:
    """Tokens per second: the activation cache versus a plain output_hidden_states pass.

    The two alternate and each keeps its fastest round, so load from other processes on a
    shared machine biases neither side.
    """
    n_tokens = sum(t.n_tokens for t in tokens)
    _plain_pass(lm, tokens[:2], batch_size)  # warm-up
    plain, ours = [], []
    for _ in range(rounds):
        plain.append(_plain_pass(lm, tokens, batch_size))
        ours.append(_cache_pass(lm, tokens, layers, batch_size))
    return {"extract_tokens": n_tokens, "extract_plain_tok_s": n_tokens / min(plain),
            "extract_cache_tok_s": n_tokens / min(ours), "extract_ratio": min(plain) / min(ours)}


def _choose_and_score(logits_val, logits_test, y_val, y_test) -> float:
    """Test ROC-AUC of the strength with the best val PR-AUC (columns are strengths)."""
    best = int(np.argmax([average_precision_score(y_val, logits_val[:, j])
                          for j in range(logits_val.shape[1])]))
    return float(roc_auc_score(y_test, logits_test[:, best]))


def training(cache, tokens, problems: list[str], args: argparse.Namespace) -> dict[str, float]:
    groups = np.unique([problem_key(p) for p in problems], return_inverse=True)[1]
    split = split_groups(groups, (0.6, 0.2, 0.2), 0)
    joint_s = sklearn_s = 0.0
    unconverged = iterations = work = 0
    gaps = []
    n_c = len(args.strengths)
    for layer in args.layers:
        data = build_layer_data(cache.layer(layer, tokens), [t.labels[args.label] for t in tokens],
                                [t.input_ids for t in tokens], [t.chain_start for t in tokens],
                                tuple(args.lags), split, groups)
        row_split = data.split[data.chain]
        mean, scale = standardizer(data.features[row_split == 0])
        x = (data.features - mean) / scale
        rows = {s: row_split == s for s in range(3)}
        start = time.perf_counter()
        train = rows[0]
        targets = np.repeat(data.targets[train].astype(np.float32), n_c, axis=1)
        weights = np.repeat(data.valid[train].astype(np.float32), n_c, axis=1)
        fit = fit_joint(torch.from_numpy(x[train]), torch.from_numpy(targets),
                        torch.from_numpy(weights), torch.tensor(args.strengths * len(args.lags)),
                        args.max_iter)
        logits = (torch.from_numpy(x) @ fit.coef + fit.bias).numpy()
        joint_s += time.perf_counter() - start
        unconverged += int((~fit.converged).sum())
        iterations += int(fit.iterations.sum())
        work += int(train.sum()) * x.shape[1] * int(fit.iterations.sum())
        for k, lag in enumerate(args.lags):
            ok = {s: rows[s] & data.valid[:, k] for s in range(3)}
            y = {s: data.targets[ok[s], k] for s in range(3)}
            cols = k * n_c + np.arange(n_c)
            ours = _choose_and_score(logits[ok[1]][:, cols], logits[ok[2]][:, cols], y[1], y[2])
            start = time.perf_counter()
            fits = [LogisticRegression(C=c, max_iter=1000).fit(x[ok[0]], y[0])
                    for c in args.strengths]
            sklearn_s += time.perf_counter() - start
            theirs = _choose_and_score(np.stack([m.decision_function(x[ok[1]]) for m in fits], 1),
                                       np.stack([m.decision_function(x[ok[2]]) for m in fits], 1),
                                       y[1], y[2])
            gaps.append(abs(ours - theirs))
            print(f"layer {layer:>2} lag {lag:>3}: test ROC-AUC joint {ours:.4f}  sklearn {theirs:.4f}")
    return {"train_joint_s": joint_s, "train_sklearn_s": sklearn_s,
            "train_speedup": sklearn_s / joint_s, "train_max_auroc_gap": max(gaps),
            "train_fits_sklearn": len(gaps) * n_c, "train_fits_unconverged": unconverged,
            "train_mean_iterations": iterations / (len(gaps) * n_c),
            # s per (train row x width x output iteration): FIT_SECONDS_PER_UNIT in the family
            "train_seconds_per_unit": joint_s / max(work, 1)}


def main() -> None:
    args = parse_args()
    lm = load_model()
    chains = load_chains(SAMPLE_PATH)
    tokens = tokenize_chains(lm, chains.chains, KNOWN_LABELS)
    load_before = os.getloadavg()[0]
    metrics: dict[str, float] = {}
    if not args.skip_extraction:
        metrics = extraction(lm, tokens[:args.extract_chains], args.layers, args.batch_size,
                             args.rounds)
        print(f"extraction: cache {metrics['extract_cache_tok_s']:.0f} tok/s vs plain forward "
              f"{metrics['extract_plain_tok_s']:.0f} tok/s = {metrics['extract_ratio']:.2f}x")
    if args.threads:
        torch.set_num_threads(args.threads)
    cache, _ = extract(lm, tokens, chains.digest,
                       ExtractionConfig(tuple(args.layers), "float16", args.batch_size),
                       OUT / "activations")
    metrics.update(training(cache, tokens, [c.problem for c in chains.chains], args))
    print(f"training: joint {metrics['train_joint_s']:.1f} s vs sklearn {metrics['train_sklearn_s']:.1f} s "
          f"({metrics['train_fits_sklearn']} fits) = {metrics['train_speedup']:.1f}x faster; "
          f"largest test ROC-AUC gap {metrics['train_max_auroc_gap']:.4f}; "
          f"{metrics['train_fits_unconverged']} fits unconverged, "
          f"{metrics['train_mean_iterations']:.0f} iterations per fit, "
          f"{metrics['train_seconds_per_unit']:.2e} s per row x width x iteration")
    metrics["load_avg_1min_start"] = load_before
    metrics["load_avg_1min_end"] = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, 1-min load "
          f"average {load_before:.1f} at start and {metrics['load_avg_1min_end']:.1f} at the end")
    mlflow.set_experiment("bench")
    with mlflow.start_run(run_name="probes"):
        mlflow.log_params({"model": "smollm2-135m", "layers": args.layers, "lags": args.lags,
                           "strengths": args.strengths, "chains": len(tokens),
                           "torch_threads": torch.get_num_threads(), "max_iter": args.max_iter})
        mlflow.log_metrics(metrics)


if __name__ == "__main__":
    main()
