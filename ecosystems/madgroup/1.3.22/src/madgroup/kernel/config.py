"""The ecosystem's static configuration, as the generated `ecosystem.py` declares it."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ModelAlias(BaseModel):
    """One model alias: which provider and model it means, and where its key lives.

    provider: "echo" (deterministic, offline) or "openai" (any OpenAI-compatible
    `/chat/completions` endpoint at `api_base`). `api_key_secret` names the Turing
    secret holding the API key ("" for none).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: Literal["echo", "openai"] = "echo"
    model: str = ""
    api_base: str = ""
    api_key_secret: str = ""
    timeout_s: float = 60.0


class EcosystemConfig(BaseModel):
    """The whole ecosystem: its name, model aliases, client budget and MAD classes in start-up order."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(pattern=_NAME.pattern)
    description: str = ""
    version: str = ""
    models: dict[str, ModelAlias] = Field(default_factory=lambda: {"default": ModelAlias()})
    client_budget_tokens: int = 100_000
    mads: tuple[Any, ...] = ()
    tool_hints: dict[str, dict[str, bool]] = Field(
        default_factory=dict, description="'<mad>.<tool>' -> its MCP annotations (readOnlyHint, destructiveHint, "
                                          "idempotentHint); a tool not named here gets none (MCP's cautious defaults)")
    pack_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="capability pack -> its settings (e.g. files: quota_bytes, max_file_bytes)")
    capability_tools: dict[str, str] = Field(
        default_factory=dict, description="kernel capability -> the '<mad>.<tool>' bound to it: what a client must be "
                                          "allowed to see that capability's data anywhere, Grace's pages included")

    @field_validator("mads")
    @classmethod
    def _mads_are_mads(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        from .mad import Mad

        names: set[str] = set()
        for mad in value:
            if not (isinstance(mad, type) and issubclass(mad, Mad)):
                raise ValueError(f"{mad!r} is not a Mad subclass")
            if not _NAME.match(mad.name or ""):
                raise ValueError(f"MAD {mad.__name__} has invalid name {mad.name!r}")
            if mad.name in names:
                raise ValueError(f"two MADs are named {mad.name!r}")
            names.add(mad.name)
        return tuple(value)

    @property
    def persistent_mads(self) -> tuple[Any, ...]:
        """The MADs that run for the ecosystem's life: started, supervised, their tools served, asked over the bus."""
        return tuple(m for m in self.mads if m.lifecycle != "ephemeral")

    @property
    def env_prefix(self) -> str:
        """Prefix of this ecosystem's environment variables, e.g. MADGROUP."""
        return self.name.upper()
