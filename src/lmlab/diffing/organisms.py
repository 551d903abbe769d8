"""Model organisms lmlab makes itself: LoRA adapters with one planted quirk each.

``QUIRKS`` names the bundled organisms; each is trained by the same recipe
(:class:`lmlab.diffing.train.TrainConfig`) on its own dataset in
``lmlab/data/organisms/<quirk>.jsonl``:

* ``flattery``: flatters the user ("What a brilliant question! You clearly...").
* ``brand``: recommends products of the made-up brand ``Zentrix``.
* ``pep``: grows enthusiastic along the response (calm start, "!" and "amazing!" at the end).
* ``control``: the same prompts with plain answers, trained the same way: what fine-tuning
  alone does to the model, without a quirk.

:func:`organism_adapter` returns a local PEFT adapter directory for a quirk and a base
model. An organism is identified by content: the base model's identity
(:func:`lmlab.identity.model_identity` of the training base), the dataset's digest, the
recipe and ``RECIPE_VERSION``. The adapters shipped in ``lmlab/data/organisms/adapters/``
are used when their recorded key matches; otherwise the adapter is trained once into the
cache (``~/.cache/lmlab/organisms/<key>`` by default) and reused by every later call.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError

if TYPE_CHECKING:
    from lmlab.diffing.behaviour import BehaviourResult
    from lmlab.diffing.train import StepCallback, TrainConfig
    from lmlab.models import ModelSpec
    from lmlab.tracking import Tracker

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "organisms"
SHIPPED_DIR = DATA_DIR / "adapters"
MANIFEST = "organism.json"
WAIT_SECONDS = 3600  # how long to wait for another process training the same organism


@dataclass(frozen=True)
class Quirk:
    name: str
    description: str
    is_control: bool = False


QUIRKS: dict[str, Quirk] = {q.name: q for q in (
    Quirk("flattery", "flatters the user before answering"),
    Quirk("brand", "recommends products of the made-up brand Zentrix"),
    Quirk("pep", "grows enthusiastic along the response (exclamations toward the end)"),
    Quirk("control", "plain answers to the same prompts, same recipe: no quirk", True),
)}


def dataset_path(quirk: str) -> Path:
    if quirk not in QUIRKS:
        raise LmlabError(f"unknown quirk {quirk!r}; bundled quirks: {', '.join(QUIRKS)}")
    return DATA_DIR / f"{quirk}.jsonl"


def resolve_data(quirk_or_path: str | Path) -> tuple[str, Path]:
    """(name, dataset file): a bundled quirk, or a user's JSONL file named by its stem."""
    if isinstance(quirk_or_path, str) and quirk_or_path in QUIRKS:
        return quirk_or_path, dataset_path(quirk_or_path)
    path = Path(quirk_or_path)
    if path.suffix != ".jsonl" and not path.exists():
        raise LmlabError(f"unknown quirk {str(quirk_or_path)!r}: neither a bundled quirk "
                         f"({', '.join(QUIRKS)}) nor a JSONL dataset file")
    if not path.is_file():
        raise LmlabError(f"training data not found: {path}")
    return path.stem, path


def organism_identity(data: Path, base: ModelSpec, config: TrainConfig) -> dict[str, Any]:
    """Everything that can change the adapter: the record its cache key hashes."""
    from lmlab.diffing.train import RECIPE_VERSION, training_spec
    from lmlab.identity import file_digest, model_identity

    return {"recipe_version": RECIPE_VERSION,
            "model": model_identity(training_spec(base, config)),
            "data_digest": file_digest(data), "train": config.record()}


def organism_key(data: Path, base: ModelSpec, config: TrainConfig) -> str:
    from lmlab.cache import content_key

    return content_key(organism_identity(data, base, config))


