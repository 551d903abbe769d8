"""The needle design: distinct needles within a cell, the same needles in every cell, a
seeded needle choice, distractors placed independently of depth, and pooled intervals
clustered by needle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from context_helpers import family_and_ctx, niah_spec
from lmlab.context.family import ContextFamily
from lmlab.context.haystack import load_haystack
from lmlab.context.niah import NiahSettings, NiahTask, build_prompt, bundled_needles_path, \
    load_needles
from lmlab.context.rows import RowStore
from lmlab.context.scoring import accuracy_metrics
from lmlab.llm.accounting import Ledger
from lmlab.llm.clients import LocalClient
from lmlab.stats import rate


def test_samples_of_a_cell_are_distinct_needles_and_every_cell_asks_the_same(tiny, tmp_path) -> None:
    family, _ = family_and_ctx(niah_spec({"samples": 3}, {"length": [300, 400], "depth": [0, 100]}),
                               tmp_path, tiny)
    needles = [[item.fields["needle"] for item in family.task.items(
        params, family.client, 6, family.client.identity, family.decoding)]
        for params in family.conditions()]
    assert all(len(set(cell)) == 3 for cell in needles)
    assert all(set(cell) == set(needles[0]) for cell in needles)


def test_the_needles_used_do_not_follow_the_files_order(tmp_path: Path) -> None:
    raw = json.loads(bundled_needles_path().read_text())
    reversed_file = tmp_path / "needles.json"
    reversed_file.write_text(json.dumps({"needles": raw["needles"][::-1]}))
    forward = NiahTask(NiahSettings()).sample_ids(3)
    backward = NiahTask(NiahSettings(needles=str(reversed_file))).sample_ids(3)
    assert set(forward) == set(backward)
    assert NiahTask(NiahSettings(seed=1)).sample_ids(3) != forward  # the seed chooses


def words_before_each_distractor(context: str, needle: str, distractors: list[str]) -> list[int]:
    text = context.replace(needle, "")
    return [len(re.findall(r"\S+", text[:text.find(d)])) for d in distractors]


def test_distractor_positions_do_not_depend_on_the_needle_depth(tiny) -> None:
    client = LocalClient(tiny, Ledger())
    needles, _ = load_needles()
    hay = load_haystack()
    found = []
    for depth in (0, 50, 100):
        recipe = {"task": "niah", "v": 1, "source": hay.source_id, "needles": "x",
                  "order": "sequential", "seed": 3, "length": 480, "depth": depth,
                  "needle": "parrot", "distractors": 2, "placement": 2}
        sized, needle = build_prompt(recipe, hay, needles, client.count_prompt_tokens)
        found.append(words_before_each_distractor(sized.placement.context, needle.needle,
                                                  list(needle.distractors)))
    assert found[0] == found[1] == found[2]


def test_pooled_intervals_count_needles_not_rows(tiny, tmp_path: Path) -> None:
    """Four needles in six cells: two always right, two always wrong. Pooled over depths,
    each length has 12 rows but only 4 independent needles, and the interval says so."""
    grid = {"length": [300, 400], "depth": [0, 50, 100]}
    family, ctx = family_and_ctx(niah_spec({"samples": 4}, grid), tmp_path, tiny)
    good = set(family.task.sample_ids(4)[:2])
    summary = []
    with RowStore(tmp_path / "store" / "context" / "rows.sqlite") as store:
        for params in family.conditions():
            rows = []
            for item in family.task.items(params, family.client, 6, family.client.identity,
                                          family.decoding):
                row = {"cell_id": item.cell_id, "task": "niah", "status": "done",
                       "target_tokens": params["length"], "depth": params["depth"],
                       "needle": item.fields["needle"], "correct": item.fields["needle"] in good,
                       "reported_tokens": item.built_tokens}
                store.put(row)
                rows.append(row)
            summary.append({**params, **accuracy_metrics(rows)})
    parent = family.summarize(ctx, pd.DataFrame(summary))
    by_length = parent.tables["niah_by_length"]
    assert list(by_length["accuracy"]) == [0.5, 0.5]
    assert list(by_length["accuracy_n"]) == [4, 4]  # needles, not the 12 rows
    wilson_over_rows = rate([True] * 6 + [False] * 6)
    assert all(by_length["accuracy_ci_hi"] - by_length["accuracy_ci_lo"]
               > wilson_over_rows.upper - wilson_over_rows.lower)
    assert list(parent.tables["niah_by_depth"]["accuracy_n"]) == [4, 4, 4]
    metrics = parent.metrics
    assert metrics["effective_length"] == 400 and metrics["effective_length_n"] == 4
    assert metrics["effective_length_ci_lo"] == 0  # resampling only the wrong needles
    # The parent's headline: accuracy at the shortest and longest length, same intervals.
    for name, row in (("shortest", by_length.iloc[0]), ("longest", by_length.iloc[-1])):
        assert metrics[f"headline/accuracy_{name}"] == row["accuracy"]
        assert metrics[f"headline/accuracy_{name}_ci_lo"] == row["accuracy_ci_lo"]
        assert metrics[f"headline/accuracy_{name}_n"] == 4
    assert parent.tags["lmlab.headline"] == "accuracy at 300 and 400 tokens"


def test_a_condition_key_changes_with_the_scoring_version(monkeypatch) -> None:
    from lmlab.context import family as context_family

    spec = niah_spec({})
    before = ContextFamily(spec).settings_identity()
    monkeypatch.setattr(context_family, "SCORING_VERSION", 999)
    assert ContextFamily(spec).settings_identity() != before
