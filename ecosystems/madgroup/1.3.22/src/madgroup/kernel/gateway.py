"""The HTTP face of the ecosystem: the MCP gateway at /mcp, /healthz and /metrics, the security headers on every
response, and Grace's web console at / when the build has the console pack (packs/console/).

- One `MCPServer` (mcp SDK 2.x) over streamable HTTP exposes every MAD tool as `<mad>.<tool>`
  with the tool's real parameter schema and an outputSchema (a tool bound to a kernel capability:
  the capability's shape, `kernel/capabilities.py`); a call dispatches to the MAD method through
  `Runtime.invoke_tool` with principal "client:<token-name>".
- /mcp requires `Authorization: Bearer <token>` of a client that is not revoked (`kernel/clients.py`,
  re-read on every request); otherwise 401. Every tools/call is then admitted for its client
  (`allow` patterns, rate limit, daily quota), its arguments are checked strictly against the
  schema tools/list advertises, and it is logged with client, tool, correlation id, outcome and
  duration (a JSON log line and a `gateway_calls` row; the result's `_meta` carries the
  correlation id). Every denial is written to the hash-chained audit log (`kernel/audit.py`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import ConfigDict, PrivateAttr, ValidationError, create_model
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import logs, packs, tracing
from .capabilities import CAPABILITIES
from .clients import CallLedger, Client, ClientRegistry, Rate, RateLimiter
from .errors import KernelError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import LOOPBACK, scrape_allowed
from .runtime import Runtime

log = logs.get("gateway")

CLIENT_SCOPE_KEY = "regen.client"


CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on form POSTs.
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "permissions-policy": "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), "
                          "payment=(), usb=()",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


class GatewayAudit:
    """Gateway denials, written to the ecosystem's hash-chained audit log as `gateway.<event>`."""

    def __init__(self, runtime: Runtime):
        self.audit = runtime.audit

    def record(self, client: str, event: str, detail: str = "", remote: str = "") -> None:
        self.audit.append(client, f"gateway.{event}", "mcp", False, detail, remote=remote)
        log.warning("gateway denial", extra={"client": client, "event": event, "detail": detail, "remote": remote})


def watching(send: Send, seen: Callable[[dict], None]) -> Send:
    """`send`, telling `seen` the http.response.start message (status, headers) on its way out."""
    async def watched(message) -> None:
        if message["type"] == "http.response.start":
            seen(message)
        await send(message)

    return watched


def refusal(status: int, error: str, message: str, headers: dict[str, str] | None = None,
            jsonrpc: bool = False) -> Response:
    """An HTTP refusal: `{"error", "message"}`, the kernel's error shape, or (`jsonrpc`) a JSON-RPC error body
    with the message, which an MCP client shows."""
    body = ({"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": message}} if jsonrpc
            else {"error": error, "message": message})
    return JSONResponse(body, status_code=status, headers=headers)


def retry_after(wait: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(wait)))}


# What the MCP layer refuses before a tool runs, by status: audited like a tool's refusal.
BAD_REQUESTS = {400: "malformed request", 406: "unacceptable Accept header", 413: "body over the size limit",
                415: "not JSON"}


PROTECTED_RESOURCE_PATH = "/.well-known/oauth-protected-resource"


def _origin(scope: Scope) -> str:
    """scheme://host[:port] as the client addressed this server (its Host header)."""
    host = Headers(scope=scope).get("host") or "{}:{}".format(*(scope.get("server") or ("127.0.0.1", 80)))
    return f"{scope.get('scheme', 'http')}://{host}"


def _remote(scope: Scope) -> str:
    """host:port of the peer of a request."""
    peer = scope.get("client") or ("", 0)
    return f"{peer[0]}:{peer[1]}"


def protected_resource(request: Request, name: str) -> Response:
    """RFC 9728 metadata for /mcp: a bearer token in the Authorization header, and no authorization server.
    A client that discovers it learns there is no OAuth flow to start: it sends the token it was given."""
    origin = _origin(request.scope)
    return JSONResponse({
        "resource": origin + "/mcp",
        "resource_name": f"{name} MCP gateway",
        "bearer_methods_supported": ["header"],
        "authorization_servers": [],
        "resource_documentation": origin + "/",
    }, headers={"Cache-Control": "max-age=3600"})


