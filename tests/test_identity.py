"""A condition's identity: content digests, resolved model facts, operational settings.

The sweep-level tests run the steering family on a tiny model: what must be recomputed
is recomputed (an edited data file at the same path), and what must not is reused (a
different batch size, fewer reported splits).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from lmlab import __version__
from lmlab.data.prompts import BUNDLED_DIR
from lmlab.identity import (condition_identity, file_digest, folder_digest, model_identity,
                            path_digest, strip_operational)
from lmlab.models import ModelSpec
from lmlab.steering.family import SteeringFamily
from lmlab.sweeps.runner import run_sweep
from lmlab.sweeps.spec import parse_spec
from lmlab.tracking import KEY_TAG, PARENT_TAG


# ------------------------------------------------------------------ digests

def test_editing_a_file_at_the_same_path_changes_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n')
    before = file_digest(path)
    path.write_text('{"prompt": "b"}\n')
    assert file_digest(path) != before


def test_removing_a_file_from_a_folder_changes_its_digest(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"essay {name}")
    before = folder_digest(tmp_path)
    (tmp_path / "b.txt").unlink()
    assert folder_digest(tmp_path) != before


def test_a_renamed_copy_of_a_folder_has_the_same_digest(tmp_path: Path) -> None:
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text("same text")
    assert path_digest(tmp_path / "one") == path_digest(tmp_path / "two")


# ------------------------------------------------------------------ model identity

def test_model_identity_names_the_resolved_dtype_and_device_type() -> None:
    cpu = model_identity(ModelSpec("tiny:llama", device="cpu"))
    gpu = model_identity(ModelSpec("tiny:llama", device="cuda", dtype="float32"))
    assert cpu["dtype"] == "float32" and cpu["device_type"] == "cpu"
    assert gpu["device_type"] == "cuda"
    assert cpu != gpu


def test_model_identity_of_a_local_directory_follows_its_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    before = model_identity(ModelSpec(str(tmp_path), device="cpu"))
    (tmp_path / "model.safetensors").write_bytes(b"weights v2")
    after = model_identity(ModelSpec(str(tmp_path), device="cpu"))
    assert before["weights_digest"] != after["weights_digest"]


def test_model_identity_includes_the_adapter_digest(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"lora v1")
    spec = ModelSpec("tiny:llama", adapter=str(adapter), device="cpu")
    before = model_identity(spec)["adapter"]["weights_digest"]
    (adapter / "adapter_model.safetensors").write_bytes(b"lora v2")
    assert model_identity(spec)["adapter"]["weights_digest"] != before


def test_a_hub_id_that_is_not_cached_is_named_unresolved() -> None:
    ident = model_identity(ModelSpec("nobody/not-a-real-model", device="cpu"))
    assert "unresolved" in ident["revision"]


def test_condition_identity_carries_the_lmlab_version() -> None:
    ident = condition_identity("steering", {}, {}, {}, {"layer": 1})
    assert ident["lmlab"] == __version__


def test_strip_operational_reaches_into_nested_settings() -> None:
    settings = {"n_prompts": 20, "generation": {"batch_size": 32, "max_new_tokens": 48}, "register": True}
    assert strip_operational(settings, ["generation.batch_size", "register"]) == {
        "n_prompts": 20, "generation": {"max_new_tokens": 48}}


# ------------------------------------------------------------------ sweeps

@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    return tmp_path


def tiny_spec(data_dir: Path, **steering):  # type: ignore[no-untyped-def]
    settings = {"n_prompts": 3, "n_train": 4, "eval_splits": ["harm_test", "benign"],
                "generation": {"max_new_tokens": 3, "batch_size": 4}, "kl_tokens": 2,
                "data": {"harm_test": str(data_dir / "harm_test.jsonl")}, "controls": []}
    for key, value in steering.items():
        settings[key] = {**settings[key], **value} if isinstance(value, dict) else value
    return parse_spec({"family": "steering", "name": "ident", "model": {"name": "tiny:llama"},
                       "grid": {"layer": [1], "alpha": [0.5]}, "steering": settings})


def count_runs(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    original = SteeringFamily.run_condition

    def counting(self, ctx, params):  # type: ignore[no-untyped-def]
        calls.append(dict(params))
        return original(self, ctx, params)

    monkeypatch.setattr(SteeringFamily, "run_condition", counting)
    return calls


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "harm_test.jsonl").write_text((BUNDLED_DIR / "harm_test.jsonl").read_text())
    return folder


def test_editing_a_prompt_file_at_the_same_path_recomputes(store: Path, data_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_runs(monkeypatch)
    run_sweep(tiny_spec(data_dir))
    first = len(calls)
    path = data_dir / "harm_test.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([json.dumps({"id": "new", "prompt": "An edited first prompt"})]
                              + lines[1:]) + "\n")
    run_sweep(tiny_spec(data_dir))
    assert first == 2 and len(calls) == 4  # baseline and the steered condition, both again


def test_changing_only_the_batch_size_reuses_every_condition(store: Path, data_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_runs(monkeypatch)
    run_sweep(tiny_spec(data_dir))
    run_sweep(tiny_spec(data_dir, generation={"batch_size": 1}))
    assert len(calls) == 2


def test_asking_for_fewer_splits_reuses_a_run_that_has_them(store: Path, data_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_runs(monkeypatch)
    run_sweep(tiny_spec(data_dir))
    run_sweep(tiny_spec(data_dir, eval_splits=["benign"]))
    assert len(calls) == 2


def test_asking_for_more_splits_runs_again_and_reuses_the_cached_splits(
        store: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmlab.steering.family as steering

    run_sweep(tiny_spec(data_dir, eval_splits=["benign"]))
    scored: list = []
    original = steering.SteeringFamily._score

    def counting(self, lm, prompts, edits, base_rows, split):  # type: ignore[no-untyped-def]
        scored.append(split)
        return original(self, lm, prompts, edits, base_rows, split)

    monkeypatch.setattr(steering.SteeringFamily, "_score", counting)
    outcome = run_sweep(tiny_spec(data_dir, eval_splits=["harm_test", "benign"]))
    assert set(scored) == {"harm_test"}  # benign came from the evaluation cache
    assert set(outcome.summary["reused"]) == {False}


def test_every_child_logs_its_inputs_as_mlflow_datasets(store: Path, data_dir: Path) -> None:
    outcome = run_sweep(tiny_spec(data_dir))
    client = MlflowClient()
    runs = client.search_runs([outcome.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
    run = runs[0]
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert {"harm_test", "benign", "harm_train", "harmless_train"} <= set(inputs)
    harm_test = inputs["harm_test"]
    assert harm_test.digest == file_digest(data_dir / "harm_test.jsonl")
    profile = json.loads(harm_test.profile)
    assert profile["rows_kept"] == 3 and profile["rows_read"] >= 3
    assert "duplicates_removed" in profile
    identity = json.loads(Path(client.download_artifacts(run.info.run_id, "identity.json")).read_text())
    assert identity["output_data"]["harm_test"] == harm_test.digest
    assert set(identity["data"]) == {"harm_train", "harmless_train"}
    assert identity["model"]["device_type"] == "cpu"
    assert run.data.tags[KEY_TAG]


# ------------------------------------------------------------------ runtime threads

def test_threads_come_from_the_environment_then_the_spec_then_physical_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.runtime import RuntimeSpec, physical_cores, resolve_threads

    monkeypatch.delenv("LMLAB_THREADS", raising=False)
    assert resolve_threads(RuntimeSpec()) == (physical_cores(), "physical cores")
    assert resolve_threads(RuntimeSpec(threads=3)) == (3, "runtime.threads")
    monkeypatch.setenv("LMLAB_THREADS", "5")
    assert resolve_threads(RuntimeSpec(threads=3)) == (5, "LMLAB_THREADS")


def test_a_bad_thread_count_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.errors import LmlabError
    from lmlab.runtime import RuntimeSpec, resolve_threads

    with pytest.raises(LmlabError, match="runtime.threads"):
        RuntimeSpec.from_dict({"threads": "four"})
    monkeypatch.setenv("LMLAB_THREADS", "many")
    with pytest.raises(LmlabError, match="LMLAB_THREADS"):
        resolve_threads(RuntimeSpec())


def test_the_thread_count_is_logged_on_the_parent_and_is_not_part_of_any_key(
        store: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_runs(monkeypatch)
    spec = tiny_spec(data_dir)
    outcome = run_sweep(spec)
    parent = MlflowClient().get_run(outcome.parent_run_id)
    assert parent.data.params["runtime.threads"] == "1"
    threaded = parse_spec({**spec.source, "runtime": {"threads": 2}})
    monkeypatch.delenv("LMLAB_THREADS")
    try:
        run_sweep(threaded)
    finally:
        torch.set_num_threads(1)  # keep the rest of the test session single-threaded
    assert len(calls) == 2 and threaded.study_name == spec.study_name


def test_prompts_longer_than_max_prompt_chars_are_dropped_and_counted(store: Path,
                                                                       data_dir: Path) -> None:
    outcome = run_sweep(tiny_spec(data_dir, max_prompt_chars=150))
    metrics = MlflowClient().get_run(outcome.parent_run_id).data.metrics
    assert metrics["data/harm_test/dropped_too_long"] > 0
    assert metrics["data/harm_test/rows_kept"] == 3
