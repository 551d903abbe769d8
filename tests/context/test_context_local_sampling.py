"""The local subject at temperature > 0: one seed per cell, whatever the batch."""

from __future__ import annotations

from lmlab.llm.accounting import Ledger
from lmlab.llm.clients import LocalClient, Request

PROMPT = "Write one short sentence about rivers."
OTHER = "Name three colours of autumn leaves, and say which one you like best, in a few words."


def texts(client: LocalClient, requests: list[Request]) -> dict[str, str]:
    return {request.key: reply.text for request, reply in client.complete(requests)}


def test_two_samples_of_one_prompt_sent_apart_get_different_seeds(tiny) -> None:
    client = LocalClient(tiny, Ledger(), batch_size=1, temperature=1.0)
    first = texts(client, [Request("cell-a", PROMPT, 16)])
    second = texts(client, [Request("cell-b", PROMPT, 16)])  # a later call: a fresh batch 0
    assert first["cell-a"] != second["cell-b"]


def test_a_cell_samples_the_same_text_alone_and_inside_a_padded_batch(tiny) -> None:
    client = LocalClient(tiny, Ledger(), batch_size=4, temperature=1.0)
    alone = texts(client, [Request("cell-a", PROMPT, 16)])
    batched = texts(client, [Request("cell-z", OTHER, 16), Request("cell-a", PROMPT, 16)])
    assert batched["cell-a"] == alone["cell-a"]
    assert texts(client, [Request("cell-a", PROMPT, 16)]) == alone  # and on a re-run


def test_greedy_decoding_keeps_its_identity_and_sampling_names_its_sampler(tiny) -> None:
    greedy = LocalClient(tiny, Ledger()).identity
    sampled = LocalClient(tiny, Ledger(), temperature=0.7).identity
    assert set(greedy) == {"kind", "model", "temperature"}  # greedy cell ids are unchanged
    assert "sampler" in sampled and sampled["temperature"] == 0.7
