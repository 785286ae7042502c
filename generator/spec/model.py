"""The spec of an ecosystem, as typed models.

A spec folder holds `ecosystem.yaml`, `requirements.md`, `principles.md` and one
`mads/<name>.yaml` per MAD. `generator.load` reads the folder into these models;
every later stage takes them as its input. All models are immutable and reject
unknown keys, so a typo in a spec is an error, never silently ignored.

Requirements are traced by id: `Spec.requirement_items` are requirements.md's requirements
(`Requirement`, parsed by `requirements.py`), a MAD's `requirements` and the ecosystem's
`acceptance` (keyed by `ACCEPTANCE_AREAS`) name the ones they prove.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import keyword
import re
import sys
from collections.abc import Sequence
from functools import cached_property
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..frozen import Frozen
from ..kernel.capabilities import PACKS, TYPE_NAMES, packs_for

IDENTIFIER = r"^[a-z][a-z0-9_]*$"
# The oldest Python the kernel runs on (its own code uses 3.11 features).
MIN_PYTHON = (3, 11)
# An exact pin: a distribution name, optional extras, `==` and a version (no wildcard, no range).
PINNED_REQUIREMENT = re.compile(
    r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)"
    r"(?:\[\s*[A-Za-z0-9][A-Za-z0-9._-]*(?:\s*,\s*[A-Za-z0-9][A-Za-z0-9._-]*)*\s*\])?"
    r"\s*==\s*[A-Za-z0-9][A-Za-z0-9.+!_-]*$"
)
# The areas of the kernel's own acceptance tests, and what each proves of every ecosystem built.
# ecosystem.yaml `acceptance:` maps some of them to the requirements (of requirements.md) they prove.
ACCEPTANCE_AREAS: dict[str, str] = {
    "tools": "every spec tool is exposed over MCP as <mad>.<tool>",
    "web": "the web UI signs in with a client token, escapes content, refuses CSRF; /healthz answers",
    "gateway": "MCP requests without a valid bearer token are refused",
    "persistence": "conversations and secrets survive a restart",
    "secrets_at_rest": "no secret value is stored in plaintext",
    "clients": "the operator adds, lists and revokes clients; calls are logged and denials audited",
    "privilege": "a MAD is refused every capability its spec does not grant",
    "durability": "a request between MADs is delivered at least once and handled once across a crash",
    "isolation": "a MAD that raises or hangs does not take the process down; health per MAD",
    "audit": "the audit log is hash-chained and verifies; secrets re-encrypt under a new key",
    "observability": "JSON logs carry correlation ids; /metrics counts messages, tool calls and errors",
}
# The error type of a rule whose message is complete as written; the loader shows it as is.
SPEC_RULE = "spec_rule"


def spec_rule(message: str) -> PydanticCustomError:
    """A validation error the loader reports verbatim, at the value's line."""
    return PydanticCustomError(SPEC_RULE, "{message}", {"message": message})


def _check_type(value: str) -> str:
    if value not in TYPE_NAMES:
        raise ValueError(f"unknown type {value!r}; expected one of {', '.join(sorted(TYPE_NAMES))}")
    return value


TypeName = Annotated[str, AfterValidator(_check_type)]

# What an ecosystem's package must not be called: it is imported by its name, beside the standard library, the
# kernel's libraries, and its tests' own modules (conftest.py, harness.py), one of which it would shadow or be
# shadowed by.
_TAKEN_NAMES = frozenset({"tests", "conftest", "harness", "pytest", "mcp", "uvicorn", "starlette", "httpx", "httpx2",
                          "pydantic", "cryptography", "anyio", "prometheus_client"})


