"""Integrity checks for the bundled refusal-experiment prompt splits."""

import itertools
import json
import re
from pathlib import Path

import pytest

PROMPT_DIR = Path(__file__).parents[1] / "src/lmlab/data/prompts"
SPLITS = ("harm_train", "harm_val", "harm_test", "benign", "harmless_train")
MIN_ROWS = 100


def _load(split):
    path = PROMPT_DIR / f"{split}.jsonl"
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _normalise(text):
    text = re.sub(r"[^\w\s]", "", text.lower())
    return " ".join(text.split())


@pytest.fixture(scope="module")
def data():
    return {split: _load(split) for split in SPLITS}


@pytest.mark.parametrize("split", SPLITS)
def test_split_has_enough_rows(data, split):
    assert len(data[split]) >= MIN_ROWS


def test_ids_unique_across_all_files(data):
    ids = [row["id"] for rows in data.values() for row in rows]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("split", SPLITS)
def test_no_duplicate_prompts_within_split(data, split):
    normed = [_normalise(row["prompt"]) for row in data[split]]
    dupes = {p for p in normed if normed.count(p) > 1}
    assert not dupes


def test_no_prompt_shared_across_splits(data):
    normed = {s: {_normalise(r["prompt"]) for r in rows} for s, rows in data.items()}
    for a, b in itertools.combinations(SPLITS, 2):
        shared = normed[a] & normed[b]
        assert not shared, f"{a} and {b} share prompts: {sorted(shared)[:3]}"


def test_harm_test_categories_disjoint_from_train(data):
    train_cats = {row["category"] for row in data["harm_train"]}
    test_cats = {row["category"] for row in data["harm_test"]}
    assert not train_cats & test_cats


@pytest.mark.parametrize("split", SPLITS)
def test_rows_have_nonempty_prompt_and_category(data, split):
    for row in data[split]:
        for key in ("prompt", "category"):
            assert isinstance(row.get(key), str) and row[key].strip(), row


@pytest.mark.parametrize("split", SPLITS)
def test_bundled_split_loads_whole_with_its_own_ids(data, split):
    from lmlab.data.prompts import load_prompt_set

    rows, report = load_prompt_set(f"bundled:{split}", split)
    assert report.rows_read == report.rows_kept == len(data[split])
    assert not any(report.dropped.values()) and not report.notes
    assert [(r.id, r.prompt, r.category) for r in rows] == [
        (d["id"], d["prompt"], d["category"]) for d in data[split]]
