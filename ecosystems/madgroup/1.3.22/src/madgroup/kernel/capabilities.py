"""The catalogue of kernel capabilities a spec'd tool may be bound to (`builtin: <name>`).

This table is the contract between three parties: the spec loader (a tool bound to a
capability must declare compatible parameters), the offline reference synthesiser (it
renders a tool body that calls the capability), and the kernel runtime (which must
implement every entry with exactly this signature; a kernel test enforces it).

Each capability also names the shape of what it returns (a `Shape` below): MCP clients are told it
as the `outputSchema` of every tool bound to the capability (see kernel/gateway.py).

This module holds the core's part: the types, the core's capabilities and shapes, and the functions over
the whole catalogue. Each pack's part (its PackInfo, capabilities, shapes and hints) is the catalogue in its
folder (`packs/<name>/__init__.py`), and CAPABILITIES, PACKS and the hint sets are assembled from the core and
the packs present: every pack in the compiler, only those its spec uses in an artifact.

It imports nothing heavy on purpose (pydantic only, which the spec loader uses anyway, and the packs'
catalogues, which import no pack library): `regen check` loads it to validate specs.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_serializer

# The type vocabulary shared by specs, capabilities and generated code (Python spelling).
TYPE_NAMES: frozenset[str] = frozenset(
    {"str", "int", "float", "bool", "dict", "list", "list[str]", "list[int]", "list[dict]", "None"}
)


@dataclass(frozen=True)
class CapabilityParam:
    name: str
    type: str
    default: object = None
    required: bool = True


@dataclass(frozen=True)
class Capability:
    name: str
    summary: str
    params: tuple[CapabilityParam, ...] = field(default_factory=tuple)
    returns: str = "dict"
    shape: type[Shape] | None = None  # the result's shape; of each item when `returns` is a list
    pack: str = ""  # the capability pack that implements it (kernel/packs/<pack>/); "" for the core

    def param(self, name: str) -> CapabilityParam | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def output(self) -> Any:
        """The type of the result, as a tool bound to this capability returns it (None: unknown)."""
        if self.shape is None:
            return None
        return list[self.shape] if self.returns.startswith("list") else self.shape


def param(name: str, type_: str, default: object = ..., /) -> CapabilityParam:
    """A parameter; one given a default is optional."""
    required = default is ...
    return CapabilityParam(name, type_, None if required else default, required)


# ---- what capabilities return -------------------------------------------------------------------


class Shape(BaseModel):
    """The shape of a capability's result, as MCP clients are told it (a tool's outputSchema).

    The fields named are always there; a field with a default may be absent (and then stays absent,
    never null); the kernel may add fields it does not name here, and clients get them too
    (`additionalProperties`). The gateway checks every result against its shape before sending it.
    """

    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _absent_stays_absent(self, handler: Any) -> Any:
        data = handler(self)
        for name in type(self).model_fields.keys() - self.model_fields_set:  # a required field is always set
            data.pop(name, None)
        return data


class Conversation(Shape):
    """A conversation on the bus."""

    id: str
    title: str
    participants: list[str]
    created_by: str
    created_at: str


class ConversationListing(Conversation):
    """A conversation as listed, with how many messages it holds."""

    message_count: int


class Message(Shape):
    """A message envelope on the bus."""

    id: str
    correlation_id: str
    sender: str
    conversation_id: str
    kind: str
    content: str
    payload: dict[str, Any]
    created_at: str


class ModelAliasInfo(Shape):
    """A model alias this ecosystem can call (never its key)."""

    alias: str
    provider: str
    model: str
    api_base: str
    has_key: bool


class ModelReply(Shape):
    """A model's answer and the tokens it cost, charged to each of `charged_to`."""

    model: str
    provider: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    charged_to: list[str]


class Budget(Shape):
    """One account's token budget."""

    budget: int
    spent: int
    remaining: int
    calls: int


class Budgets(Shape):
    """Token budgets by account: each MAD's, each client's, and what a new client gets."""

    mads: dict[str, Budget]
    clients: dict[str, Budget]
    client_budget_tokens: int


class SecretVersion(Shape):
    """A secret's name and the version written (never its value)."""

    name: str
    version: int


class SecretValue(SecretVersion):
    """A secret's newest version and its value."""

    value: str


class SecretListing(SecretVersion):
    """A stored secret: its newest version and when it was written (never its value)."""

    updated_at: str


class KeyRotation(Shape):
    """What a key rotation re-encrypted (counts, never key material); `key_file` when the operator must install it."""

    secrets: int
    versions: int
    key_id: str
    key_file: str | None = None


class SecretsAuditEntry(Shape):
    """One entry of the secrets audit log."""

    id: int
    ts: str
    actor: str
    on_behalf_of: str
    action: str
    name: str
    ok: bool
    detail: str


class MadHealth(Shape):
    """One MAD's supervision state; `health` is its own report when it could be probed."""

    name: str
    state: str
    ok: bool
    breaker: str
    failures: int
    failures_total: int
    restarts: int
    in_flight: int
    leaked: int
    last_error: str
    last_error_at: str
    retry_in_s: float | None = None
    restart_in_s: float | None = None
    error: str | None = None
    health: dict[str, Any] | None = None