def package_name_problem(name: str) -> str | None:
    """Why `name` cannot be an ecosystem's name, which is its Python package's too; None when it can."""
    if not re.match(IDENTIFIER, name):
        return f"'{name}' is not an ecosystem name; expected lower case letters, digits and _, starting with a letter"
    if keyword.iskeyword(name):
        return f"'{name}' is a Python keyword, and an ecosystem's name is its Python package's; expected another, like '{name}_eco'"
    if name in sys.stdlib_module_names or name in _TAKEN_NAMES:
        kind = "a module of Python's standard library" if name in sys.stdlib_module_names else (
            "a module of the artifact's tests" if name in ("tests", "conftest", "harness") else "a library the kernel imports")
        return (f"'{name}' is also {kind}, which the ecosystem's Python package (named like the ecosystem) would "
                f"shadow or be shadowed by; expected another name, like '{name}_eco'")
    return None


def _package_name(name: str) -> str:
    if problem := package_name_problem(name):
        raise spec_rule(problem)
    return name


def _not_keyword(what: str):
    """A validator refusing Python keywords: the name becomes a Python name in generated code."""

    def check(value: str) -> str:
        if keyword.iskeyword(value):
            raise spec_rule(f"{what} '{value}' is a Python keyword, so generated code cannot use it; "
                            f"expected another name, like '{value}_'")
        return value

    return AfterValidator(check)


def _param_name(name: str) -> str:
    if not re.match(IDENTIFIER, name):
        raise ValueError(f"parameter name {name!r} must be a lower-case identifier")
    if keyword.iskeyword(name):
        raise spec_rule(f"parameter name '{name}' is a Python keyword, so generated code cannot use it; "
                        f"expected another name, like '{name}_'")
    if name == "self":
        raise spec_rule("parameter name 'self' is taken by the tool method itself; expected another name")
    return name


ParamName = Annotated[str, AfterValidator(_param_name)]

# What a default of each type must be, in words and as a test (bool is not a number here).
_DEFAULT_TYPES: dict[str, tuple[str, Any]] = {
    "str": ("text", lambda v: isinstance(v, str)),
    "int": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "dict": ("a mapping", lambda v: isinstance(v, dict)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "list[str]": ("a list of text", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "list[int]": ("a list of whole numbers", lambda v: isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v)),
    "list[dict]": ("a list of mappings", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v)),
    "None": ("null", lambda v: v is None),
}


def default_matches(type_name: str, value: Any) -> bool:
    """Whether `value` is a valid default for a param of `type_name` (one of TYPE_NAMES)."""
    return _DEFAULT_TYPES[type_name][1](value)


class Param(Frozen):
    """One parameter of a tool. A parameter with a `default` is optional."""

    type: TypeName
    description: str = ""
    default: str | int | float | bool | list | dict | None = None

    @field_validator("default")
    @classmethod
    def _default_of_type(cls, value: Any, info: ValidationInfo) -> Any:
        type_name = info.data.get("type")  # absent when the type itself was invalid
        if type_name in _DEFAULT_TYPES and not default_matches(type_name, value):
            shown = json.dumps(value, ensure_ascii=False, default=str)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            quoting = type_name == "str" and isinstance(value, (int, float))  # bool is an int
            hint = "; quote it so YAML keeps it as text" if quoting else ""
            raise spec_rule(f"default {shown} does not match the param's type {type_name}; "
                            f"expected {_DEFAULT_TYPES[type_name][0]}{hint}")
        return value

    @property
    def optional(self) -> bool:
        return "default" in self.model_fields_set


class ToolHints(Frozen):
    """What MCP clients are told of a tool (its annotations); unset, the bound capability decides."""

    read_only: bool | None = Field(default=None, description="it changes nothing")
    destructive: bool | None = Field(default=None, description="it may overwrite or delete what was there")
    idempotent: bool | None = Field(default=None, description="calling it twice with the same arguments does "
                                                              "no more than once")


class Tool(Frozen):
    """A tool of a MAD's Action Engine, exposed over MCP as `<mad>.<tool>`."""

    name: Annotated[str, Field(pattern=IDENTIFIER), _not_keyword("tool name")]
    description: str
    params: dict[ParamName, Param] = Field(default_factory=dict)
    returns: TypeName = "dict"
    builtin: str | None = Field(
        default=None, description="a kernel capability this tool is bound to, e.g. secrets.get"
    )
    hints: ToolHints | None = Field(
        default=None, description="read_only, destructive, idempotent: what MCP clients are told; "
                                  "default: what the bound capability implies"
    )


