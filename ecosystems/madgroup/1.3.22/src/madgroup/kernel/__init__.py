"""regen kernel: the runtime every generated ecosystem is built on.

Copied into each ecosystem as `<pkg>/kernel/`: the core, which imports only the standard
library, mcp, starlette, uvicorn, cryptography, pydantic and prometheus_client, and of the
packs (`packs/`) those its spec uses, each with its own pinned libraries: the capability packs
its tools are bound to, the deployment packs it names (redis: the Redis bus; tracing:
OpenTelemetry traces; console: Grace's web UI), which the core loads only when configured to use
them, and those its spec implies (emads: its roles; storage: its MADs' tables; openai: its model
aliases with that provider).
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


def __getattr__(name: str):  # lazy: the runtime pulls in cryptography and the MCP SDK
    if name == "Runtime":
        from .runtime import Runtime

        return Runtime
    raise AttributeError(name)