class EcosystemStatus(Shape):
    """Health of the ecosystem and of each MAD."""

    name: str
    description: str
    version: str
    status: str
    healthy: bool
    started_at: str
    uptime_s: float
    database: str
    search: str
    bus: str
    mads: list[MadHealth]


class MadInfo(Shape):
    """A MAD: its role, level, lifecycle, state, conversations, peers, capability families, budget and tools."""

    name: str
    role: str
    level: str
    lifecycle: str
    state: str
    conversations: list[str]
    talks_to: list[str]
    owns: list[str]
    budget_tokens: int
    tools: list[str]
    spawns: list[str] = []  # the roles it may spawn
    max_instances: int | None = None  # a role's (lifecycle "ephemeral") cap, and how many instances run now
    instances: int | None = None


# Each pack: what it is for, the pinned packages it needs in an artifact that uses it, and how it enters one
# (`kind`): a capability pack when a tool is bound to one of its capabilities; a deployment pack, which serves
# the operator rather than a tool, when the spec names it under `packs:` in ecosystem.yaml; the roles pack when
# the spec has a role (a MAD with `lifecycle: ephemeral`).
@dataclass(frozen=True)
class PackInfo:
    name: str
    summary: str
    dependencies: tuple[str, ...] = ()  # pinned (name==version), as the artifact's pyproject lists them
    requires: tuple[str, ...] = ()  # packs loaded with this one, reached through PackContext.peer
    kind: Literal["capabilities", "deployment", "roles", "storage", "provider"] = "capabilities"


# ---- the core's catalogue -----------------------------------------------------------------------

# The ecosystem.* capabilities come after the packs' in CAPABILITIES, as they always have: the senior's prompt
# lists the catalogue in its order, and a recorded answer is keyed by the prompt.
_CORE: tuple[Capability, ...] = (
    Capability("conversations.create",
               "Create a conversation on the bus; returns {id, title, participants, created_by}.",
               (param("title", "str"), param("participants", "list[str]", [])), shape=Conversation),
    Capability("conversations.post", "Post a message envelope to a conversation; returns the stored envelope.",
               (param("conversation_id", "str"), param("content", "str"), param("kind", "str", "message"),
                param("correlation_id", "str", "")), shape=Message),
    Capability("conversations.history", "The newest `limit` envelopes of a conversation, oldest first.",
               (param("conversation_id", "str"), param("limit", "int", 50)), "list[dict]", shape=Message),
    Capability("conversations.search", "Full-text search over every message of every conversation.",
               (param("query", "str"), param("limit", "int", 20)), "list[dict]", shape=Message),
    Capability("conversations.list", "The conversations on the bus, newest first.", (param("limit", "int", 50),),
               "list[dict]", shape=ConversationListing),
    Capability("models.list", "The model aliases this ecosystem can call.", (), "list[dict]", shape=ModelAliasInfo),
    Capability("models.send", "Send a prompt to a model alias, charged to the caller's token budget.",
               (param("model", "str"), param("prompt", "str"), param("max_tokens", "int", 256)), shape=ModelReply),
    Capability("models.budget", "Token budget, spent and remaining, per MAD and client.", (), shape=Budgets),
    Capability("secrets.set", "Store a secret, encrypted at rest; returns {name, version}, never the value.",
               (param("name", "str"), param("value", "str")), shape=SecretVersion),
    Capability("secrets.get", "Read a secret the caller is allowed to read; returns {name, version, value}.",
               (param("name", "str"),), shape=SecretValue),
    Capability("secrets.list", "Names and versions of stored secrets, never values.", (), "list[dict]",
               shape=SecretListing),
    Capability("secrets.rotate", "Replace a secret's value with a new version; returns {name, version}.",
               (param("name", "str"), param("value", "str")), shape=SecretVersion),
    Capability("secrets.rotate_key", "Re-encrypt every secret under a new key; returns {secrets, versions, key_id} "
                                     "(counts, never key material).", (), shape=KeyRotation),
    Capability("secrets.audit", "The newest entries of the append-only secrets audit log.",
               (param("limit", "int", 50),), "list[dict]", shape=SecretsAuditEntry),
)
_CORE_LAST: tuple[Capability, ...] = (
    Capability("ecosystem.status", "Health of the ecosystem and of each MAD.", (), shape=EcosystemStatus),
    Capability("ecosystem.mads", "Every MAD with its role, level and tools.", (), "list[dict]", shape=MadInfo),
)

# ---- the packs' catalogues ----------------------------------------------------------------------

# The packs whose capabilities CAPABILITIES lists first, in this order (then any other, by name): the order
# the catalogue always had, which the senior's prompt shows.
_LISTED_FIRST = ("files", "data", "web", "documents", "charts", "security")


