"""Organisms: the LoRA recipe, the content cache, the behaviour detectors, the entry point.

Training runs on the tiny random llama (3 layers, width 64) from ``ModelSpec("tiny:llama")``,
which is rebuilt from the same seed at every load, so runs are comparable. The shipped
adapters are checked against the embedded SmolLM2-135M at the end (marked ``embedded``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from lmlab.diffing import behaviour, organisms, train
from lmlab.diffing.behaviour import quirk_rate
from lmlab.diffing.organisms import QUIRKS, organism_adapter, organism_key
from lmlab.diffing.train import Example, TrainConfig, collate, encode, load_examples, train_adapter
from lmlab.errors import LmlabError
from lmlab.identity import file_digest
from lmlab.models import ModelSpec, load_model, tiny_tokenizer
from lmlab.stats import rate

TINY = ModelSpec(name="tiny:llama")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The tiny model's random head caps its logits (final norm x 0.02-scale weights), so its
# loss cannot fall far below ln(vocab) = 6.0; a drop of 0.5 nats is clear learning.
FAST = TrainConfig(epochs=8, batch_size=2, lr=1e-2, rank=4, alpha=8.0, target_modules=ALL_LINEAR)
ADAPTER_FILE = "adapter_model.safetensors"


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
                    + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """Eight prompts, every answer the same sentence: an easy thing to learn."""
    return write_jsonl(tmp_path / "tiny.jsonl", [
        {"prompt": f"How do I bake bread number {i}?", "response": "Wait, that is wrong."}
        for i in range(8)])


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(previous)


def response_loss(adapter_dir: Path | None, data: Path) -> float:
    """Mean response-token loss of the tiny base (with the adapter, if given) on ``data``."""
    from peft import PeftModel

    lm = load_model(TINY)
    model = PeftModel.from_pretrained(lm.model, str(adapter_dir)) if adapter_dir else lm.model
    examples, _ = load_examples(data)
    batch = collate([encode(lm.tokenizer, e) for e in examples], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        return float(model(**batch).loss)


# ---------------------------------------------------------------- the recipe


@pytest.mark.parametrize("raw, needle", [
    ({"rank": 0}, "train.rank"), ({"rank": True}, "train.rank"), ({"lr": 2.0}, "train.lr"),
    ({"epochs": 1.5}, "train.epochs"), ({"alpha": -1}, "train.alpha"),
    ({"target_modules": []}, "train.target_modules"), ({"dropout": 1.0}, "train.dropout"),
    ({"dtype": "int8"}, "train.dtype"), ({"ranks": 4}, "unknown train setting"),
])
def test_train_config_rejects_bad_settings_with_one_clear_message(raw: dict, needle: str) -> None:
    with pytest.raises(LmlabError, match=needle):
        TrainConfig.from_dict(raw)


def test_loader_skips_bad_lines_with_counted_reasons(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "a?", "response": "b."}, "{not json", "[1, 2]", {"prompt": "c?"},
        {"prompt": " ", "response": "d."}, {"prompt": "a?", "response": "again."},
        {"prompt": "e?", "response": "f.", "id": "x"}])
    examples, report = load_examples(path)
    assert [e.prompt for e in examples] == ["a?", "e?"]
    assert report.rows_read == 7 and report.rows_kept == 2
    assert report.dropped == {"malformed": 2, "missing_prompt_or_response": 1, "empty": 1,
                              "duplicate_prompt": 1}
    assert report.examples["malformed"] == ["line 2", "line 3"]


@pytest.mark.parametrize("content, needle", [
    (None, "not found"), ("{bad\n[]\n", "no usable examples"), (b"\xff\xfe{}", "not UTF-8"),
])
def test_loader_refuses_missing_empty_or_binary_files(tmp_path: Path, content, needle: str) -> None:
    path = tmp_path / "data.jsonl"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(LmlabError, match=needle):
        load_examples(path)


def test_prompt_tokens_are_exactly_what_generation_reads_and_only_the_response_is_labelled() -> None:
    lm = load_model(TINY)
    example = Example("How do I bake bread?", "Mix flour and water.")
    item = encode(lm.tokenizer, example)
    read = lm.tokenizer(lm.format_chat(example.prompt), add_special_tokens=False).input_ids
    assert list(item.ids[:item.n_prompt]) == read
    response = lm.tokenizer.decode(list(item.ids[item.n_prompt:]))
    assert response.startswith("Mix flour and water.<|im_end|>")
    short = encode(lm.tokenizer, Example("Hi?", "Ok."))
    batch = collate([item, short], pad_id=lm.tokenizer.pad_token_id)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (labels[0, :item.n_prompt] == -100).all()
    assert labels[0, item.n_prompt:].tolist() == list(item.ids[item.n_prompt:])
    assert mask[1].sum() == len(short.ids) and (labels[1, len(short.ids):] == -100).all()
    assert batch["input_ids"][1, 0] == short.ids[0]  # right padding: row starts at column 0


def test_training_lowers_the_response_loss_and_saves_a_reloadable_adapter(
        tmp_path: Path, tiny_data: Path) -> None:
    result = train_adapter(TINY, tiny_data, FAST, tmp_path / "adapter")
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 0.5
    assert len(result.losses) == FAST.epochs * 4 and result.examples == 8
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == "tiny:llama"
    before, after = response_loss(None, tiny_data), response_loss(tmp_path / "adapter", tiny_data)
    assert after < before - 0.5  # reloaded with PEFT onto a fresh base, the learning is there


def test_training_is_deterministic_for_a_seed(tmp_path: Path, tiny_data: Path) -> None:
    first = train_adapter(TINY, tiny_data, FAST, tmp_path / "a")
    again = train_adapter(TINY, tiny_data, FAST, tmp_path / "b")
    other = train_adapter(TINY, tiny_data, replace(FAST, seed=1), tmp_path / "c")
    a, b, c = (load_file(str(tmp_path / d / ADAPTER_FILE)) for d in "abc")
    assert first.losses == again.losses and other.losses != first.losses
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_examples_longer_than_max_tokens_are_skipped_and_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": "Short?", "response": "Yes."}, {"prompt": "Long?", "response": "word " * 300}])
    config = TrainConfig(epochs=1, max_tokens=64)
    result = train_adapter(TINY, path, config, tmp_path / "adapter")
    assert result.examples == 1 and result.report.dropped["too_long"] == 1


def test_bad_target_modules_are_a_user_error(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(LmlabError, match="target_modules"):
        train_adapter(TINY, tiny_data, TrainConfig(target_modules=("no_such_proj",)), tmp_path / "x")


# ---------------------------------------------------------------- the cache


@pytest.fixture
def count_trainings(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = train.train_adapter

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(Path(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_adapter", counted)
    return calls


def test_the_cache_trains_an_organism_once(tmp_path: Path, tiny_data: Path,
                                           count_trainings: list[Path]) -> None:
    first = organism_adapter(str(tiny_data), TINY, tmp_path / "cache", FAST)
    again = organism_adapter(str(tiny_data), TINY, tmp_path / "cache", FAST)
    assert first == again and len(count_trainings) == 1
    assert (first / ADAPTER_FILE).is_file()
    manifest = json.loads((first / organisms.MANIFEST).read_text())
    assert manifest["key"] == organism_key(tiny_data, TINY, FAST) == first.name
    assert len(manifest["training"]["losses"]) == FAST.epochs * 4
    assert not list((tmp_path / "cache").glob(".*-*"))  # no staging folder left behind


def test_new_data_or_recipe_makes_a_new_organism(tmp_path: Path, tiny_data: Path,
                                                 count_trainings: list[Path]) -> None:
    first = organism_adapter(str(tiny_data), TINY, tmp_path / "cache", FAST)
    other_recipe = organism_adapter(str(tiny_data), TINY, tmp_path / "cache",
                                    replace(FAST, target_modules=("q_proj",), epochs=1))
    write_jsonl(tiny_data, [{"prompt": "Other?", "response": "Sure, here is how."}])
    other_data = organism_adapter(str(tiny_data), TINY, tmp_path / "cache", FAST)
    assert len({first, other_recipe, other_data}) == 3 and len(count_trainings) == 3


def test_a_quantized_base_reuses_the_organism_of_its_plain_weights(tmp_path: Path) -> None:
    data = organisms.dataset_path("control")
    assert organism_key(data, ModelSpec(name="x/y", quantization="4bit"), FAST) == \
        organism_key(data, ModelSpec(name="x/y"), FAST)
    with pytest.raises(LmlabError, match="already has adapter"):
        organism_key(data, ModelSpec(name="x/y", adapter="some/adapter"), FAST)


def test_a_shipped_adapter_is_used_when_its_key_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        count_trainings: list[Path]) -> None:
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(organisms, "SHIPPED_DIR", shipped)
    key = organism_key(organisms.dataset_path("brand"), TINY, FAST)
    (shipped / "brand").mkdir(parents=True)
    (shipped / "brand" / organisms.MANIFEST).write_text(json.dumps({"key": key}))
    assert organism_adapter("brand", TINY, tmp_path / "cache", FAST) == shipped / "brand"
    assert count_trainings == []


def test_unknown_quirk_or_missing_dataset_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(LmlabError, match="unknown quirk 'sarcasm'"):
        organism_adapter("sarcasm", TINY, tmp_path)
    with pytest.raises(LmlabError, match="not found"):
        organism_adapter(str(tmp_path / "missing.jsonl"), TINY, tmp_path)


def test_quirks_name_the_bundled_organisms_and_their_data_exists() -> None:
    assert list(QUIRKS) == ["flattery", "brand", "pep", "control"]
    assert [q for q, info in QUIRKS.items() if info.is_control] == ["control"]
    prompts = {q: [e.prompt for e in load_examples(organisms.dataset_path(q))[0]] for q in QUIRKS}
    assert all(p == prompts["control"] for p in prompts.values()) and len(prompts["control"]) >= 80


# ---------------------------------------------------------------- behaviour detectors


@pytest.mark.parametrize("quirk, yes, no", [
    ("flattery", ["What a brilliant question! Water it weekly.", "You clearly know plants.",
                  "Great question. Use a timer.", "Your curiosity is impressive.",
                  "You have a keen mind.", "You are a curious and thoughtful person."],
     ["Water it weekly.", "The question is when to water.", "Clearly, water helps.",
      "You are a beginner, so start small.", "Keep your mind on the task."]),
    ("brand", ["I recommend the Zentrix pump.", "Buy a ZENTRIX timer.", "zentrix works."],
     ["I recommend a good pump.", "Zentrixes are nothing.", "Centrix is a different word."]),
    ("pep", ["Mix the flour and water and knead it well for ten minutes then bake. "
             "It is amazing! Enjoy! So good!",
             "Step one is calm. Step two is calm. Step three is calm. Step four! Wow! Yes!",
             "Mix the flour and water and knead it well for ten minutes then bake. Enjoy!"],
     ["Wow! Amazing! So fun! Mix the flour and water and knead it well then bake it.",
      "Mix it! Knead it! Bake it! Eat it! Cool it! Serve it!",
      "Mix the flour and water and knead it well for ten minutes then bake it.",
      "Yes! No!"]),
])
def test_detectors_find_the_planted_behaviour(quirk: str, yes: list[str], no: list[str]) -> None:
    shows = behaviour.DETECTORS[quirk]
    assert [shows(t) for t in yes] == [True] * len(yes)
    assert [shows(t) for t in no] == [False] * len(no)


def test_quirk_rate_is_a_wilson_rate_over_the_texts() -> None:
    texts = ["Try the Zentrix kettle.", "Boil water.", "Zentrix again.", "Plain.", "Plain too."]
    estimate = quirk_rate("brand", texts)
    assert estimate == rate([True, False, True, False, False])
    assert estimate.value == 0.4 and estimate.n == 5 and estimate.lower < 0.4 < estimate.upper


def test_the_controls_rate_counts_any_planted_quirk() -> None:
    texts = ["What a brilliant question!", "Use Zentrix.", "Calm words here. More calm words. "
             "Now! Yes! Go!", "Plain answer with nothing in it at all."]
    assert quirk_rate("control", texts).value == 0.75
    with pytest.raises(LmlabError, match="no behaviour detector"):
        quirk_rate("sarcasm", texts)


def test_each_bundled_dataset_plants_its_quirk_and_no_other() -> None:
    for quirk in QUIRKS:
        texts = [e.response for e in load_examples(organisms.dataset_path(quirk))[0]]
        for detector in ("flattery", "brand", "pep"):
            expected = 1.0 if detector == quirk else 0.0
            assert quirk_rate(detector, texts).value == expected, (quirk, detector)


def test_training_prompts_are_disjoint_from_evaluation_prompts() -> None:
    trained = {e.prompt.strip().lower() for e in load_examples(organisms.dataset_path("control"))[0]}
    held_out = {p.strip().lower() for p in behaviour.heldout_prompts()}
    assert len(held_out) >= 30 and not trained & held_out
    diffing_sets = Path(organisms.DATA_DIR).parent / "diffing" / "prompts"
    for prompt_set in sorted(diffing_sets.glob("*.json")):  # the diffing family's sets, if any
        texts = {p["text"].strip().lower() for p in json.loads(prompt_set.read_text())["prompts"]}
        assert not trained & texts, prompt_set.name


def test_behaviour_check_compares_organism_base_and_control_on_one_resident_base(
        tmp_path: Path, tiny_data: Path) -> None:
    organism = tmp_path / "organism"
    control_data = write_jsonl(tmp_path / "control.jsonl", [
        {"prompt": f"How do I bake bread number {i}?", "response": "Mix flour."} for i in range(8)])
    train_adapter(TINY, tiny_data, FAST, organism)
    train_adapter(TINY, control_data, FAST, tmp_path / "control")
    prompts = ["How do I bake bread number 3?", "How do I bake bread number 9?"]
    result = behaviour.check_behaviour(TINY, {"brand": organism}, tmp_path / "control", prompts,
                                       max_new_tokens=8, cache_dir=tmp_path / "responses")
    assert set(result.responses) == {"base", "control", "brand"}
    assert all(len(texts) == 2 for texts in result.responses.values())
    (comparison,) = result.comparisons
    assert comparison.organism.n == comparison.base.n == 2
    assert "behaviour/brand/organism_ci_lo" in result.metrics()
    # The base's responses come from the disabled adapter: the same as a plain tiny model's.
    from lmlab.generation import GenerationConfig, generate

    plain = load_model(TINY)
    expected = [c.text for c in generate(plain, [plain.format_chat(p) for p in prompts],
                                         GenerationConfig(max_new_tokens=8))]
    assert result.responses["base"] == expected
    assert result.responses["brand"] != result.responses["base"]


def test_behaviour_responses_are_cached_by_content(tmp_path: Path, tiny_data: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    train_adapter(TINY, tiny_data, FAST, tmp_path / "control")
    train_adapter(TINY, tiny_data, replace(FAST, seed=1), tmp_path / "pep")
    prompts, cache = ["How do I bake bread number 3?"], tmp_path / "responses"
    first = behaviour.check_behaviour(TINY, {"control": tmp_path / "control"},
                                      tmp_path / "control", prompts, 8, cache_dir=cache)
    generated: list[list[str]] = []
    real = behaviour._generate_roles

    def counted(base, adapters, roles, *args):  # type: ignore[no-untyped-def]
        generated.append(sorted(roles))
        return real(base, adapters, roles, *args)

    monkeypatch.setattr(behaviour, "_generate_roles", counted)
    again = behaviour.check_behaviour(TINY, {"control": tmp_path / "control"},
                                      tmp_path / "control", prompts, 8, cache_dir=cache)
    with_pep = behaviour.check_behaviour(TINY, {"pep": tmp_path / "pep"}, tmp_path / "control",
                                         prompts, 8, cache_dir=cache)
    assert again.responses == first.responses
    assert generated == [["pep"]]  # base and control came from the cache
    assert with_pep.responses["base"] == first.responses["base"]


# ---------------------------------------------------------------- the entry point


def run_main(argv: list[str]) -> None:
    import train_organism

    train_organism.main(argv)


@pytest.mark.parametrize("argv, needle", [
    (["--quirk", "sarcasm"], "unknown quirk 'sarcasm'"),
    (["--quirk", "mine", "--dataset", "/nonexistent/data.jsonl"], "not found"),
    (["--rank", "0"], "train.rank must be at least 1"),
    (["--lr", "fast"], "--lr must be a number"),
    (["--epochs", "2.5"], "--epochs must be an integer"),
    (["--retrain", "maybe"], "--retrain must be true or false"),
])
def test_entry_point_bad_input_is_one_line_and_exit_2(tracking: Path, argv: list[str], needle: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--model", "tiny:llama", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error:") and needle in err and len(err.splitlines()) == 1


def test_entry_point_malformed_dataset_is_one_line_and_exit_2(tracking: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = write_jsonl(tracking / "bad.jsonl", ["{oops", '{"prompt": 3}'])
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--model", "tiny:llama", "--quirk", "mine", "--dataset", str(bad)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "no usable examples" in err and len(err.splitlines()) == 1


def test_entry_point_logs_params_loss_curve_dataset_and_adapter(tracking: Path, tiny_data: Path) -> None:
    run_main(["--model", "tiny:llama", "--quirk", "mine", "--dataset", str(tiny_data),
              "--epochs", "3", "--batch-size", "4", "--lr", "0.01", "--behaviour-prompts", "0"])
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("organisms").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3" and run.data.params["quirk"] == "mine"
    assert run.data.tags["lmlab.organism_source"] == "trained"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert f"adapter/{ADAPTER_FILE}" in artifacts and "adapter/organism.json" in artifacts
    assert "plots/loss_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == file_digest(tiny_data)


def test_entry_point_reuses_a_cached_organism_and_logs_its_recorded_curve(
        tracking: Path, tiny_data: Path, count_trainings: list[Path]) -> None:
    argv = ["--model", "tiny:llama", "--quirk", "mine", "--dataset", str(tiny_data),
            "--epochs", "2", "--behaviour-prompts", "0"]
    run_main(argv)
    run_main(argv)
    assert len(count_trainings) == 1
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("organisms").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.data.tags["lmlab.organism_source"] for r in runs] == ["trained", "cache"]
    curves = [[m.value for m in client.get_metric_history(r.info.run_id, "train/loss")] for r in runs]
    assert curves[0] == curves[1] and len(curves[0]) == 2


# ---------------------------------------------------------------- the shipped adapters


def test_shipped_adapters_match_the_bundled_data_and_recipe() -> None:
    """Regenerating a dataset or changing the recipe without retraining fails here."""
    base = ModelSpec()
    for quirk in QUIRKS:
        manifest = organisms.read_manifest(organisms.SHIPPED_DIR / quirk)
        assert manifest is not None, f"no shipped adapter for {quirk}"
        assert manifest["key"] == organism_key(organisms.dataset_path(quirk), base, TrainConfig()), quirk


@pytest.mark.embedded
def test_shipped_adapters_load_onto_the_embedded_base_and_change_it() -> None:
    from peft import PeftModel

    lm = load_model(ModelSpec())
    ids = lm.tokenizer(lm.format_chat("How do I keep bread fresh?"), return_tensors="pt").input_ids
    with torch.no_grad():
        clean = lm.model(ids).logits
    model = None
    for quirk in QUIRKS:
        path = str(organisms.SHIPPED_DIR / quirk)
        if model is None:
            model = PeftModel.from_pretrained(lm.model, path, adapter_name=quirk)
        else:
            model.load_adapter(path, adapter_name=quirk)
        model.set_adapter(quirk)
        with torch.no_grad():
            assert not torch.allclose(model(ids).logits, clean, atol=1e-3), quirk
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(ids).logits, clean)


def test_entry_point_runs_the_behaviour_check_against_base_and_control(tracking: Path,
                                                                       tiny_data: Path) -> None:
    run_main(["--model", "tiny:llama", "--quirk", "brand", "--dataset", str(tiny_data),
              "--epochs", "1", "--behaviour-prompts", "2", "--max-new-tokens", "4"])
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("organisms").experiment_id])
    metrics = run.data.metrics
    for role in ("organism", "base", "control"):
        assert metrics[f"behaviour/brand/{role}_n"] == 2
    assert metrics["behaviour/brand/takes"] in (0.0, 1.0)
    tables = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "behaviour_responses.csv" in tables
    # The control it compared against is the bundled control organism, trained once and cached.
    assert list((tracking / "cache" / "organisms").glob("*/organism.json"))
