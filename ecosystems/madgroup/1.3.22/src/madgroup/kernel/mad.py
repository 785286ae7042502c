"""The MAD base class: a Thought Engine (imperator prompt + model alias) and an Action Engine (tools).

A generated MAD subclasses `Mad`, sets its class attributes, and decorates its tools with
`@tool`. The runtime instantiates it with a `Kernel` handle made for that MAD alone, so
`self.use(...)` reaches the kernel capabilities it was granted, `self.ask(...)` reaches the
MADs it talks to over the conversation bus, `self.spawn(...)` runs instances of the roles it
spawns (eMADs, kernel/packs/emads/), and `self.store` its own tables; it holds no reference to the
runtime, the database, the secrets manager or any other MAD.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from .packs.storage.pack import TableStore

F = TypeVar("F", bound=Callable[..., Any])

_TOOL_FLAG = "__regen_tool__"


def tool(fn: F) -> F:
    """Mark an async method of a Mad subclass as a tool of its Action Engine."""
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"tool {fn.__qualname__} must be an async method")
    setattr(fn, _TOOL_FLAG, True)
    return fn


def _type_name(annotation: Any) -> str:
    """The Python spelling of an annotation: 'str', 'list[dict]' ('' when missing)."""
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


class OwnTables:
    """CRUD over one MAD's own tables (`<mad>_<table>`), with no attribute leading to the database."""

    __slots__ = ("insert", "select", "update", "delete", "table_name")

    def __init__(self, store: TableStore):
        for name in self.__slots__:
            setattr(self, name, getattr(store, name))


@dataclass(slots=True, eq=False)  # slots: no __dict__, nothing more to hang on it; eq=False: hashed by identity
class Kernel:
    """What one MAD may reach of the kernel; the runtime makes one per MAD.

    `use(capability, **kwargs)`, `ask(mad, prose, *, tool, args, conversation_id)`,
    `spawn(role, task, conversation_id)` and `earlier_reports(limit)` are closures the runtime
    made with the MAD's name inside, so a MAD cannot choose whom it acts as, and the runtime
    checks each call against the grants it recorded for that MAD at start (changing the MAD's
    class attributes later grants nothing). `store` is its own tables (an eMAD's: its role's);
    `instance` is an eMAD's own name (`<role>-<n>`), "" for a persistent MAD.
    Python cannot wall off objects inside one process: frame, traceback, closure and garbage-
    collector introspection can still find the runtime; the ecosystem's review rules forbid those.
    """

    use: Callable[..., Awaitable[Any]]
    ask: Callable[..., Awaitable[Any]]
    spawn: Callable[..., Awaitable[Any]]
    earlier_reports: Callable[..., Awaitable[Any]]
    store: OwnTables
    instance: str = ""


