"""Call accounting, budget cap, token-per-minute limiter and the judge's verdict parser."""

from __future__ import annotations

import time

import pytest

from lmlab.llm.accounting import BudgetExceeded, CallRecord, Ledger, TokenRateLimiter
from lmlab.llm.clients import ClientConfig
from lmlab.llm.judge import parse_verdict
from lmlab.errors import LmlabError


def call(role: str = "subject", cost: float = 0.0) -> CallRecord:
    return CallRecord(role, 100, 10, 5, "eos", 0.5, cost, "price_table" if cost else "none")  # type: ignore[arg-type]


def test_ledger_totals_by_role_and_flattens_to_metrics() -> None:
    ledger = Ledger()
    ledger.record(call())
    ledger.record(call("judge", 0.25))
    metrics = ledger.metrics()
    assert metrics["subject_calls"] == 1 and metrics["judge_calls"] == 1
    assert metrics["subject_reasoning_tokens"] == 5 and metrics["cost_usd"] == 0.25
    assert "tok/min" in ledger.line() and "none/price_table" in ledger.line()


def test_budget_cap_raises_a_clean_error_once_reached() -> None:
    ledger = Ledger(budget_usd=0.5)
    ledger.check_budget()
    ledger.record(call(cost=0.6))
    with pytest.raises(BudgetExceeded, match="finished rows are kept"):
        ledger.check_budget()


def test_limiter_waits_when_the_window_is_full() -> None:
    limiter = TokenRateLimiter(100, window_s=0.3)
    start = time.monotonic()
    limiter.acquire(80)
    limiter.acquire(80)  # must wait for the first to leave the window
    assert time.monotonic() - start >= 0.25


def test_limiter_lets_an_oversized_request_through_alone() -> None:
    limiter = TokenRateLimiter(10, window_s=0.2)
    limiter.acquire(50)  # no deadlock on an empty window


@pytest.mark.parametrize("text,verdict", [
    ('{"verdict": "correct"}', True),
    ('Sure. {"verdict": "Incorrect"} hope that helps', False),
    ("correct", None),
    ('{"verdict": "maybe"}', None),
    ("{broken", None),
])
def test_judge_verdict_is_structured_or_off_format(text: str, verdict: bool | None) -> None:
    assert parse_verdict(text) is verdict


def test_client_config_refuses_inline_api_keys() -> None:
    with pytest.raises(LmlabError, match="api_key_env"):
        ClientConfig.from_dict({"model": "openai/x", "api_key": "sk-secret"})


def test_client_config_identity_leaves_out_where_and_how_fast() -> None:
    a = ClientConfig(model="openai/x", api_base="http://127.0.0.1:1/v1", concurrency=2)
    b = ClientConfig(model="openai/x", api_base="http://127.0.0.1:2/v1", concurrency=8)
    assert a.identity() == b.identity()


def test_judge_agreement_and_kappa_use_rows_the_judge_answered() -> None:
    from lmlab.context.scoring import accuracy_metrics

    rows = [{"status": "done", "correct": c, "judge_verdict": j, "judge_flag": None}
            for c, j in [(True, True), (False, False), (True, False), (False, False)]]
    rows.append({"status": "done", "correct": True, "judge_verdict": None, "judge_flag": "off_format"})
    metrics = accuracy_metrics(rows)
    assert metrics["accuracy"] == 0.6 and metrics["accuracy_n"] == 5
    assert metrics["judge_accuracy"] == 0.25 and metrics["judge_accuracy_n"] == 4
    assert metrics["judge_agreement"] == 0.75 and metrics["judge_off_format"] == 1
    assert metrics["judge_kappa"] == pytest.approx(0.5)
