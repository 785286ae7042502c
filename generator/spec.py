"""The spec of an ecosystem, as typed models.

A spec folder holds `ecosystem.yaml`, `requirements.md`, `principles.md` and one
`mads/<name>.yaml` per MAD. `generator.load` reads the folder into these models;
every later stage takes them as its input. All models are immutable and reject
unknown keys, so a typo in a spec is an error, never silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from .kernel.capabilities import TYPE_NAMES

IDENTIFIER = r"^[a-z][a-z0-9_]*$"


def _check_type(value: str) -> str:
    if value not in TYPE_NAMES:
        raise ValueError(f"unknown type {value!r}; expected one of {', '.join(sorted(TYPE_NAMES))}")
    return value


TypeName = Annotated[str, AfterValidator(_check_type)]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Param(Frozen):
    """One parameter of a tool. A parameter with a `default` is optional."""

    type: TypeName
    description: str = ""
    default: str | int | float | bool | list | dict | None = None

    @property
    def optional(self) -> bool:
        return "default" in self.model_fields_set


class Tool(Frozen):
    """A tool of a MAD's Action Engine, exposed over MCP as `<mad>.<tool>`."""

    name: str = Field(pattern=IDENTIFIER)
    description: str
    params: dict[str, Param] = Field(default_factory=dict)
    returns: TypeName = "dict"
    builtin: str | None = Field(
        default=None, description="a kernel capability this tool is bound to, e.g. secrets.get"
    )

    @field_validator("params")
    @classmethod
    def _param_names(cls, params: dict[str, Param]) -> dict[str, Param]:
        for name in params:
            if not re.match(IDENTIFIER, name):
                raise ValueError(f"parameter name {name!r} must be a lower-case identifier")
        return params


class Column(Frozen):
    name: str = Field(pattern=IDENTIFIER)
    type: Literal["text", "integer", "real", "blob", "json"]
    primary_key: bool = False
    nullable: bool = True


class Table(Frozen):
    """A table in the MAD's own storage (created by the kernel as `<mad>_<table>`)."""

    name: str = Field(pattern=IDENTIFIER)
    columns: list[Column] = Field(min_length=1)


class Imperator(Frozen):
    """The MAD's Thought Engine: its system prompt and the model alias it thinks with."""

    model: str = Field(description="an alias from ecosystem.yaml `models`")
    prompt: str = Field(min_length=1)


class MadSpec(Frozen):
    name: str = Field(pattern=IDENTIFIER)
    role: str = Field(min_length=1)
    level: Literal["V0", "V1", "V2", "V3", "V4", "V5"]
    lifecycle: Literal["persistent", "ephemeral"] = "persistent"
    tools: list[Tool] = Field(default_factory=list)
    conversations: list[str] = Field(default_factory=list, description="conversations it joins")
    talks_to: list[str] = Field(default_factory=list, description="MADs it depends on")
    secrets: list[str] = Field(default_factory=list, description="secrets it may read")
    storage: list[Table] = Field(default_factory=list)
    budget_tokens: int = Field(default=100_000, ge=0, description="per-MAD LLM token budget")
    imperator: Imperator

    @property
    def class_name(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))


class ModelAlias(Frozen):
    """A model the running ecosystem can call through Fiedler."""

    provider: Literal["echo", "openai"] = "echo"
    model: str = ""
    api_base: str = ""
    api_key_secret: str = Field(default="", description="a Turing secret holding the API key")


class PrincipleRule(Frozen):
    """A machine-checked design principle, enforced on every generated Python file."""

    id: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    description: str
    forbid_imports: list[str] = Field(default_factory=list)
    forbid_calls: list[str] = Field(default_factory=list)
    forbid_patterns: list[str] = Field(default_factory=list, description="regular expressions")

    @field_validator("forbid_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}")
        return patterns


class EcosystemSpec(Frozen):
    name: str = Field(pattern=IDENTIFIER)
    description: str
    python: str = Field(pattern=r"^3\.\d+$")
    dependencies: list[str] = Field(min_length=1, description="pinned runtime requirements")
    dev_dependencies: list[str] = Field(default_factory=list)
    models: dict[str, ModelAlias] = Field(default_factory=dict)
    client_budget_tokens: int = Field(default=100_000, ge=0)
    principles: list[PrincipleRule] = Field(default_factory=list)


class SpecFile(Frozen):
    """A file of the spec folder, by its path relative to the folder, with its content hash."""

    path: str
    sha256: str


class Spec(Frozen):
    """A whole, validated spec: what every later stage starts from."""

    root: str = Field(description="the spec folder, as given")
    ecosystem: EcosystemSpec
    requirements: str
    principles: str
    mads: tuple[MadSpec, ...]
    files: tuple[SpecFile, ...]

    def mad(self, name: str) -> MadSpec:
        return next(m for m in self.mads if m.name == name)
