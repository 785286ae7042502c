"""Grace, the DMZ: the web UI people use to reach the ecosystem (the console pack; see its `__init__.py`).

- Sign-in with a client token (the MCP gateway's bearer tokens). Sessions live server-side in
  the state database (`console_sessions`), so every replica on it honours them and a restart keeps
  them; the browser only holds a random id in an HttpOnly, SameSite=Strict cookie (Secure over
  https), and the database only its sha256. Sessions expire when idle and at an absolute age, end at
  sign-out, and end as soon as the token is revoked. Failed sign-ins are audited and rate limited
  per address.
- Chat: prose goes to the Imperator through Fiedler (a bus request from grace to fiedler);
  a line starting with `/` runs a tool directly (`/rogers.search query=hello limit=5`), only
  when the client's token allows it. The exchange is recorded in the client's conversation
  on the bus (secret-looking values redacted there; the full answer is shown once).
- Browse: conversations, MADs, health and the audit log.
- Security: the gateway's `observed` middleware puts a strict CSP (no inline script or style) and the
  other headers on every response; every POST checks the Origin and a per-session CSRF token;
  bodies are capped (413 before reading past the cap); every value is HTML-escaped.

Permissions beyond tools, matched by the token's allow patterns like a tool name:
`fiedler.send` for prose (it spends Fiedler's models) and `grace.audit` for the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import math
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ... import logs
from ...clients import AUDIT_PERMISSION, Client
from ...errors import KernelError, NotFound
from ...runtime import REDACTED, Runtime, redact
from .assets import ASSETS
from .pages import (
    PageContext,
    ToolInfo,
    audit_page,
    chat_page,
    conversation_page,
    conversations_page,
    error_page,
    health_page,
    json_text,
    mads_page,
    overview_page,
    signin_page,
    tools_text,
)

log = logs.get("grace")

SESSION_COOKIE = "grace_session"
MAX_BODY = 64 * 1024          # bytes of a form POST; larger bodies get 413 before they are read
MAX_MESSAGE = 8000            # characters of one chat message
MAX_STORED = 10_000           # characters of a tool answer recorded on the bus
MAX_SHOWN = 100_000           # characters of a tool answer shown once in the page
PROSE_PERMISSION = "fiedler.send"
CHAT_TITLE = "Grace chat · {client}"

_NO_STORE = {"cache-control": "no-store"}
_SIGNIN_NOTICES = {
    "signed-out": "You have signed out.",
    "expired": "Your session ended. Sign in again.",
}


class Clients(Protocol):
    """The client registry of the MCP gateway (its bearer tokens and their allow patterns)."""

    def identify(self, token: str) -> Client | None: ...

    def get(self, name: str) -> Client | None: ...

    def allowed(self, name: str, tool: str) -> bool: ...


# ---- sessions and sign-in throttling -------------------------------------------------------------

@dataclass
class Session:
    sid: str                  # the cookie's value, a bearer secret: the database keeps only its sha256
    csrf: str
    created: float
    seen: float
    client: str = ""          # "" until signed in
    credential: str = ""      # the sha256 of the client's token as the client registry keeps it (never the token):
                              # checked on every request, so revoking the client ends the session on every replica
    flash: bytes | None = None  # sealed: what the next chat page shows once (`SessionStore.remember`)
    notice: str = ""          # this request's error to show once on the next chat page
    shown: dict[str, str] = field(default_factory=dict)  # this request's envelope id -> full answer, shown once


SESSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS console_sessions (
    id_sha256 TEXT PRIMARY KEY, csrf TEXT NOT NULL, client TEXT NOT NULL, credential TEXT NOT NULL,
    created REAL NOT NULL, seen REAL NOT NULL, flash BLOB);
"""
TOUCH_S = 60.0  # last-seen is written only once it is this stale: a request costs one indexed read, not a write
# A visitor not signed in holds an id of this form, stored nowhere ("anon.<created>.<random>"): a cookieless flood
# of the sign-in page writes nothing. Its CSRF token is derived from it, which a site that cannot read the cookie
# cannot do; an anonymous id grants nothing but posting the sign-in form, so its forged age gains nothing either.
_ANONYMOUS = re.compile(r"anon\.(\d{1,12})\.[A-Za-z0-9_-]{43}")
_FLASH_KEY_LABEL = b"grace: the answers the next chat page shows once"


