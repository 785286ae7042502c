"""The real senior: every model call goes through `litellm.completion`.

`LiteLLMClient` is the real `ModelClient` (senior/models.py); it registers the offline reference synthesiser as the litellm custom provider
`offline`, so the offline default takes the same path as any real model. For each
request it:

- sends only the parameters the model's provider takes (litellm's own table of supported
  parameters decides; `seed` to Anthropic, for one, is left out and said to be);
- retries rate limits, server errors, timeouts, dropped connections and garbled bodies
  with exponential backoff and jitter (a server's Retry-After wins);
- then tries the pipeline's fallbacks in order, after *any* failure of the model before:
  a refused key or an unknown model name on the senior is exactly when a fallback helps;
- tells `on_event` of every retry, fallback and answer as it happens (the screen and the
  run log listen), and fails with the HTTP status and what to do about it.

litellm takes seconds to import, so it is imported on the first call, never at CLI start-up.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Literal

from ..config import Price, SeniorModel
from ..errors import BuildFailed, OverBudget, UserError
from ..frozen import Frozen
from .models import ModelReply, ModelRequest, Reserve

# The test suite turns this off (tests/conftest.py) so that no test can reach a paid
# endpoint by accident; the offline provider, loopback servers and injected fakes still work.
ALLOW_MODEL_REQUESTS = True

MAX_RETRY_AFTER = 60.0

# Providers whose litellm adapter turns `response_format` into the provider's own structured
# output (Anthropic: output_format or a forced tool; Gemini: a response schema; Ollama: `format`),
# so a schema can be asked of every model they serve, known to litellm's model table or not.
# An `openai/` model behind some api_base may be any server: only what litellm knows is asked.
TRANSLATES_RESPONSE_FORMAT = ("anthropic", "gemini", "vertex_ai", "ollama", "ollama_chat")


def load_litellm():
    """Import litellm once, hermetically, with the offline provider registered."""
    # Without these litellm fetches its price table and Anthropic's beta-header table at
    # import or first call: a build must be hermetic, and may reach nothing but its model.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    os.environ.setdefault("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "True")
    import litellm

    from .offline.provider import OfflineReference

    if not any(p.get("provider") == "offline" for p in litellm.custom_provider_map):
        litellm.suppress_debug_info = True
        litellm.telemetry = False
        litellm.custom_provider_map = [
            *litellm.custom_provider_map,
            {"provider": "offline", "custom_handler": OfflineReference()},
        ]
    return litellm


def provider_of(model: str) -> str:
    return model.split("/", 1)[0] if "/" in model else "openai"


def unknown_provider(model: str) -> str | None:
    """Why litellm cannot route `model` (a misspelt provider, say), with the nearest providers it knows; None if it can."""
    litellm = load_litellm()
    try:
        litellm.get_llm_provider(model)
    except Exception:
        import difflib

        known = [str(getattr(p, "value", p)) for p in litellm.provider_list] + ["offline"]
        near = difflib.get_close_matches(provider_of(model), known, n=3)
        return (f"litellm knows no provider {provider_of(model)!r} (model {model!r})"
                + (f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else "; write it as <provider>/<model>"))
    return None


def price_per_token(model: str, prices: dict[str, Price]) -> tuple[float, float] | None:
    """USD per input and per output token: the pipeline's table first, then litellm's; None if unknown."""
    if model.startswith("offline/"):
        return (0.0, 0.0)
    if model in prices:
        return (prices[model].input_per_mtok / 1e6, prices[model].output_per_mtok / 1e6)
    info = load_litellm().model_cost.get(model) or load_litellm().model_cost.get(model.split("/", 1)[-1])
    if not info or info.get("input_cost_per_token") is None:
        return None
    return (float(info["input_cost_per_token"]), float(info.get("output_cost_per_token") or 0.0))


def key_variable(model: SeniorModel, name: str) -> str | None:
    """The environment variable `name` (the senior or a fallback) takes its key from; None: it needs none."""
    if model.api_key_env:
        return model.api_key_env
    if name.startswith("offline/"):
        return None
    provider = provider_of(name)
    if provider.startswith("ollama") or (provider == "openai" and _loopback(model.api_base)):
        return None  # a local server (Ollama, or OpenAI-compatible on this machine) takes no key
    missing = load_litellm().validate_environment(model=name, api_base=model.api_base).get("missing_keys") or []
    # What litellm says is missing; when nothing is, the key it read is named PROVIDER_API_KEY.
    return missing[0] if missing else f"{provider.upper()}_API_KEY"


def missing_key(model: SeniorModel) -> str | None:
    """What is wrong with the key the model (or a fallback) needs, as "VAR, which is not set"; None if nothing."""
    for name in [model.model, *model.fallbacks]:
        variable = key_variable(model, name)
        if variable is None:
            continue
        if variable not in os.environ:
            return f"{variable}, which is not set"
        if not os.environ[variable].strip():
            return f"{variable}, which is set but empty"
        if model.api_key_env:  # one variable serves the whole chain
            return None
    return None


@functools.lru_cache(maxsize=256)
def left_out(model: str, temperature: float | None, seed: int | None) -> tuple[str, ...]:
    """The parameters set for `model` that litellm would refuse to send it: its own check of each parameter
    against the provider and model (Anthropic takes no seed; OpenAI's o-series and gpt-5 only temperature 1)."""
    litellm = load_litellm()
    from litellm.utils import get_optional_params

    try:
        name, provider = litellm.get_llm_provider(model)[:2]
    except Exception:  # a provider litellm does not know is sent what it is given
        return ()
    refused = []
    for parameter, value in (("temperature", temperature), ("seed", seed)):
        if value is None:
            continue
        try:
            get_optional_params(model=name, custom_llm_provider=provider, max_tokens=1, **{parameter: value})
        except litellm.UnsupportedParamsError:
            refused.append(parameter)
        except Exception:  # litellm could not tell (a custom provider): the parameter is sent
            pass
    return tuple(refused)


@functools.lru_cache(maxsize=256)
def structured_output(model: str) -> bool:
    """Whether to ask `model` for the answer's JSON schema (else the prompt alone asks for the JSON)."""
    if model.startswith("offline/"):
        return False
    litellm = load_litellm()
    try:
        if litellm.supports_response_schema(model=model):
            return True
        return (provider_of(model) in TRANSLATES_RESPONSE_FORMAT
                and "response_format" in (litellm.get_supported_openai_params(model=model) or []))
    except Exception:
        return False


# --- what happened, for the screen and the run log ---------------------------------------


FailureKind = Literal["rate_limited", "server_error", "timeout", "connection", "dropped", "bad_response",
                      "key_refused", "unknown_model", "bad_request", "disabled"]
TRANSIENT: frozenset[str] = frozenset({"rate_limited", "server_error", "timeout", "connection", "dropped", "bad_response"})


class ModelEvent(Frozen):
    """One thing that happened while asking for a unit: a retry, a fallback, a model given up, an answer."""

    event: Literal["retry", "gave_up", "fallback", "answered"]
    unit: str
    model: str
    attempt: int
    status: int | None = None
    error: FailureKind | None = None
    message: str | None = None
    wait_s: float | None = None
    to_model: str | None = None
    elapsed_s: float = 0.0

    def line(self) -> str:
        """The event in a line, as the screen shows it."""
        status = f"HTTP {self.status}" if self.status else (self.error or "").replace("_", " ")
        if self.event == "retry":
            return f"{self.unit}: {self.model} {status}, retry {self.attempt} in {self.wait_s:.1f}s ({self.message})"
        if self.event == "gave_up":
            return f"{self.unit}: {self.model} gave up: {self.message}"
        if self.event == "fallback":
            return f"{self.unit}: falling back from {self.model} to {self.to_model}"
        return f"{self.unit}: answered by {self.model} after {self.attempt} tries, {self.elapsed_s:.1f}s"


class ModelFailure(Exception):
    """One model's failure on one request, in words a user can act on."""

    def __init__(self, kind: FailureKind, detail: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT


class LiteLLMClient:
    """The real client: `litellm.completion` with retries, backoff and fallbacks, each reported."""

    reserves_each_model = True  # `complete` reserves every attempt at the price of the model it asks

    def __init__(
        self,
        senior: SeniorModel,
        prices: dict[str, Price] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_event: Callable[[ModelEvent], None] = lambda event: None,
    ):
        self.senior = senior
        self.prices = prices or {}
        self.sleep = sleep
        self.on_event = on_event

    def complete(self, request: ModelRequest, reserve: Reserve | None = None) -> ModelReply:
        started = time.monotonic()
        chain = [request.model, *self.senior.fallbacks]
        failures: list[str] = []
        retries = 0
        for index, model in enumerate(chain):
            if not ALLOW_MODEL_REQUESTS and not model.startswith("offline/") and not _loopback(request.api_base):
                raise UserError(f"model requests are disabled here; refusing to call {model}")
            try:
                reply, tries = self._with_retries(request, model, reserve, started)
            except OverBudget as exc:
                if not failures:
                    raise
                # Why the fallback was needed belongs with why it was not called.
                raise OverBudget(f"{exc}\nIt was to be the fallback {model}, after: " + "; ".join(failures)) from exc
            except _GaveUp as gave_up:
                retries += gave_up.tries - 1
                failures.append(f"{model}: {gave_up.message}")
                if index + 1 < len(chain):
                    self._tell("fallback", request, model, gave_up.tries, started, to_model=chain[index + 1],
                               message=gave_up.message)
                continue
            retries += tries - 1
            elapsed = time.monotonic() - started
            self._tell("answered", request, model, tries, started)
            return reply.model_copy(update={"attempts": tries, "retries": retries, "fallbacks": index,
                                            "latency_ms": int(elapsed * 1000),
                                            "elapsed_s": None if model.startswith("offline/") else round(elapsed, 2)})
        if len(failures) == 1:
            raise BuildFailed(f"unit {request.unit}: {failures[0]}")
        raise BuildFailed(f"unit {request.unit}: no model answered:\n  " + "\n  ".join(failures))

    def _with_retries(self, request: ModelRequest, model: str, reserve: Reserve | None,
                      started: float) -> tuple[ModelReply, int]:
        attempts = self.senior.max_retries + 1
        first = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                with (reserve(model) if reserve is not None else nullcontext(lambda reply: None)) as settle:
                    reply = self._call(request, model)
                    settle(reply)
                return reply, attempt
            except ModelFailure as failure:
                if not failure.transient or attempt == attempts:
                    message = self._explain(failure, model, request, attempt, time.monotonic() - first)
                    self._tell("gave_up", request, model, attempt, started, failure=failure, message=message)
                    raise _GaveUp(message, attempt) from failure
                # Exponential backoff with full jitter; a server's Retry-After wins when longer.
                wait = max(random.uniform(0, self.senior.backoff_seconds * 2 ** (attempt - 1)), failure.retry_after or 0.0)
                self._tell("retry", request, model, attempt, started, failure=failure, wait=wait,
                           message=failure.detail)
                self.sleep(wait)
        raise AssertionError("unreachable")

    def _tell(self, event: str, request: ModelRequest, model: str, attempt: int, started: float,
              failure: ModelFailure | None = None, wait: float | None = None, message: str | None = None,
              to_model: str | None = None) -> None:
        self.on_event(ModelEvent(
            event=event, unit=request.unit, model=model, attempt=attempt, wait_s=None if wait is None else round(wait, 3),
            status=failure.status if failure else None, error=failure.kind if failure else None,
            message=message[:500] if message else None, to_model=to_model,
            elapsed_s=round(time.monotonic() - started, 3),
        ))

    def _explain(self, failure: ModelFailure, model: str, request: ModelRequest, tries: int, seconds: float) -> str:
        """The failure, with its HTTP status and what the user can do about it."""
        status = f"HTTP {failure.status}: " if failure.status else ""
        over = f"after {tries} {'try' if tries == 1 else 'tries'} over {seconds:.1f}s"
        where = request.api_base or f"{provider_of(model)}'s default endpoint"
        if failure.kind == "key_refused":
            variable = key_variable(self.senior, model) or "api_key_env"
            return (f"{status}the key in {variable} was refused; check it is current and allowed to use {model} "
                    f"({failure.detail})")
        if failure.kind == "unknown_model":
            return (f"{status}the model name {model.split('/', 1)[-1]!r} is unknown to the provider at {where}; "
                    f"check the name in the pipeline file ({failure.detail})")
        if failure.kind == "rate_limited":
            return f"{status}rate-limited {over}; raise max_retries or backoff_seconds, or lower concurrency"
        if failure.kind == "server_error":
            return f"{status}the provider failed {over}: {failure.detail}"
        if failure.kind == "timeout":
            return (f"no answer within {self.senior.timeout_seconds:g}s (timeout_seconds) {over}; "
                    "raise timeout_seconds or lower max_tokens")
        if failure.kind == "connection":
            return (f"connection refused to {where} {over}; is the server running, and api_base right? "
                    f"({failure.detail})")
        if failure.kind == "dropped":
            return f"the connection to {where} was dropped before an answer, {over} ({failure.detail})"
        if failure.kind == "bad_response":
            return f"{status}the provider's response could not be read, {over}: {failure.detail}"
        if failure.status is None:  # litellm's own check, before anything was sent
            return f"litellm would not send the request: {failure.detail}"
        return f"{status}the provider refused the request: {failure.detail}"

    def _call(self, request: ModelRequest, model: str) -> ModelReply:
        litellm = load_litellm()
        dropped = set(left_out(model, request.temperature, request.seed))
        kwargs: dict = {
            "model": model,
            "messages": [dict(m) for m in request.messages],
            "max_tokens": request.max_tokens,
            "timeout": self.senior.timeout_seconds,
            "num_retries": 0,  # retries are ours: counted, backed off, reported
            "max_retries": 0,
        }
        if "temperature" not in dropped:
            kwargs["temperature"] = request.temperature
        if request.seed is not None and "seed" not in dropped:
            kwargs["seed"] = request.seed
        if request.api_base:
            kwargs["api_base"] = request.api_base
        if self.senior.api_key_env:
            kwargs["api_key"] = os.environ.get(self.senior.api_key_env, "")
        elif provider_of(model) == "openai" and _loopback(request.api_base) and not os.environ.get("OPENAI_API_KEY"):
            kwargs["api_key"] = "local"  # a local server takes any key; the OpenAI SDK insists on one
        if request.response_schema and structured_output(model):
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.response_schema},
            }
        started = time.monotonic()
        try:
            response = litellm.completion(**kwargs)
        except Exception as exc:  # litellm maps every provider's failures into its own tree
            raise _failure(litellm, exc) from exc
        latency_ms = int((time.monotonic() - started) * 1000)
        if not getattr(response, "choices", None):  # a 200 with no choice is a provider fault, worth another try
            raise ModelFailure("bad_response", "the response had no choices")
        choice = response.choices[0]
        try:
            (choice.message.content or "").encode("utf-8")
        except UnicodeEncodeError:  # JSON escapes can smuggle lone surrogates: garbled, like bad bytes
            raise ModelFailure("bad_response", "the answer is not valid UTF-8 text") from None
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
        completion_tokens = getattr(usage, "completion_tokens", 0) or 0
        finish_reason = choice.finish_reason
        if completion_tokens == request.max_tokens:
            # Some adapters lose the provider's "cut off" (a JSON-mode tool call, Ollama's /api/generate):
            # an answer exactly as long as the limit was cut off by it, whatever the finish reason says.
            finish_reason = "length"
        return ModelReply(
            content=choice.message.content or "",
            model=model,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=self._cost(litellm, model, response, prompt_tokens, completion_tokens),
            latency_ms=latency_ms,
        )

    def _cost(self, litellm, model: str, response, prompt_tokens: int, completion_tokens: int) -> float:
        price = price_per_token(model, self.prices)
        if price is not None:
            return prompt_tokens * price[0] + completion_tokens * price[1]
        try:  # litellm may still price it from the response (a dated model name, say)
            return float(litellm.completion_cost(completion_response=response) or 0.0)
        except Exception:  # unknown: a pipeline with a cost budget refuses to start with such a model
            return 0.0


