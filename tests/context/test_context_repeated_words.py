"""Known answers for each repeated-words metric on hand-made outputs."""

from __future__ import annotations

import pytest

from lmlab.context import repeated_words as rw

GOLD = rw.gold_text("apple", "apples", 5, 2)  # "apple apple apples apple apple"


def test_gold_text_puts_the_modified_word_at_its_index() -> None:
    assert GOLD == "apple apple apples apple apple"


def test_levenshtein_score_is_one_minus_distance_over_longer_length() -> None:
    assert rw.levenshtein_score(GOLD, GOLD) == 1.0
    # one deleted character ("apples" -> "apple") out of 30
    assert rw.levenshtein_score(GOLD, "apple apple apple apple apple") == pytest.approx(1 - 1 / 30)
    # twice as long: distance 31 over 61 characters (the old cap's "0.5 floor")
    assert rw.levenshtein_score(GOLD, GOLD + " " + GOLD) == pytest.approx(1 - 31 / 61)


def test_levenshtein_score_is_zero_for_empty_texts() -> None:
    assert rw.levenshtein_score(GOLD, "") == 0.0
    assert rw.levenshtein_score("", GOLD) == 0.0


def test_word_count_delta_is_gold_minus_output_words() -> None:
    assert rw.word_count_delta("apple apple", GOLD) == 3
    assert rw.word_count_delta(GOLD + " apple", GOLD) == -1


def test_modified_word_present_uses_trailing_space_or_leading_space_at_the_end() -> None:
    assert rw.modified_word_present(GOLD, "apples", 2, 5)
    assert not rw.modified_word_present("apple apple apple", "apples", 2, 5)
    last = rw.gold_text("apple", "apples", 3, 2)  # "apple apple apples"
    assert rw.modified_word_present(last, "apples", 2, 3)
    assert not rw.modified_word_present("apples apple apple", "apples", 2, 3)


def test_position_accuracy_compares_character_offsets_with_the_gold() -> None:
    assert rw.correct_position(GOLD, GOLD, "apples", 2, 5)
    shifted = "apple apples apple apple apple"
    assert rw.modified_word_present(shifted, "apples", 2, 5)
    assert not rw.correct_position(shifted, GOLD, "apples", 2, 5)


def test_modified_word_position_is_the_word_index_in_the_output() -> None:
    assert rw.modified_word_position(GOLD, "apples") == 2
    assert rw.modified_word_position("apples apple", "apples") == 0
    assert rw.modified_word_position("apple apple", "apples") is None


@pytest.mark.parametrize("output,stop,expected", [
    (GOLD, "eos", "exact"),
    (GOLD + " apple apple apple", "length", "ran_to_cap"),
    ("I'm sorry, I can't repeat that.", "eos", "refused"),
    ("apple apple apples", "eos", "cut_short"),
    ("apple apple apples apple apple apple", "eos", "different"),
])
def test_output_category(output: str, stop: str, expected: str) -> None:
    assert rw.category(output, GOLD, stop, "apple", "apples") == expected


def test_stratum_indices_partition_positions_and_thin_to_samples() -> None:
    positions = [0.0, 0.5, 1.0]
    strata = [rw.stratum_indices(101, p, positions, 1000) for p in positions]
    assert sorted(i for s in strata for i in s) == list(range(101))
    assert rw.stratum_indices(101, 0.0, positions, 3) == [0, 12, 25]
    assert rw.stratum_indices(101, 1.0, positions, 1) == [76]


def test_settings_reject_multiword_or_equal_words() -> None:
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError):
        rw.RepeatedWordsSettings(common_word="red apple")
    with pytest.raises(LmlabError):
        rw.RepeatedWordsSettings(common_word="apple", modified_word="apple")