class Unauthenticated:
    """Requests without a valid token, per source address: throttled (the clients' token bucket: bursts of
    20, then 5 a second), and audited coalesced: the first refusal of a source in each `interval_s` is an
    audit row, the others of that interval are counted into the next row ("and N more").
    A flood of bad tokens costs the server a counter increment, not an fsynced row each."""

    RATE = Rate(calls=20, seconds=4.0, unit="second")
    interval_s, max_sources, clock = 60.0, 10_000, staticmethod(time.monotonic)

    def __init__(self, audit: GatewayAudit):
        self.audit = audit
        self.limiter = RateLimiter(self.clock, max_keys=self.max_sources)
        self._open: dict[str, tuple[float, int]] = {}  # source -> (interval start, refusals not yet written)

    def refused(self, source: str, actor: str, event: str, detail: str, remote: str) -> None:
        """Audit a refusal: at once if it opens an interval for its source, else counted into the next row."""
        now = self.clock()
        start, pending = self._open.get(source, (None, 0))
        if start is not None and now - start < self.interval_s:
            self._open[source] = (start, pending + 1)
            return
        more = f"; and {pending} more from {source} in the {self.interval_s:g} s before" if pending else ""
        if len(self._open) > self.max_sources:
            self._open.clear()
        self._open[source] = (now, 0)
        self.audit.record(actor, event, detail + more, remote)

    def flush(self) -> None:
        """Write the counts still pending (at shutdown)."""
        for source, (_, pending) in sorted(self._open.items()):
            if pending:
                self.audit.record("anonymous", "unauthorized", f"{pending} more refused requests from {source}", source)
        self._open.clear()


