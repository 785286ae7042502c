"""The LLM layer: every model call goes through `litellm.completion`, behind one seam.

`ModelClient` is the seam a test swaps (STYLE.md rule 4). `LiteLLMClient` is the real
one; it registers the offline reference synthesiser as the litellm custom provider
`offline`, so the offline default takes the same path as any real model. It retries
429, 5xx and timeouts with exponential backoff and jitter (honouring Retry-After),
then falls back to the next model of the pipeline. litellm takes seconds to import, so
it is imported on the first call, never at CLI start-up.

Around the client sit the content-addressed `ResponseCache` (same request, same
answer, no tokens) and `TranscriptModel` (a recorded build's transcript as the model,
for `regen verify` and `--replay`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import Price, SeniorModel
from ..errors import BuildFailed, UserError

# The test suite turns this off (tests/conftest.py) so that no test can reach a paid
# endpoint by accident; the offline provider, loopback servers and injected fakes still work.
ALLOW_MODEL_REQUESTS = True

MAX_ANSWER_BYTES = 4 * 1024 * 1024
MAX_RETRY_AFTER = 60.0


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _sha256_json(data: object) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ModelRequest(Frozen):
    """One request to the senior model for one synthesis unit."""

    unit: str
    model: str
    messages: tuple[dict[str, str], ...]
    temperature: float
    seed: int | None
    max_tokens: int
    api_base: str | None = None
    response_schema: dict | None = Field(default=None, description="ask for structured output when supported")

    @classmethod
    def for_unit(
        cls, unit: str, senior: SeniorModel, messages: list[dict[str, str]], response_schema: dict | None = None
    ) -> ModelRequest:
        return cls(
            unit=unit,
            model=senior.model,
            messages=tuple(messages),
            temperature=senior.temperature,
            seed=senior.seed,
            max_tokens=senior.max_tokens,
            api_base=senior.api_base,
            response_schema=response_schema,
        )

    @property
    def hash(self) -> str:
        """Content address of what the model is asked: same request, same hash."""
        return _sha256_json(self.model_dump(exclude={"unit"}))

    @property
    def prompt_hash(self) -> str:
        """Content address of the prompt alone, whichever model it was sent to."""
        return _sha256_json(self.model_dump(include={"messages", "response_schema"}))


class ModelReply(Frozen):
    content: str
    model: str = Field(default="", description="the model that answered (a fallback, perhaps)")
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: int = 0
    attempts: int = 1
    cached: bool = False

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ModelClient(Protocol):
    def complete(self, request: ModelRequest) -> ModelReply: ...


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


class ResponseCache:
    """Content-addressed answers: `<dir>/<hash[:2]>/<hash>.json`, written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, request_hash: str) -> Path:
        return self.folder / request_hash[:2] / f"{request_hash}.json"

    def get(self, request_hash: str) -> ModelReply | None:
        path = self._path(request_hash)
        try:
            return ModelReply.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # a corrupt entry is a miss, and goes away
            path.unlink(missing_ok=True)
            return None

    def put(self, request_hash: str, reply: ModelReply) -> None:
        path = self._path(request_hash)
        temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(reply.model_copy(update={"cached": False}).model_dump_json())
            os.replace(temporary, path)
        except (OSError, ValueError):  # a cache that cannot be written costs tokens later, not the build
            temporary.unlink(missing_ok=True)


class TranscriptModel:
    """A recorded build as the model: each request gets the answer recorded for it.

    A request is matched by its hash. A repair after failed tests or a review is matched by
    its place in the unit's conversation instead, because its prompt quotes the sandbox's
    output or the reviewers' findings, which need not be byte-identical from run to run.
    """

    def __init__(self, transcript: Path):
        self.source = transcript
        self.by_unit: dict[str, list[tuple[str, str, ModelReply]]] = {}
        self._lock = threading.Lock()
        self._next: dict[str, int] = {}
        try:
            lines = transcript.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UserError(f"{transcript}: cannot read the transcript to replay: {exc}")
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                reply = ModelReply(
                    content=entry["response"],
                    model=entry.get("answered_by") or entry["model"],
                    finish_reason=entry.get("finish_reason"),
                    prompt_tokens=entry["usage"]["prompt_tokens"],
                    completion_tokens=entry["usage"]["completion_tokens"],
                    cost_usd=entry.get("cost_usd", 0.0),
                )
                self.by_unit.setdefault(entry["unit"], []).append((entry["request_hash"], entry["purpose"], reply))
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{transcript}:{number}: not a transcript line: {exc}")

    def unanswered(self, unit: str) -> int:
        """How many recorded answers of `unit` have not been asked for yet."""
        return len(self.by_unit.get(unit, [])) - self._next.get(unit, 0)

    def complete(self, request: ModelRequest) -> ModelReply:
        with self._lock:
            recorded = self.by_unit.get(request.unit, [])
            index = self._next.get(request.unit, 0)
            after_tests = any(purpose in ("repair-tests", "repair-review") for _, purpose, _ in recorded[:index + 1])
            if index < len(recorded) and (recorded[index][0] == request.hash or after_tests):
                self._next[request.unit] = index + 1
                return recorded[index][2].model_copy(update={"cached": True, "latency_ms": 0, "attempts": 0})
        raise BuildFailed(
            f"{self.source} has no answer for unit {request.unit} (request {request.hash[:12]}): "
            "its inputs (spec, prompts, kernel or pipeline) differ from the recorded build"
        )


