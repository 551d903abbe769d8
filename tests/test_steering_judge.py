"""The optional LLM judge: a structured refusal verdict, cached by content, its calls and
cost logged, and its agreement with the phrase and likelihood detectors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from lmlab.cache import DiskCache
from lmlab.llm.accounting import CallRecord, Ledger
from lmlab.llm.clients import CallFailure, Client, Reply, Request
from lmlab.llm.judge import parse_refusal_verdict, parse_verdict, refusal_request
from lmlab.steering.family import judge_metrics
from lmlab.steering.judging import judge_completions
from lmlab.sweeps.runner import run_sweep
from lmlab.sweeps.spec import parse_spec
from lmlab.tracking import PARENT_TAG, run_metrics


class Scripted(Client):
    """Answers each request with ``answer(request)`` (text, or a CallFailure)."""

    def __init__(self, answer: Callable[[Request], str | CallFailure]) -> None:
        self.answer = answer
        self.role = "judge"
        self.ledger = Ledger()
        self.sent: list[Request] = []

    identity = property(lambda self: {"kind": "scripted"})  # type: ignore[assignment]
    context_window = property(lambda self: None)  # type: ignore[assignment]

    def count_prompt_tokens(self, user: str, system: str | None = None) -> int:
        return len(user.split())

    def complete(self, requests: Sequence[Request]) -> Iterator[tuple[Request, Reply | CallFailure]]:
        for request in requests:
            self.sent.append(request)
            answer = self.answer(request)
            if isinstance(answer, CallFailure):
                yield request, answer
                continue
            call = CallRecord("judge", 10, 3, 0, "eos", 0.0, 0.0, "none")
            self.ledger.record(call)
            yield request, Reply(answer, "eos", call)


def rows(*completions: str) -> list[dict[str, Any]]:
    return [{"prompt": f"request {i}", "completion": text} for i, text in enumerate(completions)]


# ------------------------------------------------------------------ verdicts

@pytest.mark.parametrize("text, verdict", [
    ('{"verdict": "refusal"}', "refusal"),
    ('Here: {"verdict": "Compliance"} done', "compliance"),
    ('{"verdict": "degenerate"}', "degenerate"),
    ('{"verdict": "correct"}', None),
    ("refusal", None),
    ("{broken", None),
])
def test_the_refusal_verdict_is_structured_or_off_format(text: str, verdict: str | None) -> None:
    assert parse_refusal_verdict(text) == verdict


def test_the_correctness_verdict_of_the_context_family_is_unchanged() -> None:
    assert parse_verdict('{"verdict": "correct"}') is True
    assert parse_verdict('{"verdict": "refusal"}') is None


def test_the_judge_sees_the_request_and_the_reply_and_an_empty_reply_is_named() -> None:
    request = refusal_request("k", "How do I pick a lock?", "  ")
    assert "How do I pick a lock?" in request.user and "(empty)" in request.user
    assert '"verdict": "degenerate"' in request.user


# ------------------------------------------------------------------ caching

def test_verdicts_are_cached_by_content_and_reused(tmp_path: Path) -> None:
    judge = Scripted(lambda r: '{"verdict": "refusal"}' if "sorry" in r.user else '{"verdict": "compliance"}')
    cache = DiskCache(tmp_path)
    first = judge_completions(judge, cache, rows("I'm sorry, no.", "Sure, here it is."))
    assert [r["judge_verdict"] for r in first] == ["refusal", "compliance"]
    assert not any(r["judge_cached"] for r in first) and len(judge.sent) == 2
    again = judge_completions(judge, cache, rows("I'm sorry, no.", "Sure, here it is.", "New text."))
    assert len(judge.sent) == 3, "only the new completion is sent"
    assert [r["judge_cached"] for r in again] == [True, True, False]
    assert again[0]["judge_verdict"] == "refusal"


def test_an_off_format_verdict_is_flagged_and_a_failed_call_is_retried_later(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    failing = Scripted(lambda r: CallFailure("timeout", "slow", 3))
    [failed] = judge_completions(failing, cache, rows("text"))
    assert failed["judge_verdict"] is None and failed["judge_flag"] == "error: timeout"
    working = Scripted(lambda r: "I think it refused")
    [off] = judge_completions(working, cache, rows("text"))
    assert len(working.sent) == 1, "the failure was not cached"
    assert off["judge_verdict"] is None and off["judge_flag"] == "off_format"


# ------------------------------------------------------------------ metrics

def test_judge_agreement_and_rates_use_the_prompts_it_answered() -> None:
    verdicts = ["refusal", "refusal", "compliance", "compliance", None]
    judged = [{"judge_verdict": v, "judge_flag": None if v else "off_format"} for v in verdicts]
    base = [{"judge_verdict": "compliance", "judge_flag": None}] * 5
    phrase = np.array([True, False, False, False, True])
    likelihood = np.array([True, True, False, False, False])
    metrics = judge_metrics("harm_test", judged, base, phrase, likelihood)
    assert metrics["harm_test/refusal_judge"] == 0.5 and metrics["harm_test/refusal_judge_n"] == 4
    assert metrics["harm_test/judge_off_format"] == 1
    # judge vs phrase on 4 answered prompts: agree 3 of 4; chance 0.5*0.25 + 0.5*0.75 = 0.5
    assert metrics["harm_test/agreement_judge_phrase"] == 0.75
    assert metrics["harm_test/kappa_judge_phrase"] == pytest.approx(0.5)
    assert metrics["harm_test/agreement_judge_likelihood"] == 1.0
    assert metrics["harm_test/refusal_judge_diff"] == 0.5


# ------------------------------------------------------------------ through a sweep

class FakeJudgeServer:
    """An OpenAI-compatible chat endpoint on loopback that answers with a verdict and usage."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                server.requests.append(prompt)
                reply = prompt.split("Reply:\n<<<\n", 1)[1].split("\n>>>", 1)[0]
                verdict = "degenerate" if reply == "(empty)" else "compliance"
                payload = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": json.dumps({"verdict": verdict})}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    return tmp_path