class BearerGate:
    """ASGI wrapper: only requests bearing the token of a current (not revoked) client reach the MCP app.

    The registry is asked on every request (it re-reads tokens.json when the file changes), so a
    revocation also shuts out sessions that are already open.
    """

    def __init__(self, app: Any, server: GatewayServer, sessions: SessionLimits):
        self.app, self.server, self.sessions = app, server, sessions
        self.clients, self.audit = server.clients, server.audit
        self.unauthenticated = Unauthenticated(server.audit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        found, refused = self._identify(scope, headers.get("authorization", ""))
        opening = scope["method"] == "POST" and "mcp-session-id" not in headers
        if refused is None and opening:
            refused = self._refuse_opening(found, _remote(scope))
            send = self.sessions.recording(found.name, send)
        if refused is not None:
            return await refused(scope, receive, send)
        status = [0]
        scope[CLIENT_SCOPE_KEY] = found.name  # in place: the access log (`observed`) names the client too
        await self.app(scope, receive, watching(send, lambda start: status.__setitem__(0, start["status"])))
        if status[0] in BAD_REQUESTS:  # refused by the MCP layer before any tool: still the client's doing
            self.audit.record(f"client:{found.name}", "bad-request",
                              f"HTTP {status[0]} ({BAD_REQUESTS[status[0]]}) on {scope['method']} /mcp", _remote(scope))

    def _identify(self, scope: Scope, header: str) -> tuple[Client | None, Response | None]:
        """(the current client the Authorization header names, None) or (None, the refusal to answer with)."""
        scheme, _, token = header.partition(" ")
        try:
            found = self.clients.identify(token.strip()) if scheme.lower() == "bearer" else None
        except KernelError as exc:  # tokens.json unreadable: refuse everyone rather than guess
            log.error("client registry unreadable", extra={"error": str(exc)})
            return None, refusal(503, "unavailable", "the gateway cannot read its clients; see the server log")
        if found is not None and not found.revoked:
            return found, None
        source, remote = str((scope.get("client") or ("",))[0]), _remote(scope)
        if wait := self.unauthenticated.limiter.take(source, Unauthenticated.RATE):
            # Too many refused requests from this address: answered without looking further or writing.
            self.unauthenticated.refused(source, "anonymous", "unauthorized", "throttled", remote)
            message = f"too many requests without a valid token from this address; retry in {max(wait, 0.1):.1f} s"
            return None, refusal(429, "rate_limited", message, retry_after(wait))
        if found is None:
            actor, event, message = "anonymous", "unauthorized", "a valid 'Authorization: Bearer <token>' header is required"
            detail = "missing bearer token" if not header else "invalid bearer token"
        else:
            actor, event, message = f"client:{found.name}", "revoked", "this token was revoked; ask the operator for a new one"
            detail = f"token of client {found.name!r}, revoked at {found.revoked_at}"
        self.unauthenticated.refused(source, actor, event, detail, remote)
        metadata = _origin(scope) + PROTECTED_RESOURCE_PATH + "/mcp"
        return None, refusal(401, "unauthorized", message,
                             {"WWW-Authenticate": f'Bearer realm="mcp", resource_metadata="{metadata}"'})

    def _refuse_opening(self, client: Client, remote: str) -> Response | None:
        """A new session counts against the client's rate limit, and its open sessions against their cap."""
        if wait := self.server.throttled(client, remote, "initialize", "opens sessions too fast"):
            return refusal(429, "rate_limited", wait[1], retry_after(wait[0]), jsonrpc=True)
        if cap := self.sessions.full(client.name):
            message = (f"too_many_sessions: client {client.name!r} has {cap} sessions open, its cap; close one "
                       f"(DELETE /mcp) or let one idle out ({self.sessions.idle_s:g} s)")
            self.audit.record(f"client:{client.name}", "sessions-exhausted", message, remote)
            return refusal(429, "too_many_sessions", message, {"Retry-After": "30"}, jsonrpc=True)
        return None


class SessionLimits:
    """Open MCP sessions per client: at most `per_client` each, idle ones closed after `idle_s` (by the SDK).

    The session manager knows its sessions, not whose they are: the id each new session is given is
    read off its opening response and remembered with the client; a session the manager no longer
    holds (closed, idled out) stops counting."""

    def __init__(self, manager: Any, per_client: int = 16, idle_s: float = 30 * 60):
        self.manager, self.per_client, self.idle_s = manager, per_client, idle_s
        manager.session_idle_timeout = idle_s  # the SDK closes a session idle this long
        self._owner: dict[str, str] = {}

    def count(self) -> int:
        """Every open session, whoever holds it."""
        return len(getattr(self.manager, "_server_instances", {}) or {})

    def full(self, client: str) -> int:
        """The cap when `client` has reached it, else 0."""
        live = getattr(self.manager, "_server_instances", {})
        self._owner = {sid: who for sid, who in self._owner.items() if sid in live}  # closed ones stop counting
        held = sum(1 for who in self._owner.values() if who == client)
        return self.per_client if held >= self.per_client else 0

    def recording(self, client: str, send: Send) -> Send:
        def remember(start: dict) -> None:
            if session := Headers(raw=start.get("headers", [])).get("mcp-session-id"):
                self._owner[session] = client

        return watching(send, remember)


def _caller(ctx: Context | None) -> tuple[str | None, str]:
    """(client name set by BearerGate or None, "host:port" of the peer) of an MCP request."""
    try:
        request = getattr(ctx.request_context, "request", None) if ctx is not None else None
    except ValueError:  # a Context outside a request
        request = None
    scope = getattr(request, "scope", None)
    if not isinstance(scope, dict):
        return None, ""
    return scope.get(CLIENT_SCOPE_KEY), _remote(scope)


class _Failed(ToolError):
    """A call that failed with `outcome` (what the call log records; the message starts with it): refused by the
    gateway before it runs, or a MAD's KernelError on its way through the SDK's tool wrapper, keeping its code."""

    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome


CORRELATION_META_KEY = "regen/correlation_id"

_JSON_TYPES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "array": "an array", "object": "an object", "null": "null"}


def _expected(schema: dict[str, Any]) -> str:
    """What a JSON schema asks for, in words: 'an integer', 'an array of strings', 'a string or null'."""
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(_expected(s) for s in schema[key])
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    items = schema.get("items")
    if kind == "array" and isinstance(items, dict) and items.get("type") in _JSON_TYPES.keys() - {"null"}:
        return f"an array of {items['type']}s"  # strings, integers, booleans, arrays...
    return _JSON_TYPES.get(str(kind), "a value of another kind")


# What a value parsed from JSON is, in words (the types json.loads makes).
_KINDS = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
          dict: "an object"}


