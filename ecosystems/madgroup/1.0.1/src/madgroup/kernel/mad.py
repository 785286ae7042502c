"""The MAD base class: a Thought Engine (imperator prompt + model alias) and an Action Engine (tools).

A generated MAD subclasses `Mad`, sets its class attributes, and decorates its tools with
`@tool`. The runtime instantiates it with itself, so `self.use(...)` reaches the kernel
capabilities and `self.ask(...)` reaches other MADs over the conversation bus.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from .db import TableStore
    from .runtime import Runtime

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


class Mad:
    """Base class of every MAD. Subclasses set the class attributes below."""

    name: ClassVar[str] = ""
    role: ClassVar[str] = ""
    level: ClassVar[str] = "V1"
    lifecycle: ClassVar[str] = "persistent"
    conversations: ClassVar[tuple[str, ...]] = ()
    talks_to: ClassVar[tuple[str, ...]] = ()
    secrets: ClassVar[tuple[str, ...]] = ()
    owns: ClassVar[tuple[str, ...]] = ()
    budget_tokens: ClassVar[int] = 100_000
    storage: ClassVar[tuple[dict[str, Any], ...]] = ()
    imperator_model: ClassVar[str] = "default"
    imperator_prompt: ClassVar[str] = ""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.conversation_ids: dict[str, str] = {}  # title -> id of the conversations it joined

    # ---- introspection -----------------------------------------------------------------------

    @classmethod
    def tool_methods(cls) -> dict[str, Callable[..., Any]]:
        """name -> unbound function of every @tool, in definition order (base classes first)."""
        found: dict[str, Callable[..., Any]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if callable(value) and getattr(value, _TOOL_FLAG, False):
                    found[attr] = value
        return found

    @classmethod
    def tool_signature(cls, name: str) -> inspect.Signature:
        """The tool's signature without `self`, annotations resolved to real types."""
        fn = cls.tool_methods()[name]
        hints = typing.get_type_hints(fn)
        sig = inspect.signature(fn)
        params = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in list(sig.parameters.values())[1:]
        ]
        return sig.replace(parameters=params, return_annotation=hints.get("return", sig.return_annotation))

    @classmethod
    def tools(cls) -> list[dict[str, Any]]:
        """Every tool: name, qualified name, description, parameters and return type (from inspect)."""
        out = []
        for name, fn in cls.tool_methods().items():
            sig = inspect.signature(fn)
            params = []
            for p in list(sig.parameters.values())[1:]:
                entry: dict[str, Any] = {"name": p.name, "type": _type_name(p.annotation)}
                if p.default is inspect.Parameter.empty:
                    entry["required"] = True
                else:
                    entry["required"] = False
                    entry["default"] = p.default
                params.append(entry)
            out.append(
                {
                    "name": name,
                    "qualified_name": f"{cls.name}.{name}",
                    "description": inspect.cleandoc(fn.__doc__ or ""),
                    "params": params,
                    "returns": _type_name(sig.return_annotation),
                }
            )
        return out

    # ---- kernel access -----------------------------------------------------------------------

    async def use(self, capability: str, **kwargs: Any) -> Any:
        """Call a kernel capability (see capabilities.py) as this MAD."""
        return await self.runtime.use(capability, caller=self.name, **kwargs)

    @property
    def store(self) -> TableStore:
        """CRUD over this MAD's own storage tables (`<mad>_<table>`)."""
        return self.runtime.table_store(self.name)

    def conversation_id(self, title: str | None = None) -> str:
        """The id of a conversation this MAD joined at start (the first one when title is None)."""
        if title is None:
            if not self.conversation_ids:
                raise NotFound(f"MAD {self.name!r} joined no conversation")
            return next(iter(self.conversation_ids.values()))
        try:
            return self.conversation_ids[title]
        except KeyError:
            raise NotFound(f"MAD {self.name!r} did not join conversation {title!r}") from None

    async def ask(
        self,
        mad: str,
        prose: str = "",
        *,
        tool: str = "",
        args: dict[str, Any] | None = None,
        conversation_id: str = "",
    ) -> Any:
        """Ask another MAD (one of `talks_to`) over the bus: a tool call when `tool` is set, else prose."""
        return await self.runtime.request(self.name, mad, prose=prose, tool=tool, args=args, conversation_id=conversation_id)

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
        sig = inspect.signature(methods[name])
        try:
            sig.bind(self, **args)
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
        """Called once when the MAD starts (after its tables and conversations exist)."""

    async def on_stop(self) -> None:
        """Called once at shutdown."""

    async def health(self) -> dict[str, Any]:
        """Override to report more; the runtime adds state and errors."""
        return {"ok": True}
