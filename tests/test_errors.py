"""Bad input, clean exits: every row of docs/errors.md, run through the entry point's main().

Each row is one mistake a user can make (a spec value, a file, a command-line argument,
an environment variable) and the one line it must get on stderr, ``lmlab: error: ...``,
with exit code 2 and no traceback. Rows of the ``sweep`` entry point run with
``MLFLOW_RUN_ID`` set, as under ``mlflow run``: that run must end FAILED with the same
reason in its ``lmlab.failure`` tag. ``docs/errors.md`` is rendered from ``ROWS`` (run
``python tests/test_errors.py`` after editing them) and a test checks it lists exactly
these rows. A few true subprocess tests at the end prove the same through
``python entrypoints/...`` and ``mlflow run``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmlab.tracking import FAILURE_TAG

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
BEGIN, END = "<!-- rows:begin (generated from tests/test_errors.py) -->", "<!-- rows:end -->"
PREFIX = "lmlab: error: "
TMP = "<tmp>"  # stands for the test's own folder in inputs and lines
DROP = object()  # a change that removes the key

BASES: dict[str, dict[str, Any]] = {
    "steering": {
        "family": "steering", "name": "bad", "model": {"name": "tiny:llama"},
        "grid": {"method": ["suffix_contrast"], "layer": [1], "alpha": [0.5], "intervention": ["add"]},
        "steering": {"n_prompts": 2, "n_train": 2, "eval_splits": ["benign"],
                     "generation": {"max_new_tokens": 2, "batch_size": 4}, "kl_tokens": 2},
    },
    "probes": {
        "family": "probes", "name": "bad", "model": {"name": "tiny:llama"},
        "grid": {"label": ["backtracking"], "layer": [0], "lag": [0]},
        "probes": {"data": "sample", "max_chains": 8},
    },
    "niah": {
        "family": "context", "name": "bad", "model": {"name": "tiny:llama"},
        "grid": {"length": [64], "depth": [0]},
        "context": {"task": "niah", "samples": 1, "max_tokens": 4, "subject": "local"},
    },
    "longmemeval": {
        "family": "context", "name": "bad", "model": {"name": "tiny:llama"},
        "grid": {"variant": ["focused"]},
        "context": {"task": "longmemeval", "samples": 1, "max_tokens": 4, "subject": "local"},
    },
    "repeated_words": {
        "family": "context", "name": "bad", "model": {"name": "tiny:llama"},
        "grid": {"words": [4], "position": [0.5]},
        "context": {"task": "repeated_words", "samples": 1, "subject": "local"},
    },
}


@dataclass(frozen=True)
class Row:
    """One bad input. ``line`` is what follows ``lmlab: error: `` on stderr."""

    family: str  # the table's first column: spec, steering, probes, context, or an entry point
    line: str
    base: str | None = "steering"  # spec the changes apply to (sweep entry point)
    changes: Mapping[str, Any] = field(default_factory=dict)  # dotted key -> value or DROP
    text: str | None = None  # the spec file's raw text instead of a base
    args: tuple[str, ...] = ()  # extra arguments (after --spec for the sweep entry point)
    entry: str = "sweep"  # sweep, steer or probe_view
    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, bytes] = field(default_factory=dict)  # name -> content, under <tmp>
    shown: str | None = None  # how the input reads in the table (default: from the fields)
    code: int = 2


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def shown_input(row: Row) -> str:
    if row.shown:
        return row.shown
    parts = [f"no `{key}`" if value is DROP else f"`{key}: {_yaml_value(value)}`"
             for key, value in row.changes.items()]
    if row.text is not None:
        parts.append("spec file `" + row.text.replace("\n", "⏎") + "`")
    if row.args:
        script = {"sweep": "sweep.py --spec s.yaml", "steer": "steer.py",
                  "probe_view": "probe_view.py"}[row.entry]
        parts.append(f"`{script} {' '.join(row.args)}`")
    parts += [f"`{name}={value}`" for name, value in row.env.items()]
    return ", ".join(parts)


# ---------------------------------------------------------------- the rows

ROWS: list[Row] = [
    # ---- the spec file itself
    Row("spec", f"sweep spec not found: {TMP}/missing.yaml", base=None,
        args=("--spec", f"{TMP}/missing.yaml"), shown="`--spec missing.yaml` (no such file)"),
    Row("spec", f"sweep spec {TMP} is a directory, not a YAML file", base=None,
        args=("--spec", TMP), shown="`--spec` names a directory"),
    Row("spec", f"{TMP}/spec.yaml, line 3, column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence that starts at line 2, column 7): malformed YAML",
        text="family: steering\ngrid: [unclosed\n"),
    Row("spec", f"{TMP}/spec.yaml, line 2, column 1: found character '\\t' that cannot start any "
        "token (while scanning for the next token): malformed YAML",
        text="family: steering\n\tname: tabbed\n", shown="a tab for indentation"),
    Row("spec", f"{TMP}/spec.yaml, line 3, column 1: duplicate key 'name' (first given at line 2): "
        "malformed YAML", text="family: steering\nname: a\nname: b\n"),
    Row("spec", f"{TMP}/spec.yaml: a sweep spec must be a YAML mapping, got an empty file", text="",
        shown="an empty spec file"),
    Row("spec", f"{TMP}/spec.yaml: a sweep spec must be a YAML mapping, got list",
        text="- family: steering\n"),
    Row("spec", f"{TMP}/spec.yaml: not UTF-8 text (byte 0xff at offset 8)", base=None,
        files={"spec.yaml": b"family: \xffsteering\n"}, args=("--spec", f"{TMP}/spec.yaml"),
        shown="a spec file that is not UTF-8"),
    Row("spec", f"{TMP}/spec.yaml: 'family' is required: one of context, diffing, probes, steering",
        changes={"family": DROP}),
    Row("spec", f"{TMP}/spec.yaml: unknown family 'steerin'; did you mean 'steering'?",
        changes={"family": "steerin"}),
    Row("spec", f"{TMP}/spec.yaml: unknown family 'vision'; known: context, diffing, probes, steering",
        changes={"family": "vision"}),
    Row("spec", f"{TMP}/spec.yaml: unknown key 'colour'; known: description, family, grid, model, "
        "name, runtime, search, steering, storage, test_mode", changes={"colour": "blue"}),
    Row("spec", f"{TMP}/spec.yaml: unknown key 'steerng'; did you mean 'steering'?",
        changes={"steerng": {"n_prompts": 2}}),
    Row("spec", f"{TMP}/spec.yaml: 'name' must be a non-empty string", changes={"name": DROP}),
    Row("spec", f"{TMP}/spec.yaml: test_mode must be true or false, got 'false'",
        changes={"test_mode": "false"}),
    Row("spec", f"{TMP}/spec.yaml: storage must be a string or null, got 5", changes={"storage": 5}),
    Row("spec", f"{TMP}/spec.yaml: 'grid' must be a mapping of name -> list of values",
        changes={"grid": [1, 2]}),
    Row("spec", f"{TMP}/spec.yaml: grid.alpha must be a non-empty list, got 0.5",
        changes={"grid.alpha": 0.5}),
    Row("spec", f"{TMP}/spec.yaml: give either 'grid' or 'search', not both",
        changes={"search": {"params": {"alpha": {"float": [0.1, 1.0]}}, "n_trials": 2}}),
    Row("spec", "search.n_trials must be a positive integer",
        changes={"grid": DROP, "search": {"params": {"alpha": {"float": [0.1, 1.0]}}, "n_trials": 0}}),
    Row("spec", "search is missing required setting(s) ['n_trials']",
        changes={"grid": DROP, "search": {"params": {"alpha": {"float": [0.1, 1.0]}}}}),
    Row("spec", "search.sampler must be nsga2, tpe or random, not 'cmaes'",
        changes={"grid": DROP, "search": {"params": {"alpha": {"float": [0.1, 1.0]}},
                                          "n_trials": 2, "sampler": "cmaes"}}),
    Row("spec", "search.seed must be an integer, got 'one'",
        changes={"grid": DROP, "search": {"params": {"alpha": {"float": [0.1, 1.0]}},
                                          "n_trials": 2, "seed": "one"}}),
    Row("spec", "search.params.alpha needs exactly one of int, float, choices",
        changes={"grid": DROP, "search": {"params": {"alpha": {"float": [0.1, 1], "int": [0, 1]}},
                                          "n_trials": 2}}),
    Row("spec", "search.params.alpha.float must be [low, high] with low <= high, got [1.0, 0.1]",
        changes={"grid": DROP, "search": {"params": {"alpha": {"float": [1.0, 0.1]}}, "n_trials": 2}}),
    Row("spec", "search.params.layer.int must be a list of 2 values (an integer, an integer), "
        "got [0, 'two']",
        changes={"grid": DROP, "search": {"params": {"layer": {"int": [0, "two"]}}, "n_trials": 2}}),
    Row("spec", "search.params.alpha: a log range needs low > 0, got 0.0",
        changes={"grid": DROP, "search": {"params": {"alpha": {"float": [0.0, 1.0], "log": True}},
                                          "n_trials": 2}}),
    Row("spec", "runtime.threads must be an integer or null, got 'two'",
        changes={"runtime": {"threads": "two"}}),
    Row("spec", "runtime.threads must be a positive integer, got 0", changes={"runtime": {"threads": 0}}),
    Row("spec", "LMLAB_THREADS must be a positive integer, got 'many'", env={"LMLAB_THREADS": "many"}),
    # ---- the model block
    Row("model", "unknown model setting 'quantisation'; did you mean 'quantization'?",
        changes={"model.quantisation": "4bit"}),
    Row("model", "model.dtype must be one of 'auto', 'float32', 'float16', 'bfloat16', got 'float64'",
        changes={"model.dtype": "float64"}),
    Row("model", "model.quantization must be one of 'none', '4bit', '8bit', got '2bit'",
        changes={"model.quantization": "2bit"}),
    Row("model", "model.device must be auto or a torch device such as cpu, cuda or cuda:1, not 'gpu'",
        changes={"model.device": "gpu"}),
    Row("model", "model.name 'tiny:bert': tiny model arch must be one of llama, qwen2, mistral, "
        "gemma, gpt2", changes={"model.name": "tiny:bert"}),
    Row("model", "model.revision does not apply to 'tiny:llama': tiny models are random weights "
        "built from a config, not a Hub repo", changes={"model.revision": "main"}),
    Row("model", "model.name must be a string, got 5", changes={"model.name": 5}),
    # ---- steering
    Row("steering", "add_norm_multiple (the grid's alpha for add) must be a finite number >= 0, "
        "got -1.0", changes={"grid.alpha": [-1.0]}),
    Row("steering", f"{TMP}/spec.yaml: grid.alpha must be a finite number, got nan",
        changes={"grid.alpha": [float("nan")]}),
    Row("steering", "ablate_fraction (the grid's alpha for ablate) is the share of the component "
        "removed and must be in [0, 1], got 1.5 (above 1 would reflect the component instead of "
        "removing it)", changes={"grid.alpha": [1.5], "grid.intervention": ["ablate"]}),
    Row("steering", "'random' is the matched-norm control, not a method: list real methods "
        "('mean_diff', 'suffix_contrast') in grid.method and keep steering.controls: [random] "
        "(one control per method)", changes={"grid.method": ["random"]}),
    Row("steering", "unknown direction method 'pca'; known: ('mean_diff', 'suffix_contrast')",
        changes={"grid.method": ["pca"]}),
    Row("steering", "intervention must be one of ('add', 'ablate'), not 'scale'",
        changes={"grid.intervention": ["scale"]}),
    Row("steering", "scope must be one of ('layer', 'all'), not 'some'", changes={"grid.scope": ["some"]}),
    Row("steering", "layer must be an integer, got 'one'", changes={"grid.layer": ["one"]}),
    Row("steering", "layer 7 is outside the model (valid: 0..2)",
        changes={"grid.layer": [7]}),
    Row("steering", "unknown steering grid key(s): ['strength']; allowed: ['alpha', 'intervention', "
        "'layer', 'method', 'scope']", changes={"grid.strength": [1]}),
    Row("steering", "unknown steering setting 'n_promts'; did you mean 'n_prompts'?",
        changes={"steering.n_promts": 3}),
    Row("steering", "steering.n_prompts must be an integer, got 'many'",
        changes={"steering.n_prompts": "many"}),
    Row("steering", "steering.n_prompts must be >= 1 and n_train >= 2", changes={"steering.n_prompts": 0}),
    Row("steering", "steering.generation.max_new_tokens must be an integer, got 'long'",
        changes={"steering.generation.max_new_tokens": "long"}),
    Row("steering", "steering.generation must be a mapping, got 48", changes={"steering.generation": 48}),
    Row("steering", "generation.max_new_tokens and batch_size must be positive",
        changes={"steering.generation.batch_size": 0}),
    Row("steering", "steering.eval_splits has unknown split(s) ['harm_tset']",
        changes={"steering.eval_splits": ["harm_tset"]}),
    Row("steering", "steering.eval_splits must be a list of strings, got 'benign'",
        changes={"steering.eval_splits": "benign"}),
    Row("steering", "steering.controls may only contain 'random'",
        changes={"steering.controls": ["shuffled"]}),
    Row("steering", "steering.positions must be one of ('all', 'prompt', 'generation')",
        changes={"steering.positions": "middle"}),
    Row("steering", "steering.degenerate.max_perplexity must be a number, got 'high'",
        changes={"steering.degenerate.max_perplexity": "high"}),
    Row("steering", "unknown steering data split(s): ['harm_dev']",
        changes={"steering.data": {"harm_dev": "x.csv"}}),
    Row("steering", "steering input 'benign' not found: /no/such/file.jsonl",
        changes={"steering.data": {"benign": "/no/such/file.jsonl"}}),
    Row("steering", f"{TMP}/empty.jsonl: no usable prompts: 0 prompts read, 0 kept",
        changes={"steering.data": {"benign": f"{TMP}/empty.jsonl"}}, files={"empty.jsonl": b""}),
    Row("steering", "steering.judge: put API keys in the environment or .env, and name the variable "
        "with api_key_env", changes={"steering.judge": {"model": "openai/gpt-4o-mini", "api_key": "sk-x"}}),
    Row("steering", "steering.judge: LiteLLM model 'gpt4' needs a provider prefix, e.g. "
        "openai/<name> or anthropic/<name>", changes={"steering.judge": "gpt4"}),
    Row("steering", "steering.judge.concurrency must be an integer, got 'four'",
        changes={"steering.judge": {"model": "openai/gpt-4o-mini", "concurrency": "four"}}),
    # ---- probes
    Row("probes", "a probes sweep needs a grid with exactly the keys ['label', 'layer', 'lag']",
        base="probes", changes={"grid.lag": DROP}),
    Row("probes", "grid.lag must be an integer, got 0.5", base="probes", changes={"grid.lag": [0.5]}),
    Row("probes", "unknown probes setting 'colour'; known: batch_size, bootstrap, data, dtype, "
        "extra_labels, fit_threads, max_chains, max_iter, max_malformed_share, min_coverage, "
        "min_span_match, register, register_all, seed, split, strengths, tolerance", base="probes",
        changes={"probes.colour": "red"}),
    Row("probes", "unknown probes setting 'max_chain'; did you mean 'max_chains'?", base="probes",
        changes={"probes.max_chain": 8}),
    Row("probes", "probes.max_chains must be an integer or null, got 'ten'", base="probes",
        changes={"probes.max_chains": "ten"}),
    Row("probes", "probes.split must be a list of 3 values (a number, a number, a number), got "
        "[0.5, 0.5]", base="probes", changes={"probes.split": [0.5, 0.5]}),
    Row("probes", "probes.strengths must be a list of numbers, got 'many'", base="probes",
        changes={"probes.strengths": "many"}),
    Row("probes", "probes.register must be true or false, got 'yes'", base="probes",
        changes={"probes.register": "yes"}),
    # ---- context
    Row("context", "context.task is required: one of ('niah', 'longmemeval', 'repeated_words')",
        base="niah", changes={"context.task": DROP}),
    Row("context", "context.task must be one of ('niah', 'longmemeval', 'repeated_words'), not 'needle'",
        base="niah", changes={"context.task": "needle"}),
    Row("context", "context.max_tokens must be an integer, got 'four'", base="niah",
        changes={"context.max_tokens": "four"}),
    Row("context", "context.max_tokens must be an integer, got 'four'", base="niah",
        args=("--context.max_tokens", "four")),
    Row("context", "context.subject.concurrency must be an integer, got 'four'", base="niah",
        changes={"context.subject": {"model": "openai/served", "concurrency": "four"}}),
    Row("context", "context.subject.concurrency must be an integer, got 'four'", base="niah",
        changes={"context.subject": {"model": "local"}},
        args=("--context.subject.concurrency", "four")),
    Row("context", "unknown context.subject setting 'concurency'; did you mean 'concurrency'?",
        base="niah", changes={"context.subject": {"model": "local", "concurency": 4}}),
    Row("context", "context.subject: put API keys in the environment or .env, and name the "
        "variable with api_key_env", base="niah",
        changes={"context.subject": {"model": "openai/x", "api_key": "sk-x"}}),
    Row("context", "context.judge: prices needs exactly input_per_mtok and output_per_mtok (USD)",
        base="niah",
        changes={"context.judge": {"model": "openai/x", "prices": {"input": 1.0}}}),
    Row("context", "context.samples must be an integer, got 2.5", base="niah",
        changes={"context.samples": 2.5}),
    Row("context", "context.truncation_tolerance must be between 0 and 1", base="niah",
        changes={"context.truncation_tolerance": 2}),
    Row("context", "unknown context key 'max_token' for task niah; did you mean 'max_tokens'?",
        base="niah", changes={"context.max_token": 4}),
    Row("context", "context.distractors must be an integer, got 'two'", base="niah",
        changes={"context.distractors": "two"}),
    Row("context", "context.order must be sequential or shuffle, not 'random'", base="niah",
        changes={"context.order": "random"}),
    Row("context", "niah grid 'length' must be an integer >= 16 tokens, got 8", base="niah",
        changes={"grid.length": [8]}),
    Row("context", "niah grid 'depth' must be a percentage in 0..100, got 150", base="niah",
        changes={"grid.depth": [150]}),
    Row("context", "context task niah needs a grid (niah: length, depth; repeated_words: words, "
        "position)", base="niah", changes={"grid": DROP}),
    Row("context", "haystack folder not found: /no/such/essays", base="niah",
        changes={"context.haystack": "/no/such/essays"}),
    Row("context", "longmemeval grid 'variant' must be focused or full, got 'partial'",
        base="longmemeval", changes={"grid.variant": ["partial"]}),
    Row("context", "context.data must be a string or a mapping or null, got 5", base="longmemeval",
        changes={"context.data": 5}),
    Row("context", "context.common_word must be a single word, got 'two words'",
        base="repeated_words", changes={"context.common_word": "two words"}),
    Row("context", "context.output_cap must be positive", base="repeated_words",
        changes={"context.output_cap": 0}),
    # ---- the sweep entry point's own arguments
    Row("sweep.py", "--test-mode must be true or false, got 'maybe'", args=("--test-mode", "maybe")),
    Row("sweep.py", "--bogus needs a value", args=("--bogus",)),
    Row("sweep.py", "unexpected argument 'extra'; spec settings are given as --key value (or -P "
        "key=value through mlflow run)", args=("extra",)),
    Row("sweep.py", "override 'context.subject.concurrency': context.subject is 'local' in the "
        "spec, not a mapping; set the whole block, e.g. context.subject='{...}'", base="niah",
        args=("--context.subject.concurrency", "4")),
    Row("sweep.py", "--grid.alpha '[1,' is not a YAML value: line 1, column 4: expected the node "
        "content, but found '<stream end>' (while parsing a flow node)", args=("--grid.alpha", "[1,")),
    # ---- the steer entry point
    Row("steer.py", "argument --layer: expected an integer, got 'abc' (see --help)", base=None,
        entry="steer", args=("--layer", "abc", "--alpha", "0.5")),
    Row("steer.py", "argument --layer: expected an integer, got '1.5' (see --help)", base=None,
        entry="steer", args=("--layer", "1.5", "--alpha", "0.5")),
    Row("steer.py", "argument --alpha: expected a number, got 'strong' (see --help)", base=None,
        entry="steer", args=("--layer", "1", "--alpha", "strong")),
    Row("steer.py", "the following arguments are required: --layer (see --help)", base=None,
        entry="steer", args=("--alpha", "0.5")),
    Row("steer.py", "intervention must be one of ('add', 'ablate'), not 'scale'", base=None,
        entry="steer", args=("--layer", "1", "--alpha", "0.5", "--intervention", "scale",
                             "--model", "tiny:llama")),
    Row("steer.py", "steering.n_prompts must be >= 1 and n_train >= 2", base=None, entry="steer",
        args=("--layer", "1", "--alpha", "0.5", "--n-prompts", "0", "--model", "tiny:llama")),
    # ---- the probe_view entry point
    Row("probe_view.py", f"text file not found: {TMP}/chain.txt", base=None, entry="probe_view",
        args=("--text-file", f"{TMP}/chain.txt", "--no-log")),
    Row("probe_view.py", "the text to score is empty", base=None, entry="probe_view",
        args=("--text", " ", "--no-log"), shown="`probe_view.py --text ' ' --no-log`"),
    Row("probe_view.py", "no registered model named 'probe-nothing'; registered probes: none",
        base=None, entry="probe_view", args=("--name", "probe-nothing", "--no-log")),
    Row("probe_view.py", "unrecognized arguments: --colour red (see --help)", base=None,
        entry="probe_view", args=("--colour", "red")),
]


# ---------------------------------------------------------------- running a row


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"entrypoint_{name}", ROOT / "entrypoints" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


ENTRY_POINTS: dict[str, ModuleType] = {}


def entry_point(name: str) -> ModuleType:
    if name not in ENTRY_POINTS:
        ENTRY_POINTS[name] = _load(name)
    return ENTRY_POINTS[name]


def _apply(raw: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if value is DROP:
            node.pop(last, None)
        else:
            node[last] = value
    return out


def _here(text: str, tmp: Path) -> str:
    return text.replace(TMP, str(tmp))


def _here_value(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return _here(value, tmp)
    if isinstance(value, dict):
        return {k: _here_value(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_here_value(v, tmp) for v in value]
    return value


def argv_for(row: Row, tmp: Path) -> list[str]:
    """Write the row's files and spec under ``tmp``; the entry point's argv."""
    for name, content in row.files.items():
        (tmp / name).write_bytes(content)
    args = [_here(a, tmp) for a in row.args]
    if row.entry != "sweep" or row.base is None and row.text is None:
        return args
    spec = tmp / "spec.yaml"
    if row.text is not None:
        spec.write_text(row.text)
    else:
        changes = {k: v if v is DROP else _here_value(v, tmp) for k, v in row.changes.items()}
        spec.write_text(yaml.safe_dump(_apply(BASES[row.base], changes)))
    return ["--spec", str(spec), *args]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tracking store for the whole table (each row gets its own run in it)."""
    store = tmp_path_factory.mktemp("errors-store")
    previous, cwd = mlflow.get_tracking_uri(), Path.cwd()
    os.chdir(store)  # artifacts go to ./mlruns: keep them out of the checkout
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    MlflowClient().create_experiment("errors")
    yield store
    mlflow.set_tracking_uri(previous)
    os.chdir(cwd)


