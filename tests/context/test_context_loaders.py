"""The context loaders on messy files: every record counted, bad ones skipped with a
reason, a whole file (or folder) refused only when nothing in it is usable."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from context_helpers import niah_spec
from lmlab.context import longmemeval as lme
from lmlab.context.family import ContextFamily
from lmlab.context.haystack import load_haystack
from lmlab.context.niah import bundled_needles_path, load_needles
from lmlab.errors import LmlabError
from lmlab.sweeps.spec import parse_spec

PROSE = "The river turned the mill wheel all winter.\n\nIn spring the ice broke up early.\n"
NOT_UTF8 = "Caf\xe9 au lait and a long essay.".encode("latin-1")


def messy_haystack(root: Path) -> Path:
    folder = root / "essays"
    folder.mkdir()
    (folder / "a_good.txt").write_text(PROSE)
    (folder / "b_latin1.txt").write_bytes(NOT_UTF8)
    (folder / "c_empty.txt").write_text("  \n\n ")
    (folder / "d_copy.txt").write_text(PROSE)
    (folder / "notes.md").write_text("not an essay")
    return folder


def test_a_non_utf8_essay_is_skipped_not_the_whole_folder(tmp_path: Path) -> None:
    haystack = load_haystack(str(messy_haystack(tmp_path)))
    assert haystack.paragraphs == ("The river turned the mill wheel all winter.",
                                   "In spring the ice broke up early.")


def test_the_haystack_report_counts_files_by_reason_and_names_the_skipped(tmp_path: Path) -> None:
    folder = messy_haystack(tmp_path)
    family = ContextFamily(niah_spec({"haystack": str(folder)}))
    haystack = next(r for r in family.data_reports() if r.name == "haystack")
    assert (haystack.rows_read, haystack.rows_kept) == (4, 1)
    assert dict(haystack.dropped) == {"not_utf8": 1, "empty": 1, "duplicate": 1}
    warnings = "\n".join(haystack.warnings())
    assert "b_latin1.txt" in warnings and "c_empty.txt" in warnings and "d_copy.txt" in warnings
    assert "notes.md" in warnings  # ignored, and said so
    assert haystack.metrics()["data/haystack/dropped_not_utf8"] == 1


def test_a_folder_with_nothing_usable_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "latin"
    folder.mkdir()
    (folder / "x.txt").write_bytes(NOT_UTF8)
    with pytest.raises(LmlabError, match=f"{folder}.*not_utf8"):
        load_haystack(str(folder))


def messy_needles(path: Path) -> Path:
    good = json.loads(bundled_needles_path().read_text())["needles"][:2]
    path.write_text(json.dumps({"needles": [
        *good,
        dict(good[0]),  # the same id again
        {"id": "no-answer", "needle": "A fact.", "question": "Which fact?", "answers": []},
        {"id": "broken", "needle": "A fact."},
        "not an object",
        {"id": "blank", "needle": "  ", "question": "What?", "answers": ["x"]},
    ]}))
    return path


def test_bad_needles_are_skipped_and_counted(tmp_path: Path) -> None:
    path = messy_needles(tmp_path / "needles.json")
    needles, _ = load_needles(str(path))
    assert [n.id for n in needles] == ["compass", "granary"]
    family = ContextFamily(niah_spec({"needles": str(path)}))
    report = next(r for r in family.data_reports() if r.name == "needles")
    assert (report.rows_read, report.rows_kept, report.requested) == (7, 2, 2)
    assert dict(report.dropped) == {"duplicate": 1, "no_answer": 1, "malformed": 2, "empty": 1}
    assert any("entry 2" in w for w in report.warnings())  # the first duplicate, by position


def test_a_non_utf8_needles_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "needles.json"
    path.write_bytes(b'{"needles": [{"id": "caf\xe9"}]}')
    with pytest.raises(LmlabError, match=f"{path} is not UTF-8"):
        load_needles(str(path))


def instance(qid: str, answer: str = "beagle") -> dict:
    return {"question_id": qid, "question_type": "single-session-user", "question": "My dog?",
            "answer": answer, "question_date": "2023/05/30", "haystack_session_ids": ["s1"],
            "haystack_dates": ["2023/05/01"], "answer_session_ids": ["s1"],
            "haystack_sessions": [[{"role": "user", "content": "I got a beagle."}]]}


def test_bad_longmemeval_instances_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "lme.json"
    bad_ids = {**instance("q4"), "haystack_session_ids": ["s1", "s2"]}
    path.write_text(json.dumps([instance("q1"), instance("q1"), {"question_id": "q2"},
                                instance("q3", answer=""), bad_ids, 7, instance("q5")]))
    assert [q.question_id for q in lme.load_official(path)] == ["q1", "q5"]
    spec = parse_spec({"family": "context", "name": "lme",
                       "context": {"task": "longmemeval", "data": str(path), "samples": 4}})
    [report] = ContextFamily(spec).data_reports()
    assert (report.name, report.rows_read, report.rows_kept, report.requested) == ("longmemeval", 7, 2, 4)
    assert dict(report.dropped) == {"duplicate": 1, "malformed": 3, "empty": 1}
    assert "asked for 4 instances" in "\n".join(report.warnings())


def test_a_non_utf8_longmemeval_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "lme.json"
    path.write_bytes(json.dumps([instance("q1")]).encode().replace(b"beagle", b"b\xe9agle"))
    with pytest.raises(LmlabError, match=f"{path} is not UTF-8"):
        lme.load_official(path)


def write_csv(path: Path, column: str, rows: list[tuple[str, str, str, str]], extra: str = "") -> Path:
    frame = pd.DataFrame(rows, columns=["custom_id", "question", "answer", column])
    path.write_text(frame.to_csv(index=False) + extra)
    return path


def test_bad_csv_rows_are_skipped_and_unpaired_ids_counted(tmp_path: Path) -> None:
    focused = write_csv(tmp_path / "f.csv", "focused_prompt", [
        ("q1", "a?", "x", "F1"), ("q1", "a?", "x", "F1 again"), ("q2", "b?", "y", ""),
        ("q3", "c?", "z", "F3"), ("q4", "d?", "w", "F4")], extra='q5,"e?",v,F5,surplus\n')
    full = write_csv(tmp_path / "l.csv", "full_prompt", [
        ("q1", "a?", "x", "L1"), ("q3", "c?", "z", "L3")])
    paths = {"focused": str(focused), "full": str(full)}
    assert [q.prompts for q in lme.load_csvs(paths)] == [{"focused": "F1", "full": "L1"},
                                                         {"focused": "F3", "full": "L3"}]
    _, _, reports = lme.read_csvs(paths)
    by_name = {r.name: r for r in reports}
    f = by_name["longmemeval_focused"]
    assert (f.rows_read, f.rows_kept) == (6, 2)
    assert dict(f.dropped) == {"duplicate": 1, "empty": 1, "malformed": 1, "unpaired": 1}
    assert (by_name["longmemeval_full"].rows_read, by_name["longmemeval_full"].rows_kept) == (2, 2)


def test_a_non_utf8_csv_is_an_error_naming_it(tmp_path: Path) -> None:
    focused = tmp_path / "f.csv"
    focused.write_bytes(b"custom_id,question,answer,focused_prompt\nq1,caf\xe9?,x,F\n")
    with pytest.raises(LmlabError, match=f"{focused} is not UTF-8"):
        lme.load_csvs({"focused": str(focused)})
