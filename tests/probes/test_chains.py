"""Reading annotated chains: tags, alignment against the original text, token labels."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from lmlab.errors import LmlabError
from lmlab.probes.chains import (KNOWN_LABELS, ChainsConfig, align_chain, load_chains,
                                 model_text, parse_annotation, tokenize_chain)

from .conftest import record

CHAIN = ("Okay, so I need to add 2 and 3.\n\nFirst, 2 plus 3 is 6. Let me be careful here.\n\n"
         "Wait, that is wrong: 2 plus 3 is 5.\nSo the answer is 5.")
# The annotator dropped "Let me be careful here." and joined the paragraphs with spaces.
ANNOTATED = ('["initializing"]Okay, so I need to add 2 and 3.["end-section"] '
             '["deduction"]First, 2 plus 3 is 6.["end-section"] '
             '["backtracking"]Wait, that is wrong: 2 plus 3 is 5.["end-section"] '
             '["deduction"]So the answer is 5.["end-section"]')


def _text(chain, label):
    return [chain.text[s.start:s.end] for s in chain.spans if s.label == label]


def test_spans_are_found_in_the_original_chain_when_the_annotation_drops_a_sentence():
    chain = align_chain(record("a", CHAIN, ANNOTATED), ChainsConfig(), "a")
    assert _text(chain, "backtracking") == ["Wait, that is wrong: 2 plus 3 is 5."]
    assert _text(chain, "deduction") == ["First, 2 plus 3 is 6.", "So the answer is 5."]
    assert chain.text == CHAIN  # never re-spaced: the newlines are still there
    dropped = len("Letmebecarefulhere.")
    visible = sum(not c.isspace() for c in CHAIN)
    assert chain.coverage == pytest.approx(1 - dropped / visible, abs=0.01)


def test_a_span_crossing_a_newline_keeps_the_newline():
    chain_text = "Start here.\nWait, no.\nThat was wrong. Fine."
    annotated = '["initializing"]Start here.["end-section"] ["backtracking"]Wait, no. That was wrong.["end-section"] Fine.'
    chain = align_chain(record("b", chain_text, annotated), ChainsConfig(), "b")
    assert _text(chain, "backtracking") == ["Wait, no.\nThat was wrong."]


def test_labels_land_on_the_right_tokens_and_prompt_tokens_are_excluded(tiny_lm):
    chain = align_chain(record("a", CHAIN, ANNOTATED), ChainsConfig(), "a")
    tokens = tokenize_chain(tiny_lm, chain, KNOWN_LABELS)
    text, prompt_chars = model_text(tiny_lm, chain)
    assert text == tiny_lm.format_chat("What is 2 + 3?") + CHAIN
    encoded = tiny_lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(tokens.input_ids) == encoded["input_ids"]
    span = next(s for s in chain.spans if s.label == "backtracking")
    start, end = prompt_chars + span.start, prompt_chars + span.end
    for index, (a, b) in enumerate(encoded["offset_mapping"]):
        expected = a < end and b > start and index >= tokens.chain_start
        assert tokens.labels["backtracking"][index] == int(expected), (index, text[a:b])
    labelled = "".join(text[a:b] for (a, b), on in zip(encoded["offset_mapping"],
                                                       tokens.labels["backtracking"]) if on)
    assert labelled.strip() == "Wait, that is wrong: 2 plus 3 is 5."
    assert encoded["offset_mapping"][tokens.chain_start][0] >= prompt_chars
    assert not any(v[:tokens.chain_start].any() for v in tokens.labels.values())


@pytest.mark.parametrize("annotated, message", [
    ('Fine.["end-section"]', "closes no open tag"),
    ('["deduction"]A.["backtracking"]B.["end-section"]', "unbalanced"),
    ('["deduction"]A. B.', "never closed"),
    ('["daydreaming"]A.["end-section"]', "unknown label 'daydreaming'"),
    ("No tags at all.", "no labelled spans"),
])
def test_bad_tags_give_a_clear_error(annotated, message):
    with pytest.raises(LmlabError, match=message):
        parse_annotation(annotated, KNOWN_LABELS, "chain #0")


def test_stray_labels_can_be_accepted_explicitly():
    plain, spans = parse_annotation('["daydreaming"]A.["end-section"]', KNOWN_LABELS + ("daydreaming",))
    assert plain == "A." and spans == [("daydreaming", 0, 2)]


def test_low_coverage_chains_are_dropped_and_counted(tmp_path):
    good = record("good", CHAIN, ANNOTATED)
    poor = record("poor", CHAIN + " " + "Many more unannotated words follow here. " * 10,
                  '["deduction"]First, 2 plus 3 is 6.["end-section"]')
    path = tmp_path / "c.json"
    path.write_text(json.dumps([good, poor]))
    chains = load_chains(path, ChainsConfig(min_coverage=0.7))
    assert [c.task_id for c in chains.chains] == ["good"]
    assert chains.report()["chains_dropped_low_coverage"] == 1


def test_a_dataset_empty_after_filtering_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([record("a", CHAIN + " x" * 400, '["deduction"]First.["end-section"]')]))
    with pytest.raises(LmlabError, match="no chains left after filtering"):
        load_chains(path)


@pytest.mark.parametrize("content, message", [
    ("{}", "expected a JSON list"), ("[1]", "must be an object"), ("not json", "not valid JSON"),
    ('[{"task_id": "x"}]', "missing key"),
])
def test_malformed_files_give_a_clear_error(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(LmlabError, match=message):
        load_chains(path)


def test_the_sample_dataset_is_big_enough_and_needs_alignment(sample_records):
    chains = load_chains(__import__("lmlab.probes.chains", fromlist=["SAMPLE_PATH"]).SAMPLE_PATH)
    assert len(chains.chains) >= 150
    counts = Counter(s.label for c in chains.chains for s in c.spans)
    assert counts["backtracking"] >= 150
    assert set(counts) == set(KNOWN_LABELS)
    starts = [c.text[s.start:s.end].startswith("Wait") for c in chains.chains for s in c.spans
              if s.label == "backtracking"]
    assert 0.3 < np.mean(starts) < 0.7  # "Wait" is informative but not the whole story
    stripped_differs = sum(
        parse_annotation(r["annotated_chain"], KNOWN_LABELS)[0] != r["reasoning_chain"]
        for r in sample_records)
    assert stripped_differs >= 30
    assert any("\n" in r["reasoning_chain"] for r in sample_records)
