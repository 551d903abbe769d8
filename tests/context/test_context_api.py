"""LiteLLM against a real OpenAI-compatible server (`transformers serve`) on loopback,
directly and through a fault-injecting proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from context_helpers import api_subject, family_and_ctx, niah_spec
from lmlab.llm.accounting import BudgetExceeded
from lmlab.context.rows import RowStore
from lmlab.errors import LmlabError

HERE = Path(__file__).parent


def run_all(family, ctx):  # type: ignore[no-untyped-def]
    return [family.run_condition(ctx, p) for p in family.conditions()]


def store_rows(tmp_path: Path) -> list[dict]:
    with RowStore(tmp_path / "store" / "context" / "rows.sqlite") as store:
        return store.all()


def test_needle_grid_runs_through_litellm_against_transformers_serve(served, tmp_path) -> None:
    spec = niah_spec({"subject": api_subject(served, served.api_base)})
    family, ctx = family_and_ctx(spec, tmp_path)
    results = run_all(family, ctx)
    assert [r.metrics["rows_done"] for r in results] == [2, 2, 2, 2]
    rows = store_rows(tmp_path)
    assert len(rows) == 8
    for row in rows:  # the server counts what we built with the model's own tokenizer
        assert row["reported_tokens"] == row["built_tokens"]
        assert abs(row["built_tokens"] - row["target_tokens"]) <= 0.01 * row["target_tokens"]
        assert row["call"]["cost_source"] == "none" and row["stop_reason"] in ("eos", "length")
    assert results[0].tags["context.tokenizer"] == "own"
    # each call counted once: the ledger's totals equal the rows' provider-reported tokens
    assert sum(r.metrics["subject_prompt_tokens"] for r in results) == \
        sum(row["call"]["prompt_tokens"] for row in rows)


def test_retries_recover_from_rate_limits_server_errors_timeouts_and_bad_bodies(
        served, proxy_factory, tmp_path) -> None:
    faults = {1: "429", 2: "500", 3: "garbage", 4: "cut", 5: "hang", 6: "empty"}
    proxy = proxy_factory(plan=lambda n: faults.get(n, "ok"), hang_s=9)
    spec = niah_spec({"subject": api_subject(served, proxy.api_base, timeout_s=6,
                                                      concurrency=1, max_retries=7)},
                     grid={"length": [300], "depth": [50]})
    family, ctx = family_and_ctx(spec, tmp_path)
    result = run_all(family, ctx)[0]
    assert result.metrics["rows_done"] == 2 and result.metrics["rows_error"] == 0
    assert result.metrics["retries"] == 6
    assert proxy.actions[:6] == ["429", "500", "garbage", "cut", "hang", "empty"]


def test_concurrency_bound_caps_requests_in_flight(served, proxy_factory, tmp_path) -> None:
    slow = proxy_factory(delay_s=0.3)
    spec = niah_spec({"subject": api_subject(served, slow.api_base, concurrency=2), "samples": 4},
                     grid={"length": [300], "depth": [50]})
    family, ctx = family_and_ctx(spec, tmp_path)
    assert run_all(family, ctx)[0].metrics["rows_done"] == 4
    assert slow.max_inflight == 2


def test_persistent_errors_become_error_rows_that_a_rerun_finishes(served, proxy_factory,
                                                                   tmp_path) -> None:
    broken = proxy_factory(plan=lambda n: "500")
    spec = niah_spec({"subject": api_subject(served, broken.api_base, max_retries=1)},
                     grid={"length": [300], "depth": [50]})
    family, ctx = family_and_ctx(spec, tmp_path)
    first = run_all(family, ctx)[0]
    assert first.metrics["rows_error"] == 2 and first.metrics["accuracy_n"] == 0
    assert {r["error_kind"] for r in store_rows(tmp_path)} == {"server_error"}
    healthy = proxy_factory()
    spec = niah_spec({"subject": api_subject(served, healthy.api_base)},
                     grid={"length": [300], "depth": [50]})
    family, ctx = family_and_ctx(spec, tmp_path)
    second = run_all(family, ctx)[0]
    assert second.metrics["rows_done"] == 2 and second.metrics["rows_sent"] == 2
    assert len(store_rows(tmp_path)) == 2


def test_silent_truncation_is_flagged_not_scored_as_a_miss(served, proxy_factory, tmp_path) -> None:
    cutting = proxy_factory(plan=lambda n: "truncate:300")  # a server that keeps the tail only
    spec = niah_spec({"subject": api_subject(served, cutting.api_base)},
                     grid={"length": [400], "depth": [50]})
    family, ctx = family_and_ctx(spec, tmp_path)
    result = run_all(family, ctx)[0]
    assert result.metrics["rows_truncated"] == 2 and result.metrics["accuracy_n"] == 0
    row = store_rows(tmp_path)[0]
    assert row["status"] == "truncated" and "correct" not in row
    assert row["reported_tokens"] < 0.9 * row["built_tokens"]


def test_budget_cap_stops_cleanly_and_keeps_finished_rows(served, tmp_path) -> None:
    prices = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}  # ~$0.3 per call
    spec = niah_spec({"subject": api_subject(served, served.api_base, prices=prices,
                                             budget_usd=0.5, concurrency=1)})
    family, ctx = family_and_ctx(spec, tmp_path)
    with pytest.raises(BudgetExceeded, match="budget cap"):
        run_all(family, ctx)
    rows = store_rows(tmp_path)
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows)
    assert all(r["call"]["cost_source"] == "price_table" for r in rows)


def test_missing_api_key_is_a_clear_error(served, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("LMLAB_TEST_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    spec = niah_spec({"subject": api_subject(served, served.api_base, api_key_env="LMLAB_TEST_KEY")})
    with pytest.raises(LmlabError, match="LMLAB_TEST_KEY is not set"):
        family_and_ctx(spec, tmp_path)


def test_off_format_judge_is_flagged_and_agreement_uses_judged_rows(served, tmp_path) -> None:
    subject = api_subject(served, served.api_base)
    spec = niah_spec({"subject": subject, "judge": subject}, grid={"length": [300], "depth": [50]})
    family, ctx = family_and_ctx(spec, tmp_path)
    result = run_all(family, ctx)[0]
    assert result.metrics["judge_off_format"] == 2 and result.metrics["judge_accuracy_n"] == 0
    assert result.metrics["judge_calls"] == 2 and result.metrics["rows_done"] == 2
    assert all(r["judge_flag"] == "off_format" for r in store_rows(tmp_path))


_WORKER = """
import sys
sys.path.insert(0, {here!r})
from context_helpers import api_subject, family_and_ctx, niah_spec
from types import SimpleNamespace
from pathlib import Path
served = SimpleNamespace(model_dir={model_dir!r})
spec = niah_spec({{"subject": api_subject(served, {api_base!r}, concurrency=1)}})
family, ctx = family_and_ctx(spec, Path({tmp!r}))
for p in family.conditions():
    family.run_condition(ctx, p)
