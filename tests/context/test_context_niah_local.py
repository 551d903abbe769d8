"""Needle prompts sized with the subject's tokenizer; local runs, resume and test mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from context_helpers import family_and_ctx, niah_spec
from lmlab.cache import content_key
from lmlab.llm.accounting import Ledger
from lmlab.llm.clients import LocalClient
from lmlab.context.haystack import load_haystack, sentence_boundaries
from lmlab.context.niah import PLACEMENT_VERSION, build_prompt, load_needles
from lmlab.context.rows import RowStore
from lmlab.errors import LmlabError


def recipe(length: int, depth: float, needle: str = "compass", **extra: object) -> dict:
    hay = load_haystack()
    base = {"task": "niah", "v": 1, "source": hay.source_id, "needles": "x", "order": "sequential",
            "seed": 0, "length": length, "depth": depth, "needle": needle, "distractors": 0}
    if extra.get("distractors"):
        base["placement"] = PLACEMENT_VERSION
    return {**base, **extra}


@pytest.mark.parametrize("length", [260, 333, 480])
@pytest.mark.parametrize("depth", [0, 37.5, 100])
def test_prompt_is_within_one_percent_of_target_with_the_models_tokenizer(tiny, length, depth) -> None:
    client = LocalClient(tiny, Ledger())
    needles, _ = load_needles()
    sized, _ = build_prompt(recipe(length, depth), load_haystack(), needles, client.count_prompt_tokens)
    measured = client.count_prompt_tokens(sized.prompt)
    assert measured == sized.tokens
    assert abs(measured - length) <= 0.01 * length


def test_needle_sits_on_a_sentence_boundary(tiny) -> None:
    client = LocalClient(tiny, Ledger())
    needles, _ = load_needles()
    sized, needle = build_prompt(recipe(480, 50), load_haystack(), needles, client.count_prompt_tokens)
    context = sized.placement.context
    start = sized.placement.needle_start
    assert context[start:start + len(needle.needle)] == needle.needle
    assert start in sentence_boundaries(context)


def test_recipe_rebuilds_the_exact_prompt(tiny) -> None:
    client = LocalClient(tiny, Ledger())
    needles, _ = load_needles()
    r = recipe(400, 25, "parrot", distractors=2, order="shuffle", seed=7)
    first, _ = build_prompt(r, load_haystack(), needles, client.count_prompt_tokens)
    again, _ = build_prompt(dict(r), load_haystack(), needles, client.count_prompt_tokens)
    assert content_key(first.prompt) == content_key(again.prompt)
    assert all(d in first.prompt for d in needles[2].distractors)


def test_shuffle_is_seeded() -> None:
    hay = load_haystack()
    assert hay.text("shuffle", 1) == hay.text("shuffle", 1)
    assert hay.text("shuffle", 1) != hay.text("shuffle", 2)
    assert hay.text("sequential", 1) == hay.text("sequential", 2)


def test_bundled_haystack_has_about_eight_thousand_words_of_tokens() -> None:
    assert sum(len(p.split()) for p in load_haystack().paragraphs) > 6000


def test_empty_haystack_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("not a txt file")
    with pytest.raises(LmlabError, match="no usable text"):
        load_haystack(str(tmp_path))


def test_missing_haystack_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LmlabError, match="not found"):
        load_haystack(str(tmp_path / "nope"))


def test_haystack_too_short_for_the_length_is_a_clear_error(tiny, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("One short sentence. Another one.")
    client = LocalClient(tiny, Ledger())
    needles, _ = load_needles()
    with pytest.raises(LmlabError, match="haystack too short"):
        build_prompt(recipe(480, 50, source="x"), load_haystack(str(tmp_path)), needles,
                     client.count_prompt_tokens)


def test_malformed_needles_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "needles.json"
    path.write_text('{"needles": [{"id": "a"}]}')
    with pytest.raises(LmlabError, match="malformed"):
        load_needles(str(path))


def test_length_beyond_the_models_context_stops_before_any_call(tiny, tmp_path: Path) -> None:
    spec = niah_spec({}, grid={"length": [300, 600], "depth": [50]})
    with pytest.raises(LmlabError, match="exceeds the subject's context of 512"):
        family_and_ctx(spec, tmp_path, tiny)


def test_local_grid_writes_rows_and_a_rerun_makes_zero_calls(tiny, tmp_path: Path) -> None:
    spec = niah_spec({}, grid={"length": [300], "depth": [0, 100]})
    family, ctx = family_and_ctx(spec, tmp_path, tiny)
    first = [family.run_condition(ctx, p) for p in family.conditions()]
    assert [r.metrics["rows_done"] for r in first] == [2, 2]
    assert all(r.metrics["size_error_max"] <= 0.01 for r in first)
    assert first[0].metrics["subject_prompt_tokens"] > 0
    again, ctx2 = family_and_ctx(spec, tmp_path, tiny)
    second = [again.run_condition(ctx2, p) for p in again.conditions()]
    assert [r.metrics["calls_made"] for r in second] == [0, 0]
    assert [r.metrics["rows_reused"] for r in second] == [2, 2]


def test_test_mode_is_a_stratified_subset_of_the_same_cell_ids(tiny, tmp_path: Path) -> None:
    grid = {"length": [300, 400], "depth": [0, 50, 100]}
    full, ctx = family_and_ctx(niah_spec({"samples": 3}, grid), tmp_path, tiny)
    test, _ = family_and_ctx(niah_spec({"samples": 3, "test_samples": 1}, grid, test_mode=True),
                             tmp_path, tiny)
    conditions = test.conditions()
    assert {c["length"] for c in conditions} == {300, 400}
    assert {c["depth"] for c in conditions} == {0, 50, 100}
    assert len(conditions) < 6 and all(c["subset"] == "test" for c in conditions)

    def ids(family, params):  # type: ignore[no-untyped-def]
        return {i.cell_id for i in family.task.items(params, family.client, 6,
                                                     family.client.identity, family.decoding)}

    full_ids = set().union(*(ids(full, p) for p in full.conditions()))
    test_ids = set().union(*(ids(test, p) for p in conditions))
    assert test_ids < full_ids


def test_test_mode_rows_never_replace_full_run_rows(tiny, tmp_path: Path) -> None:
    grid = {"length": [300], "depth": [50]}
    full, ctx = family_and_ctx(niah_spec({}, grid), tmp_path, tiny)
    full.run_condition(ctx, full.conditions()[0])
    with RowStore(tmp_path / "store" / "context" / "rows.sqlite") as store:
        before = {r["cell_id"]: r for r in store.all()}
    test, ctx2 = family_and_ctx(niah_spec({"test_samples": 1}, grid, test_mode=True), tmp_path, tiny)
    result = test.run_condition(ctx2, test.conditions()[0])
    assert result.metrics["calls_made"] == 0
    with RowStore(tmp_path / "store" / "context" / "rows.sqlite") as store:
        assert {r["cell_id"]: r for r in store.all()} == before