class Mad:
    """Base class of every MAD. Subclasses set the class attributes below."""

    name: ClassVar[str] = ""
    role: ClassVar[str] = ""
    level: ClassVar[str] = "V1"
    # "persistent": one instance for the ecosystem's life, its tools served, asked over the bus.
    # "ephemeral": a role; MADs whose `spawns` names it run an instance of it per task (kernel/packs/emads/).
    lifecycle: ClassVar[str] = "persistent"
    spawns: ClassVar[tuple[str, ...]] = ()  # the roles this MAD may spawn
    max_instances: ClassVar[int] = 1  # a role's instances running at once; more spawns wait their turn
    task_timeout_s: ClassVar[float] = 300.0  # a role's instance running work() longer is cancelled and fails
    conversations: ClassVar[tuple[str, ...]] = ()
    talks_to: ClassVar[tuple[str, ...]] = ()
    secrets: ClassVar[tuple[str, ...]] = ()
    owns: ClassVar[tuple[str, ...]] = ()
    budget_tokens: ClassVar[int] = 100_000
    storage: ClassVar[tuple[dict[str, Any], ...]] = ()
    imperator_model: ClassVar[str] = "default"
    imperator_prompt: ClassVar[str] = ""
    # Fault isolation (kernel/supervisor.py): a tool call, bus delivery or on_start running longer
    # than this is cancelled and counts as a failure; at most this many calls run at once.
    handler_timeout_s: ClassVar[float] = 30.0
    max_concurrent_calls: ClassVar[int] = 32

    def __init__(self, kernel: Kernel):
        self._kernel = kernel
        self.conversation_ids: dict[str, str] = {}  # title -> id of the conversations it joined

    # ---- introspection -----------------------------------------------------------------------

    @classmethod
    def tool_methods(cls) -> dict[str, Callable[..., Any]]:
        """name -> unbound function of every @tool, in definition order (base classes first)."""
        return dict(_tool_methods(cls))

    @classmethod
    def tool_signature(cls, name: str) -> inspect.Signature:
        """The tool's signature without `self`, annotations resolved to real types."""
        fn = cls.tool_methods()[name]
        hints = typing.get_type_hints(fn)
        sig = inspect.signature(fn)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in list(sig.parameters.values())[1:]]
        return sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation))

    @classmethod
    def tools(cls) -> list[dict[str, Any]]:
        """Every tool: name, qualified name, description, parameters and return type (from inspect)."""
        def param(p: inspect.Parameter) -> dict[str, Any]:
            entry: dict[str, Any] = {"name": p.name, "type": _type_name(p.annotation), "required": p.default is p.empty}
            return entry if entry["required"] else {**entry, "default": p.default}

        return [{"name": name, "qualified_name": f"{cls.name}.{name}",
                 "description": inspect.cleandoc(fn.__doc__ or ""),
                 "params": [param(p) for p in list(inspect.signature(fn).parameters.values())[1:]],
                 "returns": _type_name(inspect.signature(fn).return_annotation)}
                for name, fn in cls.tool_methods().items()]

    # ---- kernel access -----------------------------------------------------------------------

    async def use(self, capability: str, **kwargs: Any) -> Any:
        """Call a kernel capability (see capabilities.py) as this MAD."""
        return await self._kernel.use(capability, **kwargs)

    @property
    def store(self) -> OwnTables:
        """CRUD over this MAD's own storage tables (`<mad>_<table>`)."""
        return self._kernel.store

    def conversation_id(self, title: str | None = None) -> str:
        """The id of a conversation this MAD joined at start (the first one when title is None)."""
        if title is None and self.conversation_ids:
            return next(iter(self.conversation_ids.values()))
        if title in self.conversation_ids:
            return self.conversation_ids[title]
        raise NotFound(f"MAD {self.name!r} joined no conversation" if title is None
                       else f"MAD {self.name!r} did not join conversation {title!r}")

    @property
    def instance(self) -> str:
        """This eMAD's own name, `<role>-<n>` (never reused); "" for a persistent MAD."""
        return self._kernel.instance

    async def ask(self, mad: str, prose: str = "", *, tool: str = "", args: dict[str, Any] | None = None,
                  conversation_id: str = "") -> Any:
        """Ask another MAD (one of `talks_to`) over the bus: a tool call when `tool` is set, else prose."""
        return await self._kernel.ask(mad, prose=prose, tool=tool, args=args, conversation_id=conversation_id)

    # ---- eMADs (kernel/packs/emads/) -------------------------------------------------------------

    async def spawn(self, role: str, task: str, conversation_id: str = "") -> dict[str, Any]:
        """Run an instance of `role` (one of `spawns`) on `task` and wait for it: returns {"instance", "role",
        "conversation_id", "state": "reported" or "failed", "report"}. It works, and posts its report, in
        conversation `conversation_id` (one this MAD joined) or, when "", in a new one titled after the task.
        Spawns may run at once (asyncio.gather); past the role's `max_instances` they wait their turn."""
        return await self._kernel.spawn(role, task, conversation_id)

    async def earlier_reports(self, limit: int = 20) -> list[dict[str, Any]]:
        """For an eMAD: what earlier instances of its role reported, oldest first (the `limit` newest), each
        {"instance", "task", "state": "reported" or "failed", "report", "started_at", "ended_at"}; refused
        for a persistent MAD."""
        return await self._kernel.earlier_reports(limit)

    async def work(self, task: str) -> str:
        """An eMAD's task; what it returns is its report. Override it; by default the Thought Engine answers
        the task, told what the last five instances of its role reported."""
        earlier = [f"- {r['instance']} ({r['state']}) on {r['task'][:200]!r}: {r['report'][:500]}"
                   for r in await self.earlier_reports(5)]
        memory = "What earlier instances of your role reported:\n" + "\n".join(earlier) + "\n\n" if earlier else ""
        return await self.think(f"{memory}Your task: {task}")

    # ---- Thought Engine ----------------------------------------------------------------------

    async def think(self, prose: str, max_tokens: int = 256) -> str:
        """Send the imperator prompt and `prose` to this MAD's model alias; charged to this MAD."""
        prompt = f"{self.imperator_prompt.strip()}\n\n{prose}" if self.imperator_prompt.strip() else prose
        result = await self.use("models.send", model=self.imperator_model, prompt=prompt, max_tokens=max_tokens)
        return result["text"]

    # ---- Action Engine -----------------------------------------------------------------------

    async def call_tool(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run one of this MAD's tools with keyword arguments checked against its signature."""
        methods = self.tool_methods()
        if name not in methods:
            raise NotFound(f"MAD {self.name!r} has no tool {name!r}; it has {', '.join(methods) or 'none'}")
        args = dict(args or {})
        names, required = _parameters(methods[name])
        if not (args.keys() <= names and required <= args.keys()):  # the usual case checked cheaply, the rest by bind
            try:
                _signature(methods[name]).bind(self, **args)
            except TypeError as exc:
                raise InvalidArgument(f"{self.name}.{name}: {exc}") from None
        return await getattr(self, name)(**args)

    async def handle(self, envelope: dict[str, Any]) -> Any:
        """Deterministic requests (payload {"tool", "args"}) go to the tool; prose goes to think()."""
        payload = envelope.get("payload") or {}
        if isinstance(payload, dict) and payload.get("tool"):
            return await self.call_tool(str(payload["tool"]), payload.get("args") or {})
        return await self.think(str(envelope.get("content", "")))

    # ---- lifecycle hooks ---------------------------------------------------------------------

    async def on_start(self) -> None:
        """Called once when the MAD starts (after its tables and conversations exist); an eMAD's, before work()."""

    async def on_stop(self) -> None:
        """Called once at shutdown; an eMAD's, once its report is posted."""

    async def health(self) -> dict[str, Any]:
        """Override to report more; the runtime adds state and errors."""
        return {"ok": True}


# Read on every bus delivery: a class's tools and their signatures are fixed once it is defined.
@functools.cache
def _tool_methods(cls: type[Mad]) -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            if callable(value) and getattr(value, _TOOL_FLAG, False):
                found[attr] = value
    return found


_signature = functools.cache(inspect.signature)


@functools.cache
def _parameters(fn: Callable[..., Any]) -> tuple[frozenset[str], frozenset[str]]:
    """The keyword names a tool takes and those it requires (any name, when it takes **kwargs: bind decides)."""
    params = [p for p in list(_signature(fn).parameters.values())[1:] if p.kind is not p.VAR_POSITIONAL]
    if any(p.kind in (p.VAR_KEYWORD, p.POSITIONAL_ONLY) for p in params):
        return frozenset(), frozenset({"\0"})  # never the cheap path
    return frozenset(p.name for p in params), frozenset(p.name for p in params if p.default is p.empty)