"""


def test_resume_after_a_kill_loses_and_duplicates_no_rows(served, proxy_factory, tmp_path) -> None:
    slow = proxy_factory(delay_s=0.4)
    code = _WORKER.format(here=str(HERE), model_dir=str(served.model_dir), api_base=slow.api_base,
                          tmp=str(tmp_path))
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    path = tmp_path / "store" / "context" / "rows.sqlite"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and worker.poll() is None:
            if path.exists() and len(store_rows(tmp_path)) >= 3:
                break
            time.sleep(0.1)
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    kept = len(store_rows(tmp_path))
    assert 3 <= kept < 8
    healthy = proxy_factory()
    spec = niah_spec({"subject": api_subject(served, healthy.api_base)})
    family, ctx = family_and_ctx(spec, tmp_path)
    results = run_all(family, ctx)
    rows = store_rows(tmp_path)
    assert len(rows) == 8 and len({r["cell_id"] for r in rows}) == 8
    assert all(r["status"] == "done" for r in rows)
    assert sum(r.metrics["rows_sent"] for r in results) == 8 - kept
    assert len(healthy.forwarded_prompts) == 8 - kept


def test_a_rejected_request_is_an_error_row_without_retries(served, proxy_factory, tmp_path) -> None:
    rejecting = proxy_factory(plan=lambda n: "400")
    spec = niah_spec({"subject": api_subject(served, rejecting.api_base)},
                     grid={"length": [300], "depth": [50]})
    family, ctx = family_and_ctx(spec, tmp_path)
    result = run_all(family, ctx)[0]
    assert result.metrics["rows_error"] == 2 and result.metrics["retries"] == 0
    assert all(r["error_kind"] == "bad_request" and r["attempts"] == 1 for r in store_rows(tmp_path))
