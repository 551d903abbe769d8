"""Send only unfinished cells, score each answer, judge when asked, write every row.

Rows are written one by one as answers arrive, so an interrupted or budget-stopped run
keeps everything it finished. A reply whose provider-reported prompt tokens fall well
short of the tokens we built is flagged ``truncated`` (a server cut the context) and
left unscored; a prompt that cannot fit the model's context is flagged ``over_context``
without a call; a call that failed after its retries is an ``error`` row, retried by
the next run. A done row scored by an older version of the deterministic scorers is
rescored from its stored response when it is reused (no new call).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from lmlab.llm.accounting import CallRecord
from lmlab.llm.clients import CallFailure, Client, Reply, Request
from lmlab.llm.judge import judge_request, parse_verdict
from lmlab.context.rows import FINISHED, RowStore
from lmlab.context.scoring import SCORING_VERSION


@dataclass(frozen=True)
class JudgeQuestion:
    question: str
    reference: str
    abstention: bool = False


@dataclass
class Item:
    """One cell: the request to send, the row fields to keep and how to score a reply."""

    cell_id: str
    task: str
    request: Request
    built_tokens: int
    fields: dict[str, Any]  # recipe and facts stored on the row (never the prompt)
    score: Callable[[Reply], dict[str, Any]]
    judge: JudgeQuestion | None = None


@dataclass
class Outcome:
    rows: list[dict[str, Any]]
    sent: int = 0
    reused: int = 0
    judged: int = 0
    rescored: int = 0


@dataclass(frozen=True)
class EngineSettings:
    truncation_tolerance: float = 0.1  # reported < (1 - tolerance) x built -> truncated
    progress: str | None = None


def _base_row(item: Item) -> dict[str, Any]:
    return {"cell_id": item.cell_id, "task": item.task, "built_tokens": item.built_tokens,
            "max_tokens": item.request.max_tokens, **item.fields}


def _over_context(item: Item, window: int | None) -> bool:
    return window is not None and item.built_tokens + item.request.max_tokens > window


def answer_row(item: Item, result: Reply | CallFailure, tolerance: float) -> dict[str, Any]:
    row = _base_row(item)
    if isinstance(result, CallFailure):
        return {**row, "status": "error", "error_kind": result.kind,
                "error": result.message, "attempts": result.attempts}
    reported = result.call.prompt_tokens
    row.update(response=result.text, reasoning=result.reasoning, stop_reason=result.stop_reason,
               reported_tokens=reported, call=result.call.to_dict())
    if reported < (1 - tolerance) * item.built_tokens:
        return {**row, "status": "truncated",
                "flag": f"provider saw {reported} prompt tokens of {item.built_tokens} built"}
    return {**row, "status": "done", "scoring": SCORING_VERSION, **item.score(result)}


def stored_reply(row: Mapping[str, Any]) -> Reply:
    """The reply a done row recorded, rebuilt for scoring it again."""
    return Reply(row.get("response") or "", row.get("stop_reason") or "unknown",
                 CallRecord(**row["call"]), row.get("reasoning"))


def rescore_stale(items: Mapping[str, Item], finished: Mapping[str, Mapping[str, Any]],
                  store: RowStore) -> int:
    """Rescore done rows scored under an older scoring version; returns how many."""
    stale = [row for row in finished.values()
             if row.get("status") == "done" and row.get("scoring") != SCORING_VERSION]
    for row in stale:
        item = items[row["cell_id"]]
        store.put({**row, "scoring": SCORING_VERSION, **item.score(stored_reply(row))})
    return len(stale)


def run_items(items: Sequence[Item], client: Client, store: RowStore,
              settings: EngineSettings = EngineSettings(), judge: Client | None = None) -> Outcome:
    by_key = {item.cell_id: item for item in items}
    finished = store.finished(by_key)
    todo = [item for item in by_key.values() if item.cell_id not in finished]
    outcome = Outcome(rows=[], reused=len(finished), rescored=rescore_stale(by_key, finished, store))
    window = client.context_window
    sendable = []
    for item in todo:
        if _over_context(item, window):
            store.put({**_base_row(item), "status": "over_context",
                       "flag": f"{item.built_tokens}+{item.request.max_tokens} tokens exceed the "
                               f"model's context of {window}"})
        else:
            sendable.append(item)
    bar = tqdm(total=len(by_key), initial=len(by_key) - len(sendable), desc=settings.progress,
               disable=settings.progress is None, file=sys.stderr, leave=False)
    try:
        for request, result in client.complete([item.request for item in sendable]):
            store.put(answer_row(by_key[request.key], result, settings.truncation_tolerance))
            outcome.sent += 1
            bar.update(1)
            bar.set_postfix_str(client.ledger.line(), refresh=False)
    finally:
        bar.close()
    if judge is not None:
        outcome.judged = judge_rows(by_key, store, judge)
    stored = store.get(by_key)
    outcome.rows = [stored[key] for key in by_key if key in stored]
    return outcome


def judge_identity(judge: Client) -> str:
    from lmlab.cache import content_key

    return content_key(judge.identity)


def judge_rows(items: Mapping[str, Item], store: RowStore, judge: Client) -> int:
    """Judge every done row not yet judged by this judge; returns the number judged."""
    ident = judge_identity(judge)
    rows = store.get(items)
    pending = [rows[k] for k, item in items.items() if k in rows and item.judge is not None
               and rows[k]["status"] == "done" and rows[k].get("judge_id") != ident]
    requests = []
    for row in pending:
        question = items[row["cell_id"]].judge
        assert question is not None
        requests.append(judge_request(row["cell_id"], question.question, question.reference,
                                      row.get("response") or "", question.abstention))
    judged = 0
    for request, result in judge.complete(requests):
        row = dict(rows[request.key])
        if isinstance(result, CallFailure):
            row.update(judge_verdict=None, judge_flag=f"error: {result.kind}")
        else:
            verdict = parse_verdict(result.text)
            row.update(judge_verdict=verdict, judge_raw=result.text[:300],
                       judge_flag=None if verdict is not None else "off_format",
                       judge_call=result.call.to_dict(), judge_id=ident)
        store.put(row)
        judged += 1
    return judged


def status_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    counts = {f"rows_{s}": 0.0 for s in sorted(FINISHED | {"error"})}
    for row in rows:
        counts[f"rows_{row['status']}"] += 1
    counts["rows"] = float(len(rows))
    return counts
