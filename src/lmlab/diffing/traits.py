"""Trait vectors per layer: from contrastive examples, random controls, other families.

Contrastive data is a folder holding, per trait, ``{trait}/positive.txt`` and
``negative.txt`` (one example a line) or ``{trait}.jsonl`` (lines ``{"positive",
"negative", "prompt"?}``). Each example is read as the assistant's reply to a user turn
(``context_prompt``, or the line's ``prompt``) through the chat template, exactly as
responses are read, and summarised by its mean residual over the example's own tokens.

* ``mean_diff``: mean positive summary minus mean negative summary.
* ``probe``: a logistic regression (sklearn, standardised inputs) on the summaries; the
  vector is its coefficient mapped back to residual units (coef / scale), pointing to
  the positive class.
* ``random``: a seeded Gaussian vector per layer with the norm of the mean ``mean_diff``
  vector at that layer: a control trait that should show nothing.

Vectors from elsewhere: a steering run's ``direction/*.safetensors`` artifact (tensor
``unit``, metadata ``layer``, ``method``), the file itself, or a registered probe
(``models:/name@alias``, weight / scale of its standardised logistic model). Each exists at
one layer. Projection divides by the vector's norm, so only its direction matters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.hooks import capture_residuals
from lmlab.identity import path_digest
from lmlab.models import LoadedModel

BUNDLED_TRAITS = Path(__file__).resolve().parents[1] / "data" / "diffing" / "traits"
RANDOM = "random"
MIN_EXAMPLES = 2


@dataclass(frozen=True)
class TraitData:
    name: str
    path: Path  # the trait's folder or .jsonl file (its digest enters the condition keys)
    positive: tuple[tuple[str, str], ...]  # (user prompt, example)
    negative: tuple[tuple[str, str], ...]
    report: DataReport


@dataclass(frozen=True)
class TraitVector:
    """One trait's direction at one layer (``vector`` in residual units, any norm)."""

    trait: str
    method: str  # mean_diff, probe, random, steering:<method>, registered_probe
    layer: int
    vector: torch.Tensor
    source: str = ""

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()


# ---------------------------------------------------------------- contrastive data


def trait_root(data: str) -> Path:
    return BUNDLED_TRAITS if data == "bundled" else Path(data).expanduser()


def available_traits(root: Path) -> list[str]:
    if not root.is_dir():
        raise LmlabError(f"trait data folder not found: {root}")
    names = {p.name for p in root.iterdir() if p.is_dir() and (p / "positive.txt").exists()}
    names |= {p.stem for p in root.glob("*.jsonl")}
    return sorted(names)


def trait_path(root: Path, name: str) -> Path:
    folder, lines = root / name, root / f"{name}.jsonl"
    if folder.is_dir():
        return folder
    if lines.is_file():
        return lines
    raise LmlabError(f"trait {name!r} not found in {root}: expected {folder}/positive.txt and "
                     f"negative.txt, or {lines}; available: {available_traits(root)}")


def _read_lines(path: Path, report: DataReport, context: str) -> list[tuple[str, str]]:
    if not path.is_file():
        raise LmlabError(f"trait {report.name.removeprefix('trait:')!r}: {path} not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise LmlabError(f"trait file {path} is not UTF-8 text") from error
    kept, seen = [], set()
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue  # blank lines are not records
        report.rows_read += 1
        if text in seen:
            report.drop("duplicate", where=f"{path.name} line {number}")
            continue
        seen.add(text)
        kept.append((context, text))
    return kept


def _read_jsonl(path: Path, report: DataReport, context: str
                ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    positive, negative = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        report.rows_read += 1
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            report.drop("malformed", where=where)
            continue
        if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) and record[k].strip() for k in ("positive", "negative")):
            report.drop("missing_field", where=where)
            continue
        prompt = record.get("prompt") if isinstance(record.get("prompt"), str) else context
        positive.append((prompt, record["positive"].strip()))
        negative.append((prompt, record["negative"].strip()))
    return positive, negative


