"""The catalogue of kernel capabilities a spec'd tool may be bound to (`builtin: <name>`).

This table is the contract between three parties: the spec loader (a tool bound to a
capability must declare compatible parameters), the offline reference synthesiser (it
renders a tool body that calls the capability), and the kernel runtime (which must
implement every entry with exactly this signature; a kernel test enforces it).

It imports nothing heavy on purpose: `regen check` loads it to validate specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def param(self, name: str) -> CapabilityParam | None:
        return next((p for p in self.params if p.name == name), None)


def _p(name: str, type_: str, default: object = ..., /) -> CapabilityParam:
    if default is ...:
        return CapabilityParam(name, type_)
    return CapabilityParam(name, type_, default=default, required=False)


CAPABILITIES: dict[str, Capability] = {
    c.name: c
    for c in [
        Capability(
            "conversations.create",
            "Create a conversation on the bus; returns {id, title, participants, created_by}.",
            (_p("title", "str"), _p("participants", "list[str]", [])),
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
        ),
        Capability(
            "conversations.history",
            "The newest `limit` envelopes of a conversation, oldest first.",
            (_p("conversation_id", "str"), _p("limit", "int", 50)),
            "list[dict]",
        ),
        Capability(
            "conversations.search",
            "Full-text search over every message of every conversation.",
            (_p("query", "str"), _p("limit", "int", 20)),
            "list[dict]",
        ),
        Capability(
            "conversations.list",
            "The conversations on the bus, newest first.",
            (_p("limit", "int", 50),),
            "list[dict]",
        ),
        Capability("models.list", "The model aliases this ecosystem can call.", (), "list[dict]"),
        Capability(
            "models.send",
            "Send a prompt to a model alias, charged to the caller's token budget.",
            (_p("model", "str"), _p("prompt", "str"), _p("max_tokens", "int", 256)),
        ),
        Capability("models.budget", "Token budget, spent and remaining, per MAD and client.", ()),
        Capability(
            "secrets.set",
            "Store a secret, encrypted at rest; returns {name, version}, never the value.",
            (_p("name", "str"), _p("value", "str")),
        ),
        Capability(
            "secrets.get",
            "Read a secret the caller is allowed to read; returns {name, version, value}.",
            (_p("name", "str"),),
        ),
        Capability("secrets.list", "Names and versions of stored secrets, never values.", (), "list[dict]"),
        Capability(
            "secrets.rotate",
            "Replace a secret's value with a new version; returns {name, version}.",
            (_p("name", "str"), _p("value", "str")),
        ),
        Capability(
            "secrets.rotate_key",
            "Re-encrypt every secret under a new key; returns {secrets, versions, key_id} (counts, never key material).",
            (),
        ),
        Capability(
            "secrets.audit",
            "The newest entries of the append-only secrets audit log.",
            (_p("limit", "int", 50),),
            "list[dict]",
        ),
        Capability("ecosystem.status", "Health of the ecosystem and of each MAD.", ()),
        Capability("ecosystem.mads", "Every MAD with its role, level and tools.", (), "list[dict]"),
    ]
}

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
# with the same arguments does no more than once. Writes here keep history (a secret's old versions
# stay, a post is added), so none is destructive.
READ_ONLY: frozenset[str] = frozenset({
    "conversations.history", "conversations.search", "conversations.list", "models.list", "models.budget",
    "secrets.get", "secrets.list", "secrets.audit", "ecosystem.status", "ecosystem.mads",
})
IDEMPOTENT_WRITES: frozenset[str] = frozenset({"secrets.set"})


def tool_hints(capability: str) -> dict[str, bool]:
    """The MCP annotations of a tool bound to `capability` ({} for an unknown one)."""
    if capability not in CAPABILITIES:
        return {}
    read_only = capability in READ_ONLY
    return {"readOnlyHint": read_only, "destructiveHint": False,
            "idempotentHint": read_only or capability in IDEMPOTENT_WRITES}
