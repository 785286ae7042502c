"""regen kernel: the runtime every generated ecosystem is built on.

Copied into each ecosystem as `<pkg>/kernel/`: the core, which imports only the standard
library, mcp, starlette, uvicorn, httpx, cryptography, pydantic and prometheus_client, and of
the packs (`packs/`) those its spec uses, each with its own pinned libraries: the capability
packs its tools are bound to, and the deployment packs it names (redis: the Redis bus; tracing:
OpenTelemetry traces; console: Grace's web UI), which the core loads only when configured to use them.
"""

from __future__ import annotations

from .bus import ConversationBus, Envelope
from .capabilities import CAPABILITIES, Capability, CapabilityParam
from .config import EcosystemConfig, ModelAlias
from .errors import AccessDenied, BudgetExceeded, InvalidArgument, KernelError, ModelError, NotFound
from .mad import Mad, tool

__all__ = ["AccessDenied", "BudgetExceeded", "CAPABILITIES", "Capability", "CapabilityParam", "ConversationBus",
           "EcosystemConfig", "Envelope", "InvalidArgument", "KernelError", "Mad", "ModelAlias", "ModelError", "NotFound",
           "tool"]


def __getattr__(name: str):  # lazy: the runtime pulls in httpx and cryptography
    if name == "Runtime":
        from .runtime import Runtime

        return Runtime
    raise AttributeError(name)