class _GaveUp(Exception):
    def __init__(self, message: str, tries: int):
        super().__init__(message)
        self.message = message
        self.tries = tries


def _failure(litellm, exc: Exception) -> ModelFailure:
    """What kind of failure a litellm exception is, with the provider's HTTP status and its own words."""
    detail = _message(exc)
    chain = _chain(exc)
    names = {type(c).__name__ for c in chain}
    # The status the provider sent, from the HTTP error litellm wraps (its own status may differ: a 503 from
    # Anthropic is re-raised as a 500, a 502 from Gemini as a connection error); None when no response came.
    status = next((found for c in reversed(chain) if (found := _sent_status(c)) is not None), None)
    if isinstance(exc, litellm.UnsupportedParamsError):  # raised by litellm before anything is sent
        return ModelFailure("bad_request", detail)
    if status is None and (isinstance(exc, litellm.Timeout) or names & {"ReadTimeout", "ConnectTimeout", "TimeoutException"}):
        return ModelFailure("timeout", detail)
    if status is None and names & {"ConnectError", "ConnectionRefusedError"}:
        return ModelFailure("connection", detail)
    if status is None and names & {"RemoteProtocolError", "ReadError", "ConnectionResetError"}:
        return ModelFailure("dropped", detail)
    if isinstance(exc, litellm.AuthenticationError) or status in (401, 403):
        return ModelFailure("key_refused", detail, status or 401)  # Gemini says 400 API_KEY_INVALID
    if status is None and (names & {"JSONDecodeError", "ValidationError", "UnicodeDecodeError", "KeyError"}
                           or any(s in str(exc) for s in UNREADABLE)):
        return ModelFailure("bad_response", detail)  # an answer came, and could not be read: worth another try
    if status is None and isinstance(exc, (litellm.BadRequestError, litellm.APIConnectionError)):
        return ModelFailure("bad_request", detail)  # litellm refused before sending (an unknown provider, say)
    if status is None:
        status = getattr(exc, "status_code", None) if isinstance(getattr(exc, "status_code", None), int) else None
    if status == 404:
        return ModelFailure("unknown_model", detail, status)
    if status == 429:
        return ModelFailure("rate_limited", detail, status, _retry_after(exc))
    if status == 408:
        return ModelFailure("timeout", detail, status)
    if status is not None and status >= 500:
        return ModelFailure("server_error", detail, status, _retry_after(exc))
    return ModelFailure("bad_request", detail, status)


