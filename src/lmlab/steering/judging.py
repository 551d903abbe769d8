"""The optional third refusal detector: an LLM judge reading each prompt and completion.

Verdicts are cached by content (the judge's identity and the exact request it is sent),
so a verdict is bought once and reused by every later condition, sweep and re-run that
asks the same question; failed calls are not cached and are retried next time.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from lmlab.cache import DiskCache, content_key
from lmlab.llm.clients import CallFailure, Client
from lmlab.llm.judge import parse_refusal_verdict, refusal_request

CACHE_NAMESPACE = "steering-judge"
JUDGE_COLUMNS = ("judge_verdict", "judge_flag", "judge_cached")


def judge_completions(judge: Client, cache: DiskCache,
                      rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` with ``judge_verdict`` (refusal / compliance / degenerate, or None),
    ``judge_flag`` (None, ``off_format`` or ``error: <kind>``) and ``judge_cached``."""
    out = [dict(row) for row in rows]
    pending, cache_keys = [], {}
    for index, row in enumerate(out):
        request = refusal_request(str(index), row["prompt"], row["completion"])
        key = content_key(CACHE_NAMESPACE, judge.identity, request.user, request.max_tokens)
        cached = cache.get_json(CACHE_NAMESPACE, key)
        if cached is not None:
            row.update(cached, judge_cached=True)
        else:
            pending.append(request)
            cache_keys[request.key] = key
    for request, result in judge.complete(pending):
        row = out[int(request.key)]
        if isinstance(result, CallFailure):
            row.update(judge_verdict=None, judge_flag=f"error: {result.kind}", judge_cached=False)
            continue
        verdict = parse_refusal_verdict(result.text)
        entry = {"judge_verdict": verdict, "judge_flag": None if verdict else "off_format"}
        cache.put_json(CACHE_NAMESPACE, cache_keys[request.key], entry)
        row.update(entry, judge_cached=False)
    return out