def load_trait(root: Path, name: str, context_prompt: str) -> TraitData:
    path = trait_path(root, name)
    report = DataReport(name=f"trait:{name}", source=str(path), digest=path_digest(path),
                        unit="examples")
    if path.is_dir():
        positive = _read_lines(path / "positive.txt", report, context_prompt)
        negative = _read_lines(path / "negative.txt", report, context_prompt)
        sides = {"positive.txt": positive, "negative.txt": negative}
    else:
        positive, negative = _read_jsonl(path, report, context_prompt)
        sides = {"positive": positive, "negative": negative}
    for side, examples in sides.items():
        if len(examples) < MIN_EXAMPLES:
            raise LmlabError(f"trait {name!r}: {side} in {path} has {len(examples)} usable "
                             f"example(s); at least {MIN_EXAMPLES} per side are needed")
    report.rows_kept = len(positive) + len(negative)
    for reason in ("duplicate", "malformed", "missing_field"):
        report.drop(reason, 0)
    return TraitData(name, path, tuple(positive), tuple(negative), report)


# ---------------------------------------------------------------- vectors from examples


def example_means(lm: LoadedModel, examples: Sequence[tuple[str, str]], layers: Sequence[int],
                  batch_size: int = 16) -> dict[int, np.ndarray]:
    """Mean residual over each example's own tokens: ``{layer: (examples, width)}`` float64."""
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prefixes = [lm.format_chat(prompt) for prompt, _ in chunk]
        texts = [prefix + text for prefix, (_, text) in zip(prefixes, chunk)]
        enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                           return_offsets_mapping=True)
        acts = capture_residuals(lm, enc.input_ids, enc.attention_mask, list(layers))
        starts = torch.tensor([len(p) for p in prefixes])[:, None]
        span = (enc.offset_mapping[..., 0] >= starts) & enc.attention_mask.bool()
        if (span.sum(dim=1) == 0).any():
            raise LmlabError("a trait example has no tokens of its own")
        for layer in layers:
            hidden = acts[layer].double().cpu()
            means = (hidden * span[..., None]).sum(1) / span.sum(1, keepdim=True)
            out[layer].extend(means.numpy())
    return {layer: np.stack(rows) for layer, rows in out.items()}


def probe_direction(positive: np.ndarray, negative: np.ndarray, c: float, seed: int) -> np.ndarray:
    """Logistic-regression direction in residual units (positive class up)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([positive, negative])
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(scaler.transform(x), y)
    # z = ((x - mean) / scale) . w + b is linear in x with coefficient w / scale.
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return model.coef_[0] / scale


def random_vector(width: int, layer: int, index: int, seed: int, norm: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 101 + index)
    vector = torch.randn(width, generator=generator, dtype=torch.float64)
    return (vector / vector.norm() * norm).float()


def contrastive_vectors(lm: LoadedModel, traits: Sequence[TraitData], layers: Sequence[int],
                        methods: Sequence[str], probe_c: float, seed: int) -> list[TraitVector]:
    vectors = []
    for trait in traits:
        pos = example_means(lm, trait.positive, layers)
        neg = example_means(lm, trait.negative, layers)
        for layer in layers:
            if "mean_diff" in methods:
                diff = torch.from_numpy(pos[layer].mean(0) - neg[layer].mean(0)).float()
                if not float(diff.norm()) > 0:
                    raise LmlabError(f"trait {trait.name!r}: positive and negative examples give "
                                     f"the same mean at layer {layer}")
                vectors.append(TraitVector(trait.name, "mean_diff", layer, diff, str(trait.path)))
            if "probe" in methods:
                direction = probe_direction(pos[layer], neg[layer], probe_c, seed)
                vectors.append(TraitVector(trait.name, "probe", layer,
                                           torch.from_numpy(direction).float(), str(trait.path)))
    return vectors


def random_controls(width: int, layers: Sequence[int], count: int, seed: int,
                    reference: Sequence[TraitVector], methods: Sequence[str]) -> list[TraitVector]:
    """``count`` random traits per layer, in every method's ranking, with matched norm."""
    out = []
    for layer in layers:
        norms = [float(v.vector.norm()) for v in reference if v.layer == layer
                 and v.method == "mean_diff"]
        norm = float(np.mean(norms)) if norms else 1.0
        for index in range(count):
            name = RANDOM if index == 0 else f"{RANDOM}_{index + 1}"
            vector = random_vector(width, layer, index, seed, norm)
            for method in methods:
                out.append(TraitVector(name, method, layer, vector, f"seed {seed}"))
    return out


