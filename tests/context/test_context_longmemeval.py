"""LongMemEval: official JSON and earlier CSVs, abstention, and the paired focused/full design."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lmlab.context import longmemeval as lme
from lmlab.llm.accounting import CallRecord
from lmlab.llm.clients import Reply
from lmlab.errors import LmlabError
from lmlab.sweeps.spec import parse_spec


def reply(text: str) -> Reply:
    return Reply(text, "eos", CallRecord("subject", 1, 1, 0, "eos", 0.0, 0.0, "none"))


def test_bundled_sample_covers_every_question_type_and_abstention() -> None:
    questions = lme.load_official(lme.bundled_path())
    assert {q.question_type for q in questions} == {
        "single-session-user", "single-session-assistant", "single-session-preference",
        "temporal-reasoning", "knowledge-update", "multi-session"}
    assert sum(q.abstention for q in questions) == 2


def test_focused_prompt_holds_only_evidence_sessions() -> None:
    raw = json.loads(lme.bundled_path().read_text())[0]
    focused, full = lme.render(raw, "focused"), lme.render(raw, "full")
    assert "beagle" in focused and "lentil" not in focused
    assert "beagle" in full and "lentil" in full
    assert focused.count("### Session") == 1 and full.count("### Session") == 3


def test_abstention_is_correct_only_when_the_model_declines() -> None:
    question = next(q for q in lme.load_official(lme.bundled_path()) if q.abstention)
    assert lme.score(question)(reply("You did not mention that, so I don't know."))["correct"]
    assert not lme.score(question)(reply("It is red."))["correct"]


def test_answer_match_is_case_and_punctuation_insensitive() -> None:
    question = lme.load_official(lme.bundled_path())[0]
    assert lme.score(question)(reply("Your dog is a Beagle!"))["correct"]


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON list"),
    ('[{"question_id": "a"}]', "lacks question_type"),
    ('[{"question_id": "a", "question_type": "t", "question": "q", "answer": "x", '
     '"haystack_sessions": [["not a turn"]]}]', "list of sessions"),
])
def test_malformed_official_files_are_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "lme.json"
    path.write_text(content)
    with pytest.raises(LmlabError, match=message):
        lme.load_official(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LmlabError, match="not found"):
        lme.load_official(tmp_path / "nope.json")


def test_earlier_projects_csvs_are_joined_on_custom_id(tmp_path: Path) -> None:
    base = {"custom_id": ["q1", "q2_abs"], "question": ["a?", "b?"], "answer": ["x", "y"],
            "token_count": [10, 20]}
    pd.DataFrame({**base, "focused_prompt": ["F1", "F2"]}).to_csv(tmp_path / "f.csv", index=False)
    pd.DataFrame({**base, "full_prompt": ["L1", "L2"]}).to_csv(tmp_path / "l.csv", index=False)
    questions, _ = lme.load_questions({"focused": str(tmp_path / "f.csv"), "full": str(tmp_path / "l.csv")})
    assert [q.prompts for q in questions] == [{"focused": "F1", "full": "L1"},
                                              {"focused": "F2", "full": "L2"}]
    assert questions[1].abstention


def test_csv_without_prompt_column_is_a_clear_error(tmp_path: Path) -> None:
    pd.DataFrame({"custom_id": ["q"], "question": ["a"], "answer": ["b"]}).to_csv(tmp_path / "f.csv")
    with pytest.raises(LmlabError, match="focused_prompt"):
        lme.load_csvs({"focused": str(tmp_path / "f.csv")})


def test_paired_summary_reports_both_accuracies_the_difference_and_types() -> None:
    rows = []
    for i, (focused, full) in enumerate([(1, 0), (1, 0), (1, 1), (0, 0)]):
        for variant, correct in (("focused", focused), ("full", full)):
            rows.append({"status": "done", "question_id": f"q{i}", "variant": variant,
                         "question_type": "a" if i < 2 else "b", "correct": bool(correct)})
    rows.append({"status": "error", "question_id": "q9", "variant": "full"})
    metrics, per_type = lme.paired_summary(rows)
    assert metrics["paired_questions"] == 4
    assert metrics["focused_accuracy"] == 0.75 and metrics["full_accuracy"] == 0.25
    assert metrics["full_minus_focused"] == -0.5
    assert metrics["full_minus_focused_ci_lo"] <= -0.5 <= metrics["full_minus_focused_ci_hi"]
    assert list(per_type["question_type"]) == ["a", "b"] and list(per_type["full"]) == [0.0, 0.5]


def test_local_run_of_both_variants_pairs_every_question(tiny, tmp_path: Path) -> None:
    from context_helpers import family_and_ctx

    spec = parse_spec({"family": "context", "name": "lme", "test_mode": True,
                       "context": {"task": "longmemeval", "test_samples": 2, "max_tokens": 4}})
    family, ctx = family_and_ctx(spec, tmp_path, tiny)
    conditions = family.conditions()
    assert [c["variant"] for c in conditions] == ["focused", "full"]
    results = [family.run_condition(ctx, p) for p in conditions]
    # The tiny model's context (512) is shorter than some full prompts: flagged, not sent.
    assert all(r.metrics["rows"] == 2 for r in results)
    summary = pd.DataFrame([{**p, **r.metrics} for p, r in zip(conditions, results)])
    parent = family.summarize(ctx, summary)
    assert "total_calls_made" in parent.metrics


def test_number_words_and_digits_match_each_other() -> None:
    from lmlab.context.scoring import contains_answer

    assert contains_answer("You volunteer 6 hours a week now.", ["six"])
    assert contains_answer("Three instruments.", ["3"])
    assert not contains_answer("You volunteer 16 hours.", ["six"])
