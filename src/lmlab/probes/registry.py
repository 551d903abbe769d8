"""Probes as MLflow pyfunc models, logged on their child runs and registered by alias.

Registered name: ``probe-<label>-<model>``; each version carries tags ``layer``, ``lag``,
``label`` and ``val_pr_auc``; the alias ``champion`` points at the best val PR-AUC.
Reload one with ``mlflow.pyfunc.load_model("models:/probe-backtracking-smollm2-135m@champion")``
and call ``.predict(activations)`` on (rows, width) float32 residuals of its layer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from lmlab.errors import LmlabError
from lmlab.probes.train import Probe

PYFUNC_FILE = Path(__file__).with_name("pyfunc_probe.py")
CHAMPION = "champion"
#: The signature's names: (rows, width) float32 residuals in, P(label at t + lag) out.
INPUT_NAME = "activations"
OUTPUT_NAME = "probability"


def registered_name(label: str, model_name: str) -> str:
    """``probe-<label>-<model>`` with characters the registry and URIs accept."""
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name.strip("/")).strip("-")
    return f"probe-{label}-{model}"


def artifact_name(layer: int, lag: int) -> str:
    return f"probe_layer{layer}_lag{lag}"


def pip_requirements() -> list[str]:
    return [f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]


def save_probe(probe: Probe, directory: Path, metadata: Mapping[str, Any]) -> Path:
    """Write ``probe`` as a self-contained pyfunc model directory; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{artifact_name(probe.layer, probe.lag)}.npz"
    np.savez(weights, weight=probe.weight.astype(np.float32), bias=np.float32(probe.bias),
             mean=probe.mean.astype(np.float32), scale=probe.scale.astype(np.float32),
             threshold=np.float32(probe.threshold))
    target = directory / artifact_name(probe.layer, probe.lag)
    width = int(probe.weight.shape[0])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, width), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,), OUTPUT_NAME)]))
    info = {"layer": probe.layer, "lag": probe.lag, "label": probe.label,
            "threshold": float(probe.threshold), "C": float(probe.strength), "width": width,
            "standardization": "x -> (x - mean) / scale with train-split mean and scale "
                               "(stored in the probe artifact)",
            "lag_convention": "activation at token t predicts the label at t + lag",
            **metadata}
    mlflow.pyfunc.save_model(path=str(target), python_model=str(PYFUNC_FILE),
                             artifacts={"probe": str(weights)}, signature=signature,
                             input_example=np.zeros((1, width), dtype=np.float32),
                             pip_requirements=pip_requirements(), metadata=info)
    return target


def log_probe(client: MlflowClient, run_id: str, model_dir: Path) -> str:
    """Upload a saved probe onto a run; returns its ``runs:/`` URI."""
    client.log_artifacts(run_id, str(model_dir), artifact_path=model_dir.name)
    return f"runs:/{run_id}/{model_dir.name}"


def register_probe(client: MlflowClient, name: str, source: str, run_id: str,
                   tags: Mapping[str, Any]) -> str:
    """Add a model version for ``source``; returns the version number."""
    try:
        client.create_registered_model(name, description="Linear probes over (layer, lag) "
                                                          "logged by lmlab")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def existing_version(client: MlflowClient, name: str, run_id: str) -> str | None:
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return str(versions[0].version) if versions else None


def load_registered(name: str, alias: str = CHAMPION) -> Any:
    """The pyfunc model under ``models:/name@alias``; LmlabError when it does not exist."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        known = sorted(m.name for m in client.search_registered_models(max_results=200)
                       if m.name.startswith("probe-"))
        raise LmlabError(f"no registered model named {name!r}; registered probes: "
                         f"{known or 'none'}") from error
    try:
        client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        raise LmlabError(f"registered model {name!r} has no alias {alias!r}") from error
    return mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