def run_row(row: Row, tmp: Path, store: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture) -> tuple[int, str, str | None]:
    """(exit code, stderr, id of the run standing for `mlflow run`'s, or None)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.setenv("LMLAB_STORE_DIR", str(store / ".lmlab"))
    for name, value in row.env.items():
        monkeypatch.setenv(name, value)
    run_id = None
    if row.entry == "sweep":
        client = MlflowClient()
        run_id = client.create_run(client.get_experiment_by_name("errors").experiment_id).info.run_id
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    else:
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    argv = argv_for(row, tmp)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        entry_point(row.entry).main(argv)
    return stopped.value.code, capsys.readouterr().err, run_id


def _row_id(index_row: tuple[int, Row]) -> str:
    index, row = index_row
    return f"{index + 1:03d}-{row.family.removesuffix('.py')}"


@pytest.mark.parametrize("numbered", list(enumerate(ROWS)), ids=_row_id)
def test_a_bad_input_gets_one_clear_line_and_exit_2(numbered, shared_store, tmp_path, monkeypatch,
                                                    capsys) -> None:
    _, row = numbered
    code, err, run_id = run_row(row, tmp_path, shared_store, monkeypatch, capsys)
    expected = PREFIX + _here(row.line, tmp_path)
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith(PREFIX)] == [expected]
    assert code == row.code
    if run_id is not None:
        run = MlflowClient().get_run(run_id)
        assert run.info.status == "FAILED", "the run `mlflow run` created must not stay RUNNING"
        assert run.data.tags[FAILURE_TAG] == expected.removeprefix(PREFIX)


# ---------------------------------------------------------------- the document


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_rows() -> str:
    head = ["| # | where | input | what the user sees on stderr | exit |",
            "|---|---|---|---|---|"]
    body = [f"| {n} | {row.family} | {_cell(shown_input(row))} | "
            f"`{_cell(PREFIX + row.line)}` | {row.code} |" for n, row in enumerate(ROWS, 1)]
    return "\n".join(head + body)


def _generated_part(text: str) -> str:
    if BEGIN not in text or END not in text:
        return ""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_docs_errors_md_lists_exactly_the_tested_rows() -> None:
    assert len(ROWS) >= 60
    assert _generated_part(DOC.read_text()) == render_rows(), \
        "docs/errors.md is out of date: run `python tests/test_errors.py`"


def write_doc() -> None:
    text = DOC.read_text()
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    DOC.write_text(f"{before}{BEGIN}\n{render_rows()}\n{END}{after}")


# ---------------------------------------------------------------- true subprocesses


def _env(store: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
           "LMLAB_STORE_DIR": str(store / ".lmlab"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           **extra}
    env.pop("MLFLOW_RUN_ID", None) if "MLFLOW_RUN_ID" not in extra else None
    return env


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def test_the_steer_script_reports_a_bad_argument_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "steer.py"), "--layer", "x",
                             "--alpha", "1"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300, env=_env(tmp_path))
    assert result.returncode == 2
    assert _one_error_line(result.stderr) == \
        PREFIX + "argument --layer: expected an integer, got 'x' (see --help)"


def _mlflow_run(store: Path, *params: str) -> tuple[subprocess.CompletedProcess, Any]:
    """``mlflow run`` of this project's sweep entry point; (process, the run it created)."""
    client = MlflowClient()
    before = {r.info.run_id for r in client.search_runs(["0"])}
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "sweep", "--env-manager", "local"]
    for param in params:
        command += ["-P", param]
    result = subprocess.run(command, capture_output=True, text=True, cwd=store, timeout=300,
                            env=_env(store))
    created = [r for r in client.search_runs(["0"]) if r.info.run_id not in before]
    assert len(created) == 1, result.stderr[-2000:]
    return result, created[0]