class RecordedAnswers:
    """Answers from archived builds, by prompt: what a model once wrote for exactly this prompt.

    The offline pipeline answers the units it cannot write (tools with no capability) from
    here, so a spec that once had a model write them rebuilds offline, until its prompts change.
    """

    def __init__(self, transcripts: list[tuple[str, Path]]):
        self.answers: dict[str, tuple[str, ModelReply]] = {}
        for label, path in transcripts:  # newest first: the first answer recorded for a prompt wins
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                continue  # an unreadable record answers nothing; the units it would serve are then named
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                try:
                    request = ModelRequest(
                        unit=entry["unit"], model=entry["model"], messages=tuple(entry["messages"]),
                        temperature=0, seed=None, max_tokens=1,
                        response_schema=Answer.model_json_schema()
                        if entry.get("parameters", {}).get("structured_output") else None,
                    )
                    reply = ModelReply(
                        content=entry["response"], model=entry.get("answered_by") or entry["model"],
                        finish_reason=entry.get("finish_reason"), prompt_tokens=entry["usage"]["prompt_tokens"],
                        completion_tokens=entry["usage"]["completion_tokens"], cost_usd=entry.get("cost_usd", 0.0),
                    )
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue
                self.answers.setdefault(request.prompt_hash, (label, reply))

    def source_of(self, request: ModelRequest) -> str | None:
        found = self.answers.get(request.prompt_hash)
        return found[0] if found else None


class OfflineWithRecorded:
    """The offline senior for what it can write; recorded answers for the units it cannot."""

    def __init__(self, offline: ModelClient, recorded: RecordedAnswers, units: set[str]):
        self.offline = offline
        self.recorded = recorded
        self.units = units

    def complete(self, request: ModelRequest) -> ModelReply:
        if request.unit not in self.units:
            return self.offline.complete(request)
        found = self.recorded.answers.get(request.prompt_hash)
        if found is None:
            raise BuildFailed(f"unit {request.unit} needs a model: no archived build answered this prompt")
        return found[1].model_copy(update={"cached": True, "latency_ms": 0, "attempts": 0})


class Exchange(Frozen):
    """One request and its answer, as the transcript keeps it."""

    request: ModelRequest
    reply: ModelReply
    round: int
    purpose: str


class Transcript:
    """`transcript.jsonl`: every exchange, written in plan order (unit, then round).

    Only what the model was asked and answered: two builds from the same inputs write the
    same bytes. Wall time, retries and cache hits are shown on screen, not archived."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, exchanges: list[Exchange]) -> None:
        with self.path.open("w", encoding="utf-8") as out:
            for e in exchanges:
                line = {
                    "request_hash": e.request.hash,
                    "unit": e.request.unit,
                    "round": e.round,
                    "purpose": e.purpose,
                    "model": e.request.model,
                    "answered_by": e.reply.model or e.request.model,
                    "parameters": {
                        "temperature": e.request.temperature,
                        "seed": e.request.seed,
                        "max_tokens": e.request.max_tokens,
                        "api_base": e.request.api_base,
                        "structured_output": e.request.response_schema is not None,
                    },
                    "messages": list(e.request.messages),
                    "response": e.reply.content,
                    "finish_reason": e.reply.finish_reason,
                    "usage": {"prompt_tokens": e.reply.prompt_tokens, "completion_tokens": e.reply.completion_tokens},
                    "cost_usd": e.reply.cost_usd,
                }  # no latency, retries or cache hits: they vary run to run, and the artifact must not
                out.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())


class AnswerFile(Frozen):
    path: str = Field(min_length=1)
    content: str

    @field_validator("content")
    @classmethod
    def _unix_line_endings(cls, content: str) -> str:
        # Files are written with \n line endings, whatever the model answered with.
        return content.replace("\r\n", "\n")


class Answer(Frozen):
    """The senior's answer format, the same for every model."""

    files: list[AnswerFile] = Field(min_length=1)


class AnswerRejected(BuildFailed):
    """An answer that cannot be used as it is: the problems go back to the senior in a repair round."""

    def __init__(self, unit: str, problems: list[str]):
        self.unit = unit
        self.problems = problems
        super().__init__(f"unit {unit}: the answer was rejected:\n  " + "\n  ".join(problems))


def unfenced(content: str) -> str:
    """The JSON in a model's answer: models often fence it in ``` despite being asked not to."""
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[-1].rsplit("```", 1)[0]
    return text


def parse_answer(unit: str, reply: ModelReply) -> Answer:
    """Parse and validate an answer; a bad one is rejected with what was wrong."""
    size = len(reply.content.encode("utf-8", "surrogatepass"))
    if size > MAX_ANSWER_BYTES:
        raise AnswerRejected(unit, [f"the answer is {size} bytes, over the {MAX_ANSWER_BYTES} limit"])
    text = unfenced(reply.content)
    if not text:
        raise AnswerRejected(unit, ["the answer was empty"])
    try:
        return Answer.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "answer"
        raise AnswerRejected(unit, [f'the answer is not {{"files": [{{"path", "content"}}]}}: {where}: {first["msg"]}'])
