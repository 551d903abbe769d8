"""The MLflow UI as a researcher sees it, in headless Chromium (marker ``browser``).

A store with a finished tiny steering sweep and a tiny probes sweep (built by
``build_store.py`` in its own process), served by ``mlflow server`` on a free loopback
port, opened with Playwright on the distribution's Chromium (``/usr/bin/chromium``, no
browser download). Each test checks what a person would look for and saves a screenshot
under ``LMLAB_UI_ARTIFACTS`` (default ``tests/ui/artifacts``). Waits are for selectors,
never for network idle: the UI keeps polling.

Without Playwright or Chromium the tests skip, unless ``LMLAB_REQUIRE_BROWSER=1`` (as in
``.ci/run``) turns that into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from lmlab.ui import runs_url

pytestmark = pytest.mark.browser

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHROMIUM = os.environ.get("LMLAB_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that reaches out of the machine (Playwright adds --headless).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000
CLASSIC = "workflowType=machine_learning"


def _missing() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _browser_available() -> None:
    reason = _missing()
    if reason and os.environ.get("LMLAB_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("LMLAB_UI_ARTIFACTS", HERE / "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"PYTHONPATH": str(ROOT / "src"), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "HF_HUB_OFFLINE": "1"})
    return env


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("ui-store")
    done = subprocess.run([sys.executable, str(HERE / "build_store.py"), str(folder)], env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, json.loads(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(store: tuple[Path, dict[str, Any]]) -> Iterator[str]:
    folder, _ = store
    port = _free_port()
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="lmlab-chromium-")  # a new, empty --user-data-dir
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1600, "height": 800})
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    yield page
    page.close()


def _close_assistant(page: Any) -> None:
    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.first.click()


def test_each_family_has_its_own_experiment(page: Any, server: str, store, artifacts: Path) -> None:
    _, info = store
    page.goto(f"{server}/#/experiments")
    for family in ("steering", "probes"):
        page.get_by_role("link", name=family, exact=True).wait_for(timeout=WAIT_MS)
    page.screenshot(path=str(artifacts / "experiments.png"))
    assert info["steering"]["experiment_id"] != info["probes"]["experiment_id"]


def test_the_sweep_url_shows_the_parent_by_name_with_its_children_and_headline(
        page: Any, server: str, store, artifacts: Path) -> None:
    _, info = store
    steering = info["steering"]
    page.goto(runs_url(server, steering["experiment_id"], steering["view_key"]))
    parent = page.get_by_role("link", name=steering["run_name"], exact=True)
    parent.wait_for(timeout=WAIT_MS)
    _close_assistant(page)
    # The classic view, with the family's headline as a column.
    page.locator('[role=columnheader][col-id="metrics.`headline/refusal_gain_vs_random`"]').wait_for(
        timeout=WAIT_MS)
    assert page.get_by_text("baseline [harm_test+benign]").count() == 0  # nested, collapsed
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
    for child in ("baseline [harm_test+benign]",
                  "suffix_contrast add L1 add_norm_multiple=0.5 [harm_test+benign]"):
        page.get_by_role("link", name=child, exact=True).wait_for(timeout=WAIT_MS)
    page.screenshot(path=str(artifacts / "runs_table.png"))


def test_a_parent_plot_renders(page: Any, server: str, store, artifacts: Path) -> None:
    _, info = store
    steering = info["steering"]
    page.goto(f"{server}/#/experiments/{steering['experiment_id']}/runs/"
              f"{steering['parent_run_id']}/artifacts?{CLASSIC}")
    page.get_by_text("plots", exact=True).first.wait_for(timeout=WAIT_MS)
    _close_assistant(page)
    page.get_by_text("plots", exact=True).first.click()
    page.get_by_text("refusal_vs_strength.png", exact=True).first.click()
    page.get_by_text("plots/refusal_vs_strength.png", exact=True).wait_for(timeout=WAIT_MS)
    page.wait_for_function("() => [...document.images].some(i => i.src.startsWith('blob:')"
                           " && i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
    widths = page.evaluate("() => [...document.images].filter(i => i.src.startsWith('blob:'))"
                           ".map(i => i.naturalWidth)")
    assert widths and max(widths) > 100
    page.screenshot(path=str(artifacts / "plot.png"))


def test_a_childs_every_metric_shows_as_a_table_in_its_artifacts(
        page: Any, server: str, store, artifacts: Path) -> None:
    from mlflow.tracking import MlflowClient

    folder, info = store
    steering = info["steering"]
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    child = client.search_runs([steering["experiment_id"]],
                               f"tags.`mlflow.parentRunId` = '{steering['parent_run_id']}' "
                               "and params.method = 'suffix_contrast'")[0]
    page.goto(f"{server}/#/experiments/{steering['experiment_id']}/runs/{child.info.run_id}"
              f"/artifacts?{CLASSIC}")
    page.get_by_text("condition_metrics.csv", exact=True).first.wait_for(timeout=WAIT_MS)
    _close_assistant(page)
    page.get_by_text("condition_metrics.csv", exact=True).first.click()
    # The CSV preview: one row per metric, its interval beside it.
    page.get_by_text("harm_test/refusal_phrase", exact=True).wait_for(timeout=WAIT_MS)
    for header in ("metric", "value", "ci_lo", "ci_hi"):
        page.get_by_text(header, exact=True).first.wait_for(timeout=WAIT_MS)
    page.screenshot(path=str(artifacts / "condition_metrics.png"))


def test_the_models_page_shows_the_probe_with_its_champion_alias(
        page: Any, server: str, artifacts: Path) -> None:
    name = "probe-backtracking-tiny-llama"
    page.goto(f"{server}/#/models")
    page.get_by_role("link", name=name, exact=True).wait_for(timeout=WAIT_MS)
    page.goto(f"{server}/#/models/{name}")
    page.get_by_text("@ champion").or_(page.get_by_text("champion", exact=True)).first.wait_for(
        timeout=WAIT_MS)
    _close_assistant(page)
    page.screenshot(path=str(artifacts / "models.png"))
