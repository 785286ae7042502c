"""regen kernel: the runtime every generated ecosystem is built on.

Copied verbatim into each ecosystem as `<pkg>/kernel/`; it imports only the standard
library, mcp, starlette, uvicorn, httpx, cryptography, pydantic and prometheus_client
(and redis, lazily, when the Redis transport is configured; and opentelemetry, the
opentelemetry-sdk and its OTLP/HTTP exporter, lazily, when traces are: `tracing.py`).
"""

from __future__ import annotations

from .bus import ConversationBus, Envelope
from .capabilities import CAPABILITIES, Capability, CapabilityParam
from .config import EcosystemConfig, ModelAlias
from .errors import AccessDenied, BudgetExceeded, InvalidArgument, KernelError, ModelError, NotFound
from .mad import Mad, tool

__all__ = [
    "AccessDenied",
    "BudgetExceeded",
    "CAPABILITIES",
    "Capability",
    "CapabilityParam",
    "ConversationBus",
    "EcosystemConfig",
    "Envelope",
    "InvalidArgument",
    "KernelError",
    "Mad",
    "ModelAlias",
    "ModelError",
    "NotFound",
    "tool",
]


def __getattr__(name: str):  # lazy: the runtime pulls in httpx and cryptography
    if name == "Runtime":
        from .runtime import Runtime

        return Runtime
    raise AttributeError(name)
