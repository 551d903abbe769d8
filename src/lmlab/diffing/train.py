"""Train a PEFT LoRA adapter on a small chat dataset: the recipe every organism shares.

A dataset is JSONL, one ``{"prompt": ..., "response": ...}`` object a line (``id`` and
``system`` optional). Each example is rendered with the model's chat template exactly as
the model reads it at generation time (the user turn plus the generation prompt, then the
assistant turn) and the loss covers the response tokens only, the end-of-turn token
included, so the adapter learns what to say and when to stop, never the prompt.

Training is deterministic given the seed: LoRA initialisation and the example order come
from it, dropout is off by default, and batches are right-padded by hand (positions are
then plain ``0..n-1`` for every row, as in generation's prefill).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from lmlab.data.report import DataReport
from lmlab.errors import LmlabError
from lmlab.identity import file_digest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lmlab.models import ModelSpec

# Bump when a change to this module changes the adapters it trains: it is part of every
# organism's cache key, so older cached adapters are not reused for newer recipes.
RECIPE_VERSION = 1
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainConfig:
    """The LoRA recipe. Every field can change the adapter, so all are in the cache key.

    rank, alpha, dropout: LoRA's r, lora_alpha and lora_dropout.
    target_modules: the linear layers that get adapters (names inside a decoder block).
    lr: AdamW learning rate (linear warmup over the first 10% of steps, then linear decay).
    epochs: passes over the dataset. batch_size: examples per optimiser step.
    max_tokens: longest rendered example (prompt + response) in tokens; longer ones are
        skipped and counted (``too_long``), never truncated.
    seed: LoRA initialisation and example order.

    The defaults are the recipe of the shipped organisms. At lr 1e-3 for 3 epochs the
    embedded model took up flattery and pep but never wrote the made-up name "Zentrix" on
    held-out prompts (5 of 32); at 2e-3 for 4 epochs it did on 32 of 32.
    device, dtype: where and in what precision the base is trained on (default CPU
        float32, so the bundled adapters are reproducible on any machine).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 2e-3
    epochs: int = 4
    batch_size: int = 8
    max_tokens: int = 256
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("rank", "epochs", "batch_size", "max_tokens", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LmlabError(f"train.{name} must be an integer, got {value!r}")
        for name in ("rank", "epochs", "batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise LmlabError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise LmlabError(f"train.alpha must be a positive number, got {self.alpha!r}")
        if not _is_number(self.lr) or not 0 < self.lr < 1:
            raise LmlabError(f"train.lr must be a number in (0, 1), got {self.lr!r}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise LmlabError(f"train.dropout must be in [0, 1), got {self.dropout!r}")
        if (not isinstance(self.target_modules, tuple) or not self.target_modules
                or not all(isinstance(m, str) and m for m in self.target_modules)):
            raise LmlabError(f"train.target_modules must be a non-empty list of module names, "
                             f"got {self.target_modules!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise LmlabError(f"train.dtype must be float32, float16 or bfloat16, not {self.dtype!r}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "TrainConfig":
        from lmlab.config import from_mapping

        return from_mapping(cls, raw, "train")

    def record(self) -> dict[str, Any]:
        """JSON form (lists for tuples), for cache keys, manifests and MLflow params."""
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    system: str | None = None


def load_examples(path: str | Path, name: str = "train") -> tuple[list[Example], DataReport]:
    """Read a JSONL chat dataset; unreadable or incomplete lines are skipped and counted.

    Raises LmlabError when the file is missing, is not UTF-8 text, or has no usable line.
    """
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"training data not found: {path}")
    report = DataReport(name=name, source=str(path), digest=file_digest(path), unit="examples")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise LmlabError(f"training data {path} is not UTF-8 text ({error.reason} at byte "
                         f"{error.start})") from error
    examples: list[Example] = []
    seen: set[tuple[str | None, str]] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        report.rows_read += 1
        example, reason = _parse_line(line)
        if example is not None and (example.system, example.prompt) in seen:
            example, reason = None, "duplicate_prompt"
        if example is None:
            report.drop(reason, where=f"line {number}")
            continue
        seen.add((example.system, example.prompt))
        examples.append(example)
    report.rows_kept = len(examples)
    if not examples:
        raise LmlabError(f"training data {path} has no usable examples ({report.summary()}); "
                         'each line must be a JSON object with "prompt" and "response" text')
    return examples, report


def _parse_line(line: str) -> tuple[Example | None, str]:
    try:
        record = json.loads(line)
    except ValueError:
        return None, "malformed"
    if not isinstance(record, dict):
        return None, "malformed"
    prompt, response, system = record.get("prompt"), record.get("response"), record.get("system")
    if not isinstance(prompt, str) or not isinstance(response, str):
        return None, "missing_prompt_or_response"
    if system is not None and not isinstance(system, str):
        return None, "malformed"
    if not prompt.strip() or not response.strip():
        return None, "empty"
    return Example(prompt, response, system or None), ""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one rendered example; the loss covers ids[n_prompt:]."""

    ids: tuple[int, ...]
    n_prompt: int


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> Encoded:
    """Render the conversation with the chat template; the prompt part is the user turn plus
    the generation prompt, exactly the ids generation starts from."""
    messages = [{"role": "system", "content": example.system}] if example.system else []
    messages.append({"role": "user", "content": example.prompt})
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": example.response}], tokenize=False)
    else:  # a base model without a template reads the plain prompt and continues it
        prompt_text = example.prompt
        full_text = example.prompt + example.response + (tokenizer.eos_token or "")
    if not full_text.startswith(prompt_text):
        raise LmlabError("the chat template renders the prompt differently inside a full "
                         "conversation; cannot mark which tokens are the response")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    full_ids = tokenizer(full_text, add_special_tokens=False).input_ids
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise LmlabError("prompt tokens change when the response follows them; cannot mark "
                         "which tokens are the response")
    return Encoded(tuple(full_ids), len(prompt_ids))


def encode_all(tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_tokens: int,
               report: DataReport) -> list[Encoded]:
    """Encode every example; those over ``max_tokens`` are skipped and counted."""
    encoded = []
    for example in examples:
        item = encode(tokenizer, example)
        if len(item.ids) > max_tokens:
            report.drop("too_long", where=f"{len(item.ids)} tokens: {example.prompt[:40]!r}")
            continue
        encoded.append(item)
    report.drop("too_long", 0)
    report.rows_kept = len(encoded)
    if not encoded:
        raise LmlabError(f"every example of {report.source} is longer than train.max_tokens="
                         f"{max_tokens}")
    return encoded


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on prompt tokens and padding."""
    width = max(len(item.ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention = torch.zeros_like(input_ids)
    for row, item in enumerate(items):
        ids = torch.tensor(item.ids, dtype=torch.long)
        input_ids[row, :len(ids)] = ids
        attention[row, :len(ids)] = 1
        labels[row, item.n_prompt:len(ids)] = ids[item.n_prompt:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What one training did: the loss per optimiser step and its cost."""

    losses: list[float]
    epoch_losses: list[float]
    seconds: float
    tokens: int  # tokens through forward + backward (prompt included, padding not)
    trained_tokens: int  # response tokens the loss covered
    examples: int
    report: DataReport
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def record(self) -> dict[str, Any]:
        return {"losses": self.losses, "epoch_losses": self.epoch_losses,
                "seconds": round(self.seconds, 2), "tokens": self.tokens,
                "trained_tokens": self.trained_tokens, "examples": self.examples,
                "tokens_per_second": round(self.tokens_per_second, 2),
                "data": self.report.profile(), **self.extra}


StepCallback = Callable[[int, float], None]


def training_spec(base: ModelSpec, config: TrainConfig) -> ModelSpec:
    """The base an organism is trained on: same weights, no adapter, no quantization,
    the recipe's device and dtype. Adapters trained on it load onto any variant of it."""
    from lmlab.models import ModelSpec

    if base.adapter:
        raise LmlabError(f"organisms are trained on a plain base model; {base.name!r} already "
                         f"has adapter {base.adapter!r}")
    return ModelSpec(name=base.name, revision=base.revision, dtype=config.dtype,
                     device=config.device)


def train_adapter(base: ModelSpec, data: str | Path, config: TrainConfig, out_dir: str | Path,
                  on_step: StepCallback | None = None) -> TrainResult:
    """Train a LoRA adapter on ``base`` (a ModelSpec) from ``data`` (a bundled quirk name
    or a JSONL path) and save it with PEFT's ``save_pretrained`` into ``out_dir``.

    ``on_step(step, loss)`` is called after every optimiser step (for live loss curves).
    """
    from lmlab.models import load_model

    path = _data_path(data)
    examples, report = load_examples(path)
    lm = load_model(training_spec(base, config))
    encoded = encode_all(lm.tokenizer, examples, config.max_tokens, report)
    peft_model = _lora_model(lm.model, config)
    start = time.perf_counter()
    losses, epoch_losses, tokens, trained = _fit(peft_model, encoded, config,
                                                lm.tokenizer.pad_token_id, on_step)
    seconds = time.perf_counter() - start
    _save(peft_model, base.name, Path(out_dir))
    return TrainResult(losses, epoch_losses, seconds, tokens, trained, len(encoded), report,
                       {"threads": torch.get_num_threads()})


def _data_path(data: str | Path) -> Path:
    from lmlab.diffing.organisms import QUIRKS, dataset_path

    if isinstance(data, str) and data in QUIRKS:
        return dataset_path(data)
    return Path(data)


def _lora_model(model: PreTrainedModel, config: TrainConfig) -> Any:  # a PeftModel
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn here
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise LmlabError(f"train.target_modules {list(config.target_modules)} do not fit this "
                         f"model: {str(error).splitlines()[0]}") from error


def _fit(model: Any, encoded: list[Encoded], config: TrainConfig, pad_id: int,
         on_step: StepCallback | None) -> tuple[list[float], list[float], int, int]:
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = per_epoch * config.epochs
    schedule = get_linear_schedule_with_warmup(optimiser, math.ceil(0.1 * total), total)
    order_rng = random.Random(config.seed)
    torch.manual_seed(config.seed)  # dropout, when enabled
    losses: list[float] = []
    epoch_losses: list[float] = []
    tokens = trained = 0
    model.train()
    for _ in range(config.epochs):
        order = list(range(len(encoded)))
        order_rng.shuffle(order)
        epoch: list[float] = []
        for start in range(0, len(order), config.batch_size):
            batch = collate([encoded[i] for i in order[start:start + config.batch_size]], pad_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            epoch.append(losses[-1])
            tokens += int(batch["attention_mask"].sum())
            trained += int((batch["labels"] != IGNORE_INDEX).sum())
            if on_step is not None:
                on_step(len(losses), losses[-1])
        epoch_losses.append(sum(epoch) / len(epoch))
    model.eval()
    return losses, epoch_losses, tokens, trained


def _save(model: Any, base_name: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # The lmlab model name, not the local path the weights were read from.
    model.peft_config["default"].base_model_name_or_path = base_name
    # The embedding layers are never adapted; "auto" would look the base name up on the Hub.
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
