"""The real senior: every model call goes through `litellm.completion`.

`LiteLLMClient` is the real `ModelClient` (senior/models.py); it registers the offline reference synthesiser as the litellm custom provider
`offline`, so the offline default takes the same path as any real model. It retries
429, 5xx and timeouts with exponential backoff and jitter (honouring Retry-After),
then falls back to the next model of the pipeline. litellm takes seconds to import, so
it is imported on the first call, never at CLI start-up.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

from ..config import Price, SeniorModel
from ..errors import BuildFailed, UserError
from .models import ModelReply, ModelRequest

# The test suite turns this off (tests/conftest.py) so that no test can reach a paid
# endpoint by accident; the offline provider, loopback servers and injected fakes still work.
ALLOW_MODEL_REQUESTS = True

MAX_RETRY_AFTER = 60.0


def load_litellm():
    """Import litellm once, hermetically, with the offline provider registered."""
    # Without this litellm downloads its price table at import: a build must be hermetic.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
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


def missing_key(senior: SeniorModel) -> str | None:
    """The environment variable the senior (or a fallback) needs and does not have, if any."""
    if senior.api_key_env:
        return None if os.environ.get(senior.api_key_env) else senior.api_key_env
    litellm = load_litellm()
    for model in [senior.model, *senior.fallbacks]:
        if model.startswith("offline/"):
            continue
        missing = litellm.validate_environment(model=model).get("missing_keys") or []
        if missing:
            return missing[0]
    return None


class _Transient(Exception):
    """A failure worth another try: rate limit, server error, timeout, a garbled response."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(exc: Exception) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or getattr(exc, "litellm_response_headers", None)
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        # Honoured, within reason: a server may not park a unit for longer than a minute a try.
        return min(MAX_RETRY_AFTER, max(0.0, float(value))) if value is not None else None
    except ValueError:  # the HTTP-date form: fall back to our own backoff
        return None


class LiteLLMClient:
    """The real client: `litellm.completion` with retries, backoff and fallbacks."""

    def __init__(
        self,
        senior: SeniorModel,
        prices: dict[str, Price] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.senior = senior
        self.prices = prices or {}
        self.sleep = sleep

    def complete(self, request: ModelRequest) -> ModelReply:
        failures = []
        for model in [request.model, *self.senior.fallbacks]:
            if not ALLOW_MODEL_REQUESTS and not model.startswith("offline/") and not _loopback(request.api_base):
                raise UserError(f"model requests are disabled here; refusing to call {model}")
            try:
                return self._with_retries(request, model)
            except _Transient as exc:
                failures.append(f"{model}: {exc}")
        raise BuildFailed(f"unit {request.unit}: every model failed after retries: " + "; ".join(failures))

    def _with_retries(self, request: ModelRequest, model: str) -> ModelReply:
        attempts = self.senior.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                reply = self._call(request, model)
                return reply.model_copy(update={"attempts": attempt})
            except _Transient as exc:
                if attempt == attempts:
                    raise
                # Exponential backoff with full jitter; a server's Retry-After wins when longer.
                delay = random.uniform(0, self.senior.backoff_seconds * 2 ** (attempt - 1))
                self.sleep(max(delay, exc.retry_after or 0.0))
        raise AssertionError("unreachable")

    def _call(self, request: ModelRequest, model: str) -> ModelReply:
        litellm = load_litellm()
        kwargs: dict = {
            "model": model,
            "messages": [dict(m) for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "timeout": self.senior.timeout_seconds,
            "num_retries": 0,  # retries are ours: counted, backed off, recorded
            "max_retries": 0,
        }
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.api_base:
            kwargs["api_base"] = request.api_base
        if self.senior.api_key_env:
            kwargs["api_key"] = os.environ.get(self.senior.api_key_env, "")
        if request.response_schema and not model.startswith("offline/") and _supports_schema(litellm, model):
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.response_schema},
            }
        started = time.monotonic()
        try:
            response = litellm.completion(**kwargs)
        except (litellm.RateLimitError, litellm.Timeout, litellm.APIConnectionError,
                litellm.InternalServerError, litellm.ServiceUnavailableError) as exc:
            raise _Transient(_message(exc), _retry_after(exc)) from exc
        except litellm.APIError as exc:
            if (getattr(exc, "status_code", 500) or 500) >= 500:
                raise _Transient(_message(exc)) from exc
            raise BuildFailed(f"model {model} refused unit {request.unit}: {_message(exc)}") from exc
        except Exception as exc:  # litellm maps provider failures into its own tree; anything else is fatal
            status = getattr(exc, "status_code", None)
            if isinstance(status, int) and status >= 500:
                raise _Transient(_message(exc)) from exc
            raise BuildFailed(f"model {model} failed on unit {request.unit}: {_message(exc)}") from exc
        latency_ms = int((time.monotonic() - started) * 1000)
        if not response.choices:  # a 200 with no choice is a provider fault, worth another try
            raise _Transient("the response had no choices")
        choice = response.choices[0]
        try:
            (choice.message.content or "").encode("utf-8")
        except UnicodeEncodeError:  # JSON escapes can smuggle lone surrogates: garbled, like bad bytes
            raise _Transient("the answer is not valid UTF-8 text") from None
        usage = getattr(response, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
        completion_tokens = getattr(usage, "completion_tokens", 0) or 0
        return ModelReply(
            content=choice.message.content or "",
            model=model,
            finish_reason=choice.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=self._cost(litellm, model, response, prompt_tokens, completion_tokens),
            latency_ms=latency_ms,
        )

    def _cost(self, litellm, model: str, response, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.prices.get(model)
        if price is not None:
            return (prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / 1e6
        try:
            return float(litellm.completion_cost(completion_response=response) or 0.0)
        except Exception:  # no price known: reported as 0, and `prices` in the pipeline fixes it
            return 0.0


def _loopback(api_base: str | None) -> bool:
    if not api_base:
        return False
    from urllib.parse import urlparse

    return (urlparse(api_base).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _supports_schema(litellm, model: str) -> bool:
    try:
        return bool(litellm.supports_response_schema(model=model))
    except Exception:
        return False


def _message(exc: Exception) -> str:
    return str(exc).split(" - ", 1)[-1].strip()[:500] or type(exc).__name__