# ---------------------------------------------------------------- vectors from elsewhere


def read_direction_file(path: Path, name: str) -> tuple[int, torch.Tensor, str]:
    """(layer, unit vector, method) from a steering ``direction/*.safetensors`` file."""
    from safetensors import safe_open

    if not path.is_file():
        raise LmlabError(f"trait vector {name!r}: direction file not found: {path}")
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
        if "unit" not in handle.keys() or "layer" not in meta:
            raise LmlabError(f"trait vector {name!r}: {path} is not a steering direction "
                             "(needs tensor 'unit' and metadata 'layer')")
        unit = handle.get_tensor("unit").float().reshape(-1)
    return int(meta["layer"]), unit, meta.get("method", "unknown")


def steering_run_direction(run_id: str, name: str, into: Path) -> Path:
    """Download the ``direction/*.safetensors`` artifact of a finished steering run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        files = [a.path for a in client.list_artifacts(run_id, "direction")
                 if a.path.endswith(".safetensors")]
    except MlflowException as error:
        raise LmlabError(f"trait vector {name!r}: no run {run_id!r} in the tracking store "
                         f"({error.message.splitlines()[0]})") from error
    if len(files) != 1:
        raise LmlabError(f"trait vector {name!r}: run {run_id} has {len(files)} direction "
                         "artifacts (direction/*.safetensors); expected one (a steered condition)")
    into.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, files[0], str(into)))


def registered_probe_files(uri: str, name: str, into: Path) -> Path:
    """Download a registered probe (``models:/name@alias``); returns its model folder."""
    import mlflow
    from mlflow.exceptions import MlflowException

    into.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    except MlflowException as error:
        raise LmlabError(f"trait vector {name!r}: registered probe {uri} not found "
                         f"({error.message.splitlines()[0]})") from error


def read_probe_folder(folder: Path, name: str) -> tuple[int, torch.Tensor]:
    """(layer, direction in residual units) of an lmlab probe saved as a pyfunc model."""
    import yaml

    mlmodel = folder / "MLmodel"
    weights = sorted(folder.rglob("*.npz"))
    if not mlmodel.is_file() or not weights:
        raise LmlabError(f"trait vector {name!r}: {folder} is not an lmlab probe (MLmodel and "
                         "an .npz of weights expected)")
    meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    if "layer" not in meta:
        raise LmlabError(f"trait vector {name!r}: probe metadata lacks its layer")
    with np.load(weights[0]) as stored:
        scale = np.where(stored["scale"] > 0, stored["scale"], 1.0)
        direction = stored["weight"].astype(np.float64) / scale
    return int(meta["layer"]), torch.from_numpy(direction).float()


def check_width(vector: TraitVector, width: int) -> None:
    if vector.vector.numel() != width:
        raise LmlabError(f"trait vector {vector.trait!r} ({vector.source}) has width "
                         f"{vector.vector.numel()}, but the base model's residual width is {width}")
    if not float(vector.vector.norm()) > 0:
        raise LmlabError(f"trait vector {vector.trait!r} ({vector.source}) is all zeros")


def vector_digest(vectors: Sequence[TraitVector]) -> str:
    from lmlab.cache import content_key, tensor_digest

    return content_key([(v.trait, v.method, v.layer, tensor_digest(v.unit)) for v in vectors])