def _sent_status(exc: BaseException) -> int | None:
    """The HTTP status of a response that really came: from httpx's error, or the openai SDK's (which holds the
    response); litellm's own exceptions carry statuses of their choosing and are not asked."""
    if "HTTPStatusError" in type(exc).__name__ and isinstance(getattr(exc, "status_code", None), int):
        return exc.status_code  # type: ignore[attr-defined]
    if type(exc).__module__.startswith(("openai", "httpx")):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status if isinstance(status, int) else None
    return None


# How litellm's adapters say a response arrived and could not be read (their own words, not the provider's).
UNREADABLE = ("Unable to get json response", "Error converting to valid response", "Expecting value",
              "Expecting property name", "Unterminated string", "Invalid control character")


def _chain(exc: BaseException) -> list[BaseException]:
    """An exception and its causes, outermost first (litellm wraps its provider's error, which wraps httpx's)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _retry_after(exc: Exception) -> float | None:
    for headers in (getattr(getattr(exc, "response", None), "headers", None), getattr(exc, "litellm_response_headers", None)):
        value = headers.get("retry-after") if headers else None
        if value is None:
            continue
        try:
            # Honoured, within reason: a server may not park a unit for longer than a minute a try.
            return min(MAX_RETRY_AFTER, max(0.0, float(value)))
        except ValueError:  # the HTTP-date form: fall back to our own backoff
            return None
    return None


def _loopback(api_base: str | None) -> bool:
    if not api_base:
        return False
    from urllib.parse import urlparse

    return (urlparse(api_base).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _message(exc: Exception) -> str:
    """The provider's own words: litellm's prefixes, its proxy advice and the JSON wrapping taken off."""
    text = str(exc).split("To drop these", 1)[0].split("To drop unsupported", 1)[0].split("\nTraceback", 1)[0]
    text = re.sub(r"\blitellm\.(?=[A-Z])", "", text)  # litellm.BadRequestError -> BadRequestError
    text = text.split(" - ", 1)[-1].strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            text = error["message"]
        elif isinstance(error, str):
            text = error
    return " ".join(text.split())[:500].rstrip(". ") or type(exc).__name__