def describe_invalid(tool: str, schema: dict[str, Any], error: ValidationError) -> str:
    """A validation error of the SDK's argument model as one line naming the tool, each argument and what it
    expects; argument values are never echoed (they may be secrets)."""
    props: dict[str, Any] = schema.get("properties", {})
    problems = []
    for err in error.errors(include_url=False):
        loc = err["loc"]
        arg = str(loc[0]) if loc else ""
        where = arg + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        sub: dict[str, Any] = props.get(arg, {})
        for part in loc[1:]:  # walk into arrays and objects for nested problems
            sub = sub.get("items", {}) if isinstance(part, int) else sub.get("properties", {}).get(str(part), {})
        kind = err["type"]
        if kind == "missing":
            problems.append(f"argument '{where}' is required ({_expected(sub)})")
        elif kind == "extra_forbidden":
            problems.append(f"'{where}' is not an argument of {tool}; it takes: {', '.join(props) or 'no arguments'}")
        elif sub and (kind.endswith("_type") or kind.endswith("_parsing") or kind == "int_from_float"):
            given = type(err.get("input"))
            problems.append(f"argument '{where}' must be {_expected(sub)}, not {_KINDS.get(given, given.__name__)}")
        else:
            problems.append(f"argument '{where}': {err['msg']}")
    return f"invalid_argument: {tool}: " + "; ".join(problems)


def _explain(tool: str, exc: ToolError, schema: dict[str, Any]) -> tuple[str, str]:
    """(outcome, message) for a ToolError out of the SDK's call of a tool."""
    cause = exc.__cause__
    # First: a crash is the server's fault even when what crashed was a pydantic model inside the tool
    # (the SDK raises a plain ToolError only for arguments that fail the input schema).
    if isinstance(exc, UnexpectedToolError):  # the traceback is in the log; the caller gets no internals
        return "internal_error", f"internal_error: {tool} failed unexpectedly; the server log has the details"
    if isinstance(cause, ValidationError):
        return "invalid", describe_invalid(tool, schema, cause)
    if isinstance(cause, _Failed):
        return cause.outcome, str(cause)
    return "error", str(exc)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _until_utc_midnight() -> str:
    left = 86400 - int(time.time()) % 86400
    return f"{left // 3600} h {left % 3600 // 60} min"


