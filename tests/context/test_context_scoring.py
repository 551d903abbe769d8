"""Answer matching on whole words, and rows scored by an older matcher rescored on reuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from lmlab.context.engine import Item, run_items
from lmlab.context.rows import RowStore
from lmlab.context.scoring import contains_answer
from lmlab.llm.accounting import CallRecord, Ledger
from lmlab.llm.clients import CallFailure, Client, Reply, Request


@pytest.mark.parametrize("response,answer", [
    ("There were 90 jars on the shelf.", "9"),
    ("The code is 420.", "42"),
    ("You volunteer 60 hours a month.", "six"),
    ("You volunteer 16 hours.", "six"),
    ("It took 6.5 hours.", "6"),
    ("It took 6.5 hours.", "5"),
])
def test_an_answer_inside_a_longer_number_does_not_match(response: str, answer: str) -> None:
    assert not contains_answer(response, [answer])


@pytest.mark.parametrize("response,answer", [
    ("You volunteer 6 hours a week now.", "six"),
    ("Six hours.", "6"),
    ("The answer is 42.", "42"),
    ("Forty-two saplings.", "42"),
    ("forty two", "42"),
    ("42", "forty-two"),
    ("It cost 60,000 dollars.", "60000"),
    ("Loaves shaped like owls.", "owl"),
    ("On the 9th.", "nine"),
    ("A tin of peppermint tea.", "peppermint"),
    ("Business Administration!", "business administration"),
    ("Un café crème.", "café"),
])
def test_an_answer_standing_as_whole_words_matches(response: str, answer: str) -> None:
    assert contains_answer(response, [answer])


class Silent(Client):
    """A client that must not be called."""

    role = "subject"  # type: ignore[assignment]
    ledger = Ledger()
    identity = property(lambda self: {"kind": "silent"})  # type: ignore[assignment]
    context_window = property(lambda self: None)  # type: ignore[assignment]

    def count_prompt_tokens(self, user: str, system: str | None = None) -> int:
        return len(user.split())

    def complete(self, requests: Sequence[Request]) -> Iterator[tuple[Request, Reply | CallFailure]]:
        if requests:
            raise AssertionError(f"{len(requests)} request(s) sent for rows already answered")
        return iter(())


def test_a_row_scored_by_the_old_matcher_is_rescored_without_a_call(tmp_path: Path) -> None:
    call = CallRecord("subject", 10, 3, 0, "eos", 0.1, 0.0, "none").to_dict()
    old_row: dict[str, Any] = {"cell_id": "c1", "task": "niah", "status": "done", "call": call,
                               "response": "There were 90 jars.", "stop_reason": "eos",
                               "correct": True}  # the prefix matcher said '9' was there
    item = Item("c1", "niah", Request("c1", "how many jars?", 8), 10, {"needle": "jars"},
                lambda reply: {"correct": contains_answer(reply.text, ["9"])})
    with RowStore(tmp_path / "rows.sqlite") as store:
        store.put(old_row)
        outcome = run_items([item], Silent(), store)
        again = run_items([item], Silent(), store)
    assert outcome.sent == 0 and outcome.reused == 1
    assert outcome.rows[0]["correct"] is False and outcome.rows[0]["response"] == "There were 90 jars."
    assert outcome.rescored == 1 and again.rescored == 0  # stamped with the current version
