"""The ``diffing:`` block of a sweep spec, validated at the edge.

Every field's description is also the comment above its line in ``sweeps/diffing.yaml``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from lmlab.config import from_mapping
from lmlab.errors import LmlabError
from lmlab.generation import GenerationConfig

CONVENTIONS = ("same_text", "own_text")
STATS = ("mean", "top3_mean", "max_token", "trend", "top_clause")
UNITS = ("scaled", "raw")
TRAIT_METHODS = ("mean_diff", "probe")
STORES = ("scores", "activations")
DEFAULT_ORGANISMS = ("control", "flattery", "brand", "pep")
BUNDLED = "bundled"


@dataclass(frozen=True)
class VectorSource:
    """A trait vector made elsewhere: exactly one of ``steering_run`` (an MLflow run id of a
    steering condition), ``direction`` (a steering ``direction/*.safetensors`` file) or
    ``probe`` (a registered probe, ``models:/name@alias``)."""

    name: str
    steering_run: str | None = None
    direction: str | None = None
    probe: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("steering_run", "direction", "probe") if getattr(self, k)]
        if len(given) != 1:
            raise LmlabError(f"diffing.traits.vectors {self.name!r} needs exactly one of "
                             f"steering_run, direction, probe (got {given or 'none'})")
        if self.probe and not self.probe.startswith("models:/"):
            raise LmlabError(f"diffing.traits.vectors {self.name!r}: probe must be a registry "
                             f"URI models:/<name>@<alias>, not {self.probe!r}")

    @property
    def source(self) -> str:
        return self.steering_run or self.direction or self.probe or ""


@dataclass(frozen=True)
class TraitSettings:
    """Trait vectors to project on.

    data: ``bundled`` or a folder of ``{trait}/positive.txt`` + ``negative.txt`` (one example
        a line) or ``{trait}.jsonl`` lines ``{"positive", "negative", "prompt"?}``.
    names: traits to read from ``data`` (default: every trait in it).
    methods: how a contrastive trait becomes a vector per layer: ``mean_diff`` (mean
        positive minus mean negative residual over the example's tokens) and/or ``probe``
        (a logistic regression on those means).
    random: random vectors of matched norm added as control traits (``random``,
        ``random_2``...): a finding must clear every one of them, and the random control's
        own shift is estimated over these directions.
    context_prompt: the user turn a ``.txt`` example answers (examples are read as the
        assistant's reply through the chat template, as responses are).
    probe_c: inverse L2 strength of the probe method (sklearn's C).
    vectors: trait vectors from a steering run or a registered probe (see VectorSource).
    """

    data: str = BUNDLED
    names: tuple[str, ...] | None = None
    methods: tuple[str, ...] = ("mean_diff", "probe")
    random: int = 16
    context_prompt: str = "Can you give me a short tip?"
    probe_c: float = 1.0
    seed: int = 0
    vectors: tuple[VectorSource, ...] = ()

    def __post_init__(self) -> None:
        if not self.methods or set(self.methods) - set(TRAIT_METHODS):
            raise LmlabError(f"diffing.traits.methods must be a non-empty subset of "
                             f"{list(TRAIT_METHODS)}, got {list(self.methods)}")
        if not isinstance(self.random, int) or isinstance(self.random, bool) or self.random < 0:
            raise LmlabError(f"diffing.traits.random must be a count >= 0, got {self.random!r}")
        if not self.probe_c > 0:
            raise LmlabError("diffing.traits.probe_c must be positive")
        if self.names is not None and not self.names:
            raise LmlabError("diffing.traits.names must list at least one trait (or be omitted)")


@dataclass(frozen=True)
class CaptureSettings:
    """How residuals are read.

    response_only: store only the response's tokens (the model still reads the prompt).
    store: ``scores`` (stream-through: project during capture, no raw activations on
        disk) or ``activations`` (keep the residuals too, so new traits cost no capture).
    dtype: precision of stored activations (float16 or bfloat16; scores are float32).
    batch_size: sequences per forward pass.
    """

    response_only: bool = False
    store: str = "scores"
    dtype: str = "float16"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise LmlabError(f"diffing.capture.store must be one of {list(STORES)}, not "
                             f"{self.store!r}")
        if self.dtype not in ("float16", "bfloat16"):
            raise LmlabError(f"diffing.capture.dtype must be float16 or bfloat16, not {self.dtype!r}")
        if self.batch_size < 1:
            raise LmlabError("diffing.capture.batch_size must be positive")


@dataclass(frozen=True)
class AnalysisSettings:
    """How shifts are summarised and ranked.

    unit: ``scaled`` (h.v/|v| divided by the layer's mean residual norm of the clean model
        on the prompt set) or ``raw`` (h.v/|v|).
    bootstrap: resamples of responses for every 95% interval.
    detect_stats: the statistics a planted trait may be found by (rank 1 among traits,
        interval above 0 and above the random control's).
    detect_layer: the layer of the headline ranking (default: the middle of ``layers``).
    detect_convention / detect_method: which diff convention and trait method rank.
    top_k: responses and clauses shown per trait on the HTML page.
    trajectory_bins: bins of relative response position in the trajectory plots.
    """

    unit: str = "scaled"
    bootstrap: int = 1000
    detect_stats: tuple[str, ...] = STATS
    detect_layer: int | None = None
    detect_convention: str = "same_text"
    detect_method: str = "mean_diff"
    top_k: int = 5
    trajectory_bins: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise LmlabError(f"diffing.analysis.unit must be one of {list(UNITS)}")
        if not self.detect_stats or set(self.detect_stats) - set(STATS):
            raise LmlabError(f"diffing.analysis.detect_stats must be a non-empty subset of "
                             f"{list(STATS)}, got {list(self.detect_stats)}")
        if self.detect_convention not in CONVENTIONS:
            raise LmlabError(f"diffing.analysis.detect_convention must be one of {list(CONVENTIONS)}")
        if self.detect_method not in TRAIT_METHODS:
            raise LmlabError(f"diffing.analysis.detect_method must be one of {list(TRAIT_METHODS)}")
        if self.bootstrap < 100:
            raise LmlabError("diffing.analysis.bootstrap must be at least 100 resamples")
        if self.top_k < 1 or self.trajectory_bins < 2:
            raise LmlabError("diffing.analysis.top_k must be >= 1 and trajectory_bins >= 2")


@dataclass(frozen=True)
class OrganismEntry:
    """One organism as the spec names it: a bundled quirk, or a name with an adapter."""

    name: str
    adapter: str | None = None
    trait: str | None = None  # the planted trait, for blind detection's known answer
    control: bool = False  # trained the same way with nothing planted (false detections)


@dataclass(frozen=True)
class DiffingSettings:
    """The ``diffing:`` block.

    organisms: bundled quirk names (flattery, brand, pep, control) and/or mappings
        ``{name, adapter, trait?, control?}`` (adapter: a local PEFT folder or a Hub id;
        trait: the planted trait; control: nothing planted, same recipe).
        Default: the four bundled organisms, or none when ``variants`` is given.
    variants: a trait-interp ``config.json`` (``model_variants``: name -> ``{model, lora?}``,
        optional ``quantization``); every variant with a ``lora`` is an organism.
    prompt_sets: ``bundled:<name>`` or JSON files ``{name, description, system_prompt?,
        prompts: [{id, text, note?}]}``.
    layers: decoder blocks to read (layer L = hidden_states[L + 1]).
    max_prompts: use only the first N prompts of each set (None: all).
    test_prompts: prompts per set in test mode.
    """

    organisms: tuple[OrganismEntry, ...] | None = None
    variants: str | None = None
    prompt_sets: tuple[str, ...] = ("bundled:everyday_advice",)
    layers: tuple[int, ...] = (10, 15, 20)
    max_prompts: int | None = None
    test_prompts: int = 3
    traits: TraitSettings = TraitSettings()
    generation: GenerationConfig = GenerationConfig(max_new_tokens=48, batch_size=16)
    capture: CaptureSettings = CaptureSettings()
    analysis: AnalysisSettings = AnalysisSettings()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "DiffingSettings":
        raw = dict(raw or {})
        converted: dict[str, Any] = {}
        if "organisms" in raw:
            converted["organisms"] = _organisms(raw["organisms"])
        if "traits" in raw:
            converted["traits"] = _traits(raw["traits"])
        if "generation" in raw:
            converted["generation"] = from_mapping(
                GenerationConfig, {"max_new_tokens": 48, "batch_size": 16, **(raw["generation"] or {})},
                "diffing.generation")
        for name, kind in (("capture", CaptureSettings), ("analysis", AnalysisSettings)):
            if name in raw:
                converted[name] = from_mapping(kind, raw[name], f"diffing.{name}")
        if "layers" in raw:
            converted["layers"] = _layers(raw["layers"])
        if "prompt_sets" in raw:
            sets = raw["prompt_sets"]
            if isinstance(sets, str):
                sets = [sets]
            if not isinstance(sets, list) or not sets or not all(isinstance(s, str) for s in sets):
                raise LmlabError("diffing.prompt_sets must be a non-empty list of names or paths")
            converted["prompt_sets"] = tuple(sets)
        return from_mapping(cls, raw, "diffing", **converted)

    def __post_init__(self) -> None:
        if self.max_prompts is not None and self.max_prompts < 1:
            raise LmlabError("diffing.max_prompts must be >= 1 (or omitted)")
        if self.test_prompts < 1:
            raise LmlabError("diffing.test_prompts must be >= 1")
        if self.analysis.detect_layer is not None and self.analysis.detect_layer not in self.layers:
            raise LmlabError(f"diffing.analysis.detect_layer {self.analysis.detect_layer} is not "
                             f"in diffing.layers {list(self.layers)}")
        if self.analysis.detect_method not in self.traits.methods:
            raise LmlabError(f"diffing.analysis.detect_method {self.analysis.detect_method!r} is "
                             f"not in diffing.traits.methods {list(self.traits.methods)}")

    @property
    def detect_layer(self) -> int:
        if self.analysis.detect_layer is not None:
            return self.analysis.detect_layer
        ordered = sorted(self.layers)
        return ordered[(len(ordered) - 1) // 2]

    def identity(self, operational: tuple[str, ...]) -> dict[str, Any]:
        from lmlab.identity import strip_operational

        return strip_operational(asdict(self), operational)


def _layers(raw: Any) -> tuple[int, ...]:
    values = raw if isinstance(raw, list) else [raw]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise LmlabError(f"diffing.layers must be a non-empty list of integers, got {raw!r}")
    if len(set(values)) != len(values):
        raise LmlabError(f"diffing.layers must not repeat, got {raw!r}")
    return tuple(values)


def _organisms(raw: Any) -> tuple[OrganismEntry, ...]:
    if not isinstance(raw, list):
        raise LmlabError("diffing.organisms must be a list of bundled quirk names or "
                         "{name, adapter, trait?} mappings")
    out = []
    for item in raw:
        if isinstance(item, str):
            out.append(OrganismEntry(name=item))
        elif isinstance(item, Mapping):
            out.append(from_mapping(OrganismEntry, item, "diffing.organisms[]"))
        else:
            raise LmlabError(f"diffing.organisms: {item!r} is neither a name nor a mapping")
    names = [o.name for o in out]
    if len(set(names)) != len(names) or "clean" in names:
        raise LmlabError(f"diffing.organisms: names must be unique and not 'clean', got {names}")
    return tuple(out)


def _traits(raw: Any) -> TraitSettings:
    if not isinstance(raw, Mapping):
        raise LmlabError("diffing.traits must be a mapping")
    converted: dict[str, Any] = {}
    if "vectors" in raw:
        vectors = raw["vectors"] or []
        if not isinstance(vectors, list):
            raise LmlabError("diffing.traits.vectors must be a list of {name, steering_run | "
                             "direction | probe}")
        converted["vectors"] = tuple(from_mapping(VectorSource, v, "diffing.traits.vectors[]")
                                     for v in vectors)
    return from_mapping(TraitSettings, raw, "diffing.traits", **converted)