class GatewayServer(MCPServer):
    """The gateway's MCP server. Every tools/call, whatever the tool, goes through `call_tool`:

    1. admission for the client BearerGate identified: its `allow` patterns, its rate limit (token
       bucket) and its daily quota; a refusal is audited;
    2. the SDK's call of the tool, whose argument model is strict (see `_strict_tool`);
    3. a JSON log line and a `gateway_calls` row: client, tool, correlation id, outcome, duration.
    Errors come back as MCP tool errors (isError) whose text starts with a code (access_denied,
    rate_limited, quota_exceeded, unknown_tool, invalid_argument, a MAD's error code, internal_error)
    and ends with the correlation id; a successful result carries it in `_meta`.
    """

    def __init__(self, runtime: Runtime, clients: ClientRegistry, audit: GatewayAudit, tools: list[Tool], **kwargs: Any):
        super().__init__(tools=tools, **kwargs)
        self.clients, self.audit, self.metrics = clients, audit, runtime.metrics
        self.ledger, self.limiter = CallLedger(runtime.db), RateLimiter()
        self.schemas = {t.name: t.parameters for t in tools}

    async def _handle_list_tools(self, ctx: Any, params: Any) -> Any:
        """tools/list lists only what the calling client may call (the SDK's own handler lists every tool), and
        counts against the client's rate limit like a call."""
        client, remote = _caller(Context(request_context=ctx, mcp_server=self))
        record = self.clients.get(client) if client else None
        if record is not None and (wait := self.throttled(record, remote, "tools/list", "lists tools too fast")):
            raise MCPError(code=-32000, message=wait[1])
        listed = await super()._handle_list_tools(ctx, params)
        listed.tools = [t for t in listed.tools if record is not None and record.may_call(t.name)]
        return listed

    def throttled(self, client: Client, remote: str, what: str, doing: str) -> tuple[float, str] | None:
        """None when `client` may go on under its rate limit; else (seconds to wait, the rate_limited message),
        the refusal audited as being of `what` (initialize, tools/list, the tool)."""
        wait = self.limiter.take(client.name, client.rate) if client.rate is not None else 0.0
        if not wait:
            return None
        message = f"rate_limited: client {client.name!r} {doing}; retry in {max(wait, 0.1):.1f} s"
        self.audit.record(f"client:{client.name}", "rate-limited", f"{what}: {message}", remote)
        return wait, message

    def _admit(self, client: str | None, tool: str, remote: str) -> None:
        if client is None:  # BearerGate sets the client on every request that gets here
            self.audit.record("anonymous", "no-identity", tool, remote)
            raise _Failed("denied", "access_denied: no authenticated client")
        record = self.clients.get(client)
        if record is None or not record.may_call(tool):
            self.audit.record(f"client:{client}", "tool-denied", tool, remote)
            why = "is revoked" if record is None or record.revoked else f"may not call {tool} (it may call: {', '.join(record.allow)})"
            raise _Failed("denied", f"access_denied: client {client!r} {why}")
        if record.rate is not None and (wait := self.throttled(
                record, remote, tool, f"may make {_plural(record.rate.calls, 'call')} per {record.rate.unit}")):
            raise _Failed("rate_limited", wait[1])
        if record.quota is not None and not self.ledger.take_quota(client, record.quota):
            message = (f"quota_exceeded: client {client!r} has made its {_plural(record.quota, 'call')} for today; "
                       f"the quota resets at 00:00 UTC (in {_until_utc_midnight()})")
            self.audit.record(f"client:{client}", "quota-exceeded", f"{tool}: {message}", remote)
            raise _Failed("quota_exceeded", message)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:
        client, remote = _caller(context)
        cid = logs.new_id()
        t0 = time.perf_counter()
        outcome, counted, detail = "ok", False, ""
        with logs.bound((logs.correlation_id, cid), (logs.principal, f"client:{client}" if client else "")):
            span = tracing.start(f"tools/call {name}" if name in self.schemas else "tools/call", {
                "regen.correlation_id": cid, "regen.client": client or "anonymous", "regen.tool": name,
                "regen.mad": name.partition(".")[0] if name in self.schemas else "", "mcp.method.name": "tools/call",
            }, kind="server") if tracing.tracer is not None else tracing.OFF  # the parent of the MAD's spans
            try:
                self._admit(client, name, remote)
                counted = True  # from here on the call counts against the client's quota
                if name not in self.schemas:
                    raise _Failed("unknown_tool", f"unknown_tool: there is no tool {name!r}; tools are named "
                                                  "<mad>.<tool> and tools/list lists them")
                result = await super().call_tool(name, arguments, context)
            except _Failed as exc:
                outcome, detail = exc.outcome, str(exc)
                self.metrics.tool_call(*name.partition(".")[::2], exc.outcome)  # refused before reaching the MAD
            except ToolError as exc:
                outcome, detail = _explain(name, exc, self.schemas.get(name, {}))
                if outcome == "invalid":  # a client probing a tool's arguments: the message names them, never a value
                    self.audit.record(f"client:{client}", "invalid-argument", f"{name}: {detail}", remote)
            except MCPError as exc:
                outcome, detail = "protocol_error", str(exc)
                raise
            except BaseException as exc:  # cancelled (the client went away), or a fault outside the tool: recorded
                outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else "internal_error"
                detail = f"{outcome}: {type(exc).__name__}"
                raise
            finally:
                span.end(outcome, detail)
                ms = (time.perf_counter() - t0) * 1000
                self.ledger.record(client or "anonymous", name, cid, outcome, counted, ms, detail)
                log.info("gateway call", extra={"client": client or "anonymous", "tool": name, "outcome": outcome,
                                                "ms": round(ms, 1), **({"error": detail} if detail else {})})
        if outcome != "ok":
            raise ToolError(f"{detail} (correlation id {cid})")
        if isinstance(result, CallToolResult):
            result.meta = {**(result.meta or {}), CORRELATION_META_KEY: cid}
        return result


# A bare `dict` or `list` return annotation the SDK takes for a class without fields, and publishes no
# outputSchema (nor structuredContent) for: they mean `dict[str, Any]` and `list[Any]`.
_BARE_CONTAINERS = {dict: dict[str, Any], list: list[Any]}


def _make_tool(runtime: Runtime, mad_cls: Any, tool_name: str, output: Any = None):
    """An async function with the MAD tool's signature (plus the MCP context) that runs it for the calling client.

    Its return annotation is `output` when given (the shape of the kernel capability the tool is bound to,
    which is what it returns whatever its own annotation says), else the tool's own (see `_BARE_CONTAINERS`)."""
    qualified = f"{mad_cls.name}.{tool_name}"
    sig = mad_cls.tool_signature(tool_name)
    returns = output if output is not None else sig.return_annotation
    returns = _BARE_CONTAINERS.get(returns, returns) if isinstance(returns, type) else returns

    async def call(mcp_context: Context, **kwargs: Any) -> Any:
        client, _ = _caller(mcp_context)  # admitted by GatewayServer.call_tool
        try:
            return await runtime.invoke_tool(mad_cls.name, tool_name, kwargs, principal=f"client:{client}")
        except KernelError as exc:
            raise _Failed(exc.code, f"{exc.code}: {exc}") from exc

    params = [inspect.Parameter("mcp_context", inspect.Parameter.KEYWORD_ONLY, annotation=Context)]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()]
    call.__signature__ = sig.replace(parameters=params, return_annotation=returns)  # type: ignore[attr-defined]
    call.__name__ = f"{mad_cls.name}_{tool_name}"
    call.__qualname__ = call.__name__
    call.__doc__ = inspect.getdoc(mad_cls.tool_methods()[tool_name]) or qualified
    return call


