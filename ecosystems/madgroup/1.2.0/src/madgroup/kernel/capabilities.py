"""The catalogue of kernel capabilities a spec'd tool may be bound to (`builtin: <name>`).

This table is the contract between three parties: the spec loader (a tool bound to a
capability must declare compatible parameters), the offline reference synthesiser (it
renders a tool body that calls the capability), and the kernel runtime (which must
implement every entry with exactly this signature; a kernel test enforces it).

Each capability also names the shape of what it returns (a `Shape` below): MCP clients are told it
as the `outputSchema` of every tool bound to the capability (see kernel/gateway.py).

It imports nothing heavy on purpose (pydantic only, which the spec loader uses anyway): `regen check`
loads it to validate specs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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
    pack: str = ""  # the capability pack that implements it (kernel/packs/<pack>.py); "" for the core

    def param(self, name: str) -> CapabilityParam | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def output(self) -> Any:
        """The type of the result, as a tool bound to this capability returns it (None: unknown)."""
        if self.shape is None:
            return None
        return list[self.shape] if self.returns.startswith("list") else self.shape


def _p(name: str, type_: str, default: object = ..., /) -> CapabilityParam:
    if default is ...:
        return CapabilityParam(name, type_)
    return CapabilityParam(name, type_, default=default, required=False)


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
        for name, info in type(self).model_fields.items():
            if not info.is_required() and name not in self.model_fields_set:
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


class FileWritten(Shape):
    """A file as written: its path inside the ecosystem's file root, its size and its content's SHA-256."""

    path: str
    size: int
    sha256: str


class FileContent(FileWritten):
    """A file's content (UTF-8 text, or base64 when asked for) with its size and SHA-256."""

    content: str


class FileInfo(Shape):
    """An entry of the file root: its kind ("file", "dir"; "link" or "other" for what the pack shows but never
    follows or opens), its size and when it last changed; a file's SHA-256 from `files.stat`."""

    path: str
    kind: str
    size: int
    modified_at: str
    sha256: str | None = None


class FileDeleted(Shape):
    """What was deleted."""

    path: str
    deleted: bool


def _files(op: str, summary: str, params: tuple[CapabilityParam, ...], returns: str, shape: type[Shape]) -> Capability:
    return Capability(f"files.{op}", summary, params, returns, shape=shape, pack="files")