ColumnType = Literal["text", "integer", "real", "blob", "json"]

# The destructive storage changes a spec can accept, as written in `allow_destructive`: each
# entry names one change, so accepting one never accepts another made later.
_NAME = r"[a-z][a-z0-9_]*"
TABLE_CHANGES = {
    "drop column <column>": re.compile(rf"^drop column (?P<column>{_NAME})$"),
    "narrow column <column> to <type>": re.compile(
        rf"^narrow column (?P<column>{_NAME}) to (?P<type>{'|'.join(get_args(ColumnType))})$"),
    "require column <column>": re.compile(rf"^require column (?P<column>{_NAME})$"),
    "change primary key to <column>, ...": re.compile(rf"^change primary key to (?P<columns>{_NAME}(?:, {_NAME})*)$"),
}
MAD_CHANGES = {"drop table <table>": re.compile(rf"^drop table (?P<table>{_NAME})$")}


def _change_of(kinds: dict[str, re.Pattern[str]]):
    """A validator accepting an entry that spells one of `kinds`."""

    def check(value: str) -> str:
        if not any(pattern.match(value) for pattern in kinds.values()):
            expected = ", ".join(f"'{kind}'" for kind in kinds)
            raise spec_rule(f"allow_destructive entry '{value}' is not a change regen knows; expected one of: {expected}")
        return value

    return AfterValidator(check)


class Column(Frozen):
    name: str = Field(pattern=IDENTIFIER)
    type: ColumnType
    primary_key: bool = False
    nullable: bool = True


class Table(Frozen):
    """A table in the MAD's own storage (created by the kernel as `<mad>_<table>`)."""

    name: str = Field(pattern=IDENTIFIER)
    columns: list[Column] = Field(min_length=1)
    # Consent for the build's migration, not part of the table: kept out of prompts and generated code.
    allow_destructive: list[Annotated[str, _change_of(TABLE_CHANGES)]] = Field(
        default_factory=list, exclude=True,
        description="destructive changes since the previous version that the author accepts, e.g. 'drop column note'",
    )


class Imperator(Frozen):
    """The MAD's Thought Engine: its system prompt and the model alias it thinks with."""

    model: str = Field(description="an alias from ecosystem.yaml `models`")
    prompt: str | None = Field(default=None, min_length=1, description="omitted: the senior writes it from the role")


class MadSpec(Frozen):
    name: Annotated[str, Field(pattern=IDENTIFIER), _not_keyword("MAD name")]
    role: str = Field(min_length=1)
    level: Literal["V0", "V1", "V2", "V3", "V4", "V5"]
    lifecycle: Literal["persistent", "ephemeral"] = "persistent"
    tools: list[Tool] = Field(default_factory=list)
    conversations: list[str] = Field(default_factory=list, description="conversations it joins")
    talks_to: list[str] = Field(default_factory=list, description="MADs it depends on")
    secrets: list[str] = Field(default_factory=list, description="secrets it may read")
    storage: list[Table] = Field(default_factory=list)
    allow_destructive: list[Annotated[str, _change_of(MAD_CHANGES)]] = Field(
        default_factory=list, exclude=True, description="tables dropped since the previous version, e.g. 'drop table tags'",
    )
    budget_tokens: int = Field(default=100_000, ge=0, description="per-MAD LLM token budget")
    imperator: Imperator
    # Dumped (into prompts) only when given: a spec without it asks exactly what it asked before.
    requirements: list[str] = Field(
        default_factory=list, exclude_if=lambda ids: not ids,
        description="ids of requirements.md that this MAD's tools and their tests prove, e.g. [R1, R4]",
    )
    # Ephemeral MADs (roles) and who may spawn them; dumped only when given, like `requirements`.
    spawns: list[str] = Field(default_factory=list, exclude_if=lambda roles: not roles,
                              description="the roles (ephemeral MADs) this MAD may spawn for a task")
    max_instances: int | None = Field(default=None, ge=1, le=64, exclude_if=lambda n: n is None,
                                      description="a role's cap of instances running at once (default 1)")
    task_timeout_seconds: float | None = Field(default=None, gt=0, le=86_400, exclude_if=lambda t: t is None,
                                               description="how long one instance of a role may work (default 300)")

    @property
    def class_name(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))


