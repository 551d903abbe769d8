"""Reading annotated chains: tags, alignment against the original text, token labels."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from lmlab.errors import LmlabError
import lmlab.probes.chains as chains_module
from lmlab.probes.chains import (FILTERED, KNOWN_LABELS, MALFORMED, SAMPLE_PATH, ChainsConfig,
                                 MalformedChain, align_chain, load_chains, model_text,
                                 parse_annotation, scan_chains, tokenize_chain)

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


@pytest.mark.parametrize("annotated, reason, message", [
    ('Fine.["end-section"]', "stray_end_tag", "closes no open tag"),
    ('["deduction"]A.["backtracking"]B.["end-section"]', "nested_open_tag", "unbalanced"),
    ('["deduction"]A. B.', "unclosed_tag", "never closed"),
    ('["daydreaming"]A.["end-section"]', "unknown_label", "unknown label 'daydreaming'"),
    ('["deduction"]A.["daydreaming]', "broken_tag", "half-quoted"),
    ("No tags at all.", "no_tags", "no labelled spans"),
])
def test_bad_tags_give_a_reason_and_a_clear_message(annotated, reason, message):
    with pytest.raises(MalformedChain, match=message) as raised:
        parse_annotation(annotated, KNOWN_LABELS, "chain #0")
    assert raised.value.reason == reason and reason in MALFORMED


def test_stray_labels_can_be_accepted_explicitly():
    parsed = parse_annotation('["daydreaming"]A.["end-section"]', KNOWN_LABELS + ("daydreaming",))
    assert parsed.plain == "A." and parsed.spans == (("daydreaming", 0, 2),)


@pytest.mark.parametrize("broken", ['["end-section]', '[end-section"]', '[end-section]'])
def test_a_known_tag_missing_a_quote_is_repaired_and_counted(broken):
    parsed = parse_annotation(f'["deduction"]A.{broken} B. ["backtracking"]C.["end-section"]',
                              KNOWN_LABELS)
    assert parsed.plain == "A. B. C."
    assert parsed.spans == (("deduction", 0, 2), ("backtracking", 6, 8))
    assert parsed.repaired == 1


def test_a_bracketed_word_in_the_text_is_not_a_tag():
    parsed = parse_annotation('["deduction"]Take f[x] at x = 2.["end-section"]', KNOWN_LABELS)
    assert parsed.plain == "Take f[x] at x = 2." and parsed.repaired == 0


def test_low_coverage_chains_are_dropped_and_counted(tmp_path):
    good = record("good", CHAIN, ANNOTATED)
    poor = record("poor", CHAIN + " " + "Many more unannotated words follow here. " * 10,
                  '["deduction"]First, 2 plus 3 is 6.["end-section"]')
    path = tmp_path / "c.json"
    path.write_text(json.dumps([good, poor]))
    chains = load_chains(path, ChainsConfig(min_coverage=0.7))
    assert [c.task_id for c in chains.chains] == ["good"]
    assert chains.report()["chains_dropped_low_coverage"] == 1
    assert [(s.task_id, s.reason) for s in chains.skipped] == [("poor", "low_coverage")]


def test_a_dataset_empty_after_filtering_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([record("a", CHAIN + " x" * 400, '["deduction"]First.["end-section"]')]))
    with pytest.raises(LmlabError, match="no chains left after filtering"):
        load_chains(path)


@pytest.mark.parametrize("content, message", [
    ("{}", "expected a JSON list"), ("[1]", "1 not_an_object"), ("not json", "not valid JSON"),
    ('[{"task_id": "x"}]', "1 missing_key"),
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
        parse_annotation(r["annotated_chain"], KNOWN_LABELS).plain != r["reasoning_chain"]
        for r in sample_records)
    assert stripped_differs >= 30
    assert any("\n" in r["reasoning_chain"] for r in sample_records)


# ------------------------------------------------------------- malformed chains in a file

def _first_tag(annotated: str) -> str:
    return annotated[annotated.index('["'):annotated.index('"]') + 2]


def _mutations() -> list[tuple[str, object]]:
    """(expected reason, mutation of a record) for every malformation the published files
    show, 16 in all: the most seen per 100 chains."""
    def edit(key, change):
        def apply(r):
            r[key] = change(r[key])
            return r
        return apply

    def without(key):
        def apply(r):
            del r[key]
            return r
        return apply

    first_end = edit("annotated_chain", lambda a: a.replace('["end-section"]', " ", 1))
    last_end = edit("annotated_chain", lambda a: a[:a.rindex('["end-section"]')])
    first_opener = edit("annotated_chain", lambda a: a.replace(_first_tag(a), "", 1))
    stray = edit("annotated_chain", lambda a: a.replace(_first_tag(a), '["conclusion"]', 1))
    broken = edit("annotated_chain", lambda a: a.replace(_first_tag(a), '["conclusion]', 1))
    untagged = edit("annotated_chain", lambda a: parse_annotation(a, KNOWN_LABELS).plain)
    return [("nested_open_tag", first_end), ("nested_open_tag", first_end),
            ("unknown_label", stray), ("unknown_label", stray),
            ("unclosed_tag", last_end), ("unclosed_tag", last_end),
            ("stray_end_tag", first_opener), ("broken_tag", broken),
            ("missing_key", without("problem")), ("missing_key", without("annotated_chain")),
            ("not_a_string", edit("reasoning_chain", lambda _: 42)),
            ("not_a_string", edit("task_id", lambda _: [1])),
            ("empty", edit("reasoning_chain", lambda _: "  \n")),
            ("duplicate", None), ("not_an_object", None), ("no_tags", untagged)]


def published_like(sample_records: list[dict], n_good: int = 84) -> tuple[list, list[str], Counter]:
    """n_good sound chains (3 with ["end-section] missing a quote) and 16 malformed ones."""
    good = [dict(r) for r in sample_records[:n_good]]
    for r in good[:3]:
        r["annotated_chain"] = r["annotated_chain"].replace('["end-section"]', '["end-section]', 1)
    bad: list = []
    for offset, (reason, mutate) in enumerate(_mutations()):
        r = dict(sample_records[n_good + offset])
        if reason == "duplicate":
            r["task_id"] = good[5]["task_id"]
        elif reason == "not_an_object":
            r = "a chain pasted as a bare string"
        else:
            r = mutate(r)
        bad.append(r)
    records = good[:40] + bad[:8] + good[40:] + bad[8:]  # malformed chains scattered
    return records, [str(r["task_id"]) for r in good], Counter(reason for reason, _ in _mutations())


def test_a_file_with_every_malformation_keeps_the_good_chains_and_counts_each_bad_one(
        tmp_path, sample_records):
    records, good_ids, expected = published_like(sample_records)
    path = tmp_path / "published.json"
    path.write_text(json.dumps(records))
    words = lambda text: len(text.split())  # noqa: E731 - a known-answer "tokenizer"
    chains = load_chains(path, count_tokens=words)
    assert [c.task_id for c in chains.chains] == good_ids
    assert chains.dropped == expected and chains.n_read == 100 and chains.n_malformed == 16
    assert chains.repaired_tags == 3 and chains.stray_labels == Counter({"conclusion": 2})
    by_reason: dict[str, list] = {}
    for index, record in enumerate(records):
        for skipped in chains.skipped:
            if skipped.index == index:
                by_reason.setdefault(skipped.reason, []).append(record)
    text = lambda r: r["reasoning_chain"] if isinstance(r, dict) and isinstance(  # noqa: E731
        r.get("reasoning_chain"), str) else ""
    table = chains.skip_table().set_index("reason")
    report = chains.report()
    for reason, cases in by_reason.items():
        assert table.loc[reason, "chains"] == expected[reason]
        assert table.loc[reason, "characters"] == sum(len(text(r)) for r in cases)
        assert table.loc[reason, "tokens"] == sum(words(text(r)) for r in cases)
        assert report[f"chains_skipped_tokens_{reason}"] == table.loc[reason, "tokens"]
        assert table.loc[reason, "kind"] == "malformed"
    assert report["chains_malformed_share"] == pytest.approx(0.16)
    assert report["chains_kept_tokens"] == sum(words(c.text) for c in chains.chains)
    assert "nested_open_tag" in chains.console_table()
    assert len(chains.skipped_frame()) == 16


def test_a_repaired_tag_gives_the_spans_of_the_intact_annotation(sample_records):
    intact = sample_records[0]
    repaired = dict(intact, annotated_chain=intact["annotated_chain"].replace(
        '["end-section"]', '["end-section]'))
    a = align_chain(intact, ChainsConfig(), "a")
    b = align_chain(repaired, ChainsConfig(), "b")
    assert a.spans == b.spans and a.coverage == b.coverage


def test_a_file_past_the_malformed_share_stops_with_the_counts(tmp_path, sample_records):
    records, _, _ = published_like(sample_records)
    for index in range(5):  # 21 of 100 malformed
        records[index] = dict(records[index], annotated_chain="no tags here")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(LmlabError, match=r"21 of 100 chains \(21%\) are malformed.*6 no_tags"):
        load_chains(path)
    assert len(load_chains(path, ChainsConfig(max_malformed_share=0.25)).chains) == 79


def test_duplicates_keep_the_first_and_a_malformed_first_does_not_hide_a_good_second(tmp_path):
    bad_first = record("same", CHAIN, '["deduction"]First, 2 plus 3 is 6.')  # never closed
    good = record("same", CHAIN, ANNOTATED)
    again = record("same", CHAIN, ANNOTATED)
    others = [record(f"x{i}", CHAIN, ANNOTATED) for i in range(7)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([bad_first, good, again, *others]))
    chains = load_chains(path)
    assert [s.reason for s in chains.skipped] == ["unclosed_tag", "duplicate"]
    assert [s.index for s in chains.skipped] == [0, 2]
    assert chains.chains[0].task_id == "same"


def test_a_non_utf8_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([record("a", "Caf\u00e9 " + CHAIN, ANNOTATED)],
                                ensure_ascii=False).encode("latin-1"))
    with pytest.raises(LmlabError, match=r"latin1\.json: not UTF-8 text \(byte \d+"):
        load_chains(path)


def test_max_chains_stops_aligning_once_enough_chains_are_kept(monkeypatch):
    full = load_chains(SAMPLE_PATH)
    aligned = []
    real = chains_module._char_map
    monkeypatch.setattr(chains_module, "_char_map",
                        lambda a, b: aligned.append(1) or real(a, b))
    few = load_chains(SAMPLE_PATH, ChainsConfig(max_chains=12))
    assert len(aligned) == 12  # every sample chain passes the filters
    assert [c.task_id for c in few.chains] == [c.task_id for c in full.chains[:12]]
    assert few.dropped["beyond_max_chains"] == full.n_read - 12
    assert "beyond_max_chains" in FILTERED and few.n_malformed == 0


def test_a_scan_reads_what_a_load_would_align_without_aligning(monkeypatch, tmp_path, sample_records):
    records, good_ids, _ = published_like(sample_records)
    path = tmp_path / "published.json"
    path.write_text(json.dumps(records))
    monkeypatch.setattr(chains_module, "_char_map", None)  # aligning would fail
    scanned = scan_chains(path, ChainsConfig(max_chains=50))
    by_id: dict[str, dict] = {}
    for r in records:  # the first of duplicates, as the load keeps
        if isinstance(r, dict) and "task_id" in r:
            by_id.setdefault(str(r["task_id"]), r)
    assert scanned == [(by_id[i]["problem"], by_id[i]["reasoning_chain"]) for i in good_ids[:50]]