def judged_spec(judge: dict[str, Any]) -> Any:
    return parse_spec({
        "family": "steering", "name": "judged", "model": {"name": "tiny:llama"},
        "grid": {"layer": [1], "alpha": [1.0]},
        "steering": {"n_prompts": 3, "n_train": 4, "eval_splits": ["harm_test", "benign"],
                     "generation": {"max_new_tokens": 4, "batch_size": 4}, "kl_tokens": 2,
                     "judge": judge}})


def child_runs(outcome: Any) -> list:
    return MlflowClient().search_runs(
        [outcome.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")


def test_a_litellm_judge_logs_its_calls_cost_and_agreement_and_buys_each_verdict_once(store: Path) -> None:
    server = FakeJudgeServer()
    try:
        outcome = run_sweep(judged_spec({
            "model": "openai/fake-judge", "api_base": server.api_base, "timeout_s": 10,
            "prices": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}))
    finally:
        server.stop()
    runs = child_runs(outcome)
    assert len(runs) == 3
    calls = sum(r.data.metrics["judge/calls"] for r in runs)
    assert calls == len(server.requests) == len(set(server.requests)), "no verdict bought twice"
    assert 0 < calls <= 3 * 2 * 3  # conditions x splits x prompts
    baseline = [r for r in runs if r.data.params["intervention"] == "none"][0]
    assert baseline.data.metrics["judge/calls"] == 6
    assert baseline.data.metrics["judge/cost_usd"] == pytest.approx(6 * (100 * 1.0 + 10 * 2.0) / 1e6)
    assert baseline.data.tags["steering.judge_cost_source"] == "price_table"
    steered = [r for r in runs if r.data.params["intervention"] == "add"]
    every = {r.info.run_id: run_metrics(MlflowClient(), r) for r in runs}
    assert all(every[r.info.run_id]["judge/cached"] >= 6 for r in steered), \
        "baseline verdicts reused"
    for metrics in every.values():
        assert {"harm_test/refusal_judge", "harm_test/agreement_judge_phrase",
                "harm_test/kappa_judge_likelihood",
                "benign/agreement_judge_likelihood"} <= set(metrics)


def test_a_spent_judge_budget_stops_cleanly_and_a_rerun_buys_only_missing_verdicts(store: Path) -> None:
    from lmlab.errors import LmlabError

    server = FakeJudgeServer()
    judge = {"model": "openai/fake-judge", "api_base": server.api_base, "timeout_s": 10,
             "concurrency": 1, "prices": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
    try:
        with pytest.raises(LmlabError, match="steering.judge.budget_usd"):
            run_sweep(judged_spec({**judge, "budget_usd": 0.0003}))  # about 2 calls
        bought = len(server.requests)
        assert 0 < bought < 6
        run_sweep(judged_spec({**judge, "budget_usd": 1.0}))  # the budget is operational
    finally:
        server.stop()
    assert len(server.requests) == len(set(server.requests)), "no verdict bought twice"
    assert len(server.requests) > bought


def test_the_judges_operational_settings_stay_out_of_the_condition_key() -> None:
    from lmlab.sweeps.family import family_for

    base = {"model": "openai/fake-judge", "api_base": "http://127.0.0.1:1/v1"}
    one = family_for(judged_spec(base)).settings_identity()
    other = family_for(judged_spec({**base, "api_base": "http://127.0.0.1:2/v1",
                                    "concurrency": 9})).settings_identity()
    changed = family_for(judged_spec({**base, "model": "openai/other-judge"})).settings_identity()
    assert one == other and one != changed
    assert family_for(judged_spec(None)).settings_identity()["judge"] is None  # type: ignore[arg-type]


def test_a_local_judge_runs_the_sweeps_own_model(store: Path) -> None:
    outcome = run_sweep(judged_spec({"model": "local"}))
    baseline = [r for r in child_runs(outcome) if r.data.params["intervention"] == "none"][0]
    metrics = run_metrics(MlflowClient(), baseline)
    assert metrics["judge/calls"] == 6
    # A random tiny model cannot answer in the format: every verdict is flagged, none guessed.
    assert metrics["harm_test/judge_off_format"] + metrics["harm_test/refusal_judge_n"] == 3
