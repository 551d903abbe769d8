"""Real servers for the ``services`` tests: PostgreSQL and an MLflow tracking server.

``scripts/ci_services.sh`` starts them on 127.0.0.1 (idempotent) and writes their URLs to
``$LMLAB_SERVICES_DIR/services.env``. These tests run only when selected (``-m services``
or ``LMLAB_REQUIRE_SERVICES=1``). They skip, with the reason, only where PostgreSQL is not
installed; with ``LMLAB_REQUIRE_SERVICES=1`` (CI) that is a failure instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from scale_helpers import ROOT, Services, TrackingServer

SERVICES_DIR = Path(os.environ.get("LMLAB_SERVICES_DIR", "/tmp/lmlab-services"))
REQUIRED = os.environ.get("LMLAB_REQUIRE_SERVICES") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.services)


def _selected(config: pytest.Config) -> bool:
    expression = config.getoption("markexpr") or ""
    return REQUIRED or ("services" in expression and "not services" not in expression)


def _unavailable() -> str | None:
    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")) and shutil.which("apt-get") is None:
        return "PostgreSQL is not installed (apt-get install -y postgresql)"
    if os.geteuid() != 0 and not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        return "PostgreSQL is not installed and installing it needs root"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'lmlab[scale]')"
    return None


@pytest.fixture(scope="session")
def services(request: pytest.FixtureRequest) -> Services:
    if not _selected(request.config):
        pytest.skip("services tests run with -m services (they start PostgreSQL and mlflow server)")
    reason = _unavailable()
    if reason:
        if REQUIRED:
            pytest.fail(f"LMLAB_REQUIRE_SERVICES=1 but {reason}")
        pytest.skip(reason)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "ci_services.sh")], capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"scripts/ci_services.sh failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    values = dict(line.split("=", 1) for line in
                  (SERVICES_DIR / "services.env").read_text().splitlines() if "=" in line)
    found = Services(values["LMLAB_PG_URL"], values["LMLAB_MLFLOW_URL"], values["LMLAB_MLFLOW_BACKEND"],
                     Path(values["LMLAB_ARTIFACTS_DIR"]))
    os.environ["PGPASSWORD"] = found.password  # what a user puts in PGPASSWORD or ~/.pgpass
    return found


@pytest.fixture
def own_server(services: Services, tmp_path: Path) -> Iterator[TrackingServer]:
    backend = services.new_database("lmlab_mlflow")
    server = TrackingServer(backend, tmp_path / "artifacts", tmp_path / "mlflow-server.log",
                            {**os.environ, "PGPASSWORD": services.password})
    server.start()
    try:
        yield server
    finally:
        server.stop()
