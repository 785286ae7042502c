"""The HTTP face of the ecosystem: the MCP gateway at /mcp, Grace's page at /, and /healthz.

- One `MCPServer` (mcp SDK 2.x) over streamable HTTP exposes every MAD tool as `<mad>.<tool>`
  with the tool's real parameter schema; a call dispatches to the MAD method through
  `Runtime.invoke_tool` with principal "client:<token-name>".
- /mcp requires `Authorization: Bearer <token>`; a missing or wrong token gets 401, and a
  token whose `allow` patterns do not cover a tool gets a tool error. Every denial is
  written to the append-only `gateway_audit` table and logged.
"""

from __future__ import annotations

import inspect
import json
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import logs
from .bus import now_iso
from .errors import KernelError
from .grace import render_index
from .runtime import Runtime
from .tokens import TokenStore

log = logs.get("gateway")

CLIENT_SCOPE_KEY = "regen.client"

_AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    client TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    remote TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS gateway_audit_no_update BEFORE UPDATE ON gateway_audit
BEGIN SELECT RAISE(ABORT, 'gateway_audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS gateway_audit_no_delete BEFORE DELETE ON gateway_audit
BEGIN SELECT RAISE(ABORT, 'gateway_audit is append-only'); END;
"""

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class GatewayAudit:
    def __init__(self, runtime: Runtime):
        self.db = runtime.db
        self.db.script(_AUDIT_SCHEMA)

    def record(self, client: str, event: str, detail: str = "", remote: str = "") -> None:
        self.db.execute(
            "INSERT INTO gateway_audit (ts, client, event, detail, remote) VALUES (?, ?, ?, ?, ?)",
            (now_iso(), client, event, detail[:500], remote),
        )
        log.warning("gateway denial", extra={"client": client, "event": event, "detail": detail, "remote": remote})

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.db.query("SELECT * FROM gateway_audit ORDER BY id DESC LIMIT ?", (limit,))


class BearerGate:
    """ASGI wrapper: only requests with a valid bearer token reach the MCP app."""

    def __init__(self, app: Any, tokens: TokenStore, audit: GatewayAudit):
        self.app = app
        self.tokens = tokens
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = ""
        for key, value in scope.get("headers", []):
            if key.lower() == b"authorization":
                header = value.decode("latin-1")
        scheme, _, token = header.partition(" ")
        name = self.tokens.verify(token.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            client = scope.get("client") or ("", 0)
            self.audit.record("anonymous", "unauthorized", "missing bearer token" if not header else "invalid bearer token",
                              f"{client[0]}:{client[1]}")
            response = JSONResponse(
                {"error": "unauthorized", "message": "a valid 'Authorization: Bearer <token>' header is required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="mcp"'},
            )
            await response(scope, receive, send)
            return
        scope = dict(scope)
        scope[CLIENT_SCOPE_KEY] = name
        await self.app(scope, receive, send)


def _client_of(ctx: Context) -> str | None:
    request = getattr(ctx.request_context, "request", None)
    scope = getattr(request, "scope", None)
    return scope.get(CLIENT_SCOPE_KEY) if isinstance(scope, dict) else None


def _make_tool(runtime: Runtime, tokens: TokenStore, audit: GatewayAudit, mad_cls: Any, tool_name: str):
    qualified = f"{mad_cls.name}.{tool_name}"
    sig = mad_cls.tool_signature(tool_name)

    async def call(mcp_context: Context, **kwargs: Any) -> Any:
        client = _client_of(mcp_context)
        if client is None:
            audit.record("anonymous", "no-identity", qualified)
            raise ToolError("access_denied: no authenticated client")
        if not tokens.allowed(client, qualified):
            audit.record(f"client:{client}", "tool-denied", qualified)
            raise ToolError(f"access_denied: client {client!r} may not call {qualified}")
        try:
            return await runtime.invoke_tool(mad_cls.name, tool_name, kwargs, principal=f"client:{client}")
        except KernelError as exc:
            raise ToolError(f"{exc.code}: {exc}") from exc

    params = [inspect.Parameter("mcp_context", inspect.Parameter.KEYWORD_ONLY, annotation=Context)]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()]
    call.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    call.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
    if sig.return_annotation is not inspect.Signature.empty:
        call.__annotations__["return"] = sig.return_annotation
    call.__name__ = f"{mad_cls.name}_{tool_name}"
    call.__qualname__ = call.__name__
    call.__doc__ = inspect.getdoc(mad_cls.tool_methods()[tool_name]) or qualified
    return call


def build_mcp(runtime: Runtime, tokens: TokenStore, audit: GatewayAudit) -> MCPServer:
    cfg = runtime.config
    server: MCPServer = MCPServer(
        name=cfg.name,
        description=cfg.description or None,
        instructions=f"The {cfg.name} ecosystem. Tools are named <mad>.<tool>.",
        version=cfg.version or "0",
        log_level="WARNING",
    )
    for mad_cls in cfg.mads:
        for tool_name in mad_cls.tool_methods():
            fn = _make_tool(runtime, tokens, audit, mad_cls, tool_name)
            server.add_tool(fn, name=f"{mad_cls.name}.{tool_name}", description=fn.__doc__)
    return server


def _security(host: str) -> TransportSecuritySettings:
    if host in ("127.0.0.1", "localhost", "::1"):
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
        )
    # Bound to a routable address: bearer tokens are the guard; Host checks would break proxies.
    return TransportSecuritySettings(enable_dns_rebinding_protection=False)


def build_app(runtime: Runtime, tokens: TokenStore, host: str = "127.0.0.1") -> Starlette:
    """The Starlette app; its lifespan starts the runtime (MADs) and the MCP session manager."""
    audit = GatewayAudit(runtime)
    mcp = build_mcp(runtime, tokens, audit)
    mcp.streamable_http_app(streamable_http_path="/mcp", host=host, transport_security=_security(host))
    session_manager = mcp.session_manager
    mcp_asgi = BearerGate(StreamableHTTPASGIApp(session_manager), tokens, audit)

    async def index(request: Request) -> Response:
        status = await runtime.ecosystem_status("grace")
        mads = await runtime.ecosystem_mads("grace")
        tools = {cls.name: cls.tools() for cls in runtime.config.mads}
        convs = runtime.bus.list(20)
        return HTMLResponse(render_index(status, mads, tools, convs), headers=_SECURITY_HEADERS)

    async def healthz(request: Request) -> Response:
        try:
            status = await runtime.ecosystem_status("grace")
        except Exception:
            log.exception("health check failed")
            return JSONResponse({"status": "error"}, status_code=503)
        body = {
            "status": status["status"],
            "name": status["name"],
            "uptime_s": status["uptime_s"],
            "database": status["database"],
            "mads": {m["name"]: m["state"] for m in status["mads"]},
        }
        return Response(json.dumps(body), status_code=200 if status["healthy"] else 503, media_type="application/json")

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await runtime.start()
        try:
            async with session_manager.run():
                yield
        finally:
            await runtime.stop()

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/mcp", mcp_asgi),
        ],
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.audit = audit
    app.state.mcp = mcp
    return app
