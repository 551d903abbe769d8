"""A 429 that says how long to wait is waited out for exactly that long."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from lmlab.llm.accounting import Ledger
from lmlab.llm.clients import ClientConfig, LiteLLMClient, Request, retry_after_seconds


def rate_limited(headers: dict[str, str]) -> Exception:
    import litellm

    response = httpx.Response(429, headers=headers, request=httpx.Request("POST", "http://x/v1"))
    return litellm.RateLimitError("slow down", llm_provider="openai", model="m", response=response)


def completion(text: str = "ok") -> SimpleNamespace:
    usage = SimpleNamespace(prompt_tokens=5, completion_tokens=1, completion_tokens_details=None, cost=0.0)
    message = SimpleNamespace(content=text, reasoning_content=None)
    return SimpleNamespace(choices=[SimpleNamespace(message=message, finish_reason="stop")], usage=usage)


@pytest.mark.parametrize("headers, seconds", [
    ({"Retry-After": "7"}, 7.0),
    ({"retry-after-ms": "1500"}, 1.5),
    ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past: no wait
    ({}, None),
])
def test_retry_after_is_read_from_the_rate_limit_answer(headers, seconds) -> None:
    assert retry_after_seconds(rate_limited(headers)) == seconds


def test_the_client_sleeps_what_retry_after_asks_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    client = LiteLLMClient(ClientConfig(model="openai/m", api_base="http://127.0.0.1:9/v1",
                                        tokenizer="litellm", backoff_s=0.01, max_retries=3),
                           Ledger(), sleep=slept.append)
    monkeypatch.setattr(client, "count_prompt_tokens", lambda user, system=None: 5)
    answers = iter([rate_limited({"Retry-After": "7"}), rate_limited({"Retry-After": "3"}), completion()])

    def fake_completion(**kwargs):  # type: ignore[no-untyped-def]
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(client._litellm, "completion", fake_completion)
    [(_, reply)] = list(client.complete([Request("cell", "hello", 4)]))
    assert reply.text == "ok"
    assert slept == [7.0, 3.0]