class _OutputMismatch(Exception):
    """A tool's result does not fit its outputSchema: the server's fault, never the caller's."""


class _CheckedOutput(FuncMetadata):
    """The SDK's tool metadata, logging why a result does not fit the tool's outputSchema when the SDK's check
    fails. The call then fails as internal_error (not as the caller's invalid_argument, which a ValidationError
    would read as); the log names the fields, never their values."""

    _tool: str = PrivateAttr(default="")

    def convert_result(self, result: Any) -> Any:
        try:
            return super().convert_result(result)
        except ValidationError as exc:
            problems = ["/".join(map(str, e["loc"])) + ": " + e["msg"] for e in exc.errors(include_input=False)]
            log.error("tool result does not fit its outputSchema", extra={"tool": self._tool, "problems": problems[:20]})
            raise _OutputMismatch(f"{self._tool}: the result does not fit its outputSchema") from None


def _strict_tool(fn: Any, name: str, hints: dict[str, bool] | None = None) -> Tool:
    """The SDK's Tool for `fn` with a strict argument model: no coercion ("5" is not an integer, true is
    not 1) and no unknown arguments, so a call is checked against exactly the schema tools/list
    advertises, which says so (`additionalProperties: false`). The SDK's own model is lax and
    silently drops unknown arguments.

    Every tool has an outputSchema too, and every successful call a structuredContent the SDK has checked
    against it (the MCP spec requires both together). The SDK derives the schema from `fn`'s return
    annotation; for one it cannot describe (none, `Any`, a class without fields) the result goes out
    wrapped as the SDK wraps a list, `{"result": <any JSON value>}`."""
    tool = Tool.from_function(fn, name=name, description=fn.__doc__, context_kwarg="mcp_context",
                              annotations=ToolAnnotations(**hints) if hints else None)
    meta = tool.fn_metadata
    lax = meta.arg_model
    strict = type(lax.__name__, (lax,), {"__module__": lax.__module__, "model_config": ConfigDict(strict=True, extra="forbid")})
    anything = meta.output_schema is None  # then the schema is derived from the wrapping model
    tool.fn_metadata = _CheckedOutput(
        arg_model=strict, output_schema=meta.output_schema, wrap_output=anything or meta.wrap_output,
        output_model=create_model(f"{fn.__name__}Output", result=(Any, ...)) if anything else meta.output_model)
    tool.fn_metadata._tool = name
    tool.parameters = strict.model_json_schema(by_alias=True)
    return tool


def build_mcp(runtime: Runtime, clients: ClientRegistry, audit: GatewayAudit) -> GatewayServer:
    cfg = runtime.config
    runtime.secrets.client_scope = clients.secret_scope  # a client's --secret patterns, over MCP and in Grace alike
    # A tool bound to a kernel capability returns what the capability does: its outputSchema is the capability's shape.
    bound = {tool: CAPABILITIES[cap].output for cap, tool in cfg.capability_tools.items() if cap in CAPABILITIES}
    tools = [_strict_tool(_make_tool(runtime, mad_cls, tool_name, bound.get(f"{mad_cls.name}.{tool_name}")),
                          f"{mad_cls.name}.{tool_name}", cfg.tool_hints.get(f"{mad_cls.name}.{tool_name}"))
             for mad_cls in cfg.persistent_mads for tool_name in mad_cls.tool_methods()]
    return GatewayServer(runtime, clients, audit, tools, name=cfg.name, description=cfg.description or None,
                         instructions=f"The {cfg.name} ecosystem. Tools are named <mad>.<tool>.",
                         version=runtime.version, log_level="WARNING")


def _security(host: str) -> TransportSecuritySettings:
    if host not in LOOPBACK:  # bearer tokens are the guard; Host checks would break proxies
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=[f"http://{h}" for h in hosts])


