"""Subject and judge models behind one interface: the local model or any LiteLLM model.

``complete(requests)`` yields ``(request, Reply | CallFailure)`` as answers arrive, so
the engine can write each row the moment it exists. The local client batches through
:func:`lmlab.generation.generate` and counts tokens with the model's own tokenizer; the
LiteLLM client runs a bounded thread pool behind a token-per-minute limiter, retries
rate limits (waiting what a 429's ``Retry-After`` asks), server errors, timeouts and
malformed bodies with backoff, and stops cleanly at the budget cap. API keys are read from the environment or ``.env`` and
passed per call: they are never stored on the client's identity, config or errors.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from lmlab.llm.accounting import BudgetExceeded, CallRecord, Ledger, Role, TokenRateLimiter
from lmlab.errors import LmlabError

LOCAL = "local"
#: How the local model samples when temperature > 0: part of its identity (cell ids).
LOCAL_SAMPLER = "temperature (full vocabulary), one seed per cell from its id"
_OPERATIONAL_KEYS = ("api_base", "api_key_env", "concurrency", "tokens_per_minute", "timeout_s",
                     "max_retries", "backoff_s", "budget_usd", "prices", "env_file")


@dataclass(frozen=True)
class Request:
    """One prompt to send; ``key`` is the row's cell id."""

    key: str
    user: str
    max_tokens: int
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": self.user}]


@dataclass(frozen=True)
class Reply:
    text: str
    stop_reason: str  # 'eos' (model stopped), 'length' (hit max_tokens) or the provider's word
    call: CallRecord
    reasoning: str | None = None  # kept apart: never sent to a judge


@dataclass(frozen=True)
class CallFailure:
    kind: str  # rate_limit, server_error, timeout, malformed, bad_request, ...
    message: str
    attempts: int


@dataclass(frozen=True)
class ClientConfig:
    """How to reach one model.

    model: ``local`` (the sweep's ``model:``) or a LiteLLM model name such as
    ``openai/<name>`` (with ``api_base`` for a local OpenAI-compatible server) or
    ``anthropic/claude-...``.
    tokenizer: directory or Hub id of the model's own tokenizer for sizing prompts;
    ``auto`` uses the served directory when the model name is one, else LiteLLM's counter.
    context_window: prompt-token limit when LiteLLM does not know it.
    prices: ``{input_per_mtok, output_per_mtok}`` in USD, overriding LiteLLM's price table.
    """

    model: str = LOCAL
    api_base: str | None = None
    api_key_env: str | None = None
    env_file: str = ".env"
    tokenizer: str = "auto"
    context_window: int | None = None
    concurrency: int = 4
    tokens_per_minute: int | None = None
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 1.0
    budget_usd: float | None = None
    temperature: float = 0.0
    prices: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise LmlabError("subject/judge model must be 'local' or a LiteLLM model name")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise LmlabError("concurrency must be >= 1, max_retries >= 0 and timeout_s > 0")
        if self.tokens_per_minute is not None and self.tokens_per_minute < 1:
            raise LmlabError("tokens_per_minute must be positive when given")
        if self.budget_usd is not None and self.budget_usd <= 0:
            raise LmlabError("budget_usd must be positive when given")
        if self.prices is not None and set(self.prices) != {"input_per_mtok", "output_per_mtok"}:
            raise LmlabError("prices needs exactly input_per_mtok and output_per_mtok (USD)")
        if self.model != LOCAL and "/" not in self.model:
            raise LmlabError(f"LiteLLM model {self.model!r} needs a provider prefix, "
                             "e.g. openai/<name> or anthropic/<name>")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | str | None, where: str = "subject") -> "ClientConfig":
        """From a spec block: a model name, or a mapping checked key by key (``where`` names
        the block in messages, e.g. ``context.judge``)."""
        from lmlab.config import from_mapping

        if raw is None:
            return cls()
        if isinstance(raw, Mapping) and "api_key" in raw:
            raise LmlabError(f"{where}: put API keys in the environment or .env, and name the "
                             "variable with api_key_env")
        try:
            return cls(model=raw) if isinstance(raw, str) else from_mapping(cls, raw, where)
        except LmlabError as error:
            if where in str(error):
                raise
            raise LmlabError(f"{where}: {error}") from None

    def identity(self) -> dict[str, Any]:
        """Fields that change answers (where and how fast we call do not)."""
        return {k: v for k, v in self.__dict__.items() if k not in _OPERATIONAL_KEYS}


