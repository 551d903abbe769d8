"""What a sweep leaves for the MLflow UI: the classic runs view, a shared view with the
family's headline columns, and the command that opens the UI without network fetches.

MLflow 3.17's UI opens an experiment in its GenAI layout unless the URL says
``workflowType=machine_learning`` (the "Model training" switch) or the experiment is
tagged ``mlflow.experimentKind=custom_model_development``. A view shared by URL
(``viewStateShareKey=<key>``) is read from the experiment tag
``mlflow.sharedViewState.<key>``: plain JSON holding the runs table's search facets and
``selectedColumns`` (``metrics.`name```, ``params.`name```); the UI does not take
``runsExpanded`` from a shared view, so the parent's children are one click away.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

from mlflow.tracking import MlflowClient

CLASSIC_VIEW = "workflowType=machine_learning"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_KIND = "custom_model_development"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
#: LiteLLM fetches its model price table over the network at import unless this is set;
#: ``mlflow ui`` imports LiteLLM when it is installed and spends its start-up on that fetch.
PRICE_TABLE_ENV = "LITELLM_LOCAL_MODEL_COST_MAP"


def keep_price_table_local() -> None:
    """Make LiteLLM (here and in every process started from here) use its bundled prices."""
    os.environ.setdefault(PRICE_TABLE_ENV, "True")


def column(kind: str, name: str) -> str:
    """A runs-table column key as the UI spells it: ``metrics.`harm_test/refusal```."""
    return f"{kind}.`{name}`"


def share_view(client: MlflowClient, experiment_id: str, metrics: Sequence[str],
               params: Sequence[str] = ()) -> str:
    """Store a runs-table view showing ``params`` and ``metrics`` as columns on the
    experiment; returns its share key (the same columns give the same key)."""
    shown = [*(column("params", p) for p in params), *(column("metrics", m) for m in metrics)]
    state = {"selectedColumns": shown,
             "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
             "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs",
             "datasetsFilter": [], "runsHiddenMode": "SHOW_ALL"}
    text = json.dumps(state, sort_keys=True)
    key = "lmlab-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    client.set_experiment_tag(experiment_id, f"{SHARED_VIEW_TAG}{key}", text)
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_KIND)
    return key


def runs_url(base: str, experiment_id: str, share_key: str | None = None) -> str:
    """The experiment's runs table in the classic view (with a shared view when given)."""
    query = f"viewStateShareKey={share_key}&{CLASSIC_VIEW}" if share_key else CLASSIC_VIEW
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def ui_command(tracking_uri: str, port: int = 5000) -> str:
    """The shell command that opens the UI on a local store without price-table fetches."""
    return f"{PRICE_TABLE_ENV}=True mlflow ui --backend-store-uri {tracking_uri} --port {port}"