def _row_key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def _flash_cipher(sid: str) -> AESGCM:
    """The key of a session's flash comes from its id, which only the browser holds: a dump cannot open it."""
    return AESGCM(hmac.new(sid.encode(), _FLASH_KEY_LABEL, hashlib.sha256).digest())


def _seal(sid: str, notice: str, shown: dict[str, str]) -> bytes:
    nonce = os.urandom(12)
    plain = json.dumps({"notice": notice, "shown": shown}).encode()
    return nonce + _flash_cipher(sid).encrypt(nonce, plain, _row_key(sid).encode())


def _unseal(sid: str, sealed: bytes | None) -> tuple[str, dict[str, str]]:
    if not sealed:
        return "", {}
    sealed = bytes(sealed)
    try:
        data = json.loads(_flash_cipher(sid).decrypt(sealed[:12], sealed[12:], _row_key(sid).encode()))
    except InvalidTag:  # not sealed for this session (a row edited in the database): nothing to show
        return "", {}
    return data["notice"], data["shown"]


class SessionStore:
    """Server-side sessions in the state database (`console_sessions`): every replica on that database honours a
    session made on another (no sticky sessions), and a restart signs nobody out. A row is keyed by the sha256 of
    the session id, so a dump of the database signs nobody in. Bounded: at `max_sessions` the oldest go."""

    def __init__(self, db: Any, idle_s: float = 30 * 60, absolute_s: float = 8 * 3600, anonymous_s: float = 15 * 60,
                 max_sessions: int = 10_000, clock: Callable[[], float] = time.time):
        self.db = db
        self.idle_s = idle_s
        self.absolute_s = absolute_s
        self.anonymous_s = anonymous_s
        self.max_sessions = max_sessions
        self.clock = clock  # wall-clock time: the replicas and restarts share it
        db.script(SESSIONS_SCHEMA, part="console_sessions")

    def _expired(self, s: Session, now: float) -> bool:
        if not s.client:
            return now - s.created > self.anonymous_s
        return now - s.seen > self.idle_s or now - s.created > self.absolute_s

    def anonymous(self) -> Session:
        """A visitor's session before sign-in: nothing stored (see _ANONYMOUS)."""
        now = self.clock()
        return self._anonymous(f"anon.{int(now)}.{secrets.token_urlsafe(32)}", int(now))

    @staticmethod
    def _anonymous(sid: str, created: float) -> Session:
        csrf = hmac.new(sid.encode(), b"grace: the sign-in form's CSRF token", hashlib.sha256).hexdigest()
        return Session(sid, csrf, created, created)

    def new(self, client: str, credential: str) -> Session:
        """A signed-in session, stored; at the bound the oldest go."""
        now = self.clock()
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now, client, credential)
        with self.db.transaction() as conn:  # the writers' turn: replicas adding at once keep to the bound
            conn.execute("DELETE FROM console_sessions WHERE seen < ? OR created < ?", (now - self.idle_s, now - self.absolute_s))
            over = conn.execute("SELECT COUNT(*) AS n FROM console_sessions").fetchone()["n"] - self.max_sessions + 1
            if over > 0:
                conn.execute("DELETE FROM console_sessions WHERE id_sha256 IN"
                             " (SELECT id_sha256 FROM console_sessions ORDER BY created LIMIT ?)", (over,))
            conn.execute("INSERT INTO console_sessions (id_sha256, csrf, client, credential, created, seen)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (_row_key(s.sid), s.csrf, client, credential, now, now))
        return s

    def get(self, sid: str) -> Session | None:
        if anonymous := _ANONYMOUS.fullmatch(sid or ""):
            s, now = self._anonymous(sid, float(anonymous.group(1))), self.clock()
            return None if self._expired(s, now) or s.created > now + 60 else s
        row = self.db.one("SELECT csrf, created, seen, client, credential, flash FROM console_sessions WHERE id_sha256 = ?",
                          (_row_key(sid),)) if sid else None
        if row is None:
            return None
        s = Session(sid, row["csrf"], row["created"], row["seen"], row["client"], row["credential"], row["flash"])
        now = self.clock()
        if self._expired(s, now):
            self.drop(sid)
            return None
        if s.client and now - s.seen > TOUCH_S:
            self.db.execute("UPDATE console_sessions SET seen = ? WHERE id_sha256 = ?", (now, _row_key(sid)))
            s.seen = now
        return s

    def drop(self, sid: str) -> None:
        self.db.execute("DELETE FROM console_sessions WHERE id_sha256 = ?", (_row_key(sid),))

    def sign_in(self, client: str, credential: str) -> Session:
        """A fresh session (new id and CSRF token: no fixation) for the client; the anonymous id is dropped with
        its cookie, replaced by this one's."""
        return self.new(client, credential)

    def remember(self, s: Session) -> None:
        """Keep this request's notice and answers-shown-once for the next chat page, whichever replica serves it:
        sealed with a key from the session id (the answers may hold secrets the bus only has redacted)."""
        if not s.notice and not s.shown:
            return
        key = _row_key(s.sid)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT flash FROM console_sessions WHERE id_sha256 = ?", (key,)).fetchone()
            if row is not None:  # else signed out meanwhile: nothing to show
                notice, shown = _unseal(s.sid, row["flash"])
                sealed = _seal(s.sid, s.notice or notice, {**shown, **s.shown})
                conn.execute("UPDATE console_sessions SET flash = ? WHERE id_sha256 = ?", (sealed, key))
        s.notice, s.shown = "", {}

    def take_flash(self, s: Session) -> tuple[str, dict[str, str]]:
        """What `remember` kept (notice, answers), once: only the request whose update clears it shows it."""
        if not s.flash:
            return "", {}
        cleared = self.db.execute("UPDATE console_sessions SET flash = NULL WHERE id_sha256 = ? AND flash = ?",
                                  (_row_key(s.sid), s.flash))
        return _unseal(s.sid, s.flash) if cleared.rowcount == 1 else ("", {})


SIGNIN_SCHEMA = """
CREATE TABLE IF NOT EXISTS signin_failures (address TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS signin_failures_address ON signin_failures (address, ts);
"""


class SignInLimiter:
    """At most `max_failures` failed sign-ins per address in a sliding window; then that address waits.

    The lock stops *unknown* tokens: a client's valid token signs in from a locked address too, so one
    guesser behind a proxy cannot lock everyone behind it out (and guessing a 256-bit token is hopeless
    anyway). Failures are kept in the state database, so `clients unlock` can lift a lock from outside."""

    def __init__(self, db: Any, max_failures: int = 5, window_s: float = 300.0,
                 clock: Callable[[], float] = time.time):
        self.db = db
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        db.script(SIGNIN_SCHEMA, part="signin_failures")

    def retry_after(self, addr: str) -> int:
        """Seconds until an unknown token from `addr` may be tried again (0: now)."""
        now = self.clock()
        row = self.db.one("SELECT COUNT(*) AS n, MIN(ts) AS first FROM signin_failures WHERE address = ? AND ts > ?",
                          (addr, now - self.window_s))
        if not row or row["n"] < self.max_failures:
            return 0
        return max(1, math.ceil(row["first"] + self.window_s - now))

    def failed(self, addr: str) -> None:
        now = self.clock()
        with self.db.transaction() as conn:  # the window's history only: the table cannot grow without bound
            conn.execute("DELETE FROM signin_failures WHERE ts <= ?", (now - self.window_s,))
            conn.execute("INSERT INTO signin_failures (address, ts) VALUES (?, ?)", (addr, now))

    def succeeded(self, addr: str) -> None:
        self.db.execute("DELETE FROM signin_failures WHERE address = ?", (addr,))


def unlock(db: Any, address: str | None) -> int:
    """Lift the sign-in lock of `address` (None: of every address); returns the failures forgotten."""
    db.script(SIGNIN_SCHEMA, part="signin_failures")
    if address is None:
        return db.execute("DELETE FROM signin_failures").rowcount
    return db.execute("DELETE FROM signin_failures WHERE address = ?", (address,)).rowcount


# ---- deterministic commands ----------------------------------------------------------------------

class CommandError(Exception):
    """A command that cannot be run as typed; the message says what to type instead."""


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


@dataclass(frozen=True)
class ToolSpec(ToolInfo):
    """A tool as the chat offers it (`ToolInfo`), and what running its command needs."""

    mad: str
    tool: str
    params: dict[str, inspect.Parameter]


def tool_catalog(mad_classes: tuple[Any, ...]) -> dict[str, ToolSpec]:
    """`<mad>.<tool>` -> what the chat needs to parse and describe the command."""
    catalog: dict[str, ToolSpec] = {}
    for cls in mad_classes:
        for name, fn in cls.tool_methods().items():
            params = dict(cls.tool_signature(name).parameters)
            usage = " ".join(
                f"{p.name}=<{_type_name(p.annotation)}>" if p.default is inspect.Parameter.empty else f"[{p.name}={p.default!r}]"
                for p in params.values()
            )
            qualified = f"{cls.name}.{name}"
            catalog[qualified] = ToolSpec(qualified, f"{qualified} {usage}".strip(), inspect.getdoc(fn) or "",
                                          cls.name, name, params)
    return catalog


@dataclass(frozen=True)
class Argument:
    """One `name=value` of a command; `start:end` is where the value is in the text after the name."""

    name: str
    value: Any
    start: int
    end: int


_ARGUMENT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(\S*)")  # a name, and its value if it is a bare word
_JSON = json.JSONDecoder()


def scan_arguments(rest: str) -> list[Argument]:
    """`query=hello limit=5 title="two words" tags=["a", "b"] note='no quotes inside'` -> arguments.

    A value is JSON when it starts with `"`, `[` or `{` (so lists and objects keep their quotes),
    text up to the next `'` when it starts with `'`, else the text up to the next space.
    """
    args: list[Argument] = []
    pos = 0
    while rest[pos:].strip():
        match = _ARGUMENT.match(rest, pos)
        if match is None:
            raise CommandError(f"{rest[pos:].split()[0]!r} is not name=value")
        name, value, start, end = match.group(1), match.group(2), match.start(2), match.end(2)
        if rest.startswith(('"', "[", "{"), start):
            try:
                value, end = _JSON.raw_decode(rest, start)
            except ValueError:
                raise CommandError(f"{name}: the value is not valid JSON (strings in double quotes, lists in [...])") from None
        elif rest.startswith("'", start):
            end = rest.find("'", start + 1) + 1
            if not end:
                raise CommandError(f"{name}: the value has no closing '")
            value = rest[start + 1:end - 1]
        if end < len(rest) and not rest[end].isspace():
            raise CommandError(f"{name}: put a space after its value")
        args.append(Argument(name, value, start, end))
        pos = end
    return args


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """The value as the parameter's type: '5' for an int is 5; a text that is JSON ('[1, 2]') is read as JSON."""
    if annotation is inspect.Parameter.empty:
        return value
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
    if isinstance(value, str):
        try:
            return adapter.validate_json(value)
        except ValidationError:
            pass
    raise CommandError(f"{name}: expected {_type_name(annotation)}, got {value!r} ({problem})")


def parse_command(text: str, catalog: dict[str, ToolSpec]) -> tuple[ToolSpec | None, str]:
    """`/mad.tool a=1 b="x y"` -> (its spec, the text of the arguments); (None, "") for /help."""
    head, rest = (text[1:].split(None, 1) + ["", ""])[:2]
    if not head:
        raise CommandError("an empty command; /help lists the commands your token allows")
    if head == "help":
        return None, ""
    spec = catalog.get(head)
    if spec is None:
        raise CommandError(f"unknown command /{head}; /help lists the commands your token allows")
    return spec, rest


def recorded_command(text: str) -> str:
    """A command as the bus records it: secret-looking arguments (`value=...`, `password=...`) redacted."""
    head, rest = (text.split(None, 1) + [""])[:2]
    try:
        args = scan_arguments(rest)
    except CommandError:
        return f"{head} [arguments not recorded: the command could not be read]"
    for arg in reversed(args):  # from the end, so earlier offsets stay valid
        if redact({arg.name: arg.value})[arg.name] == REDACTED:
            rest = rest[:arg.start] + REDACTED + rest[arg.end:]
    return f"{head} {rest}" if rest else head


def command_args(spec: ToolSpec, rest: str) -> dict[str, Any]:
    """The keyword arguments of a command, checked against the tool's signature."""
    usage = f"usage: /{spec.signature}"
    args: dict[str, Any] = {}
    try:
        scanned = scan_arguments(rest)
    except CommandError as exc:
        raise CommandError(f"{exc}; {usage}") from None
    for arg in scanned:
        if arg.name not in spec.params:
            raise CommandError(f"/{spec.qualified} has no parameter {arg.name!r}; {usage}")
        if arg.name in args:
            raise CommandError(f"{arg.name!r} is given twice; {usage}")
        args[arg.name] = _coerce(arg.name, spec.params[arg.name].annotation, arg.value)
    missing = [n for n, p in spec.params.items() if p.default is inspect.Parameter.empty and n not in args]
    if missing:
        raise CommandError(f"missing {', '.join(missing)}; {usage}")
    return args


# ---- the web app ---------------------------------------------------------------------------------

class _Stop(Exception):
    """Ends request handling with this response (a redirect to sign in, a 403, a 413...)."""

    def __init__(self, response: Response):
        self.response = response


def _remote(request: Request) -> str:
    return request.client.host if request.client else ""


def _safe_next(value: str) -> str:
    """A local path to return to after sign-in; anything else (other hosts, schemes) becomes '/'."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value or any(ord(c) < 32 for c in value):
        return "/"
    return "/" if value.startswith("/signin") else value


class Grace:
    """Grace's routes over one runtime and the gateway's client registry."""

    def __init__(self, runtime: Runtime, clients: Clients):
        self.runtime = runtime
        self.clients = clients
        self.sessions = SessionStore(runtime.db)
        self.limiter = SignInLimiter(runtime.db)
        self.catalog = tool_catalog(runtime.config.persistent_mads)

    def routes(self) -> list[BaseRoute]:
        pages = [("/", "GET", self.overview), ("/signin", "GET", self.signin_form), ("/signin", "POST", self.signin),
                 ("/signout", "POST", self.signout), ("/chat", "GET", self.chat), ("/chat", "POST", self.chat_post),
                 ("/conversations", "GET", self.conversations),
                 ("/conversations/{conversation_id}", "GET", self.conversation), ("/mads", "GET", self.mads),
                 ("/health", "GET", self.health), ("/audit", "GET", self.audit)]
        return [*(Route(path, self._page(handler), methods=[method]) for path, method, handler in pages),
                *(Route(path, self._asset(body, media_type), methods=["GET"]) for path, (body, media_type) in ASSETS.items())]

    # ---- plumbing ----------------------------------------------------------------------------

    @property
    def _name(self) -> str:
        return self.runtime.config.name

    def _page(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except _Stop as stop:
                return stop.response
        return endpoint

    @staticmethod
    def _asset(body: bytes, media_type: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return Response(body, media_type=media_type, headers={"cache-control": "public, max-age=31536000, immutable"})
        return endpoint

    def _error(self, status: int, title: str, message: str) -> _Stop:
        return _Stop(HTMLResponse(error_page(self._name, status, title, message), status_code=status, headers=_NO_STORE))

    def _html(self, html: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
        return HTMLResponse(html, status_code=status, headers={**_NO_STORE, **(headers or {})})

    @staticmethod
    def _set_cookie(response: Response, request: Request, sid: str) -> None:
        response.set_cookie(SESSION_COOKIE, sid, path="/", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    def _audit(self, actor: str, action: str, subject: str, ok: bool, detail: str, request: Request) -> None:
        self.runtime.audit.append(actor, action, subject, ok, detail, remote=_remote(request))

    def _valid(self, s: Session | None) -> bool:
        """Signed in, and the token it signed in with is still the client's and not revoked (read from the registry
        on every request: a revocation through any replica or the command line ends the session at once)."""
        if s is None or not s.client:
            return False
        client = self.clients.get(s.client)
        return client is not None and not client.revoked and hmac.compare_digest(client.sha256, s.credential)

    def _signed_in(self, request: Request) -> Session:
        """The signed-in session, else a redirect to the sign-in page (and back here afterwards)."""
        s = self.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if self._valid(s):
            return s
        notice = ""
        if s is not None and s.client:  # the token was revoked (or renamed) since sign-in
            self.sessions.drop(s.sid)
            self._audit(f"client:{s.client}", "grace.session-ended", request.url.path, False,
                        "the session's token is no longer valid", request)
            notice = "&m=expired"
        raise _Stop(RedirectResponse(f"/signin?next={quote(target, safe='')}{notice}", status_code=303))

    async def _signed_in_form(self, request: Request) -> tuple[Session, dict[str, str]]:
        """A signed-in client's POST: its Origin and CSRF token checked, its form read."""
        s = self._signed_in(request)
        actor = f"client:{s.client}"
        self._check_origin(request, actor)
        form = await self._form(request)
        return self._check_csrf(request, s, form, actor), form

    def _check_origin(self, request: Request, actor: str) -> None:
        """A POST must come from one of our own pages: its Origin (or Referer) names this host."""
        source = request.headers.get("origin") or request.headers.get("referer") or ""
        parts = urlsplit(source)
        host = request.headers.get("host", "")
        if parts.scheme not in ("http", "https") or not host or parts.netloc.lower() != host.lower():
            self._audit(actor, "grace.origin-rejected", request.url.path, False, f"origin {source[:100]!r}", request)
            raise self._error(403, "Request refused", "This form was not sent from this site. Reload the page and try again.")

    def _check_csrf(self, request: Request, s: Session | None, form: dict[str, str], actor: str) -> Session:
        """The session whose CSRF token the form carries (403 when it is missing or wrong)."""
        sent = form.get("csrf", "")
        if s is None or not sent or not hmac.compare_digest(sent.encode(), s.csrf.encode()):
            self._audit(actor, "grace.csrf-rejected", request.url.path, False,
                        "missing CSRF token" if not sent else "wrong CSRF token", request)
            raise self._error(403, "Request refused", "The form has expired or was not sent from this site. "
                                                      "Reload the page and try again.")
        return s

    async def _form(self, request: Request) -> dict[str, str]:
        """The url-encoded form, read only up to MAX_BODY bytes (413 beyond, without reading the rest)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise self._error(415, "Unsupported form", "Forms are sent as application/x-www-form-urlencoded.")
        too_big = self._error(413, "Too large", f"The request is larger than {MAX_BODY // 1024} KiB.")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise too_big
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            raise self._error(400, "Bad form", "The form could not be read.") from None
        form: dict[str, str] = {}
        for key, value in pairs:
            form.setdefault(key, value)
        return form

    def _context(self, s: Session, active: str) -> PageContext:
        pages = {"/", "/chat", "/mads", "/health"}
        if self._may(s, self._conversation_tools()[0]):
            pages.add("/conversations")
        if self.clients.allowed(s.client, AUDIT_PERMISSION):
            pages.add("/audit")
        return PageContext(self._name, self.runtime.version, s.client, s.csrf, active, frozenset(pages))

    def _conversation_tools(self) -> tuple[str, str]:
        """The tools whose permission the conversation pages need: listing them, and reading one's messages."""
        tools = self.runtime.config.capability_tools
        return tools.get("conversations.list", ""), tools.get("conversations.history", "")

    def _allowed_tools(self, s: Session) -> list[ToolInfo]:
        return [spec for q, spec in self.catalog.items() if self.clients.allowed(s.client, q)]

    def _may(self, s: Session, tool: str) -> bool:
        return bool(tool) and self.clients.allowed(s.client, tool)

    def _require(self, s: Session, tool: str, what: str, request: Request) -> None:
        """403 (and an audit entry) unless the client may call `tool`, which `what` shows the data of."""
        if not self._may(s, tool):
            self._audit(f"client:{s.client}", "grace.view-denied", tool or what, False, what, request)
            needs = f"{tool}, which {what} needs" if tool else f"the tool that serves {what}, and this ecosystem has none"
            raise self._error(403, "Not allowed", f"Your token does not allow {needs}.")

    # ---- sign-in and sign-out ----------------------------------------------------------------

    async def signin_form(self, request: Request) -> Response:
        next_path = _safe_next(request.query_params.get("next", "/"))
        s = self.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        if self._valid(s):
            return RedirectResponse(next_path, status_code=303)
        if s is None or s.client:
            if s is not None:
                self.sessions.drop(s.sid)
            s = self.sessions.anonymous()
        info = _SIGNIN_NOTICES.get(request.query_params.get("m", ""), "")
        response = self._html(signin_page(self._name, s.csrf, next_path, info=info))
        self._set_cookie(response, request, s.sid)
        return response

    async def signin(self, request: Request) -> Response:
        self._check_origin(request, "anonymous")
        form = await self._form(request)
        s = self._check_csrf(request, self.sessions.get(request.cookies.get(SESSION_COOKIE, "")), form, "anonymous")
        next_path = _safe_next(form.get("next", "/"))
        addr = _remote(request)
        token = form.get("token", "").strip()
        found = self.clients.identify(token) if token else None
        client = found if found is not None and not found.revoked else None
        wait = self.limiter.retry_after(addr) if client is None else 0
        if wait:
            self.runtime.metrics.signin_failure("locked_out")
            self._audit("anonymous", "grace.signin", "", False, "refused: too many failed sign-ins", request)
            html = signin_page(self._name, s.csrf, next_path,
                               error=f"Too many failed sign-ins from your address. Try again in {wait} seconds.")
            return self._html(html, 429, {"retry-after": str(wait)})
        if client is None:
            self.runtime.metrics.signin_failure("invalid_token" if token else "empty_token")
            self.limiter.failed(addr)
            self._audit("anonymous", "grace.signin", "", False, "invalid token" if token else "empty token", request)
            log.warning("sign-in refused", extra={"remote": addr})
            html = signin_page(self._name, s.csrf, next_path, error="That token was not accepted. Check it and try again.")
            return self._html(html, 401, {"www-authenticate": 'Bearer realm="grace"'})
        self.limiter.succeeded(addr)
        fresh = self.sessions.sign_in(client.name, client.sha256)
        self._audit(f"client:{client.name}", "grace.signin", "", True, "", request)
        log.info("signed in", extra={"client": client.name, "remote": addr})
        response = RedirectResponse(next_path, status_code=303)
        self._set_cookie(response, request, fresh.sid)
        return response

    async def signout(self, request: Request) -> Response:
        s, _ = await self._signed_in_form(request)
        self.sessions.drop(s.sid)
        self._audit(f"client:{s.client}", "grace.signout", "", True, "", request)
        response = RedirectResponse("/signin?m=signed-out", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    # ---- pages -------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        s = self._signed_in(request)
        status = await self.runtime.ecosystem_status("grace")
        mads = await self.runtime.ecosystem_mads("grace")
        ctx = self._context(s, "/")
        recent = self.runtime.bus.list(10) if "/conversations" in ctx.pages else []
        return self._html(overview_page(ctx, status, mads, recent))

    async def conversations(self, request: Request) -> Response:
        s = self._signed_in(request)
        self._require(s, self._conversation_tools()[0], "the list of conversations", request)
        return self._html(conversations_page(self._context(s, "/conversations"), self.runtime.bus.list(200)))

    async def conversation(self, request: Request) -> Response:
        s = self._signed_in(request)
        self._require(s, self._conversation_tools()[1], "a conversation's messages", request)
        cid = request.path_params["conversation_id"]
        try:
            conv = self.runtime.bus.get(cid)
        except NotFound:
            raise self._error(404, "No such conversation", "That conversation does not exist.") from None
        return self._html(conversation_page(self._context(s, "/conversations"), conv, self.runtime.bus.history(cid, 500)))

    async def mads(self, request: Request) -> Response:
        s = self._signed_in(request)
        mads = await self.runtime.ecosystem_mads("grace")
        tools = {cls.name: cls.tools() for cls in self.runtime.config.persistent_mads}  # a role's are not served
        allowed = {q for q in self.catalog if self.clients.allowed(s.client, q)}
        return self._html(mads_page(self._context(s, "/mads"), mads, tools, allowed))

    async def health(self, request: Request) -> Response:
        s = self._signed_in(request)
        return self._html(health_page(self._context(s, "/health"), await self.runtime.ecosystem_status("grace")))

    async def audit(self, request: Request) -> Response:
        s = self._signed_in(request)
        self._require(s, AUDIT_PERMISSION, "the audit log", request)
        return self._html(audit_page(self._context(s, "/audit"), self.runtime.audit.recent(limit=200)))

    # ---- chat --------------------------------------------------------------------------------

    def _chat_conversation(self, client: str, create: bool) -> str:
        """The id of the client's chat conversation (the one Grace created; '' when none and not `create`)."""
        title = CHAT_TITLE.format(client=client)
        # Grace's own, not one another client titled alike: created_by is set by the kernel, not the caller.
        row = self.runtime.db.one(
            "SELECT id FROM conversations WHERE title = ? AND created_by = 'grace' ORDER BY created_at LIMIT 1", (title,)
        )
        if row is not None:
            return str(row["id"])
        if not create:
            return ""
        return str(self.runtime.bus.create(title, [f"client:{client}", "fiedler"], "grace")["id"])

    async def chat(self, request: Request) -> Response:
        s = self._signed_in(request)
        cid = self._chat_conversation(s.client, create=False)
        history = self.runtime.bus.history(cid, 200) if cid else []
        notice, shown = self.sessions.take_flash(s)
        allowed = self._allowed_tools(s)
        html = chat_page(self._context(s, "/chat"), history, shown, allowed, len(self.catalog) - len(allowed), notice)
        return self._html(html)

    async def chat_post(self, request: Request) -> Response:
        s, form = await self._signed_in_form(request)
        text = form.get("message", "").strip()
        if len(text) > MAX_MESSAGE:
            s.notice = f"That message is {len(text)} characters long; the limit is {MAX_MESSAGE}."
        elif text:
            await self._exchange(s, text, request)
        self.sessions.remember(s)
        return RedirectResponse("/chat", status_code=303)

    async def _exchange(self, s: Session, text: str, request: Request) -> None:
        bus = self.runtime.bus
        cid = self._chat_conversation(s.client, create=True)
        command = text.startswith("/")
        asked = bus.post(cid, f"client:{s.client}", recorded_command(text) if command else text, "message")
        corr = asked["correlation_id"]
        tok_c = logs.correlation_id.set(corr)
        tok_p = logs.principal.set(f"client:{s.client}")  # a client's prose is charged to its budget too
        try:
            if command:
                await self._command(s, cid, corr, text, request)
            else:
                await self._prose(s, cid, corr, text, request)
        finally:
            logs.principal.reset(tok_p)
            logs.correlation_id.reset(tok_c)

    def _answer(self, cid: str, corr: str, kind: str, text: str, **payload: Any) -> dict[str, Any]:
        return self.runtime.bus.post(cid, "grace", text[:MAX_STORED], kind, corr, payload=payload)

    def _denied(self, s: Session, cid: str, corr: str, what: str, request: Request, why: str = "") -> None:
        self._audit(f"client:{s.client}", "grace.tool-denied", what, False, "", request)
        self._answer(cid, corr, "error", f"access_denied: your token does not allow {what}{why}", tool=what)

    async def _command(self, s: Session, cid: str, corr: str, text: str, request: Request) -> None:
        try:
            spec, rest = parse_command(text, self.catalog)
            if spec is None:
                self._answer(cid, corr, "reply", tools_text(self._allowed_tools(s)), tool="help")
                return
            if not self.clients.allowed(s.client, spec.qualified):
                self._denied(s, cid, corr, spec.qualified, request)
                return
            args = command_args(spec, rest)
        except CommandError as exc:
            self._answer(cid, corr, "error", str(exc))
            return
        try:
            result = await self.runtime.invoke_tool(spec.mad, spec.tool, args, principal=f"client:{s.client}")
        except KernelError as exc:
            self._answer(cid, corr, "error", f"{exc.code}: {exc}", tool=spec.qualified)
            return
        except Exception:  # the MAD's bug: logged with its traceback, not shown
            log.exception("command failed", extra={"tool": spec.qualified})
            self._answer(cid, corr, "error", f"{spec.qualified} failed with an internal error; the server log has the details",
                         tool=spec.qualified)
            return
        if isinstance(result, str):
            full, stored, fmt = result, result, "text"
        else:
            full, stored, fmt = json_text(result), json_text(redact(result)), "json"
        env = self._answer(cid, corr, "reply", stored, tool=spec.qualified, format=fmt)
        if full != env["content"]:  # redacted or cut on the bus: the full answer is shown once, never stored
            s.shown[env["id"]] = full[:MAX_SHOWN]

    async def _prose(self, s: Session, cid: str, corr: str, text: str, request: Request) -> None:
        if not self.clients.allowed(s.client, PROSE_PERMISSION):
            self._denied(s, cid, corr, PROSE_PERMISSION, request, ", which prose needs: Fiedler's models answer it")
            return
        try:
            await self.runtime.request("grace", "fiedler", prose=text, conversation_id=cid)
        except KernelError as exc:
            # The bus already carries the receiver's error when it got as far as Fiedler.
            if not any(m["kind"] == "error" for m in self.runtime.bus.by_correlation(corr)):
                self._answer(cid, corr, "error", f"{exc.code}: {exc}")
        except Exception:
            log.exception("prose request failed")
            self._answer(cid, corr, "error", "fiedler failed with an internal error; the server log has the details")
