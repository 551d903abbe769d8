"""The activation store (lmlab.activations): exact sizes, one pass per batch, resume, refusal when disk is short."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lmlab.activations as activations
from lmlab.errors import LmlabError
from lmlab.hooks import capture_residuals
from lmlab.activations import ExtractionConfig, extract, stored_data_bytes
from lmlab.models import tiny_model
from lmlab.probes.chains import KNOWN_LABELS, SAMPLE_PATH, load_chains, tokenize_chains


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_model("llama", n_layers=3, hidden_size=64)


@pytest.fixture
def chain_file(tmp_path):
    path = tmp_path / "chains.json"
    path.write_text(json.dumps(json.loads(SAMPLE_PATH.read_text())[:30]))
    return path


@pytest.fixture
def tokens(tiny_lm, chain_file):
    chains = load_chains(chain_file)
    return chains.digest, tokenize_chains(tiny_lm, chains.chains[:12], KNOWN_LABELS)


def test_stored_bytes_per_token_and_layer_equal_width_times_dtype_size(tiny_lm, tokens, tmp_path):
    digest, chains = tokens
    config = ExtractionConfig(layers=(0, 2), dtype="float16", batch_size=5)
    cache, report = extract(tiny_lm, chains, digest, config, tmp_path, log=False)
    stored = sum(stored_data_bytes(p) for p in (cache.directory / "shards").glob("*.safetensors"))
    n_tokens = sum(c.n_tokens for c in chains)
    assert stored / (n_tokens * len(config.layers)) == tiny_lm.hidden_size * 2
    assert report.planned_bytes == stored


def test_cached_activations_equal_a_single_unpadded_forward(tiny_lm, tokens, tmp_path):
    digest, chains = tokens
    cache, _ = extract(tiny_lm, chains, digest, ExtractionConfig((1,), "float16", 4), tmp_path,
                       log=False)
    cached = cache.layer(1, chains)
    for chain, acts in zip(chains[:3], cached):
        ids = torch.from_numpy(chain.input_ids)[None]
        alone = capture_residuals(tiny_lm, ids, torch.ones_like(ids), [1])[1][0]
        assert acts.shape == (chain.n_tokens, tiny_lm.hidden_size)
        np.testing.assert_allclose(acts, alone.float().numpy(), atol=2e-2, rtol=1e-2)


def test_one_forward_pass_per_batch_captures_every_layer(tiny_lm, tokens, tmp_path, monkeypatch):
    digest, chains = tokens
    calls = []
    real = activations.capture_residuals

    def counting(lm, ids, mask, layers, dtype=None):
        calls.append(tuple(layers))
        return real(lm, ids, mask, layers, dtype)

    monkeypatch.setattr(activations, "capture_residuals", counting)
    extract(tiny_lm, chains, digest, ExtractionConfig((0, 1, 2), "bfloat16", 5), tmp_path, log=False)
    assert calls == [(0, 1, 2)] * 3  # 12 chains, batches of 5


def test_an_interrupted_extraction_resumes_without_redoing_finished_items(tiny_lm, tokens, tmp_path,
                                                                          monkeypatch):
    digest, chains = tokens
    config = ExtractionConfig((0, 2), "float16", 4)
    real = activations.capture_residuals
    seen: list[int] = []

    def dies_on_second_batch(lm, ids, mask, layers, dtype=None):
        seen.append(ids.shape[0])
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(lm, ids, mask, layers, dtype)

    monkeypatch.setattr(activations, "capture_residuals", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(tiny_lm, chains, digest, config, tmp_path, log=False)
    monkeypatch.setattr(activations, "capture_residuals", real)
    cache, report = extract(tiny_lm, chains, digest, config, tmp_path, log=False)
    assert (report.n_reused, report.n_extracted, report.forward_passes) == (4, 8, 2)
    assert len(cache.items) == 12
    again = extract(tiny_lm, chains, digest, config, tmp_path, log=False)[1]
    assert (again.n_extracted, again.forward_passes) == (0, 0)


def test_a_cache_with_more_layers_is_reused_for_a_subset(tiny_lm, tokens, tmp_path):
    digest, chains = tokens
    first, _ = extract(tiny_lm, chains, digest, ExtractionConfig((0, 1, 2)), tmp_path, log=False)
    second, report = extract(tiny_lm, chains, digest, ExtractionConfig((1,)), tmp_path, log=False)
    assert second.directory == first.directory and report.n_extracted == 0


def test_extraction_refuses_when_the_disk_cannot_hold_it(tiny_lm, tokens, tmp_path, monkeypatch):
    digest, chains = tokens
    monkeypatch.setattr(activations.shutil, "disk_usage",
                        lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(LmlabError, match="activation cache needs .* GB"):
        extract(tiny_lm, chains, digest, ExtractionConfig((0,)), tmp_path, log=False)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_the_manifest_lists_every_item_with_its_ids_hash(tiny_lm, tokens, tmp_path):
    digest, chains = tokens
    cache, _ = extract(tiny_lm, chains, digest, ExtractionConfig((0,)), tmp_path, log=False)
    manifest = cache.manifest()
    assert manifest["dataset_digest"] == digest and manifest["width"] == tiny_lm.hidden_size
    by_id = {item["id"]: item for item in manifest["items"]}
    for chain in chains:
        assert by_id[chain.task_id]["n_tokens"] == chain.n_tokens
        assert by_id[chain.task_id]["ids_hash"] == chain.ids_hash
    json.dumps(manifest)


def test_a_length_mismatch_is_an_error_not_a_truncation(tiny_lm, tokens, tmp_path):
    digest, chains = tokens
    cache, _ = extract(tiny_lm, chains, digest, ExtractionConfig((0,)), tmp_path, log=False)
    item = cache.items[chains[0].task_id]
    # The manifest claims this longer chain, but the shard holds one token less.
    longer = type(chains[0])(chains[0].task_id, np.r_[chains[0].input_ids, 5], chains[0].labels,
                             chains[0].chain_start)
    cache.items[longer.task_id] = {**item, "ids_hash": longer.ids_hash}
    with pytest.raises(LmlabError, match="cached activations for"):
        cache.layer(0, [longer])


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": ()}, "at least one layer"), ({"layers": (1, 1)}, "must not repeat"),
    ({"layers": (1,), "dtype": "float32"}, "dtype"), ({"layers": (1,), "batch_size": 0}, "batch_size"),
])
def test_bad_extraction_settings_are_refused(kwargs, message):
    with pytest.raises(LmlabError, match=message):
        ExtractionConfig(**kwargs)


def test_layers_outside_the_model_are_refused(tiny_lm, tokens, tmp_path):
    digest, chains = tokens
    with pytest.raises(LmlabError, match="outside the model"):
        extract(tiny_lm, chains, digest, ExtractionConfig((7,)), tmp_path, log=False)


# ---------------------------------------------------------------- items of any family


class _Response:
    """A diffing-style item: prompt + response ids, only the response stored."""

    def __init__(self, task_id: str, ids: list[int], start: int) -> None:
        self.task_id, self.input_ids, self.store_from = task_id, np.asarray(ids), start

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def ids_hash(self) -> str:
        return activations.ids_hash(self.input_ids)


def _responses(n: int = 5) -> list[_Response]:
    rng = np.random.default_rng(0)
    return [_Response(f"r{i}", rng.integers(3, 300, 6 + 3 * i).tolist(), 2 + i) for i in range(n)]


def test_response_only_items_store_exactly_their_response_tokens(tiny_lm, tmp_path):
    items = _responses()
    config = ExtractionConfig((0, 2), "bfloat16", 2)
    cache, report = extract(tiny_lm, items, "responses", config, tmp_path, log=False)
    stored = sum(stored_data_bytes(p) for p in (cache.directory / "shards").glob("*.safetensors"))
    kept = sum(item.n_tokens - item.store_from for item in items)
    assert stored == kept * len(config.layers) * tiny_lm.hidden_size * 2 == report.planned_bytes
    first = items[1]
    ids = torch.as_tensor(first.input_ids)[None]
    alone = capture_residuals(tiny_lm, ids, torch.ones_like(ids), [2])[2][0, first.store_from:]
    got = cache.layer(2, [first])[0]
    assert got.shape == (first.n_tokens - first.store_from, tiny_lm.hidden_size)
    np.testing.assert_allclose(got, alone.float().numpy(), atol=3e-2, rtol=2e-2)


class _FirstTwoCoordinates:
    key = "first-two"
    n_outputs = 2

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, :2] * (layer + 1)


def test_stream_through_stores_projections_not_residuals(tiny_lm, tmp_path):
    items = _responses(3)
    config = ExtractionConfig((1,), "float16", 4)
    raw, _ = extract(tiny_lm, items, "responses", config, tmp_path, log=False)
    projected, report = extract(tiny_lm, items, "responses", config, tmp_path, log=False,
                                projection=_FirstTwoCoordinates())
    assert projected.directory != raw.directory and projected.info["projection"] == "first-two"
    stored = sum(stored_data_bytes(p) for p in (projected.directory / "shards").glob("*"))
    assert stored == sum(i.n_tokens - i.store_from for i in items) * 2 * 4 == report.planned_bytes
    for scores, residual in zip(projected.layer(1, items), raw.layer(1, items)):
        assert scores.shape == (residual.shape[0], 2)
        np.testing.assert_allclose(scores, residual[:, :2] * 2, atol=3e-2, rtol=2e-2)


def test_the_plan_line_gives_size_and_time_before_the_work(tiny_lm, tmp_path, capsys):
    items = _responses(2)
    extract(tiny_lm, items, "responses", ExtractionConfig((0,), "float16", 4), tmp_path,
            tokens_per_second=10.0, unit="responses")
    line = capsys.readouterr().out
    tokens = sum(i.n_tokens for i in items)
    assert "0 of 2 responses already cached" in line and f"about {tokens / 10:.0f} s" in line
    assert f"x {tiny_lm.hidden_size} width x 2 bytes" in line
