"""The runtime: one process, one SQLite database, every MAD as an object, every capability implemented.

`Runtime.use(capability, caller=..., **kwargs)` is the single entry point MADs reach the
kernel through (`Mad.use`). Each capability in `capabilities.CAPABILITIES` is implemented
by a method decorated with `@implements(<name>)` whose parameters after `caller` match the
catalogue exactly (a kernel test enforces it).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import logs, tracing
from .audit import AuditLog
from .bus import ConversationBus, Envelope, current_delivery, now_iso
from .capabilities import CAPABILITIES, PACKS, granted, with_required
from .config import EcosystemConfig
from .db import open_database
from .errors import AccessDenied, InvalidArgument, KernelError, ModelError, NotFound
from .mad import Kernel, Mad, OwnTables
from .metrics import Metrics
from .models import ModelGateway, openai_pack
from .packs import IMPL_ATTR, Pack, PackContext, implements, load, module
from .secrets import KeySource, SecretsManager
from .supervisor import MadFault, NotAdmitted, SupervisionPolicy, Supervisor, Unavailable, never_suspends
from .transport import Reply, Sealer, error_to, is_local, make_transport, reply_to

if TYPE_CHECKING:
    from .packs.storage.migrations import Migration

log = logs.get("runtime")

REDACTED = "[redacted]"
_SENSITIVE_KEYS = {"value", "secret", "password", "api_key", "apikey", "token", "key", "private_key", "credentials"}


def redact(obj: Any) -> Any:
    """A copy of `obj` with values under secret-looking keys replaced: what the bus persists."""
    if isinstance(obj, dict):
        return {k: (REDACTED if str(k).lower() in _SENSITIVE_KEYS else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


def _implementations(owner: object) -> dict[str, Callable[..., Any]]:
    """capability -> the bound method of `owner` marked `@implements(capability)`."""
    return {capability: getattr(owner, attr) for attr in dir(type(owner))
            if (capability := getattr(getattr(type(owner), attr), IMPL_ATTR, None))}


def _runs_in_place(mad: Mad, tool: str) -> bool:
    """True when running `tool` on `mad` (through the kernel's own `handle` or `call_tool`) cannot suspend: its
    code never awaits. The supervisor then runs it in place rather than in a task of its own, after the disk
    a bus hop's largest fixed cost; anything that may await runs in its task as before."""
    return tool not in getattr(mad, "__dict__", {}) and _class_runs_in_place(type(mad), tool)


@functools.cache
def _class_runs_in_place(cls: type[Mad], tool: str) -> bool:
    fn = cls.tool_methods().get(tool)
    # What call_tool runs is the attribute itself: judge that (an override without @tool is not the function flagged).
    return (cls.handle is Mad.handle and cls.call_tool is Mad.call_tool and fn is not None
            and inspect.getattr_static(cls, tool, None) is fn and never_suspends(fn))


def _bus_span(verb: str, request: Envelope, target: str, tool: Any, principal: str, **how: Any) -> Any:
    """The span of a bus hop's send or delivery; OFF while tracing is off, without making its attributes."""
    if tracing.tracer is None:
        return tracing.OFF
    return tracing.start(f"bus {verb} {target}", {
        "regen.correlation_id": request.correlation_id, "regen.sender": request.sender, "regen.mad": target,
        "regen.tool": tool, "regen.client": tracing.client_of(principal), "regen.envelope_id": request.id,
    }, **how)


class Grants:
    """What one MAD (or role: each of its eMAD instances) was granted by its spec, copied when the runtime is made."""

    __slots__ = ("owns", "secrets", "talks_to", "spawns", "capabilities")

    def __init__(self, cls: type[Mad]):
        self.owns = frozenset(cls.owns)
        self.secrets = frozenset(cls.secrets)
        self.talks_to = frozenset(cls.talks_to)
        self.spawns = frozenset(cls.spawns)
        self.capabilities = granted(self.owns)


@dataclass
class MadSlot:
    """Runtime bookkeeping for one MAD instance."""

    mad: Mad
    state: str = "created"
    error: str = ""


# The package the kernel is copied into (`<package>/kernel/`): its build stamp and its migrations are beside it.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
BUILD_FILE = PACKAGE_DIR / "build.json"


def read_build_info(path: Path = BUILD_FILE) -> dict[str, str]:
    """What the compiler stamped on this build (`<package>/build.json`): ecosystem, version, inputs hash;
    {} for a tree that was not built by it (a test's package, a source checkout)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in data.items() if k in ("ecosystem", "version", "inputs_hash")} if isinstance(data, dict) else {}


def check_lifecycles(mads: Sequence[type[Mad]]) -> dict[str, type[Mad]]:
    """The roles among `mads` (name -> class), once their eMAD attributes and every MAD's `spawns` are checked."""
    for cls in mads:  # first: a MAD of no known lifecycle is named as such, before what it makes others lack
        if cls.lifecycle not in ("persistent", "ephemeral"):
            raise InvalidArgument(f"MAD {cls.name!r}: lifecycle must be 'persistent' or 'ephemeral', not {cls.lifecycle!r}")
    roles = {cls.name: cls for cls in mads if cls.lifecycle == "ephemeral"}
    for cls in mads:
        unknown = sorted(set(cls.spawns) - set(roles))
        if unknown:
            raise InvalidArgument(f"MAD {cls.name!r} spawns {', '.join(unknown)}, which is no role (a MAD with lifecycle "
                                  f"'ephemeral'); this ecosystem's roles: {', '.join(roles) or 'none'}")
    for cls in roles.values():
        if not (isinstance(cls.max_instances, int) and cls.max_instances >= 1):
            raise InvalidArgument(f"role {cls.name!r}: max_instances must be an integer >= 1, not {cls.max_instances!r}")
        if not cls.task_timeout_s > 0:
            raise InvalidArgument(f"role {cls.name!r}: task_timeout_s must be > 0 seconds, not {cls.task_timeout_s!r}")
        if cls.conversations:  # each instance would stay a participant of them for ever
            raise InvalidArgument(f"role {cls.name!r}: an eMAD joins only its task conversation; declare no conversations")
    return roles


class NoRoles:
    """The eMADs of an ecosystem without roles, whose build has no emads pack: none live, none to spawn (a spawn
    is refused before it gets here: no MAD may spawn a role that does not exist), none to count (the runtime
    asks how many instances run only of a role)."""

    def __init__(self) -> None:
        self.live: dict[str, str] = {}

    def reports(self, instance: str, limit: int = 20) -> list[dict[str, Any]]:
        raise InvalidArgument(f"{instance!r} is no live eMAD: earlier_reports is for an instance of a role, and this "
                              "ecosystem has no roles")


def _has_history(path: Path) -> bool:
    """Whether the package's migrations.json lists a migration (one that is not a list counts: the storage pack,
    or the refusal to start without it, says what is wrong with it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) != []
    except FileNotFoundError:
        return False
    except ValueError:
        return True


class NoTables:
    """A MAD's store in a build without the storage pack: it has no table, and says so as TableStore would."""

    def __init__(self, mad: str):
        self._mad = mad

    def table_name(self, table: str, *_: Any, **__: Any) -> str:
        raise InvalidArgument(f"MAD {self._mad!r} has no table {table!r}; it has []")

    insert = select = update = delete = table_name


class Runtime:
    def __init__(self, config: EcosystemConfig, state_dir: str | os.PathLike[str], *,
                 model_transport: Any = None, migrations: Sequence[Migration] | None = None,
                 supervision: SupervisionPolicy | None = None, bus_url: str = "", db_url: str = "",
                 serve_mads: Sequence[str] | None = None, claim_idle_s: float = 30.0):
        """`migrations`: the storage history to bring the state to; None reads the package's migrations.json.
        `supervision`: breaker, restart and drain settings (kernel/supervisor.py); None takes the defaults.
        `bus_url`: the bus transport (transport.py): "" for the SQLite bus of this process, a Redis URL to
        share the bus with other processes; `serve_mads`: the MADs this process runs (None: all; a subset
        needs a Redis bus); `claim_idle_s`: how long a Redis delivery whose process went silent (dead, or
        frozen) waits before another process takes it over; a live process renews its claims. `db_url`: "" for
        the state directory's SQLite, a postgresql:// URL for a database replicas share (the postgres pack)."""
        self.config = config
        self._roles = check_lifecycles(config.mads)  # name -> class of each role (lifecycle "ephemeral")
        self.build = read_build_info()
        self.version = self.build.get("version") or config.version or "unreleased"
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.db = open_database(self.state_dir, db_url)
        owned = {family for m in config.mads for family in m.owns}
        # Storage first, before anything else writes: a state this version cannot use is refused as it was
        # found, and the refusal comes before the server binds its port; so is a key that is not the state's
        # (or a malformed one), and a bus or a choice of MADs this process cannot serve.
        try:
            if is_local(bus_url):  # the local bus: this process alone delivers the state's requests
                self.db.serve_alone()
            if self.db.dialect != "sqlite" and not os.environ.get(key_var := f"{config.env_prefix}_SECRETS_KEY"):
                raise KernelError(f"the state in {self.db.path} is every replica's, so is its secrets key: set {key_var} "
                                  "(base64 of 32 bytes) for every replica; a key file in one state directory is one host's")
            core_families = {name.split(".", 1)[0] for name, c in CAPABILITIES.items() if not c.pack}
            for family in sorted(owned - core_families - set(PACKS)):
                load(family)  # not in this build (a lone or pruned copy): says so, and how to get it
            openai = openai_pack(config.models)  # likewise the provider of a model alias
            self._storage, self.migrated, self._tables, self._replica = self._open_storage(migrations)
            if self.migrated:
                log.info("storage migrated", extra={"migrations": [f"{m.number} {m.name}" for m in self.migrated]})
            # Before anything that audits: opens the chain (and adopts older audit rows) on first start.
            self.audit = AuditLog(self.db)
            self.bus = ConversationBus(self.db)
            keys = KeySource(self.state_dir, f"{config.env_prefix}_SECRETS_KEY", config.name)
            self.secrets = SecretsManager(self.db, keys, self._secrets_policy, self.audit)
            self.models = ModelGateway(self.db, config.models, {m.name: m.budget_tokens for m in config.mads},
                                       config.client_budget_tokens, transport=model_transport, openai=openai,
                                       read_secret=functools.partial(self.secrets.read_internal, "kernel.models"))
            self.serving = self._serving(serve_mads, bus_url)
            self.transport = make_transport(bus_url, ecosystem=config.name, bus=self.bus, sealer=Sealer(keys.load()),
                                            dispatch=self._deliver, claim_idle_s=claim_idle_s)
        except (KernelError, sqlite3.DatabaseError) as exc:
            self.db.close()
            if isinstance(exc, KernelError):
                raise
            locked = isinstance(exc, sqlite3.OperationalError) and self.db.dialect == "sqlite"
            raise KernelError(f"the state database {self.db.path} cannot be opened for use ({exc})" + (
                ": another process may be upgrading it; retry when it has finished" if locked else "")) from None
        self._conversations: dict[tuple[str, str], str] = {}  # (sender, target) -> their conversation
        self.slots: dict[str, MadSlot] = {}
        # What each MAD may do, fixed now from its spec: a MAD rewriting its class attributes later gains nothing.
        self._grants = {cls.name: Grants(cls) for cls in config.mads}
        self.supervisor = Supervisor(config.mads, self._restart_slot, self._slot_state, supervision)
        self.metrics = Metrics({m.name: m.tool_methods() for m in config.mads},
                               lambda: {n: self.supervisor.health(n)["ok"] for n in self.slots})  # up, breaker closed
        self.metrics.build_info(ecosystem=config.name, version=self.version,
                                inputs_hash=self.build.get("inputs_hash", ""))
        self.emads = (self._emads_pack().Emads(self.db, self._roles, self.bus, self.supervisor, self.metrics)
                      if self._roles else NoRoles())
        self._kernels = {cls.name: self._kernel_for(cls.name) for cls in config.persistent_mads}
        # The audit log's length, recorded outside the database: a drop in this series is a truncation.
        self.metrics.watch("regen_audit_entries", "Entries in the hash-chained audit log (its newest id)",
                           self.audit.head_id)
        self._impls: dict[str, Callable[..., Any]] = _implementations(self)
        self._used: set[tuple[str, str, str]] = set()  # (actor, action, subject) audited once (_first_use)
        # The capability packs of the families its MADs own, by name: the runtime imports no pack itself.
        self.packs: dict[str, Pack] = {}
        # A pack another pack requires is loaded too (before it), though no MAD is granted its capabilities.
        for name in TopologicalSorter({n: PACKS[n].requires for n in sorted(with_required(owned))}).static_order():
            self.packs[name] = load(name)(PackContext(
                ecosystem=config.name, folder=self.state_dir / name, settings=dict(config.pack_settings.get(name, {})),
                audit=self._audit, denied=self._denied, peer=functools.partial(self._peer, name),
                audit_entries=self.audit.since, post=self._pack_post))
            self._impls.update(_implementations(self.packs[name]))  # all of capabilities.available: test_contract.py
        self.started_at = ""
        self._t0 = 0.0
        self.running = False

    # ---- lifecycle ---------------------------------------------------------------------------

    def _open_storage(self, migrations: Sequence[Migration] | None) -> tuple[Any, list[Migration], dict[str, Any], Any]:
        """The storage pack, the migrations it applied now, MAD -> table -> column names and this process's
        heartbeat as a replica of the state (packs/storage/replicas.py), or None without the pack (`migrations`: None
        reads the package's migrations.json). A build whose MADs declare no table and whose history is empty has
        no such pack: then the state must hold no migration either."""
        history = bool(migrations) if migrations is not None else _has_history(PACKAGE_DIR / "migrations.json")
        try:
            storage = module("storage", "this ecosystem's MADs declare `storage:` tables, or its package has "
                                        "migrations, but its build has no storage pack, which keeps them; rebuild it "
                                        "from its spec with `nox -s regenerate`")
        except InvalidArgument:
            if history or any(cls.storage for cls in self.config.mads):
                raise
            newest = self.db.has_table("schema_migrations") and self.db.one(
                "SELECT number, name FROM schema_migrations ORDER BY number DESC LIMIT 1")
            if newest:  # older builds made the table empty: only a migration recorded in it counts
                raise KernelError(f"the state in {self.db.path} was migrated by a newer version of this ecosystem "
                                  f"(migration {newest['number']} '{newest['name']}'), whose MADs have tables; this "
                                  "build has none. Migrations are forward-only: run that newer version, or restore "
                                  "the state from a backup taken before the upgrade") from None
            return None, [], {}, None
        return storage, *storage.open_storage(self.db, self.config.mads, migrations)

    async def start(self) -> None:
        """Join conversations and start the persistent MADs in the configured order (their tables exist already);
        a role gets no slot: its instances are spawned per task (kernel/packs/emads/)."""
        self.started_at = now_iso()
        self._t0 = time.monotonic()
        for cls in self.config.mads:
            if cls.name not in self.serving:
                continue  # another process of this ecosystem runs it; the shared bus reaches it
            mad = cls(self._kernels[cls.name])
            self.slots[cls.name] = slot = MadSlot(mad)
            for title in cls.conversations:
                mad.conversation_ids[title] = self.bus.ensure(title, cls.name)["id"]
            try:
                await self._run_on_start(slot)
            except KernelError as exc:  # not fatal: reported (state "failed"), restarted with backoff
                self.supervisor.start_failed(cls.name, exc)
        self.running = True
        if self._replica:  # seen live by versions that would change the storage under it
            self._replica.start(self.version)
        # Last: deliveries a crash left pending run now, on MADs that are up.
        await self.transport.start(list(self.slots))
        log.info("ecosystem started", extra={"ecosystem": self.config.name, "mads": list(self.slots)})

    async def _run_on_start(self, slot: MadSlot) -> None:
        slot.state = "starting"
        try:
            await self.supervisor.start(slot.mad.name, slot.mad.on_start)
        except KernelError as exc:  # names the MAD and the exception type, never its message
            slot.state = "failed"
            slot.error = str(exc)
            log.warning("MAD failed to start", extra={"mad": slot.mad.name, "error": slot.error})
            self.metrics.error(slot.mad.name, "start")
            raise
        slot.state = "running"
        slot.error = ""

    async def _restart_slot(self, name: str) -> None:
        """The supervisor's restart: stop the old instance (best effort), start a new one; raises if it fails to start."""
        slot = self.slots[name]
        old = slot.mad
        if slot.state == "running":
            slot.state = "restarting"
            try:
                await self.supervisor.stop(name, old.on_stop)
            except KernelError:
                log.warning("MAD failed to stop before its restart", extra={"mad": name})
        slot.mad = type(old)(self._kernels[name])
        slot.mad.conversation_ids = dict(old.conversation_ids)
        await self._run_on_start(slot)

    async def drain(self) -> None:
        """The first half of a graceful shutdown (SIGTERM), while the HTTP port still answers: refuse new
        tool calls, stop taking deliveries from other processes (they serve them meanwhile), and wait for
        the calls in flight, up to the supervision policy's drain_timeout_s from the first call. Idempotent."""
        self.supervisor.begin_shutdown()
        await self.transport.pause()
        await self.supervisor.drain()

    async def stop(self) -> None:
        """Graceful shutdown: drain (above), stop the MADs in reverse order, close the database.

        The bus keeps carrying the requests of work in flight while it drains, and closes before the
        MADs stop; a delivery cut off at the deadline is not acked and runs again."""
        await self.drain()
        await self.transport.stop(max(0.0, self.supervisor.drain_deadline - time.monotonic()))
        await self.supervisor.close()
        for name, slot in reversed(self.slots.items()):
            if slot.state == "running":
                try:
                    await self.supervisor.stop(name, slot.mad.on_stop)
                except KernelError:
                    log.warning("MAD failed to stop cleanly", extra={"mad": name})
                    self.metrics.error(name, "stop")
                slot.state = "stopped"
        self.running = False
        for pack in reversed(self.packs.values()):  # a pack closes before those it requires
            await pack.close()
        if self._replica:
            await self._replica.stop()
        self.db.close()
        log.info("ecosystem stopped", extra={"ecosystem": self.config.name})

    # ---- lookups -----------------------------------------------------------------------------

    def mad(self, name: str) -> Mad:
        slot = self.slots.get(name)
        if slot is None:
            if name in self._roles:
                raise NotFound(f"{name!r} is a role (lifecycle ephemeral), not a running MAD: the MADs whose spawns "
                               "list it run an instance of it per task (spawn); its tools are not served")
            if name in self._grants and name not in self.serving:
                raise NotFound(f"MAD {name!r} runs in another process of this ecosystem (this one serves "
                               f"{', '.join(self.serving) or 'no MAD'}); MADs reach it over the shared bus")
            raise NotFound(f"no MAD {name!r}; known: {', '.join(self.slots) or 'none'}")
        return slot.mad

    def _serving(self, serve_mads: Sequence[str] | None, bus_url: str) -> tuple[str, ...]:
        """The persistent MADs this process runs, in start-up order (a role's instances run where they are spawned)."""
        names = [cls.name for cls in self.config.persistent_mads]
        if serve_mads is None:
            return tuple(names)
        unknown = sorted(set(serve_mads) - set(names))
        if unknown:
            raise InvalidArgument(f"cannot serve unknown MAD(s) {', '.join(unknown)}; this ecosystem has {', '.join(names)}")
        chosen = tuple(n for n in names if n in set(serve_mads))
        if chosen != tuple(names) and (bus_url or "local") == "local":
            raise InvalidArgument("serving only some MADs needs a bus shared with the processes that serve the others: "
                                  f"serve --bus redis://HOST:6379/0 (or set {self.config.env_prefix}_BUS_URL)")
        return chosen

    def table_store(self, mad: str) -> Any:
        """CRUD over `mad`'s own tables (the storage pack's TableStore); with no such pack, it has none."""
        return self._storage.TableStore(self.db, mad, self._tables.get(mad, {})) if self._storage else NoTables(mad)

    def _emads_pack(self) -> Any:
        return module("emads", f"this ecosystem has roles ({', '.join(self._roles)}) but was built without the emads "
                               "pack, which runs them; rebuild it from its spec with `nox -s regenerate`")

    def _grants_of(self, caller: str) -> Grants | None:
        """What `caller` may do: a persistent MAD's grants, or a live eMAD instance's role's; None for anyone else
        (an ended instance, a role's bare name, a client, a name nobody has)."""
        role = self.emads.live.get(caller)
        if role is not None:
            return self._grants[role]
        return None if caller in self._roles else self._grants.get(caller)

    def _as_mad(self, caller: str) -> str:
        """The MAD a caller counts as in budgets and metrics: a live eMAD instance counts as its role."""
        return self.emads.live.get(caller, caller)

    def _secrets_policy(self, caller: str) -> tuple[bool, set[str]]:
        grants = self._grants_of(caller)
        return (False, set()) if grants is None else ("secrets" in grants.owns, set(grants.secrets))

    def _kernel_for(self, name: str, task_conversation: str = "") -> Kernel:
        """The one handle MAD `name` gets (a persistent MAD, or an eMAD instance whose asks go to its task
        conversation unless it names another): its name is fixed inside these closures, so it acts as itself only.
        Closures, not functools.partial: a partial's `.func.__self__` would hand a MAD the runtime itself."""

        async def use(capability: str, **kwargs: Any) -> Any:
            return await self.use(capability, caller=name, **kwargs)

        async def ask(target: str, prose: str = "", *, tool: str = "", args: dict[str, Any] | None = None,
                      conversation_id: str = "") -> Any:
            return await self.request(name, target, prose=prose, tool=tool, args=args,
                                      conversation_id=conversation_id or task_conversation)

        async def spawn(role: str, task: str, conversation_id: str = "") -> dict[str, Any]:
            return await self.spawn(name, role, task, conversation_id)

        async def earlier_reports(limit: int = 20) -> list[dict[str, Any]]:
            return self.emads.reports(name, limit)

        role = self.emads.live.get(name, "")  # an instance's tables are its role's
        return Kernel(use, ask, spawn, earlier_reports, OwnTables(self.table_store(role or name)),
                      instance=name if role else "")

    def _peer(self, name: str, other: str) -> Pack:
        """Pack `other` as pack `name` may reach it: only a pack it requires."""
        if other not in PACKS[name].requires or other not in self.packs:
            raise KernelError(f"the {name!r} pack does not require the {other!r} pack")
        return self.packs[other]

    def _pack_post(self, actor: str, title: str, content: str) -> dict[str, Any]:
        """A pack's post to the conversation titled `title` (made if missing), sent as `actor`."""
        return self.bus.post(self.bus.ensure(title, actor)["id"], actor, content)

    def _denied(self, caller: str, action: str, subject: str, why: str) -> AccessDenied:
        """Audit and log a refused request of a MAD; the AccessDenied to raise."""
        self._audit(caller, action, subject, False, why)
        log.warning("access denied", extra={"caller": caller, "action": action, "subject": subject})
        return AccessDenied(why)

    def _slot_state(self, name: str) -> str:
        if name in self._roles:
            return "running" if self.emads.running(name) else "idle"
        slot = self.slots.get(name)
        return slot.state if slot else "created"

    async def _ready(self, name: str) -> Mad:
        self.mad(name)  # NotFound for an unknown MAD, or a role
        slot = self.slots[name]
        if slot.state in ("failed", "restarting"):
            due = self.supervisor.health(name).get("restart_in_s")
            when = f"; the supervisor restarts it in {due} s" if due is not None else ""
            raise Unavailable(f"MAD {name!r} is not running ({slot.error or slot.state}){when}")
        return slot.mad

    # ---- the one door to capabilities --------------------------------------------------------

    def capability_impl(self, capability: str) -> Callable[..., Any]:
        impl = self._impls.get(capability)
        if impl is None:
            pack = CAPABILITIES[capability].pack if capability in CAPABILITIES else ""
            if pack:
                raise NotFound(f"{capability} is in the {pack!r} capability pack, which no MAD of this ecosystem "
                               f"owns: bind a tool of one MAD to a {pack}.* capability in its spec")
            raise NotFound(f"no kernel capability {capability!r}")
        return impl

    async def use(self, capability: str, caller: str, **kwargs: Any) -> Any:
        if caller not in self.slots and caller not in self.emads.live and not caller.startswith("client:"):
            raise AccessDenied(f"unknown caller {caller!r}")
        grants = self._grants_of(caller)
        # Refused (and audited) before anything else: a MAD probing for a capability this build does not have (a
        # pack's it lacks, or none at all) is as suspect as one reaching past its grants.
        if grants is not None and capability not in grants.capabilities:
            family = capability.split(".", 1)[0]
            raise self._denied(caller, "kernel.use", capability,
                               f"MAD {caller!r} may not use {capability}: it owns {sorted(grants.owns) or 'no capability families'}, "
                               f"not {family!r}; ask the MAD that owns {family!r} over the bus")
        impl = self.capability_impl(capability)  # NotFound for a name not in this build's catalogue
        try:
            inspect.signature(impl).bind(caller, **kwargs)
        except TypeError as exc:
            raise InvalidArgument(f"{capability}: {exc}") from None
        log.debug("capability", extra={"capability": capability, "caller": caller})
        self._first_use(caller, "kernel.use", capability)
        return await impl(caller, **kwargs)

    def _first_use(self, actor: str, action: str, subject: str) -> None:
        """Audit the first time in this process that `actor` does `action` on `subject`: the audit log then shows
        who uses what (McNamara's baseline of usual use) at one entry per pair, not one per call."""
        key = (actor, action, subject)
        if key not in self._used:
            self._used.add(key)
            self._audit(actor, action, subject, True, "first use since start")

    def _audit(self, actor: str, action: str, subject: str, ok: bool, detail: str) -> None:
        """An entry of the audit log, naming the principal `actor` acted for when that is someone else."""
        self.audit.append(actor, action, subject, ok, detail, self._on_behalf_of(actor))

    def _on_behalf_of(self, caller: str) -> str:
        who = logs.principal.get()
        return who if who and who != caller else ""

    # ---- tools and MAD-to-MAD requests -------------------------------------------------------

    async def invoke_tool(self, mad: str, tool: str, args: dict[str, Any], principal: str = "") -> Any:
        """Run `<mad>.<tool>` for an outside principal (an MCP client or Grace)."""
        t0 = time.monotonic()
        named = {"tool": f"{mad}.{tool}"}
        # The gateway's correlation id is kept; any other caller gets one of its own.
        with logs.bound((logs.principal, principal), (logs.correlation_id, logs.correlation_id.get() or logs.new_id()),
                        (logs.mad, mad)):
            try:
                with self.supervisor.admission():  # refused once shutdown began; the drain waits for it
                    if principal:
                        self._first_use(principal, "tool.call", f"{mad}.{tool}")
                    if mad in self.slots or mad not in self._grants or mad in self._roles:
                        instance = await self._ready(mad)
                        result = await self._handler(mad, tool, lambda: instance.call_tool(tool, args),
                                                     at_once=_runs_in_place(instance, tool))
                    else:  # another process of this ecosystem serves it (serve --mads): a request over the shared
                        # bus from the "gateway", on behalf of the principal (admitted for this tool above)
                        payload = {"to": mad, "tool": tool, "args": dict(args)}
                        _, pending = await self._submit("gateway", mad, "", payload, "", want_reply=True)
                        result = (await pending).unwrap()
            except Exception as exc:
                # A MadFault: the MAD's code raised or hung (the supervisor logged the details); another
                # KernelError: a refusal; anything else: a crash outside the MAD.
                crashed = isinstance(exc, MadFault) or not isinstance(exc, KernelError)
                if isinstance(exc, KernelError):
                    log.info(f"tool call {'failed' if crashed else 'refused'}",
                             extra={**named, "ok": False, "error": str(exc)})
                else:
                    log.exception("tool call crashed", extra={**named, "ok": False})
                self.metrics.tool_call(mad, tool, "crashed" if crashed else "refused", time.monotonic() - t0)
                if crashed:
                    self.metrics.error(mad, "tool")
                raise
            log.info("tool call", extra={**named, "ok": True, "ms": int((time.monotonic() - t0) * 1000)})
        self.metrics.tool_call(mad, tool, "ok", time.monotonic() - t0)
        return result

    async def request(self, sender: str, target: str, *, prose: str = "", tool: str = "",
                      args: dict[str, Any] | None = None, conversation_id: str = "") -> Any:
        """A request from one MAD to another over the bus: its result, or the error it answered with.

        The request is durable before it runs (bus.py): if the process dies before the reply, it
        runs again at the next start, or on another process of a shared bus."""
        _, pending = await self._send(sender, target, prose, tool, args, conversation_id, want_reply=True)
        return (await pending).unwrap()  # want_reply=True: pending is always an awaitable of a Reply

    async def spawn(self, spawner: str, role: str, task: str, conversation_id: str = "") -> dict[str, Any]:
        """Run an instance of `role` on `task` for `spawner` (a MAD's `spawn`, kernel/packs/emads/): refused, and
        audited, unless `role` is among the spawner's `spawns`; in `conversation_id` (the spawner must be in it)
        or in a new conversation titled after the task."""
        grants = self._grants_of(spawner)
        if grants is None:
            raise self._denied(spawner, "emads.spawn", role, f"unknown spawner {spawner!r}")
        if role not in grants.spawns:
            why = (f"{role!r} is a persistent MAD: ask it over the bus; only roles are spawned"
                   if role in self._grants and role not in self._roles
                   else f"MAD {spawner!r} may not spawn {role!r} (spawns: {sorted(grants.spawns)})")
            raise self._denied(spawner, "emads.spawn", role, why)
        if not isinstance(task, str) or not task.strip():
            raise InvalidArgument("spawn needs a task: a non-empty string")
        if conversation_id:
            self._check_member(spawner, conversation_id, "spawn")
        else:
            conversation_id = self.bus.create(f"{role}: {task.strip().splitlines()[0][:100]}", [], spawner)["id"]
        cls = self._roles[role]
        return await self.emads.run(cls, spawner, task, conversation_id,
                                    lambda instance: cls(self._kernel_for(instance, conversation_id)))

    async def submit(self, sender: str, target: str, *, prose: str = "", tool: str = "",
                     args: dict[str, Any] | None = None, conversation_id: str = "") -> dict[str, Any]:
        """Queue a request without waiting for its reply: returns the request envelope (payload as stored)
        once the bus has accepted it durably. The reply is recorded in the conversation. On the local bus
        the delivery runs on the caller's event loop; if that loop ends first, it runs at the next start."""
        stored, _ = await self._send(sender, target, prose, tool, args, conversation_id, want_reply=False)
        return stored()

    async def _send(self, sender: str, target: str, prose: str, tool: str, args: dict[str, Any] | None,
                    conversation_id: str, *, want_reply: bool) -> tuple[Callable[[], dict[str, Any]], Any]:
        # Every way onto the bus refuses alike and audits the refusal (a MAD's ask, Grace, the operator's CLI).
        grants = self._grants_of(sender)
        if grants is None:
            raise self._denied(sender, "bus.ask", target, f"unknown sender {sender!r}")
        if target in self._roles:
            raise self._denied(sender, "bus.ask", target, f"{target!r} is a role (lifecycle ephemeral): roles are "
                               "spawned, not asked; list it in the MAD's spawns and call spawn(role, task)")
        if target not in grants.talks_to:
            raise self._denied(sender, "bus.ask", target,
                               f"MAD {sender!r} does not talk to {target!r} (talks_to: {sorted(grants.talks_to)})")
        payload: dict[str, Any] = {"to": target}
        if tool:
            payload.update(tool=tool, args=dict(args or {}))
        return await self._submit(sender, target, prose, payload, conversation_id, want_reply=want_reply)

    async def _submit(self, sender: str, target: str, prose: str, payload: dict[str, Any], conversation_id: str, *,
                      want_reply: bool) -> tuple[Callable[[], dict[str, Any]], Any]:
        known = not conversation_id  # the pair's own conversation, which this runtime made or found: it exists
        if not conversation_id:
            conversation_id = self._conversations.get((sender, target), "")
            if not conversation_id:
                conversation_id = self.bus.ensure(f"{sender}->{target}", sender)["id"]
                self.bus.join(conversation_id, target)
                self._conversations[(sender, target)] = conversation_id
        if who := self._on_behalf_of(sender):
            payload["on_behalf_of"] = who
        request = self.bus.envelope(conversation_id, sender, prose, "request", logs.correlation_id.get(), payload,
                                    known_conversation=known)
        stored = redact(payload)  # what is persisted; the receiver gets the real arguments
        with tracing.ending(_bus_span("send", request, target, payload.get("tool"), logs.principal.get(),
                                      kind="producer", current=False)) as span:
            span.inject(request.payload)  # the trace goes on with the delivery, wherever it runs; not into the history
            pending = await self.transport.submit(request, stored, want_reply=want_reply)
        self.metrics.message(self._as_mad(sender), "request")
        # The envelope as stored, made only for a caller that wants it (`submit`): a hop need not pay for it.
        return (lambda: request.model_copy(update={"payload": stored}).as_dict()), pending

    async def _deliver(self, request: Envelope) -> Reply:
        """Run one request on the MAD it is addressed to (the transports call this); every outcome
        is a reply or an error reply, and the handler runs under the supervisor."""
        target = str(request.payload.get("to", ""))
        tool = str(request.payload.get("tool", ""))
        envelope = request.as_dict()
        outcome: tuple[str, BaseException | None] = ("interrupted", None)  # until it answers, or refuses
        with logs.bound((logs.correlation_id, request.correlation_id), (logs.mad, target),
                        (current_delivery, request.id), (logs.principal, str(request.payload.get("on_behalf_of", "")))):
            span = _bus_span("deliver", request, target, tool, logs.principal.get(), kind="consumer",
                             carrier=request.payload)
            try:
                receiver = await self._ready(target)
                result = await self._handler(target, "handle", lambda: receiver.handle(envelope), tool,
                                             at_once=bool(tool) and _runs_in_place(receiver, tool))
                reply = reply_to(request, result, redact(result))
                outcome = ("ok", None)
                log.info("bus delivery", extra={"sender": request.sender, "tool": tool, "ok": True})
            except KernelError as exc:  # a refusal, or a fault the supervisor contained and logged
                reply = error_to(request, exc.code, str(exc))
                reply.admitted = not isinstance(exc, NotAdmitted)
                outcome = (exc.code, exc)
                log.info("bus delivery refused", extra={"sender": request.sender, "tool": tool, "ok": False,
                                                        "error": exc.code})
                if isinstance(exc, MadFault):
                    self.metrics.error(target, "bus")
            finally:
                span.end(*outcome)
        self.metrics.message(target, reply.envelope.kind)
        return reply

    async def _handler(self, mad: str, op: str, run: Callable[[], Any], tool: str = "", *, at_once: bool = False) -> Any:
        """Run a MAD's handler under the supervisor (`op`: the tool, or "handle" for a bus request), in a
        span of its own (`<mad>.<tool>`) when tracing is on. `at_once`: it cannot suspend (Mad.answers_at_once)."""
        if tracing.tracer is None:
            return await self.supervisor.call(mad, op, run, at_once=at_once)
        tool = tool or op
        with tracing.ending(tracing.start(f"{mad}.{tool}", {
            "regen.correlation_id": logs.correlation_id.get(), "regen.mad": mad, "regen.tool": tool,
            "regen.client": tracing.client_of(logs.principal.get()),
        })):
            return await self.supervisor.call(mad, op, run, at_once=at_once)

    # ---- capabilities: conversations ---------------------------------------------------------

    @implements("conversations.create")
    async def conversations_create(self, caller: str, title: str, participants: list[str] = []) -> dict:  # noqa: B006
        return self.bus.create(title, list(participants), caller)

    @implements("conversations.post")
    async def conversations_post(
        self, caller: str, conversation_id: str, content: str, kind: str = "message", correlation_id: str = ""
    ) -> dict:
        self._check_member(caller, conversation_id, "post")
        who = self._on_behalf_of(caller)
        posted = self.bus.post(conversation_id, caller, content, kind, correlation_id or logs.correlation_id.get(),
                               {"on_behalf_of": who} if who else None)
        self.metrics.message(self._as_mad(caller), kind)
        return posted

    @implements("conversations.history")
    async def conversations_history(self, caller: str, conversation_id: str, limit: int = 50) -> list[dict]:
        self._check_member(caller, conversation_id, "history")
        return self.bus.history(conversation_id, limit)

    def _check_member(self, caller: str, conversation_id: str, action: str) -> None:
        """A MAD reads and posts only in conversations it joined, unless it owns the conversations family."""
        grants = self._grants_of(caller)
        if grants is None or "conversations" in grants.owns:
            return
        if caller not in self.bus.get(conversation_id)["participants"]:  # NotFound for an unknown id
            raise self._denied(caller, f"conversations.{action}", conversation_id,
                               f"MAD {caller!r} did not join conversation {conversation_id}; ask its owner to add it")

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
        mad = self._as_mad(caller)  # an eMAD spends its role's budget
        who = self._on_behalf_of(caller)  # a client's request is charged to the client as well as to the MAD
        accounts = [mad, who] if who.startswith("client:") else [mad]
        try:
            result = await self.models.send(accounts, model, prompt, max_tokens)
        except ModelError:
            self.metrics.error(mad, "model")
            raise
        self.metrics.llm_tokens(mad, result["prompt_tokens"], kind="prompt")
        self.metrics.llm_tokens(mad, result["completion_tokens"], kind="completion")
        return result

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

    @implements("secrets.rotate_key")
    async def secrets_rotate_key(self, caller: str) -> dict:
        return self.secrets.rotate_key(caller, self._on_behalf_of(caller))

    @implements("secrets.audit")
    async def secrets_audit(self, caller: str, limit: int = 50) -> list[dict]:
        return self.secrets.audit(caller, limit, self._on_behalf_of(caller))

    # ---- capabilities: ecosystem -------------------------------------------------------------

    def healthy(self) -> bool:
        return (self.running and self.supervisor.accepting and self.db.healthy()
                and all(self.supervisor.health(name)["ok"] for name in self.slots))

    @implements("ecosystem.status")
    async def ecosystem_status(self, caller: str) -> dict:
        async def status_of(name: str, slot: MadSlot) -> dict[str, Any]:
            # state, ok, breaker, failures, restarts, in_flight, leaked, last_error (kernel/supervisor.py)
            entry: dict[str, Any] = {"name": name, **self.supervisor.health(name)}
            if slot.error:
                entry["error"] = slot.error
            if slot.state == "running" and entry["breaker"] == "closed":  # a probe must not be an open breaker's trial
                entry["health"] = await self.supervisor.probe(name, slot.mad.health)
                entry["ok"] = entry["ok"] and entry["health"].get("ok") is not False
            return entry

        mads = await asyncio.gather(*(status_of(name, slot) for name, slot in self.slots.items()))
        # A role has no slot and nothing to probe: its state is whether instances run.
        mads += [{"name": role, **self.supervisor.health(role), "lifecycle": "ephemeral",
                  "instances": self.emads.running(role), "max_instances": cls.max_instances}
                 for role, cls in self._roles.items()]
        db_ok = self.db.healthy()
        draining = not self.supervisor.accepting
        healthy = self.running and not draining and db_ok and all(m["ok"] for m in mads)
        return {"name": self.config.name, "description": self.config.description, "version": self.version,
                "status": "draining" if draining else "ok" if healthy else "degraded", "healthy": healthy,
                "started_at": self.started_at, "uptime_s": round(time.monotonic() - self._t0, 3) if self._t0 else 0.0,
                "database": "ok" if db_ok else "error", "search": "fts5" if self.bus.fts else "like",
                "bus": self.transport.name, "mads": mads}

    @implements("ecosystem.mads")
    async def ecosystem_mads(self, caller: str) -> list[dict]:
        out = []
        for cls in self.config.mads:
            is_role = cls.name in self._roles
            entry = {"name": cls.name, "role": cls.role, "level": cls.level, "lifecycle": cls.lifecycle,
                     "state": self._slot_state(cls.name) if is_role or cls.name in self.slots else "stopped",
                     "conversations": list(cls.conversations), "talks_to": list(cls.talks_to), "owns": list(cls.owns),
                     "budget_tokens": cls.budget_tokens,
                     "tools": [] if is_role else [f"{cls.name}.{t}" for t in cls.tool_methods()],  # a role's are not served
                     "spawns": list(cls.spawns)}
            if is_role:
                entry.update(max_instances=cls.max_instances, instances=self.emads.running(cls.name))
            out.append(entry)
        return out