class ModelAlias(Frozen):
    """A model the running ecosystem can call through Fiedler."""

    provider: Literal["echo", "openai"] = "echo"
    model: str = ""
    api_base: str = Field(default="", validate_default=True)
    api_key_secret: str = Field(default="", description="a Turing secret holding the API key")

    @field_validator("api_base")
    @classmethod
    def _endpoint_for_openai(cls, api_base: str, info: ValidationInfo) -> str:
        """An openai alias without its endpoint would build, and fail only at its first call."""
        if info.data.get("provider") == "openai" and not api_base.startswith(("http://", "https://")):
            raise spec_rule("provider 'openai' needs api_base: the http(s) base URL of an OpenAI-compatible "
                            "endpoint, e.g. http://127.0.0.1:11434/v1 (its /chat/completions is called)")
        return api_base


class PrincipleRule(Frozen):
    """A machine-checked design principle, enforced on every generated Python file."""

    id: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    description: str
    forbid_imports: list[str] = Field(default_factory=list)
    forbid_calls: list[str] = Field(default_factory=list)
    forbid_patterns: list[str] = Field(default_factory=list, description="regular expressions")
    applies_to: list[str] = Field(
        default_factory=lambda: ["*"],
        description="globs over generated file paths (`*` crosses folders), e.g. '*/mads/*' for MAD code only",
    )

    def applies(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, glob) for glob in self.applies_to)

    @field_validator("forbid_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}")
        return patterns


def _supported_python(version: str) -> str:
    minor = int(version.split(".")[1])
    oldest = ".".join(map(str, MIN_PYTHON))
    if version != f"3.{minor}":
        raise spec_rule(f"python '{version}' is not a plain version; expected it like '3.{minor}'")
    if (3, minor) < MIN_PYTHON:
        raise spec_rule(f"python '{version}' is too old: the kernel needs Python {oldest} or newer; "
                        f"expected '{oldest}' or later")
    return version


