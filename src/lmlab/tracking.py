"""Thin layer over MLflow: the tracking store, child runs, condition keys, dead runs.

Child runs are created with an explicit parent (the active-run stack is per thread)
in the parent's experiment, so the UI nests them. Params and metrics go in one
``log_batch`` call each to keep tracking overhead small.

A child run may show only some of its metrics as MLflow metrics (the runs table's columns);
then all of them are in its ``condition_metrics`` table, tag ``lmlab.metrics_table`` names
it, and :func:`run_metrics` reads every metric of a run back, whichever way it was logged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lmlab.errors import LmlabError
from lmlab.stats import CI_HI, CI_LO, N, P, current_names

PARENT_TAG = "mlflow.parentRunId"
KEY_TAG = "condition_key"
FAMILY_TAG = "lmlab.family"
FAILURE_TAG = "lmlab.failure_reason"
PID_TAG = "lmlab.pid"
HOST_TAG = "lmlab.host"
OUTPUT_DIGESTS_TAG = "lmlab.output_digests"
#: On a run that logged only some of its metrics: the artifact holding all of them.
METRICS_TAG = "lmlab.metrics_table"
METRICS_TABLE = "condition_metrics"
#: The condition_metrics table's columns beside ``value``: in the row of metric ``m``,
#: column ``c`` holds metric ``m_c`` (``harm_test/refusal`` and ``harm_test/refusal_ci_lo``).
TABLE_PARTS = {suffix[1:]: suffix for suffix in (CI_LO, CI_HI, N, P)}


def canonical_value(value: Any) -> Any:
    """One spelling per value so keys and params never differ by '4' vs '4.0'."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 1e15 else round(value, 10)
    if isinstance(value, (list, tuple)):
        return [canonical_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): canonical_value(v) for k, v in sorted(value.items())}
    return str(value)


def condition_key(params: Mapping[str, Any]) -> str:
    """Hash of a condition's canonical params: its identity across runs and sweeps."""
    payload = json.dumps(canonical_value(dict(params)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def param_strings(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for name, value in params.items():
        value = canonical_value(value)
        out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def store_dir() -> Path:
    """This worker's local directory for the Optuna journal, claims and caches: beside a
    local tracking store, else ``./.lmlab``; ``LMLAB_STORE_DIR`` overrides it."""
    uri = mlflow.get_tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        base = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent
    elif parsed.scheme in ("", "file"):
        base = Path(parsed.path or uri).expanduser().resolve().parent
    else:
        base = Path.cwd()
    return Path(os.environ.get("LMLAB_STORE_DIR", base / ".lmlab"))


def cache_dir(store: Path) -> Path:
    """Content-addressed caches: local to the worker (``<store>/cache``) unless
    ``LMLAB_CACHE_DIR`` points them at a path shared by several workers."""
    return Path(os.environ.get("LMLAB_CACHE_DIR") or store / "cache")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print, tag and log)."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql",
                    "databricks")


def _check_sqlite_path(uri: str) -> None:
    """Fail fast where MLflow would retry for minutes: the file must be creatable and writable."""
    raw = uri[len("sqlite:///"):].split("?", 1)[0]
    path = Path(raw[len("file:"):] if raw.startswith("file:") else raw).expanduser()
    if uri.startswith("sqlite:///:memory:") or not str(path):
        return
    if not path.parent.is_dir():
        raise LmlabError(f"tracking store {uri}: folder {path.parent} does not exist")
    existed = path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.close(fd)
    except OSError as error:
        raise LmlabError(f"tracking store {uri} cannot be opened for writing: "
                         f"{error.strerror or error}") from error
    if not existed and path.stat().st_size == 0:
        path.unlink()  # leave the creation of the database to MLflow


def ensure_store() -> MlflowClient:
    """Check the tracking store up front, then create its schema once, in this process,
    before anything fans out. Store problems are one LmlabError line."""
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    if scheme not in TRACKING_SCHEMES:
        raise LmlabError(f"tracking URI {mask_url(uri)!r} is not supported: use a sqlite:///path, "
                         "an http(s)://server, a postgresql:// database or a local folder")
    if scheme == "sqlite":
        _check_sqlite_path(uri)
    if scheme in ("http", "https"):
        _check_server(uri)
    try:
        client = MlflowClient()
        client.search_experiments(max_results=1)
    except (MlflowException, OSError) as error:
        raise LmlabError(f"tracking store {mask_url(uri)} cannot be used: {first_line(error)}") from error
    except Exception as error:  # SQLAlchemy and driver errors from a database store
        if type(error).__module__.split(".")[0] not in ("sqlalchemy", "psycopg2", "pymysql"):
            raise
        raise LmlabError(f"tracking store {mask_url(uri)} cannot be used: {first_line(error)}") from error
    return client


def _check_server(uri: str, timeout_s: float = 10.0) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as reply:
            reply.read()
    except (urllib.error.URLError, OSError) as error:
        raise LmlabError(f"tracking server {mask_url(uri)} is not reachable: "
                         f"{getattr(error, 'reason', error)}") from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:400] if text else type(error).__name__


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def host_name() -> str:
    """This worker's host as other workers see it. ``LMLAB_WORKER_HOST`` overrides the
    hostname where it does not tell machines apart (containers sharing one name)."""
    return os.environ.get("LMLAB_WORKER_HOST") or socket.gethostname()


