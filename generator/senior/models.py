"""What passes between regen and a model: a request, its reply, and the exchange the transcript keeps.

`ModelClient` is the seam a test swaps: anything with `complete(request) -> reply` can be the
senior (the real litellm client, a transcript being replayed, a fake in a test).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from pydantic import Field

from ..config import SeniorModel
from ..frozen import Frozen
from ..hashing import json_hash


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
        return json_hash(self.model_dump(exclude={"unit"}))

    @property
    def prompt_hash(self) -> str:
        """Content address of the prompt alone, whichever model it was sent to."""
        return json_hash(self.model_dump(include={"messages", "response_schema"}))


class ModelReply(Frozen):
    content: str
    model: str = Field(default="", description="the model that answered (a fallback, perhaps)")
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: int = Field(default=0, description="wall time of the request, retries and their waits included")
    attempts: int = Field(default=1, description="tries at the model that answered")
    retries: int = Field(default=0, description="failed tries before the answer, at any model")
    fallbacks: int = Field(default=0, description="models given up before the one that answered")
    cached: bool = False
    elapsed_s: float | None = Field(default=None, description="the answer's wall time when it was made (seconds, to "
                                                              "0.01), kept with it in the transcript and the cache; "
                                                              "None for the offline reference, which is not a model")

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# Reserves one call's worst case at the price of the model it goes to; the body settles it with the reply.
Reserve = Callable[[str], AbstractContextManager[Callable[[ModelReply], None]]]


class ModelClient(Protocol):
    def complete(self, request: ModelRequest) -> ModelReply: ...


def complete_within(client: ModelClient, request: ModelRequest, reserve: Reserve) -> ModelReply:
    """Ask `client` with every call reserved first: a client that may try several models (fallbacks)
    reserves each at that model's own price; any other is reserved at the price of the model asked."""
    if getattr(client, "reserves_each_model", False):
        return client.complete(request, reserve=reserve)  # type: ignore[call-arg]
    with reserve(request.model) as settle:
        reply = client.complete(request)
        settle(reply)
    return reply



class Exchange(Frozen):
    """One request and its answer, as the transcript keeps it."""

    request: ModelRequest
    reply: ModelReply
    round: int
    purpose: str
    reused_from: str | None = Field(default=None, description="the version this exchange was made for, when reused")
