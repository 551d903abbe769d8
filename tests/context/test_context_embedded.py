"""The embedded SmolLM2-135M: real-tokenizer sizing and a tiny needle grid (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from context_helpers import family_and_ctx
from lmlab.sweeps.spec import parse_spec

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def smollm():  # type: ignore[no-untyped-def]
    from lmlab.models import load_model

    return load_model()


def test_needle_grid_on_the_embedded_model(smollm, tmp_path: Path) -> None:
    spec = parse_spec({"family": "context", "name": "niah-embedded",
                       "grid": {"length": [256, 1024], "depth": [50]},
                       "context": {"task": "niah", "samples": 2, "max_tokens": 12}})
    family, ctx = family_and_ctx(spec, tmp_path, smollm)
    results = [family.run_condition(ctx, p) for p in family.conditions()]
    for result in results:
        assert result.metrics["rows_done"] == 2
        assert result.metrics["size_error_max"] <= 0.01
        assert 40 <= result.metrics["depth_actual_mean"] <= 60
    rows = results[0].tables["rows"]
    assert (rows["reported_tokens"] == rows["built_tokens"]).all()


def test_repeated_words_on_the_embedded_model_classifies_every_output(smollm, tmp_path: Path) -> None:
    spec = parse_spec({"family": "context", "name": "rw-embedded",
                       "grid": {"words": [10], "position": [0.0, 1.0]},
                       "context": {"task": "repeated_words", "samples": 1}})
    family, ctx = family_and_ctx(spec, tmp_path, smollm)
    results = [family.run_condition(ctx, p) for p in family.conditions()]
    for result in results:
        shares = [result.metrics[f"share_{c}"] for c in
                  ("exact", "ran_to_cap", "refused", "cut_short", "different")]
        assert sum(shares) == pytest.approx(1.0)
        # refused outputs are left out of the copy metrics, as in the earlier project
        kept = 1 - result.metrics["share_refused"]
        assert result.metrics["levenshtein_score_n"] == pytest.approx(kept)