def owner_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: host_name()}


def owner_is_dead(tags: Mapping[str, str]) -> bool:
    """True when the run's process was on this host and no longer exists."""
    if tags.get(HOST_TAG) != host_name() or PID_TAG not in tags:
        return False
    return not _process_alive(int(tags[PID_TAG]))


def close_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark RUNNING runs whose process died as FAILED; return their ids."""
    closed = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=5000)
    for run in runs:
        if owner_is_dead(run.data.tags):
            client.set_tag(run.info.run_id, FAILURE_TAG, "process died before the run ended")
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    return closed


def _covers(logged: str | None, wanted: Any) -> bool:
    """True when a logged list param holds every requested value (or equals a scalar)."""
    if logged is None:
        return False
    try:
        have = json.loads(logged)
    except ValueError:
        have = logged
    if isinstance(wanted, (list, tuple)):
        return isinstance(have, list) and set(map(str, wanted)) <= set(map(str, have))
    return have == canonical_value(wanted)


def _same_digests(logged: str | None, wanted: Mapping[str, str]) -> bool:
    try:
        have = json.loads(logged) if logged else {}
    except ValueError:
        return False
    return all(have.get(name) == digest for name, digest in wanted.items())


def finished_condition(client: MlflowClient, experiment_id: str, key: str,
                       outputs: Mapping[str, Any] | None = None,
                       output_digests: Mapping[str, str] | None = None):  # -> Run | None
    """Newest FINISHED run of ``key``; with ``outputs``, one whose output params cover them,
    and with ``output_digests``, one whose outputs were computed on those inputs."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{KEY_TAG} = '{key}' and attributes.status = 'FINISHED'",
        max_results=50, order_by=["attributes.end_time DESC"],
    )
    for run in runs:
        if not all(_covers(run.data.params.get(name), value) for name, value in (outputs or {}).items()):
            continue
        if output_digests and not _same_digests(run.data.tags.get(OUTPUT_DIGESTS_TAG), output_digests):
            continue
        return run
    return None


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def metrics_table(metrics: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per metric: ``metric``, ``value`` and the ``TABLE_PARTS`` named after it
    (its interval, units, p-value); a part whose metric is not there has a row of its own."""
    rows: dict[str, dict[str, Any]] = {}
    for name, value in metrics.items():
        base, column = name, "value"
        for part, suffix in TABLE_PARTS.items():
            if name.endswith(suffix) and name[:-len(suffix)] in metrics:
                base, column = name[:-len(suffix)], part
                break
        rows.setdefault(base, {"metric": base})[column] = value
    return list(rows.values())


def metrics_from_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The metrics :func:`metrics_table` laid out (empty cells are no metric)."""
    out: dict[str, float] = {}
    for row in rows:
        for column, suffix in (("value", ""), *TABLE_PARTS.items()):
            cell = row.get(column)
            if cell not in (None, "") and not (isinstance(cell, float) and math.isnan(cell)):
                out[str(row["metric"]) + suffix] = float(cell)
    return out


def run_metrics(client: MlflowClient, run: Any) -> dict[str, float]:
    """Every metric of a run, under the current names: its ``condition_metrics`` table when
    the run logged only some as MLflow metrics (tag ``lmlab.metrics_table``), else its
    MLflow metrics; intervals of runs from before ``_ci_lo`` / ``_ci_hi`` are renamed."""
    metrics = dict(run.data.metrics)
    table = run.data.tags.get(METRICS_TAG)
    if table:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(run.info.run_id, table, tmp)
                with open(path, newline="") as handle:
                    metrics.update(metrics_from_table(list(csv.DictReader(handle))))
        except (mlflow.exceptions.MlflowException, OSError, csv.Error, KeyError,
                ValueError) as error:  # the store's errors, a deleted or unreadable file
            raise LmlabError(f"run {run.info.run_id} keeps its metrics in {table}, which cannot "
                             f"be read ({first_line(error)}); delete the run to compute its "
                             "condition again") from error
    return current_names(metrics)


class Tracker:
    """Logging for one sweep: the parent run and its children, all through one client."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.seconds = 0.0  # time spent inside tracking calls, for the overhead benchmark

    def _timed(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def start_child(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        all_tags = {PARENT_TAG: self.parent_run_id, **owner_tags(), **tags}
        run = self._timed(self.client.create_run, self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in param_strings(params).items()]
        for start in range(0, len(items), 100):
            self._timed(self.client.log_batch, run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
        for start in range(0, len(items), 1000):
            self._timed(self.client.log_batch, run_id, metrics=items[start:start + 1000])

    def log_shown_metrics(self, run_id: str, metrics: Mapping[str, float],
                          shown: Mapping[str, float]) -> None:
        """Log ``shown`` as the run's MLflow metrics; when that leaves some of ``metrics``
        out, every metric goes to the run's ``condition_metrics`` table, then the tag
        that names it (:func:`run_metrics` reads them back)."""
        metrics, shown = finite_metrics(metrics), finite_metrics(shown)
        self.log_metrics(run_id, shown)
        if set(metrics) <= set(shown):
            return
        self.log_table(run_id, pd.DataFrame(metrics_table(metrics),
                                            columns=["metric", "value", *TABLE_PARTS]),
                       METRICS_TABLE)
        self.set_tags(run_id, {METRICS_TAG: f"{METRICS_TABLE}.csv"})

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            self._timed(self.client.log_batch, run_id, tags=items)

    def log_table(self, run_id: str, frame: Any, name: str) -> None:
        """A table as CSV (for pandas users) and as an MLflow table (for the UI)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.csv"
            frame.to_csv(path, index=False)
            self._timed(self.client.log_artifact, run_id, str(path))
        self._timed(self.client.log_table, run_id, data=frame, artifact_file=f"tables/{name}.json")

    def log_figure(self, run_id: str, figure: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        self._timed(self.client.log_figure, run_id, figure, f"plots/{name}.png")
        plt.close(figure)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self._timed(self.client.log_artifact, run_id, str(path), artifact_path)

    def log_datasets(self, run_id: str, reports: Sequence[Any]) -> None:
        """Each input as an MLflow dataset (name, digest, source, rows read/kept/dropped),
        so the runs table's Datasets column shows exactly what the run read."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(
            Dataset(name=r.name, digest=r.digest, source_type="local",
                    source=json.dumps({"uri": r.source}), profile=json.dumps(r.profile())),
            tags=[InputTag("mlflow.data.context", r.name)]) for r in reports]
        if not inputs:
            return
        for attempt in range(3):
            try:
                self._timed(self.client.log_inputs, run_id, datasets=inputs)
                return
            except mlflow.exceptions.MlflowException:
                # Two workers creating the same dataset row at once: one insert loses the
                # unique-constraint race; the row exists now, so linking it again succeeds.
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self._timed(self.client.log_text, run_id, text, name)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._timed(self.client.set_terminated, run_id, status)

    def fail(self, run_id: str, reason: str, status: str = "FAILED") -> None:
        self.client.set_tag(run_id, FAILURE_TAG, reason[:4000])
        self.client.set_terminated(run_id, status)