def _pack_name(name: str) -> str:
    implied = {"roles": "its spec has a role (a MAD with `lifecycle: ephemeral`)",
               "storage": "a MAD of its spec declares `storage:` tables",
               "provider": f"one of its model aliases has `provider: {name}`"}
    if name in PACKS and PACKS[name].kind in implied:
        raise spec_rule(f"the '{name}' pack is not named here: a build has it when {implied[PACKS[name].kind]}; "
                        "remove this entry")
    nameable = sorted(n for n, info in PACKS.items() if info.kind not in implied)
    if name not in nameable:
        close = difflib.get_close_matches(name, nameable, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise spec_rule(f"unknown pack '{name}'; expected one of: {', '.join(nameable)}{hint}")
    return name


def _acceptance_area(area: str) -> str:
    if area not in ACCEPTANCE_AREAS:
        close = difflib.get_close_matches(area, list(ACCEPTANCE_AREAS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise spec_rule(f"unknown acceptance area '{area}'; expected one of: {', '.join(ACCEPTANCE_AREAS)}{hint}")
    return area


class EcosystemSpec(Frozen):
    name: Annotated[str, Field(pattern=IDENTIFIER), AfterValidator(_package_name)]
    description: str
    python: Annotated[str, Field(pattern=r"^3\.\d+$"), AfterValidator(_supported_python)]
    # Pinned exactly (PINNED_REQUIREMENT): the loader refuses anything looser in a spec file.
    dependencies: list[str] = Field(min_length=1, description="pinned runtime requirements")
    dev_dependencies: list[str] = Field(default_factory=list)
    models: dict[str, ModelAlias] = Field(default_factory=dict)
    client_budget_tokens: int = Field(default=100_000, ge=0)
    principles: list[PrincipleRule] = Field(default_factory=list)
    # Dumped (into prompts) only when given, like MadSpec.requirements and `acceptance`.
    packs: dict[Annotated[str, AfterValidator(_pack_name)], dict[str, Any]] = Field(
        default_factory=dict, exclude_if=lambda packs: not packs,
        description="pack -> its settings in the built ecosystem (e.g. web: {allow: [127.0.0.1]}, "
                    "files: {quota_bytes: 1000000}); a pack's defaults apply to what is not set; a deployment "
                    "pack is brought in by naming it here (redis: {} for the Redis bus)",
    )
    acceptance: dict[Annotated[str, AfterValidator(_acceptance_area)], list[str]] = Field(
        default_factory=dict, exclude_if=lambda areas: not areas,
        description="kernel acceptance-test area -> ids of requirements.md it proves; areas: "
                    + ", ".join(ACCEPTANCE_AREAS),
    )


def used_packs(mads: Sequence[MadSpec], ecosystem: EcosystemSpec) -> frozenset[str]:
    """The kernel's packs an ecosystem of these MADs uses: those of the capabilities its tools are bound to, the
    deployment packs named under `packs:`, the roles pack if it has a role, the storage pack if a MAD declares
    tables (a build whose history has a migration keeps it too: build/prepare.py), and the pack of each model
    provider its aliases use."""
    return packs_for((t.builtin for m in mads for t in m.tools if t.builtin), ecosystem.packs,
                     any(m.lifecycle == "ephemeral" for m in mads), any(m.storage for m in mads),
                     {alias.provider for alias in ecosystem.models.values()})


class SpecFile(Frozen):
    """A file of the spec folder, by its path relative to the folder, with its content hash."""

    path: str
    sha256: str


class Requirement(Frozen):
    """One requirement of requirements.md, found by its id (see generator/spec/requirements.py)."""

    id: str = Field(description="'R1', 'R12', ... or a slug like 'conversations-persist'")
    text: str = Field(description="its Markdown, without the list or heading marker and the id")
    line: int = Field(description="the line of requirements.md it starts on (1-based)")


class Spec(Frozen):
    """A whole, validated spec: what every later stage starts from."""

    root: str = Field(description="the spec folder, as given")
    ecosystem: EcosystemSpec
    requirements: str = Field(description="requirements.md as written; its requirements are `requirement_items`")
    principles: str
    mads: tuple[MadSpec, ...]
    files: tuple[SpecFile, ...]

    def mad(self, name: str) -> MadSpec:
        return next(m for m in self.mads if m.name == name)

    @cached_property
    def packs(self) -> frozenset[str]:
        """The kernel's packs this ecosystem uses (`used_packs`)."""
        return used_packs(self.mads, self.ecosystem)

    @cached_property
    def requirement_items(self) -> tuple[Requirement, ...]:
        """The requirements of requirements.md that have an id, in file order; () when it gives none."""
        from .requirements import parse_requirements

        return parse_requirements(self.requirements).requirements

    def requirement(self, requirement_id: str) -> Requirement:
        """The requirement of that id; KeyError when requirements.md has none."""
        for item in self.requirement_items:
            if item.id == requirement_id:
                return item
        raise KeyError(requirement_id)

    def requirement_references(self) -> dict[str, tuple[str, ...]]:
        """Every requirement id -> what says it proves it: 'mad:<name>' and 'acceptance:<area>' (maybe none)."""
        found: dict[str, list[str]] = {item.id: [] for item in self.requirement_items}
        for mad in self.mads:
            for requirement_id in dict.fromkeys(mad.requirements):
                found.setdefault(requirement_id, []).append(f"mad:{mad.name}")
        for area, ids in self.ecosystem.acceptance.items():
            for requirement_id in dict.fromkeys(ids):
                found.setdefault(requirement_id, []).append(f"acceptance:{area}")
        return {requirement_id: tuple(refs) for requirement_id, refs in found.items()}

    def unreferenced_requirements(self) -> tuple[Requirement, ...]:
        """The requirements no MAD and no acceptance area claims to prove (not an error: a
        model-written test may prove them), in file order."""
        references = self.requirement_references()
        return tuple(item for item in self.requirement_items if not references[item.id])
