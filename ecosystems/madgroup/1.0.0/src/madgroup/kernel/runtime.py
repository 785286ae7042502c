"""The runtime: one process, one SQLite database, every MAD as an object, every capability implemented.

`Runtime.use(capability, caller=..., **kwargs)` is the single entry point MADs reach the
kernel through (`Mad.use`). Each capability in `capabilities.CAPABILITIES` is implemented
by a method decorated with `@implements(<name>)` whose parameters after `caller` match the
catalogue exactly (a kernel test enforces it).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:  # httpx when the ecosystem pins it; else httpx2, which mcp 2.x always brings (same API)
    import httpx
except ImportError:  # pragma: no cover
    import httpx2 as httpx  # type: ignore[no-redef]

from . import logs
from .bus import ConversationBus, now_iso
from .capabilities import CAPABILITIES
from .config import EcosystemConfig
from .db import Database, TableStore, ident
from .errors import AccessDenied, InvalidArgument, KernelError, NotFound
from .mad import Mad
from .migrations import Migration, apply_migrations, check_table, load_migrations
from .models import ModelGateway
from .secrets import SecretsManager, load_or_create_key

log = logs.get("runtime")

_IMPL_ATTR = "__regen_capability__"
REDACTED = "[redacted]"
_SENSITIVE_KEYS = {"value", "secret", "password", "api_key", "apikey", "token", "key", "private_key", "credentials"}


def implements(capability: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, _IMPL_ATTR, capability)
        return fn

    return mark


def redact(obj: Any) -> Any:
    """A copy of `obj` with values under secret-looking keys replaced: what the bus persists."""
    if isinstance(obj, dict):
        return {k: (REDACTED if str(k).lower() in _SENSITIVE_KEYS else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


class MadSlot:
    """Runtime bookkeeping for one MAD instance."""

    def __init__(self, mad: Mad):
        self.mad = mad
        self.state = "created"
        self.error = ""
        self.started_at = ""


class Runtime:
    def __init__(
        self,
        config: EcosystemConfig,
        state_dir: str | os.PathLike[str],
        *,
        model_transport: httpx.AsyncBaseTransport | None = None,
        migrations: Sequence[Migration] | None = None,
    ):
        """`migrations`: the storage history to bring the state to; None reads the package's migrations.json."""
        self.config = config
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.db = Database(self.state_dir / "ecosystem.db")
        # Storage first, before anything else writes: a state this version cannot use is refused
        # as it was found, and the refusal comes before the server binds its port.
        try:
            self.migrated = apply_migrations(self.db, load_migrations() if migrations is None else migrations)
            self._tables = self._prepare_storage()
        except KernelError:
            self.db.close()
            raise
        if self.migrated:
            log.info("storage migrated", extra={"migrations": [f"{m.number} {m.name}" for m in self.migrated]})
        self.bus = ConversationBus(self.db)
        key = load_or_create_key(self.state_dir, f"{config.env_prefix}_SECRETS_KEY")
        self.secrets = SecretsManager(self.db, key, self._secrets_policy)
        del key
        self.models = ModelGateway(
            self.db,
            config.models,
            {m.name: m.budget_tokens for m in config.mads},
            config.client_budget_tokens,
            read_secret=lambda name, purpose: self.secrets.read_internal("kernel.models", name, purpose),
            transport=model_transport,
        )
        self.slots: dict[str, MadSlot] = {}
        self._impls: dict[str, Callable[..., Any]] = {}
        for attr in dir(type(self)):
            fn = getattr(type(self), attr)
            cap = getattr(fn, _IMPL_ATTR, None)
            if cap:
                self._impls[cap] = getattr(self, attr)
        missing = set(CAPABILITIES) - set(self._impls)
        if missing:  # pragma: no cover - guarded by the kernel test
            raise RuntimeError(f"kernel does not implement: {sorted(missing)}")
        self.started_at = ""
        self._t0 = 0.0
        self.running = False

    # ---- lifecycle ---------------------------------------------------------------------------

    def _prepare_storage(self) -> dict[str, dict[str, list[str]]]:
        """Create the MAD tables no migration made (packages without migrations), then check every one
        has the declared shape. Returns MAD -> table -> column names."""
        tables: dict[str, dict[str, list[str]]] = {}
        for cls in self.config.mads:
            mine = tables.setdefault(cls.name, {})
            for table in cls.storage:
                name = ident(table["name"])
                self.db.create_table(f"{cls.name}_{name}", table["columns"])
                check_table(self.db, cls.name, f"{cls.name}_{name}", table["columns"])
                mine[name] = [ident(c["name"]) for c in table["columns"]]
        return tables

    async def start(self) -> None:
        """Join conversations and start MADs in the configured order (their tables exist already)."""
        self.started_at = now_iso()
        self._t0 = time.monotonic()
        for cls in self.config.mads:
            mad = cls(self)
            slot = MadSlot(mad)
            self.slots[cls.name] = slot
            for title in cls.conversations:
                mad.conversation_ids[title] = self.bus.ensure(title, cls.name)["id"]
            if cls.lifecycle == "ephemeral":
                slot.state = "idle"
            else:
                await self._start_slot(slot)
        self.running = True
        log.info("ecosystem started", extra={"ecosystem": self.config.name, "mads": list(self.slots)})

    async def _start_slot(self, slot: MadSlot) -> None:
        slot.state = "starting"
        try:
            await slot.mad.on_start()
        except Exception as exc:  # a MAD that fails to start is reported, not fatal
            slot.state = "failed"
            slot.error = f"{type(exc).__name__}: {exc}"
            log.exception("MAD failed to start", extra={"mad": slot.mad.name})
            return
        slot.state = "running"
        slot.started_at = now_iso()

    async def stop(self) -> None:
        for name in reversed(list(self.slots)):
            slot = self.slots[name]
            if slot.state == "running":
                try:
                    await slot.mad.on_stop()
                except Exception:
                    log.exception("MAD failed to stop cleanly", extra={"mad": name})
                slot.state = "stopped"
        self.running = False
        self.db.close()
        log.info("ecosystem stopped", extra={"ecosystem": self.config.name})

    # ---- lookups -----------------------------------------------------------------------------

    def mad(self, name: str) -> Mad:
        slot = self.slots.get(name)
        if slot is None:
            raise NotFound(f"no MAD {name!r}; known: {', '.join(self.slots) or 'none'}")
        return slot.mad

    def table_store(self, mad: str) -> TableStore:
        return TableStore(self.db, mad, self._tables.get(mad, {}))

    def _mad_class(self, name: str) -> type[Mad] | None:
        return next((m for m in self.config.mads if m.name == name), None)

    def _secrets_policy(self, caller: str) -> tuple[bool, set[str]]:
        cls = self._mad_class(caller)
        if cls is None:
            return False, set()
        return "secrets" in cls.owns, set(cls.secrets)

    async def _ready(self, name: str) -> Mad:
        mad = self.mad(name)
        slot = self.slots[name]
        if slot.state == "idle":
            await self._start_slot(slot)
        if slot.state == "failed":
            raise KernelError(f"MAD {name!r} is not running: {slot.error}")
        return mad

    # ---- the one door to capabilities --------------------------------------------------------

    def capability_impl(self, capability: str) -> Callable[..., Any]:
        impl = self._impls.get(capability)
        if impl is None:
            raise NotFound(f"no kernel capability {capability!r}")
        return impl

    async def use(self, capability: str, caller: str, **kwargs: Any) -> Any:
        impl = self.capability_impl(capability)
        if caller not in self.slots and not caller.startswith("client:"):
            raise AccessDenied(f"unknown caller {caller!r}")
        try:
            inspect.signature(impl).bind(caller, **kwargs)
        except TypeError as exc:
            raise InvalidArgument(f"{capability}: {exc}") from None
        log.debug("capability", extra={"capability": capability, "caller": caller})
        return await impl(caller, **kwargs)

    def _on_behalf_of(self, caller: str) -> str:
        who = logs.principal.get()
        return who if who and who != caller else ""

    # ---- tools and MAD-to-MAD requests -------------------------------------------------------

    async def invoke_tool(self, mad: str, tool: str, args: dict[str, Any], principal: str = "") -> Any:
        """Run `<mad>.<tool>` for an outside principal (an MCP client or Grace)."""
        tok_p = logs.principal.set(principal)
        tok_c = logs.correlation_id.set(logs.new_id())
        t0 = time.monotonic()
        try:
            instance = await self._ready(mad)
            result = await instance.call_tool(tool, args)
            log.info("tool call", extra={"tool": f"{mad}.{tool}", "ok": True, "ms": int((time.monotonic() - t0) * 1000)})
            return result
        except KernelError as exc:
            log.info("tool call refused", extra={"tool": f"{mad}.{tool}", "ok": False, "error": str(exc)})
            raise
        except Exception:
            log.exception("tool call crashed", extra={"tool": f"{mad}.{tool}", "ok": False})
            raise
        finally:
            logs.correlation_id.reset(tok_c)
            logs.principal.reset(tok_p)

    async def request(
        self,
        sender: str,
        target: str,
        *,
        prose: str = "",
        tool: str = "",
        args: dict[str, Any] | None = None,
        conversation_id: str = "",
    ) -> Any:
        """A request from one MAD to another, carried over the bus as request/reply envelopes."""
        sender_cls = self._mad_class(sender)
        if sender_cls is None:
            raise AccessDenied(f"unknown sender {sender!r}")
        if target not in sender_cls.talks_to:
            raise AccessDenied(f"MAD {sender!r} does not talk to {target!r} (talks_to: {list(sender_cls.talks_to)})")
        receiver = await self._ready(target)
        if not conversation_id:
            conversation_id = self.bus.ensure(f"{sender}->{target}", sender)["id"]
            self.bus.join(conversation_id, target)
        payload: dict[str, Any] = {"to": target}
        if tool:
            payload.update(tool=tool, args=dict(args or {}))
        corr = logs.correlation_id.get() or ""
        req = self.bus.post(conversation_id, sender, prose, "request", corr, payload=redact(payload))
        envelope = dict(req, payload=payload)  # the receiver sees the real arguments
        tok = logs.correlation_id.set(req["correlation_id"])
        try:
            result = await receiver.handle(envelope)
        except KernelError as exc:
            self.bus.post(conversation_id, target, str(exc), "error", req["correlation_id"], payload={"to": sender})
            raise
        finally:
            logs.correlation_id.reset(tok)
        content = result if isinstance(result, str) else json.dumps(redact(result), default=str)[:10_000]
        self.bus.post(
            conversation_id, target, content, "reply", req["correlation_id"], payload={"to": sender, "result": redact(result)}
        )
        return result

    # ---- capabilities: conversations ---------------------------------------------------------

    @implements("conversations.create")
    async def conversations_create(self, caller: str, title: str, participants: list[str] = []) -> dict:  # noqa: B006
        return self.bus.create(title, list(participants), caller)

    @implements("conversations.post")
    async def conversations_post(
        self, caller: str, conversation_id: str, content: str, kind: str = "message", correlation_id: str = ""
    ) -> dict:
        who = logs.principal.get()
        payload = {"on_behalf_of": who} if who and who != caller else None
        return self.bus.post(conversation_id, caller, content, kind, correlation_id or logs.correlation_id.get(), payload)

    @implements("conversations.history")
    async def conversations_history(self, caller: str, conversation_id: str, limit: int = 50) -> list[dict]:
        return self.bus.history(conversation_id, limit)

    @implements("conversations.search")
    async def conversations_search(self, caller: str, query: str, limit: int = 20) -> list[dict]:
        return self.bus.search(query, limit)

    @implements("conversations.list")
    async def conversations_list(self, caller: str, limit: int = 50) -> list[dict]:
        return self.bus.list(limit)

    # ---- capabilities: models ----------------------------------------------------------------

    @implements("models.list")
    async def models_list(self, caller: str) -> list[dict]:
        return self.models.list()

    @implements("models.send")
    async def models_send(self, caller: str, model: str, prompt: str, max_tokens: int = 256) -> dict:
        accounts = [caller]
        who = logs.principal.get()
        if who.startswith("client:") and who != caller:
            accounts.append(who)  # a client's request is charged to the client as well as to the MAD
        return await self.models.send(accounts, model, prompt, max_tokens)

    @implements("models.budget")
    async def models_budget(self, caller: str) -> dict:
        return self.models.budgets()

    # ---- capabilities: secrets ---------------------------------------------------------------

    @implements("secrets.set")
    async def secrets_set(self, caller: str, name: str, value: str) -> dict:
        return self.secrets.set(caller, name, value, self._on_behalf_of(caller))

    @implements("secrets.get")
    async def secrets_get(self, caller: str, name: str) -> dict:
        return self.secrets.get(caller, name, self._on_behalf_of(caller))

    @implements("secrets.list")
    async def secrets_list(self, caller: str) -> list[dict]:
        return self.secrets.list(caller, self._on_behalf_of(caller))

    @implements("secrets.rotate")
    async def secrets_rotate(self, caller: str, name: str, value: str) -> dict:
        return self.secrets.rotate(caller, name, value, self._on_behalf_of(caller))

    @implements("secrets.audit")
    async def secrets_audit(self, caller: str, limit: int = 50) -> list[dict]:
        return self.secrets.audit(caller, limit, self._on_behalf_of(caller))

    # ---- capabilities: ecosystem -------------------------------------------------------------

    def healthy(self) -> bool:
        return self.running and self.db.healthy() and all(s.state != "failed" for s in self.slots.values())

    @implements("ecosystem.status")
    async def ecosystem_status(self, caller: str) -> dict:
        mads = []
        for name, slot in self.slots.items():
            entry: dict[str, Any] = {"name": name, "state": slot.state, "ok": slot.state in ("running", "idle")}
            if slot.error:
                entry["error"] = slot.error
            if slot.state == "running":
                try:
                    entry["health"] = await slot.mad.health()
                except Exception as exc:
                    entry["ok"] = False
                    entry["health"] = {"ok": False, "error": f"{type(exc).__name__}"}
            mads.append(entry)
        db_ok = self.db.healthy()
        healthy = self.running and db_ok and all(m["ok"] for m in mads)
        return {
            "name": self.config.name,
            "description": self.config.description,
            "version": self.config.version,
            "status": "ok" if healthy else "degraded",
            "healthy": healthy,
            "started_at": self.started_at,
            "uptime_s": round(time.monotonic() - self._t0, 3) if self._t0 else 0.0,
            "database": "ok" if db_ok else "error",
            "search": "fts5" if self.bus.fts else "like",
            "mads": mads,
        }

    @implements("ecosystem.mads")
    async def ecosystem_mads(self, caller: str) -> list[dict]:
        out = []
        for cls in self.config.mads:
            slot = self.slots.get(cls.name)
            out.append(
                {
                    "name": cls.name,
                    "role": cls.role,
                    "level": cls.level,
                    "lifecycle": cls.lifecycle,
                    "state": slot.state if slot else "stopped",
                    "conversations": list(cls.conversations),
                    "talks_to": list(cls.talks_to),
                    "owns": list(cls.owns),
                    "budget_tokens": cls.budget_tokens,
                    "tools": [t["qualified_name"] for t in cls.tools()],
                }
            )
        return out
