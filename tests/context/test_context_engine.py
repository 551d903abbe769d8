"""The engine with scripted clients: judging sees answers only, never reasoning."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from lmlab.llm.accounting import CallRecord, Ledger
from lmlab.llm.clients import CallFailure, Client, Reply, Request
from lmlab.context.engine import Item, JudgeQuestion, run_items
from lmlab.context.rows import RowStore
from lmlab.context.scoring import accuracy_metrics


class Scripted(Client):
    """Answers every request with ``answer(request)``; remembers what it was sent."""

    def __init__(self, answer: Any, role: str = "subject") -> None:
        self.answer = answer
        self.role = role  # type: ignore[assignment]
        self.ledger = Ledger()
        self.sent: list[Request] = []

    identity = property(lambda self: {"kind": "scripted"})  # type: ignore[assignment]
    context_window = property(lambda self: None)  # type: ignore[assignment]

    def count_prompt_tokens(self, user: str, system: str | None = None) -> int:
        return len(user.split())

    def complete(self, requests: Sequence[Request]) -> Iterator[tuple[Request, Reply | CallFailure]]:
        for request in requests:
            self.sent.append(request)
            text, reasoning = self.answer(request)
            call = CallRecord(self.role, len(request.user.split()), 3, 7 if reasoning else 0,  # type: ignore[arg-type]
                              "eos", 0.0, 0.0, "none")
            self.ledger.record(call)
            yield request, Reply(text, "eos", call, reasoning)


def items(n: int) -> list[Item]:
    return [Item(f"cell{i}", "niah", Request(f"cell{i}", "find the word in this prompt", 8), 6,
                 {"needle": "x"}, lambda reply: {"correct": "owl" in reply.text},
                 JudgeQuestion("what animal?", "owl")) for i in range(n)]


def test_the_judge_sees_the_answer_but_never_the_reasoning(tmp_path: Path) -> None:
    subject = Scripted(lambda r: ("an owl", "SECRET-CHAIN-OF-THOUGHT about owls"))
    judge = Scripted(lambda r: ('{"verdict": "correct"}', None), role="judge")
    with RowStore(tmp_path / "rows.sqlite") as store:
        outcome = run_items(items(3), subject, store, judge=judge)
    assert all("an owl" in r.user and "SECRET" not in r.user for r in judge.sent)
    assert all(row["judge_verdict"] is True for row in outcome.rows)
    assert all(row["call"]["reasoning_tokens"] == 7 for row in outcome.rows)
    metrics = accuracy_metrics(outcome.rows)
    assert metrics["judge_agreement"] == 1.0 and metrics["judge_accuracy"] == 1.0


def test_rows_already_judged_by_the_same_judge_are_not_judged_again(tmp_path: Path) -> None:
    subject = Scripted(lambda r: ("owl", None))
    judge = Scripted(lambda r: ('{"verdict": "incorrect"}', None), role="judge")
    with RowStore(tmp_path / "rows.sqlite") as store:
        run_items(items(2), subject, store, judge=judge)
        again = run_items(items(2), subject, store, judge=judge)
    assert again.sent == 0 and again.judged == 0 and len(judge.sent) == 2