@pytest.fixture
def fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    previous = mlflow.get_tracking_uri()
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    MlflowClient().search_experiments()  # create the schema before mlflow run uses it
    yield tmp_path
    mlflow.set_tracking_uri(previous)


def test_mlflow_run_with_a_missing_spec_ends_its_run_failed_with_the_reason(fresh_store: Path) -> None:
    result, run = _mlflow_run(fresh_store, f"spec={fresh_store}/missing.yaml")
    assert result.returncode != 0
    assert _one_error_line(result.stderr) == PREFIX + f"sweep spec not found: {fresh_store}/missing.yaml"
    assert run.info.status == "FAILED", "the parent must not stay RUNNING"
    assert run.data.tags[FAILURE_TAG] == f"sweep spec not found: {fresh_store}/missing.yaml"


def test_the_probe_view_script_reports_a_missing_text_file_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "probe_view.py"),
                             "--text-file", "nothing.txt"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env=_env(tmp_path))
    assert result.returncode == 2
    assert _one_error_line(result.stderr) == PREFIX + "text file not found: nothing.txt"


def test_a_dotted_mlflow_param_reaches_the_spec_as_an_override(shared_store, tmp_path, monkeypatch,
                                                               capsys) -> None:
    """`mlflow run -P context.max_tokens=four`: MLflow's own command builder, on this
    project's MLproject, turns the undeclared param into `--context.max_tokens four`."""
    import shlex

    from mlflow.projects._project_spec import load_project

    spec = tmp_path / "niah.yaml"
    spec.write_text(yaml.safe_dump(BASES["niah"]))
    command = load_project(str(ROOT)).get_entry_point("sweep").compute_command(
        {"spec": str(spec), "context.max_tokens": "four"}, storage_dir=None)
    python, script, *argv = shlex.split(command.split("&&")[-1])
    assert (python, script) == ("python", "entrypoints/sweep.py")
    row = Row("context", "context.max_tokens must be an integer, got 'four'", base=None,
              args=tuple(argv))
    code, err, run_id = run_row(row, tmp_path, shared_store, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == PREFIX + row.line
    assert MlflowClient().get_run(run_id).data.tags[FAILURE_TAG] == row.line


if __name__ == "__main__":
    write_doc()
    print(f"wrote {len(ROWS)} rows to {DOC}")