CAPABILITIES: dict[str, Capability] = {
    c.name: c
    for c in [
        Capability(
            "conversations.create",
            "Create a conversation on the bus; returns {id, title, participants, created_by}.",
            (_p("title", "str"), _p("participants", "list[str]", [])),
            shape=Conversation,
        ),
        Capability(
            "conversations.post",
            "Post a message envelope to a conversation; returns the stored envelope.",
            (
                _p("conversation_id", "str"),
                _p("content", "str"),
                _p("kind", "str", "message"),
                _p("correlation_id", "str", ""),
            ),
            shape=Message,
        ),
        Capability(
            "conversations.history",
            "The newest `limit` envelopes of a conversation, oldest first.",
            (_p("conversation_id", "str"), _p("limit", "int", 50)),
            "list[dict]",
            shape=Message,
        ),
        Capability(
            "conversations.search",
            "Full-text search over every message of every conversation.",
            (_p("query", "str"), _p("limit", "int", 20)),
            "list[dict]",
            shape=Message,
        ),
        Capability(
            "conversations.list",
            "The conversations on the bus, newest first.",
            (_p("limit", "int", 50),),
            "list[dict]",
            shape=ConversationListing,
        ),
        Capability("models.list", "The model aliases this ecosystem can call.", (), "list[dict]", shape=ModelAliasInfo),
        Capability(
            "models.send",
            "Send a prompt to a model alias, charged to the caller's token budget.",
            (_p("model", "str"), _p("prompt", "str"), _p("max_tokens", "int", 256)),
            shape=ModelReply,
        ),
        Capability("models.budget", "Token budget, spent and remaining, per MAD and client.", (), shape=Budgets),
        Capability(
            "secrets.set",
            "Store a secret, encrypted at rest; returns {name, version}, never the value.",
            (_p("name", "str"), _p("value", "str")),
            shape=SecretVersion,
        ),
        Capability(
            "secrets.get",
            "Read a secret the caller is allowed to read; returns {name, version, value}.",
            (_p("name", "str"),),
            shape=SecretValue,
        ),
        Capability("secrets.list", "Names and versions of stored secrets, never values.", (), "list[dict]",
                   shape=SecretListing),
        Capability(
            "secrets.rotate",
            "Replace a secret's value with a new version; returns {name, version}.",
            (_p("name", "str"), _p("value", "str")),
            shape=SecretVersion,
        ),
        Capability(
            "secrets.rotate_key",
            "Re-encrypt every secret under a new key; returns {secrets, versions, key_id} (counts, never key material).",
            (),
            shape=KeyRotation,
        ),
        Capability(
            "secrets.audit",
            "The newest entries of the append-only secrets audit log.",
            (_p("limit", "int", 50),),
            "list[dict]",
            shape=SecretsAuditEntry,
        ),
        _files("write", "Write a file under the ecosystem's file root (utf-8 text, or base64 bytes), atomically; "
                        "returns {path, size, sha256}.",
               (_p("path", "str"), _p("content", "str"), _p("encoding", "str", "utf-8")), "dict", FileWritten),
        _files("read", "Read a file under the ecosystem's file root; returns {path, size, sha256, content}.",
               (_p("path", "str"), _p("encoding", "str", "utf-8")), "dict", FileContent),
        _files("list", "The entries of a folder of the file root (not recursive), by path.",
               (_p("path", "str", ""), _p("limit", "int", 1000)), "list[dict]", FileInfo),
        _files("stat", "A file's or folder's kind, size, time of change and (for a file) SHA-256.",
               (_p("path", "str"),), "dict", FileInfo),
        _files("move", "Move a file or folder inside the file root (never onto something that exists).",
               (_p("source", "str"), _p("destination", "str")), "dict", FileInfo),
        _files("delete", "Delete a file, or an empty folder, of the file root.", (_p("path", "str"),), "dict",
               FileDeleted),
        Capability("ecosystem.status", "Health of the ecosystem and of each MAD.", (), shape=EcosystemStatus),
        Capability("ecosystem.mads", "Every MAD with its role, level and tools.", (), "list[dict]", shape=MadInfo),
    ]
}

# Each capability pack: what it is for and the pinned packages it needs in an artifact that uses it.
@dataclass(frozen=True)
class PackInfo:
    name: str
    summary: str
    dependencies: tuple[str, ...] = ()


PACKS: dict[str, PackInfo] = {p.name: p for p in [
    PackInfo("files", "One file root per ecosystem: read, write, list, stat, move, delete; no way out of the root "
                      "(.., absolute paths, symlinks, hard links), size quotas, content hashes"),
]}


def packs_of(capability_names: Iterable[str]) -> frozenset[str]:
    """The packs these capabilities need (unknown names and core capabilities need none)."""
    return frozenset(CAPABILITIES[n].pack for n in capability_names if n in CAPABILITIES and CAPABILITIES[n].pack)


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


# What MCP clients are told about a tool bound to each capability (MCP tool annotations): whether it
# only reads, whether it may destroy (overwrite or delete what was there), and whether calling it twice
# with the same arguments does no more than once. The core's writes keep history (a secret's old
# versions stay, a post is added); a file written over or deleted is gone.
READ_ONLY: frozenset[str] = frozenset({
    "conversations.history", "conversations.search", "conversations.list", "models.list", "models.budget",
    "secrets.get", "secrets.list", "secrets.audit", "ecosystem.status", "ecosystem.mads",
    "files.read", "files.list", "files.stat",
})
IDEMPOTENT_WRITES: frozenset[str] = frozenset({"secrets.set", "files.write"})
DESTRUCTIVE: frozenset[str] = frozenset({"files.write", "files.delete"})  # overwrite or remove what was there


def tool_hints(capability: str) -> dict[str, bool]:
    """The MCP annotations of a tool bound to `capability` ({} for an unknown one)."""
    if capability not in CAPABILITIES:
        return {}
    read_only = capability in READ_ONLY
    return {"readOnlyHint": read_only, "destructiveHint": capability in DESTRUCTIVE,
            "idempotentHint": read_only or capability in IDEMPOTENT_WRITES}