class Client(ABC):
    role: Role
    ledger: Ledger

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What makes this model's answers what they are (part of every cell id)."""

    @property
    @abstractmethod
    def context_window(self) -> int | None:
        ...

    @abstractmethod
    def count_prompt_tokens(self, user: str, system: str | None = None) -> int:
        """Prompt tokens as the model will read them (chat template included)."""

    @abstractmethod
    def complete(self, requests: Sequence[Request]) -> Iterator[tuple[Request, Reply | CallFailure]]:
        ...

    def estimate_cost(self, prompt_tokens: int, output_tokens: int) -> tuple[float, str]:
        return 0.0, "none"


# ---------------------------------------------------------------- local model


def cell_seed(key: str) -> int:
    """The sampling seed of one request, derived from its cell id alone."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


class LocalClient(Client):
    """The sweep's local model, batched; token counts are exact.

    With temperature > 0 every request samples with its own seed, :func:`cell_seed` of
    its key: two cells never share a random stream, and a cell's text is the same
    whichever batch it is sent in (up to the padding's floating-point noise, which greedy
    decoding has too).
    """

    def __init__(self, lm: Any, ledger: Ledger, role: Role = "subject", batch_size: int = 8,
                 temperature: float = 0.0) -> None:
        self.lm = lm
        self.ledger = ledger
        self.role = role
        self.batch_size = batch_size
        self.temperature = temperature

    @property
    def identity(self) -> dict[str, Any]:
        ident = {"kind": LOCAL, "model": self.lm.identity, "temperature": self.temperature}
        if self.temperature > 0:
            ident["sampler"] = LOCAL_SAMPLER
        return ident

    @property
    def context_window(self) -> int | None:
        config = self.lm.model.config
        value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return int(value) if value else None

    def count_prompt_tokens(self, user: str, system: str | None = None) -> int:
        text = self.lm.format_chat(user, system)
        return len(self.lm.tokenizer(text, add_special_tokens=False).input_ids)

    def complete(self, requests: Sequence[Request]) -> Iterator[tuple[Request, Reply | CallFailure]]:
        from lmlab.generation import GenerationConfig, generate

        by_cap: dict[int, list[Request]] = {}
        for request in requests:
            by_cap.setdefault(request.max_tokens, []).append(request)
        for cap, group in sorted(by_cap.items()):
            config = GenerationConfig(max_new_tokens=cap, batch_size=self.batch_size,
                                      do_sample=self.temperature > 0,
                                      temperature=self.temperature or 1.0)
            for start in range(0, len(group), self.batch_size):
                self.ledger.check_budget()
                chunk = group[start:start + self.batch_size]
                prompts = [self.lm.format_chat(r.user, r.system) for r in chunk]
                began = time.perf_counter()
                seeds = [cell_seed(r.key) for r in chunk] if config.do_sample else None
                completions = generate(self.lm, prompts, config, row_seeds=seeds)
                share = (time.perf_counter() - began) / len(chunk)
                for request, prompt, completion in zip(chunk, prompts, completions):
                    call = CallRecord(
                        role=self.role,
                        prompt_tokens=len(self.lm.tokenizer(prompt, add_special_tokens=False).input_ids),
                        completion_tokens=len(completion.token_ids), reasoning_tokens=0,
                        stop_reason=completion.stop_reason, latency_s=share, cost_usd=0.0,
                        cost_source="none")
                    self.ledger.record(call)
                    yield request, Reply(completion.text, completion.stop_reason, call)


# ---------------------------------------------------------------- LiteLLM


def import_litellm() -> Any:
    # Without this LiteLLM fetches its price table over the network at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError as error:
        raise LmlabError("API models need LiteLLM: pip install 'lmlab[api]'") from error
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm


def read_api_key(env_name: str, env_file: str = ".env") -> str | None:
    """The key from the environment, else from ``env_file``; never logged."""
    value = os.environ.get(env_name)
    if value:
        return value
    path = Path(env_file)
    if path.is_file():
        from dotenv import dotenv_values

        return dotenv_values(path).get(env_name) or None
    return None


class MalformedResponse(Exception):
    """A 200 answer without a usable completion (empty body, no choices, bad JSON)."""


_STOP_WORDS = {"stop": "eos", "end_turn": "eos", "eos": "eos", "length": "length",
               "max_tokens": "length"}


def _api_errors(litellm: Any) -> tuple[type, ...]:
    """LiteLLM's own API error and the OpenAI SDK's base error (LiteLLM raises both)."""
    import openai

    return (litellm.APIError, openai.OpenAIError)


def _failure_kind(error: BaseException, litellm: Any) -> str | None:
    """Kind of a retryable failure, or None when retrying cannot help."""
    checks = (("rate_limit", "RateLimitError"), ("timeout", "Timeout"),
              ("server_error", "InternalServerError"), ("server_error", "ServiceUnavailableError"),
              ("server_error", "BadGatewayError"), ("connection", "APIConnectionError"))
    for kind, name in checks:
        cls = getattr(litellm, name, None)
        if cls is not None and isinstance(error, cls):
            return kind
    if isinstance(error, MalformedResponse):
        return "malformed"
    status = getattr(error, "status_code", None)
    if isinstance(error, _api_errors(litellm)) and (status is None or int(status) >= 500):
        return "server_error"
    if isinstance(error, ValueError):  # JSON decoding of a cut-off body
        return "malformed"
    return None


#: Longest wait a server's Retry-After is honoured for (a larger value is capped to it).
RETRY_AFTER_CAP_S = 600.0


def retry_after_seconds(error: BaseException) -> float | None:
    """Seconds a rate-limited answer asks us to wait: ``retry-after-ms``, or ``Retry-After``
    as seconds or an HTTP date (read from the error's headers or its HTTP response)."""
    headers: dict[str, str] = {}
    for source in (getattr(getattr(error, "response", None), "headers", None),
                   getattr(error, "headers", None)):
        if source:
            headers.update({str(k).lower(): str(v) for k, v in dict(source).items()})
    if "retry-after-ms" in headers:
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import datetime, timezone
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _RetryAfterOr:
    """Tenacity wait: the server's Retry-After when it gives one, else ``fallback``."""

    def __init__(self, fallback: Callable[[Any], float]) -> None:
        self.fallback = fallback

    def __call__(self, state: Any) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        seconds = retry_after_seconds(error) if error is not None else None
        if seconds is None:
            return float(self.fallback(state))
        return min(seconds, RETRY_AFTER_CAP_S)


def _redact(message: str, secret: str | None) -> str:
    message = message if not secret else message.replace(secret, "***")
    return re.sub(r"(sk|key)-[A-Za-z0-9_\-]{8,}", r"\1-***", message)[:500]


class LiteLLMClient(Client):
    def __init__(self, config: ClientConfig, ledger: Ledger, role: Role = "subject",
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.ledger = ledger
        self.role = role
        self._sleep = sleep
        self._litellm = import_litellm()
        self._key_present = self._check_key()
        self.limiter = TokenRateLimiter(config.tokens_per_minute)
        self._tokenizer, self.tokenizer_source = self._load_tokenizer()

    # -------------------------------------------------------------- setup
    def _check_key(self) -> bool:
        config = self.config
        if config.api_key_env:
            if read_api_key(config.api_key_env, config.env_file) is None:
                raise LmlabError(f"API key variable {config.api_key_env} is not set in the "
                                 f"environment or {config.env_file}")
            return True
        if config.api_base:
            return False  # a local server: no key needed
        missing = self._litellm.validate_environment(config.model).get("missing_keys") or []
        missing = [name for name in missing if read_api_key(name, config.env_file) is None]
        if missing:
            raise LmlabError(f"model {config.model} needs {', '.join(missing)} in the "
                             f"environment or {config.env_file}")
        return False

    def _api_key(self) -> str | None:
        if self.config.api_key_env:
            return read_api_key(self.config.api_key_env, self.config.env_file)
        if self.config.api_base:
            return "not-needed"  # OpenAI-compatible clients insist on some key
        return None

    def _load_tokenizer(self) -> tuple[Any, str]:
        name = self.config.tokenizer
        served = self.config.model.split("/", 1)[1]
        if name == "auto" and Path(served).is_dir():
            name = served
        if name in ("auto", "litellm"):
            return None, "litellm"
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name), "own"
        except (OSError, ValueError) as error:
            raise LmlabError(f"tokenizer {name!r} could not be loaded offline: "
                             f"{str(error).splitlines()[0]}") from error

    # -------------------------------------------------------------- facts
    @property
    def identity(self) -> dict[str, Any]:
        return {"kind": "litellm", **self.config.identity()}

    @property
    def context_window(self) -> int | None:
        if self.config.context_window:
            return self.config.context_window
        try:
            info = self._litellm.get_model_info(self.config.model)
        except Exception:  # LiteLLM raises several types for unknown models
            return None
        value = info.get("max_input_tokens")
        return int(value) if value else None

    def count_prompt_tokens(self, user: str, system: str | None = None) -> int:
        request = Request("", user, 1, system)
        if self._tokenizer is None:
            return int(self._litellm.token_counter(model=self.config.model,
                                                   messages=request.messages()))
        if getattr(self._tokenizer, "chat_template", None):
            ids = self._tokenizer.apply_chat_template(request.messages(), tokenize=True,
                                                      add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
            return len(ids)
        return len(self._tokenizer(user, add_special_tokens=False).input_ids)

    def estimate_cost(self, prompt_tokens: int, output_tokens: int) -> tuple[float, str]:
        prices = self.config.prices
        if prices:
            return (prompt_tokens * prices["input_per_mtok"] + output_tokens *
                    prices["output_per_mtok"]) / 1e6, "price_table"
        try:
            cost = self._litellm.cost_per_token(model=self.config.model, prompt_tokens=prompt_tokens,
                                                completion_tokens=output_tokens)
            return float(sum(cost)), "price_table"
        except Exception:  # ModelNotMappedError and friends: no known price
            return 0.0, "none"

    # -------------------------------------------------------------- calls
    def complete(self, requests: Sequence[Request]) -> Iterator[tuple[Request, Reply | CallFailure]]:
        if not requests:
            return
        stop: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            pending: dict[Future, Request] = {}
            queue = list(requests)
            while queue or pending:
                while queue and len(pending) < self.config.concurrency and not stop:
                    request = queue.pop(0)
                    pending[pool.submit(self._call_with_retries, request, stop)] = request
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    request = pending.pop(future)
                    result = future.result()
                    if result is not None:
                        yield request, result
        if stop:
            raise stop[0]

    def _call_with_retries(self, request: Request, stop: list[BaseException]) -> Reply | CallFailure | None:
        """One request with retries; None when the run must stop (budget, bad key)."""
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

        try:
            self.ledger.check_budget()
        except BudgetExceeded as error:
            stop.append(error)
            return None
        self.limiter.acquire(self.count_prompt_tokens(request.user, request.system) + request.max_tokens)
        attempts = 0
        retrying = Retrying(
            stop=stop_after_attempt(self.config.max_retries + 1),
            wait=_RetryAfterOr(wait_exponential_jitter(initial=self.config.backoff_s,
                                                       max=30 * self.config.backoff_s)),
            retry=retry_if_exception(lambda e: _failure_kind(e, self._litellm) is not None),
            sleep=self._sleep, before_sleep=lambda state: self.ledger.note_retry(), reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    attempts += 1
                    return self._call_once(request, attempts)
        except Exception as error:  # API errors become failures; anything else is a bug
            return self._failure(error, attempts, stop)
        return None  # pragma: no cover - the loop always returns or raises

    def _failure(self, error: Exception, attempts: int, stop: list[BaseException]) -> CallFailure | None:
        litellm = self._litellm
        if isinstance(error, getattr(litellm, "AuthenticationError", ())):
            stop.append(LmlabError(f"authentication failed for {self.config.model}: check "
                                   f"{self.config.api_key_env or 'the API key variable'}"))
            return None
        kind = _failure_kind(error, litellm)
        if kind is None and not isinstance(error, _api_errors(litellm)):
            raise error
        message = _redact(f"{type(error).__name__}: {error}", self._api_key())
        return CallFailure(kind or "bad_request", message, attempts)

    def _call_once(self, request: Request, attempts: int) -> Reply:
        config = self.config
        began = time.perf_counter()
        response = self._litellm.completion(
            model=config.model, messages=request.messages(), max_tokens=request.max_tokens,
            temperature=config.temperature, api_base=config.api_base, api_key=self._api_key(),
            timeout=config.timeout_s, num_retries=0)
        latency = time.perf_counter() - began
        choices = getattr(response, "choices", None) or []
        usage = getattr(response, "usage", None)
        if not choices or usage is None:
            raise MalformedResponse("response had no choices or no usage")
        message = choices[0].message
        text = message.content or ""
        reasoning = getattr(message, "reasoning_content", None)
        details = getattr(usage, "completion_tokens_details", None)
        reasoning_tokens = int(getattr(details, "reasoning_tokens", 0) or 0)
        finish = str(choices[0].finish_reason or "unknown")
        cost, source = self._cost(response, usage)
        call = CallRecord(role=self.role, prompt_tokens=int(usage.prompt_tokens or 0),
                          completion_tokens=int(usage.completion_tokens or 0),
                          reasoning_tokens=reasoning_tokens,
                          stop_reason=_STOP_WORDS.get(finish, finish), latency_s=latency,
                          cost_usd=cost, cost_source=source, attempts=attempts)
        self.ledger.record(call)
        return Reply(text, call.stop_reason, call, reasoning)

    def _cost(self, response: Any, usage: Any) -> tuple[float, str]:
        reported = getattr(usage, "cost", None)
        if isinstance(reported, (int, float)):
            return float(reported), "provider"
        if self.config.prices:
            return self.estimate_cost(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))
        try:
            return float(self._litellm.completion_cost(completion_response=response)), "price_table"
        except Exception:  # ModelNotMappedError for unknown models: no price known
            return 0.0, "none"


def make_client(config: ClientConfig, ledger: Ledger, role: Role,
                local_model: Callable[[], Any], batch_size: int = 8) -> Client:
    if config.model == LOCAL:
        return LocalClient(local_model(), ledger, role, batch_size, config.temperature)
    return LiteLLMClient(config, ledger, role)