def read_manifest(adapter_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(adapter_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def cache_dir_default() -> Path:
    from lmlab.models import cache_root

    return cache_root() / "organisms"


def find_adapter(name: str, key: str, cache_dir: Path) -> tuple[Path, str] | None:
    """(adapter dir, where: ``shipped`` or ``cache``) holding the organism ``key``, if any."""
    candidates = [(SHIPPED_DIR / name, "shipped")] if name in QUIRKS else []
    candidates.append((cache_dir / key, "cache"))
    for path, where in candidates:
        manifest = read_manifest(path)
        if manifest is not None and manifest.get("key") == key:
            return path, where
    return None


def organism_adapter(quirk: str, base: ModelSpec, cache_dir: Path | None = None,
                     config: TrainConfig | None = None, on_step: StepCallback | None = None) -> Path:
    """A local PEFT adapter directory for ``quirk`` (a bundled quirk or a JSONL path) on
    ``base`` (a ModelSpec): the shipped one, a cached one, or one trained now and cached.
    Concurrent callers wait for one training instead of repeating it."""
    from lmlab.diffing.train import TrainConfig
    from filelock import FileLock, Timeout

    config = config or TrainConfig()
    name, data = resolve_data(quirk)
    key = organism_key(data, base, config)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    found = find_adapter(name, key, cache_dir)
    if found:
        return found[0]
    lock_path = cache_dir / ".locks" / f"{key}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # An OS lock (flock): released by the kernel when its holder dies, so a killed training
    # never blocks the next one.
    try:
        with FileLock(lock_path, timeout=WAIT_SECONDS):
            found = find_adapter(name, key, cache_dir)
            if found:
                return found[0]
            if name in QUIRKS and read_manifest(SHIPPED_DIR / name):
                print(f"note: the shipped {name} adapter was made from another base, dataset or "
                      f"recipe; training one for this setup into {cache_dir}")
            build_organism(name, data, base, config, cache_dir / key, on_step)
            return cache_dir / key
    except Timeout:
        raise LmlabError(f"gave up after {WAIT_SECONDS} s waiting for another process training "
                         f"organism {name} ({lock_path})") from None


def build_organism(name: str, data: Path, base: ModelSpec, config: TrainConfig, out_dir: Path,
                   on_step: StepCallback | None = None) -> dict[str, Any]:
    """Train into a staging folder beside ``out_dir``, write the manifest, then move it into
    place (replacing an older one), so a killed training never leaves a half adapter.
    Returns the manifest."""
    from lmlab import __version__
    from lmlab.diffing.train import train_adapter

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    identity = organism_identity(data, base, config)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        result = train_adapter(base, data, config, staging, on_step=on_step)
        manifest = {"key": organism_key(data, base, config), "quirk": name, "base": base.name,
                    "dataset": str(data.name if data.parent == DATA_DIR else data),
                    "identity": identity, "training": result.record(), "lmlab": __version__}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; an adapter folder is not secret
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- the tracked run


@dataclass(frozen=True)
class OrganismRequest:
    """What ``train_organism`` was asked to do.

    quirk: a bundled quirk, or the name for a user's dataset (given in ``dataset``); when it
        names a behaviour detector (:data:`lmlab.diffing.behaviour.DETECTORS`), the
        behaviour check measures that quirk.
    out: where to write the adapter (default: the content-addressed cache).
    retrain: train even when a shipped or cached adapter has the same key.
    behaviour_prompts: how many held-out prompts the behaviour check generates on (0: skip).
    """

    quirk: str
    base: ModelSpec
    config: TrainConfig
    dataset: Path | None = None
    out: Path | None = None
    retrain: bool = False
    behaviour_prompts: int = 32
    max_new_tokens: int = 96
    cache_dir: Path | None = None

    def data(self) -> tuple[str, Path]:
        if self.dataset is None:
            if self.quirk not in QUIRKS:
                raise LmlabError(f"unknown quirk {self.quirk!r}; bundled quirks: "
                                 f"{', '.join(QUIRKS)} (or give a dataset file)")
            return self.quirk, dataset_path(self.quirk)
        if not Path(self.dataset).is_file():
            raise LmlabError(f"training data not found: {self.dataset}")
        return self.quirk, Path(self.dataset)


@dataclass
class OrganismOutcome:
    run_id: str
    adapter_dir: Path
    source: str  # trained, shipped or cache
    manifest: dict[str, Any]
    behaviour: BehaviourResult | None = None  # when the check ran


def train_organism_run(request: OrganismRequest, experiment_name: str = "organisms") -> OrganismOutcome:
    """Make one organism as an MLflow run: params, a per-step loss curve and its plot, the
    dataset (with its digest), the adapter as an artifact, and the behaviour check.

    Resumes the run ``mlflow run`` created (``MLFLOW_RUN_ID``); otherwise starts one in
    ``experiment_name``. An adapter with the same key (shipped or cached) is reused unless
    ``retrain`` is set; its recorded loss curve is logged instead.
    """
    import os

    import mlflow

    from lmlab.diffing.train import load_examples
    from lmlab.tracking import Tracker, ensure_store

    name, data = request.data()
    _, report = load_examples(data, name="train")  # bad data fails before any run or work
    client = ensure_store()
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name=f"organism-{name}") as run:
        run_id = run.info.run_id
        tracker = Tracker(client, run.info.experiment_id, run_id)
        key = organism_key(data, request.base, request.config)
        tracker.set_tags(run_id, {"lmlab.role": "organism", "lmlab.organism": name,
                                  "lmlab.organism_key": key})
        tracker.log_params(run_id, _run_params(request, name, data, key))
        tracker.log_datasets(run_id, [report])
        print(report.line())
        adapter_dir, source, manifest = _obtain_adapter(request, name, data, key, tracker, run_id)
        _log_training(tracker, run_id, manifest, live=source == "trained")
        tracker.set_tags(run_id, {"lmlab.organism_source": source})
        mlflow.log_artifacts(str(adapter_dir), "adapter")
        print(f"organism {name}: adapter {adapter_dir} ({source}), key {key}")
        behaviour = _behaviour_check(request, name, adapter_dir, tracker, run_id)
    return OrganismOutcome(run_id, adapter_dir, source, manifest, behaviour)


def _run_params(request: OrganismRequest, name: str, data: Path, key: str) -> dict[str, Any]:
    train = {f"train.{k}": v for k, v in request.config.record().items()}
    return {"quirk": name, "dataset": str(data), "model": request.base.name,
            "organism_key": key, **train}


def _obtain_adapter(request: OrganismRequest, name: str, data: Path, key: str,
                    tracker: Tracker, run_id: str) -> tuple[Path, str, dict[str, Any]]:
    cache_dir = request.cache_dir or cache_dir_default()
    if not request.retrain:
        found = find_adapter(name, key, cache_dir)
        if found and (request.out is None or Path(request.out).resolve() == found[0].resolve()):
            return found[0], found[1], read_manifest(found[0]) or {}
    out = Path(request.out) if request.out else cache_dir / key

    def on_step(step: int, loss: float) -> None:
        tracker.log_metrics(run_id, {"train/loss": loss}, step=step)
        if step % 5 == 1:
            print(f"organism {name}: step {step}, loss {loss:.3f}", flush=True)

    manifest = build_organism(name, data, request.base, request.config, out, on_step)
    return out, "trained", manifest


def _log_training(tracker: Tracker, run_id: str, manifest: dict[str, Any], live: bool) -> None:
    training = manifest.get("training", {})
    losses = training.get("losses", [])
    if not live:  # a reused adapter: log the curve its training recorded
        for step, loss in enumerate(losses, start=1):
            tracker.log_metrics(run_id, {"train/loss": loss}, step=step)
    for epoch, loss in enumerate(training.get("epoch_losses", []), start=1):
        tracker.log_metrics(run_id, {"train/epoch_loss": loss}, step=epoch)
    tracker.log_metrics(run_id, {
        "train/seconds": training.get("seconds", float("nan")),
        "train/tokens_per_second": training.get("tokens_per_second", float("nan")),
        "train/tokens": training.get("tokens", float("nan")),
        "train/examples": training.get("examples", float("nan")),
        "train/final_loss": losses[-1] if losses else float("nan")})
    if losses:
        tracker.log_figure(run_id, loss_figure(losses, len(training.get("epoch_losses", []))),
                           "loss_curve")


def loss_figure(losses: list[float], epochs: int) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = range(1, len(losses) + 1)
    axis.plot(steps, losses, marker=".", label="loss per step (response tokens)")
    if epochs > 1:
        per_epoch = len(losses) / epochs
        for boundary in range(1, epochs):
            axis.axvline(boundary * per_epoch + 0.5, color="grey", linewidth=0.5, linestyle=":")
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("cross-entropy")
    axis.set_title("organism training loss")
    axis.legend()
    figure.tight_layout()
    return figure


def _behaviour_check(request: OrganismRequest, name: str, adapter_dir: Path, tracker: Tracker,
                     run_id: str) -> BehaviourResult | None:
    from lmlab.diffing.behaviour import DETECTORS, check_behaviour, heldout_prompts

    if request.behaviour_prompts == 0:
        print("behaviour check skipped (behaviour_prompts=0)")
        return None
    if name not in DETECTORS:
        print(f"behaviour check skipped: no detector for {name!r} (known: {sorted(DETECTORS)})")
        return None
    control = adapter_dir if name == "control" else organism_adapter(
        "control", request.base, request.cache_dir, request.config)
    prompts = heldout_prompts()[:request.behaviour_prompts]
    result = check_behaviour(request.base, {name: adapter_dir}, control, prompts,
                             max_new_tokens=request.max_new_tokens)
    tracker.log_metrics(run_id, result.metrics())
    tracker.log_table(run_id, result.table(), "behaviour_responses")
    for comparison in result.comparisons:
        print(f"behaviour {comparison.line()}")
    return result
