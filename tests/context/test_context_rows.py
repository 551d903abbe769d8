"""The row store: finished rows are kept, errors are retried, nothing is duplicated."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.context.rows import RowStore, cell_id
from lmlab.errors import LmlabError


def test_a_finished_row_is_never_replaced_by_an_error(tmp_path: Path) -> None:
    with RowStore(tmp_path / "rows.sqlite") as store:
        store.put({"cell_id": "a", "status": "done", "correct": True})
        store.put({"cell_id": "a", "status": "error", "error": "boom"})
        assert store.get(["a"])["a"]["status"] == "done"


def test_an_error_row_is_replaced_by_its_retry(tmp_path: Path) -> None:
    with RowStore(tmp_path / "rows.sqlite") as store:
        store.put({"cell_id": "a", "status": "error"})
        assert store.finished(["a"]) == {}
        store.put({"cell_id": "a", "status": "done"})
        assert store.count() == 1 and store.finished(["a"])["a"]["status"] == "done"


def test_rows_survive_reopening(tmp_path: Path) -> None:
    with RowStore(tmp_path / "rows.sqlite") as store:
        store.put({"cell_id": "a", "status": "truncated"})
    with RowStore(tmp_path / "rows.sqlite") as store:
        assert set(store.finished(["a", "b"])) == {"a"}


def test_cell_id_changes_with_recipe_model_and_decoding() -> None:
    base = cell_id({"length": 1}, {"model": "m"}, {"max_tokens": 8})
    assert base == cell_id({"length": 1}, {"model": "m"}, {"max_tokens": 8})
    assert base != cell_id({"length": 2}, {"model": "m"}, {"max_tokens": 8})
    assert base != cell_id({"length": 1}, {"model": "n"}, {"max_tokens": 8})
    assert base != cell_id({"length": 1}, {"model": "m"}, {"max_tokens": 9})


def test_a_corrupt_store_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "rows.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LmlabError, match="not a usable SQLite"):
        RowStore(path)