def _pack_catalogues() -> list[ModuleType]:
    """The catalogue module (`packs/<name>/__init__.py`) of each pack in this kernel's copy: every pack in the
    compiler, only those its spec uses in an artifact. A catalogue imports nothing heavy; `pack.py` beside it
    does, and only the runtime imports that, for a pack an ecosystem loads."""
    folder = Path(__file__).parent / "packs"
    names = sorted(p.parent.name for p in folder.glob("*/__init__.py"))
    names.sort(key=lambda n: _LISTED_FIRST.index(n) if n in _LISTED_FIRST else len(_LISTED_FIRST))
    return [importlib.import_module(f"{__package__}.packs.{name}") for name in names]


# Each catalogue imports the types above from this module, which is half-loaded here, with all of them
# defined; the kernel package imports this module before any pack, so a catalogue never runs first.
_CATALOGUES = _pack_catalogues()

CAPABILITIES: dict[str, Capability] = {
    c.name: c for c in [*_CORE, *(c for cat in _CATALOGUES for c in getattr(cat, "CAPABILITIES", ())), *_CORE_LAST]
}
# Each pack present, by name: what it is for, its pinned dependencies, what it requires, its kind.
PACKS: dict[str, PackInfo] = {cat.PACK.name: cat.PACK for cat in _CATALOGUES}


def _with_packs(hint: str, core: frozenset[str]) -> frozenset[str]:
    """The core's capabilities in a hint set, with the packs' (each catalogue names its own in a set of that name)."""
    return core.union(*(getattr(cat, hint, ()) for cat in _CATALOGUES))


# What MCP clients are told about a tool bound to each capability (MCP tool annotations): whether it
# only reads, whether it may destroy (overwrite or delete what was there), and whether calling it twice
# with the same arguments does no more than once. The core's writes keep history (a secret's old
# versions stay, a post is added).
READ_ONLY: frozenset[str] = _with_packs("READ_ONLY", frozenset({
    "conversations.history", "conversations.search", "conversations.list", "models.list", "models.budget",
    "secrets.get", "secrets.list", "secrets.audit", "ecosystem.status", "ecosystem.mads",
}))
IDEMPOTENT_WRITES: frozenset[str] = _with_packs("IDEMPOTENT_WRITES", frozenset({"secrets.set"}))
DESTRUCTIVE: frozenset[str] = _with_packs("DESTRUCTIVE", frozenset())  # overwrite or remove what was there
# What reaches beyond the ecosystem (MCP's openWorldHint, which clients assume when a tool does not say).
OPEN_WORLD: frozenset[str] = _with_packs("OPEN_WORLD", frozenset())


def packs_of(capability_names: Iterable[str]) -> frozenset[str]:
    """The packs these capabilities need, with the packs those require (unknown names and core capabilities
    need none)."""
    return with_required(CAPABILITIES[n].pack for n in capability_names if n in CAPABILITIES and CAPABILITIES[n].pack)


def packs_for(capability_names: Iterable[str], named: Iterable[str], has_roles: bool, has_tables: bool = False,
              providers: Iterable[str] = ()) -> frozenset[str]:
    """The packs an ecosystem uses: those of the capabilities its tools are bound to, the deployment packs among
    the names under its `packs:`, the roles pack when it has a role, the storage pack when a MAD has tables
    (or its storage history a migration), and the pack of each model provider its aliases use (the offline
    echo model is the core's); with the packs those require."""
    deployment = [n for n in named if n in PACKS and PACKS[n].kind == "deployment"]
    implied = [*(["emads"] if has_roles else []), *(["storage"] if has_tables else []),
               *(p for p in providers if p in PACKS and PACKS[p].kind == "provider")]
    return packs_of(capability_names) | with_required([*deployment, *implied])


def with_required(packs: Iterable[str]) -> frozenset[str]:
    """These packs and every pack they require, transitively (names not in PACKS are dropped)."""
    chosen = frozenset(p for p in packs if p in PACKS)
    return chosen.union(*(with_required(PACKS[p].requires) for p in chosen))  # no pack requires itself, even indirectly


def available(packs: Iterable[str]) -> dict[str, Capability]:
    """The catalogue an ecosystem with these packs has: the core's capabilities and its packs'."""
    chosen = set(packs)
    return {name: c for name, c in CAPABILITIES.items() if not c.pack or c.pack in chosen}


# Granted to every MAD whatever it owns, each narrowed by the kernel per call: its own Thought
# Engine (charged to its own budget); reading and posting in the conversations it joined; reading
# the secrets named in its `secrets` list (the secrets manager refuses, and audits, any other name).
ALWAYS_GRANTED: frozenset[str] = frozenset(
    {"models.send", "conversations.post", "conversations.history", "secrets.get", "secrets.list"}
)


def granted(owns: tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """The capabilities a MAD may call: every one of the families it owns, plus the always-granted ones."""
    return frozenset({name for name in CAPABILITIES if name.split(".", 1)[0] in owns} | ALWAYS_GRANTED)


def tool_hints(capability: str) -> dict[str, bool]:
    """The MCP annotations of a tool bound to `capability` ({} for an unknown one)."""
    if capability not in CAPABILITIES:
        return {}
    read_only = capability in READ_ONLY
    return {"readOnlyHint": read_only, "destructiveHint": capability in DESTRUCTIVE,
            "idempotentHint": read_only or capability in IDEMPOTENT_WRITES, "openWorldHint": capability in OPEN_WORLD}
