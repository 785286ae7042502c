"""Capability packs: optional families of kernel capabilities, each in a folder of its own here.

The core (this file) says what a pack is. A pack's folder (`packs/<name>/`) holds its catalogue
(`__init__.py`: its `PackInfo`, capabilities, result shapes and MCP hints, read by `capabilities.py`; light,
it imports none of the pack's libraries), its implementation (`pack.py`): one subclass of `Pack` whose
methods implement those capabilities, marked with `@implements`, optionally its part of the command line
(`cli.py`: `add_commands(parsers, config)`, light, which the core's cli.py calls; see its PACK_PARTS), and its
tests (`tests/`: every capability, and a rogue caller trying every escape from its guards), which stay in regen.
The compiler copies a pack's folder but for its tests into an artifact only when its spec uses the pack (a tool
is bound to one of its capabilities, the spec names a deployment pack, or implies one: a role, a MAD's tables, a
model provider), with the pack's pinned dependencies; the runtime
loads the packs of the families its MADs own, by name, and nothing else. A pack reaches the ecosystem only through its `PackContext`:
its own folder in the state directory, its settings, the audit log, and the packs it requires
(`PackInfo.requires`, through `peer`): the documents pack writes into the files pack's root that way, never
around its guards.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InvalidArgument, KernelError

IMPL_ATTR = "__regen_capability__"
# What a build without the redis pack says when asked for its bus (serve --bus redis://...) or its commands (cli.py).
NO_REDIS = ("this ecosystem was built without the Redis bus: its spec does not name the redis pack; add `redis: {}` "
            "under `packs:` in spec/ecosystem.yaml and regenerate")
# ... without the postgres pack, when asked for a PostgreSQL state (serve --db postgresql://...).
NO_POSTGRES = ("this ecosystem was built without PostgreSQL state: its spec does not name the postgres pack; add "
               "`postgres: {}` under `packs:` in spec/ecosystem.yaml and regenerate (or leave --db out for SQLite)")
# ... without the tracing pack, when an OTLP endpoint is configured (serve --otlp-endpoint, OTEL_ variables).
NO_TRACING = ("an OTLP endpoint is configured, but this ecosystem was built without tracing: its spec does not name "
              "the tracing pack; add `tracing: {}` under `packs:` in spec/ecosystem.yaml and regenerate (or unset "
              "the endpoint)")


def implements(capability: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a method as the implementation of a kernel capability: `async def m(self, caller, <params>)`."""
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, IMPL_ATTR, capability)
        return fn

    return mark


@dataclass(frozen=True)
class PackContext:
    """What a pack is given: the ecosystem's name, a folder of its own under the state directory, its
    settings (`EcosystemConfig.pack_settings[<pack>]`), and the two ways it tells the operator what
    happened: `audit(actor, action, subject, ok, detail)` and `denied(actor, action, subject, why)`,
    which audits a refusal and returns the AccessDenied to raise. `peer(name)` is another loaded pack this
    one requires. `audit_entries(after_id, limit)` reads the audit log (entries with a larger id, oldest
    first), and `post(actor, title, content)` posts to the conversation of that title (made if missing):
    the security pack's view of the ecosystem."""

    ecosystem: str
    folder: Path
    settings: dict[str, Any] = field(default_factory=dict)
    audit: Callable[[str, str, str, bool, str], None] = lambda *_: None
    denied: Callable[[str, str, str, str], KernelError] = lambda _a, _c, _s, why: KernelError(why)
    peer: Callable[[str], Pack] = field(default=lambda name: _no_peer(name))
    audit_entries: Callable[[int, int], list[dict[str, Any]]] = lambda _after, _limit: []
    post: Callable[[str, str, str], dict[str, Any]] = lambda _actor, _title, _content: {}


def _no_peer(name: str) -> Pack:
    raise KernelError(f"the {name!r} capability pack is not loaded in this ecosystem")


class Pack:
    """One capability pack; subclasses set `name` and implement its capabilities with `@implements`.

    A pack may import its heavy libraries on first use rather than when the runtime starts; it names their
    top-level modules in `libraries`, so that a build lacking one still fails at start-up, as importing it would."""

    name: ClassVar[str] = ""
    libraries: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: PackContext):
        for library in self.libraries:
            if importlib.util.find_spec(library) is None:  # finds the module without importing it
                raise ModuleNotFoundError(f"No module named {library!r}", name=library)
        self.context = context

    async def close(self) -> None:
        """Called once at shutdown."""


def module(name: str, missing: str, error: type[KernelError] = InvalidArgument) -> Any:
    """Pack `name`'s implementation (`packs/<name>/pack.py`) from this kernel's copy; error(`missing`) when the
    build has no such pack (its spec did not use it), while a pack whose own library is missing still raises
    ModuleNotFoundError (here, or when the pack is made: `Pack.libraries`)."""
    try:
        return importlib.import_module(f"{__name__}.{name}.pack")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"{__name__}.{name}", f"{__name__}.{name}.pack"):
            raise  # the pack is here but one of its dependencies is not
        raise error(missing) from None


def load(name: str) -> type[Pack]:
    """The Pack class of pack `name`, from this kernel's copy of its implementation."""
    missing = (f"the {name!r} capability pack is not in this build: a MAD owns its family, but the compiler "
               "copied no such pack (rebuild with `nox -s regenerate`)")
    found = [v for v in vars(module(name, missing, KernelError)).values()
             if isinstance(v, type) and issubclass(v, Pack) and v is not Pack and v.name == name]
    if len(found) != 1:
        raise KernelError(f"pack module {name!r} must define exactly one Pack subclass named {name!r}")
    return found[0]