class DrainGate:
    """Every HTTP request in flight, counted, so a graceful shutdown can let each response finish; once
    draining, new requests get 503 with Retry-After (except /healthz, which says "draining" itself).

    MCP's standing GET stream (server-to-client notifications) is not a response to wait for: it is
    not counted, and closed with the connections."""

    RETRY_AFTER_S = 5

    def __init__(self) -> None:
        self.draining, self.in_flight = False, 0

    def begin(self) -> None:
        self.draining = True

    async def wait_idle(self, deadline: float) -> bool:
        """Wait until no counted request is in flight, or `deadline` (time.monotonic()); True if idle."""
        while self.in_flight and time.monotonic() < deadline:  # a shutdown can afford to poll
            await asyncio.sleep(0.02)
        return self.in_flight == 0

    def middleware(self, app: ASGIApp) -> ASGIApp:
        return functools.partial(self._gated, app)

    async def _gated(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if self.draining and scope["path"] != "/healthz":
            message = (f"unavailable: the ecosystem is shutting down; retry after {self.RETRY_AFTER_S} s "
                       "(on another instance, or this one once restarted)")
            # Read the request first: a socket closed with unread data is reset, and the reset can
            # overtake the 503 on its way to the client (which then sees a dropped connection).
            read, more = 0, True
            while more and read < 1 << 20:
                received = await receive()
                read += len(received.get("body", b""))
                more = received.get("more_body", False) and received["type"] == "http.request"
            headers = {"Retry-After": str(self.RETRY_AFTER_S), "Connection": "close"}
            # An MCP client shows a JSON-RPC error's message; anything else gets the kernel's error shape.
            mcp = scope["path"].rstrip("/") == "/mcp"
            return await refusal(503, "unavailable", message, headers, jsonrpc=mcp)(scope, receive, send)
        if scope["method"] == "GET" and scope["path"].rstrip("/") == "/mcp":  # the standing stream: not counted
            return await app(scope, receive, send)
        self.in_flight += 1
        try:
            await app(scope, receive, send)
        finally:
            self.in_flight -= 1


_access = logs.get("access")


def observed(app: ASGIApp, runtime: Runtime) -> ASGIApp:
    """ASGI middleware: the security headers on every HTTP response that does not set its own, and one
    access-log line and one `regen_http_requests` count per HTTP request.

    The line has the method, the path (never the query: a token could ride in it), the status, the
    time taken and the peer; the MCP client's name when the bearer gate identified one."""
    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started = time.monotonic()
        status = [0]
        hsts = {"strict-transport-security": "max-age=31536000"} if scope.get("scheme") == "https" else {}

        def seen(start: dict) -> None:
            status[0] = start["status"]
            start.setdefault("headers", [])  # ASGI allows leaving them out
            headers = MutableHeaders(scope=start)  # edits the message's own header list
            for name, value in {**SECURITY_HEADERS, **hsts}.items():
                headers.setdefault(name, value)

        try:
            await app(scope, receive, watching(send, seen))
        finally:
            code = status[0] or 500  # no response begun: the server failed it
            runtime.metrics.http_request(scope["path"], code)
            _access.info("http", extra={"method": scope["method"], "path": scope["path"][:200], "status": code,
                                        "ms": round((time.monotonic() - started) * 1000, 1), "remote": _remote(scope),
                                        **({"client": scope[CLIENT_SCOPE_KEY]} if CLIENT_SCOPE_KEY in scope else {})})

    return logged


CALL_RETENTION_DAYS = 90

NO_CONSOLE = ("this ecosystem has no web console: add `console: {}` under `packs:` in spec/ecosystem.yaml and "
              "rebuild (nox -s regenerate). MCP clients connect at /mcp; /healthz and /metrics answer as usual.\n")
NO_CONSOLE_ROUTES: list[BaseRoute] = [Route("/", lambda _: PlainTextResponse(NO_CONSOLE, 404), methods=["GET"])]


def console(runtime: Runtime, tokens: ClientRegistry) -> Any:
    """Grace's web console (packs/console/) when the spec names it (`packs: {console: {}}`, which the config
    carries as its settings); None when it does not. Named but missing from the build is an error."""
    if "console" not in runtime.config.pack_settings:
        return None
    missing = ("the spec names the console pack, but this build has no copy of it (packs/console/): rebuild "
               "with `nox -s regenerate`")
    return packs.module("console", missing, KernelError).Grace(runtime, tokens)


def build_app(runtime: Runtime, tokens: ClientRegistry, host: str = "127.0.0.1",
              call_retention_days: int = CALL_RETENTION_DAYS, sessions_per_client: int = 16,
              session_idle_s: float = 30 * 60, max_sessions: int = 1000) -> Starlette:
    """The Starlette app; its lifespan starts the runtime (MADs) and the MCP session manager, and keeps
    `gateway_calls` to its last `call_retention_days` days (0: for ever), pruned at start and hourly."""
    audit = GatewayAudit(runtime)
    mcp = build_mcp(runtime, tokens, audit)
    mcp.streamable_http_app(streamable_http_path="/mcp", host=host, transport_security=_security(host))
    session_manager = mcp.session_manager
    session_manager.max_sessions = max_sessions  # all clients together; the SDK answers 503 beyond it
    sessions = SessionLimits(session_manager, sessions_per_client, session_idle_s)
    mcp_asgi = BearerGate(StreamableHTTPASGIApp(session_manager), mcp, sessions)

    grace = console(runtime, tokens)  # the web UI (sign-in, chat, conversations, MADs, health, audit), or None
    gate = DrainGate()
    # Only the session manager knows its sessions (a private table of the SDK's; 0 if that ever moves).
    runtime.metrics.watch("regen_mcp_sessions_open", "MCP sessions open now", sessions.count)

    async def healthz(request: Request) -> Response:
        try:
            status = await runtime.ecosystem_status("grace")
        except Exception:
            log.exception("health check failed")
            return JSONResponse({"status": "error"}, status_code=503)
        open_sessions = sessions.count()
        if open_sessions >= max_sessions and status["healthy"]:  # no new MCP client could connect
            status = {**status, "status": "degraded", "healthy": False}
        body = {"status": status["status"], "mcp_sessions": {"open": open_sessions, "max": max_sessions},
                "name": status["name"], "uptime_s": status["uptime_s"], "database": status["database"],
                # per MAD: state, ok, breaker, failures, restarts, in_flight, leaked, last_error (kernel/supervisor.py);
                # not what a MAD's own health() hook says: this route is unauthenticated
                "mads": {m["name"]: {k: v for k, v in m.items() if k not in ("name", "health")} for m in status["mads"]}}
        return Response(json.dumps(body), status_code=200 if status["healthy"] else 503, media_type="application/json")

    metrics_env = f"{runtime.config.env_prefix}_METRICS_TOKEN"
    metrics_token = os.environ.get(metrics_env, "")

    async def metrics(request: Request) -> Response:
        if not scrape_allowed(request.headers.get("authorization", ""), host, metrics_token):
            message = (f"/metrics needs 'Authorization: Bearer <token>' with the value of {metrics_env}" if metrics_token else
                       f"/metrics is closed on a non-loopback address until {metrics_env} is set; scrape with it as bearer token")
            return refusal(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="metrics"'})
        return Response(runtime.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def prune_calls() -> None:
        while call_retention_days > 0:
            try:
                if gone := mcp.ledger.prune(call_retention_days):
                    log.info("gateway calls pruned", extra={"rows": gone, "keep_days": call_retention_days})
            except Exception:  # a busy or broken database: try again within the hour
                log.exception("pruning gateway calls failed")
            await asyncio.sleep(3600)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await runtime.start()
        pruning = asyncio.create_task(prune_calls())
        try:
            async with session_manager.run():
                yield
        finally:
            pruning.cancel()
            mcp_asgi.unauthenticated.flush()
            mcp.ledger.close()
            await runtime.stop()

    app = Starlette(
        routes=[
            *(grace.routes() if grace else NO_CONSOLE_ROUTES),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/mcp", mcp_asgi),
            # Both forms: RFC 9728's (the resource's path appended) and the bare one some clients probe.
            Route(PROTECTED_RESOURCE_PATH + "/mcp", lambda r: protected_resource(r, runtime.config.name), methods=["GET"]),
            Route(PROTECTED_RESOURCE_PATH, lambda r: protected_resource(r, runtime.config.name), methods=["GET"]),
        ],
        # Logged, and CSP, nosniff, frame and referrer rules on every response; then the drain gate (once
        # shutting down, nothing behind it runs).
        middleware=[Middleware(observed, runtime), Middleware(gate.middleware)],
        lifespan=lifespan,
    )
    for key, value in dict(gate=gate, grace=grace, runtime=runtime, audit=audit, mcp=mcp, tokens=tokens).items():
        setattr(app.state, key, value)
    return app
