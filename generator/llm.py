"""The LLM layer: every model call goes through `litellm.completion`, behind one seam.

`ModelClient` is the seam a test swaps (STYLE.md rule 4). `LiteLLMClient` is the real
one; it registers the offline reference synthesiser as the litellm custom provider
`offline`, so the offline default takes the same path as any real model. litellm takes
seconds to import, so it is imported on the first call, never at CLI start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import SeniorModel
from .errors import BuildFailed, UserError

# The test suite turns this off (tests/conftest.py) so that no test can reach a paid
# endpoint by accident; the offline provider and injected fakes still work.
ALLOW_MODEL_REQUESTS = True


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRequest(Frozen):
    """One request to the senior model for one synthesis unit."""

    unit: str
    model: str
    messages: tuple[dict[str, str], ...]
    temperature: float
    seed: int | None
    max_tokens: int
    api_base: str | None = None
    timeout_seconds: float = 600

    @classmethod
    def for_unit(cls, unit: str, senior: SeniorModel, messages: list[dict[str, str]]) -> ModelRequest:
        return cls(
            unit=unit,
            model=senior.model,
            messages=tuple(messages),
            temperature=senior.temperature,
            seed=senior.seed,
            max_tokens=senior.max_tokens,
            api_base=senior.api_base,
            timeout_seconds=senior.timeout_seconds,
        )

    @property
    def hash(self) -> str:
        """Content address of what the model is asked: same request, same hash."""
        payload = self.model_dump(exclude={"unit", "timeout_seconds"})
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


class ModelReply(Frozen):
    content: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: int = 0


class ModelClient(Protocol):
    def complete(self, request: ModelRequest) -> ModelReply: ...


class LiteLLMClient:
    """The real client: `litellm.completion`, with the offline provider registered."""

    def __init__(self) -> None:
        self._litellm = None

    def _load(self):
        if self._litellm is None:
            # Without this litellm downloads its price table at import: a build must be hermetic.
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            import litellm

            from .offline import OfflineReference

            litellm.suppress_debug_info = True
            litellm.telemetry = False
            providers = [p for p in litellm.custom_provider_map if p.get("provider") != "offline"]
            litellm.custom_provider_map = [
                *providers,
                {"provider": "offline", "custom_handler": OfflineReference()},
            ]
            self._litellm = litellm
        return self._litellm

    def complete(self, request: ModelRequest) -> ModelReply:
        if not ALLOW_MODEL_REQUESTS and not request.model.startswith("offline/"):
            raise UserError(f"model requests are disabled here; refusing to call {request.model}")
        litellm = self._load()
        kwargs = {
            "model": request.model,
            "messages": [dict(m) for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "timeout": request.timeout_seconds,
        }
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.api_base:
            kwargs["api_base"] = request.api_base
        started = time.monotonic()
        try:
            response = litellm.completion(**kwargs)
        except Exception as exc:  # litellm maps every provider failure to its own exception tree
            message = str(exc).split(" - ", 1)[-1].strip()
            raise BuildFailed(
                f"model {request.model} failed on unit {request.unit}: {message}"
            ) from exc
        latency_ms = int((time.monotonic() - started) * 1000)
        choice = response.choices[0]
        usage = getattr(response, "usage", None)
        try:
            cost = float(litellm.completion_cost(completion_response=response) or 0.0)
        except Exception:  # unknown models have no price: cost is then reported as 0
            cost = 0.0
        return ModelReply(
            content=choice.message.content or "",
            finish_reason=choice.finish_reason,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            cost_usd=cost,
            latency_ms=latency_ms,
        )


class Transcript:
    """`transcript.jsonl`: one line per exchange, appended and flushed as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def record(self, request: ModelRequest, reply: ModelReply) -> None:
        line = {
            "request_hash": request.hash,
            "unit": request.unit,
            "model": request.model,
            "parameters": {
                "temperature": request.temperature,
                "seed": request.seed,
                "max_tokens": request.max_tokens,
                "api_base": request.api_base,
            },
            "messages": list(request.messages),
            "response": reply.content,
            "finish_reason": reply.finish_reason,
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
            },
            "cost_usd": reply.cost_usd,
            "latency_ms": reply.latency_ms,
        }
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())


class AnswerFile(Frozen):
    path: str = Field(min_length=1)
    content: str


class Answer(Frozen):
    """The senior's answer format, the same for every model."""

    files: list[AnswerFile] = Field(min_length=1)


def parse_answer(unit: str, reply: ModelReply) -> Answer:
    """Parse and validate an answer; a bad one is a run failure that says what was wrong."""
    if reply.finish_reason == "length":
        raise BuildFailed(f"unit {unit}: the answer was cut off (finish_reason=length); nothing written")
    text = reply.content.strip()
    if text.startswith("```"):  # models often fence JSON despite being asked not to
        text = text.split("\n", 1)[-1].rsplit("```", 1)[0]
    try:
        return Answer.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "answer"
        raise BuildFailed(
            f'unit {unit}: the answer is not {{"files": [{{"path", "content"}}]}}: {where}: {first["msg"]}'
        ) from exc
