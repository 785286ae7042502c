"""MCP clients: who may call which tools, how often, and the record of every call.

- `ClientRegistry` keeps the clients in `<state>/tokens.json` (mode 0600): per client the
  sha256 of its bearer token (never the token), its `allow` patterns (fnmatch over
  `<mad>.<tool>`), an optional rate limit (`10/s`) and daily quota (`1000/day`), when it
  was created and, once revoked, when. The server re-reads the file whenever it changes
  (its inode, size or mtime), so `clients revoke` takes effect on the next request.
  Writers (the CLI) hold an exclusive lock and replace the file atomically.
- `RateLimiter`: one token bucket per client, in memory (a restart refills it).
- `CallLedger`: the `gateway_calls` table in the ecosystem database, one row per tool call;
  the daily quota is counted from it, so it survives restarts.

The plaintext token exists once: printed by `clients add`, or written to the 0600 file
`<state>/client-token[.<name>]` by `token` (which deploy/run.sh uses).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import secrets as _secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bus import now_iso
from .db import Database, FileDocument, write_private
from .errors import InvalidArgument, KernelError, NotFound

# Not a tool, granted like one: the web console's audit-log page (packs/console/); `clients add` accepts it in
# --allow whether or not this build has the console, so a token's patterns outlive a rebuild that adds it.
AUDIT_PERMISSION = "grace.audit"
CLIENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+$")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hr|hour)\s*$")
_QUOTA = re.compile(r"^\s*(\d+)\s*(?:/\s*(?:d|day))?\s*$")
_UNITS = {"s": ("second", 1.0), "m": ("minute", 60.0), "h": ("hour", 3600.0)}
_SHORT_UNITS = {"second": "s", "minute": "min", "hour": "h"}


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def utc_day(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if t is None else t))


# ---- the operator's vocabulary: names, patterns, rates, quotas -------------------------------


@dataclass(frozen=True)
class Rate:
    """At most `calls` per `seconds`, with bursts of up to `calls`."""

    calls: int
    seconds: float
    unit: str  # "second", "minute" or "hour"

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds

    def __str__(self) -> str:
        return f"{self.calls}/{_SHORT_UNITS[self.unit]}"


def parse_rate(text: str) -> Rate:
    m = _RATE.match(str(text))
    if not m or int(m.group(1)) < 1:
        raise InvalidArgument(f"bad rate {text!r}: write CALLS/UNIT with CALLS >= 1 and UNIT s, min or h, e.g. 10/s or 600/min")
    unit, seconds = _UNITS[m.group(2)[0]]
    return Rate(int(m.group(1)), seconds, unit)


def parse_quota(text: str) -> int:
    m = _QUOTA.match(str(text))
    if not m or int(m.group(1)) < 1:
        raise InvalidArgument(f"bad quota {text!r}: write CALLS/day with CALLS >= 1, e.g. 1000/day")
    return int(m.group(1))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not CLIENT_NAME.match(name):
        raise InvalidArgument(f"bad client name {name!r}: client and token names are 1-64 characters of letters, digits, _ and -")
    return name


def _check_fnmatch(pattern: str, allowed: re.Pattern[str], kind: str, over: str) -> str:
    if not isinstance(pattern, str) or not allowed.match(pattern) or pattern.count("[") != pattern.count("]"):
        raise InvalidArgument(f"bad {kind} pattern {pattern!r}: patterns are fnmatch patterns over {over}")
    return pattern


def check_pattern(pattern: str, known_tools: Iterable[str] | None = None) -> str:
    """A tool pattern as the operator wrote it; `known_tools` (when given) must include a tool it matches."""
    _check_fnmatch(pattern, _PATTERN, "tool", "<mad>.<tool> names made of letters, digits, _ . - and the wildcards "
                   "* ? [...], e.g. 'rogers.*' or 'turing.get_secret'")
    if known_tools is not None:
        tools = sorted(known_tools)
        if not any(fnmatch.fnmatchcase(t, pattern) for t in tools):
            mads = sorted({t.split(".", 1)[0] for t in tools})
            hint = f"; did you mean '{pattern}.*'?" if pattern in mads else ""
            raise InvalidArgument(
                f"tool pattern {pattern!r} matches none of this ecosystem's tools, which are named <mad>.<tool> "
                f"with <mad> one of {', '.join(mads) or 'none'}{hint}"
            )
    return pattern


_SECRET_PATTERN = re.compile(r"^[A-Za-z0-9_.:*?\[\]-]{1,128}$")


def check_secret_pattern(pattern: str) -> str:
    """A secret-name pattern as the operator wrote it (`--secret 'db.*'`)."""
    return _check_fnmatch(pattern, _SECRET_PATTERN, "secret", "secret names (letters, digits, _ . : - and the wildcards "
                          "* ? [...]), e.g. 'db.*' or 'api_key'")


# ---- clients -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    name: str
    sha256: str
    allow: tuple[str, ...]
    rate: Rate | None
    quota: int | None  # calls per UTC day
    created_at: str
    revoked_at: str = ""
    secrets: tuple[str, ...] = ()  # secret-name patterns its calls may touch; () = every secret its tools reach

    @property
    def revoked(self) -> bool:
        return bool(self.revoked_at)

    def may_call(self, tool: str) -> bool:
        return not self.revoked and any(fnmatch.fnmatchcase(tool, p) for p in self.allow)

    def describe(self) -> dict[str, Any]:
        """What `clients list` shows: never the token or its hash."""
        return {"name": self.name, "allow": list(self.allow), "secrets": list(self.secrets),
                "rate": str(self.rate) if self.rate else "", "quota": f"{self.quota}/day" if self.quota else "",
                "created_at": self.created_at, "revoked_at": self.revoked_at}


def _entry_to_client(name: str, entry: dict[str, Any]) -> Client:
    try:
        return Client(name=name, sha256=str(entry["sha256"]), allow=tuple(entry.get("allow") or ("*",)),
                      rate=parse_rate(entry["rate"]) if entry.get("rate") else None,
                      quota=parse_quota(entry["quota"]) if entry.get("quota") else None,
                      created_at=str(entry.get("created_at", "")), revoked_at=str(entry.get("revoked_at", "")),
                      secrets=tuple(entry.get("secrets") or ()))
    except (KeyError, TypeError, InvalidArgument) as exc:
        raise KernelError(f"client {name!r} in tokens.json is malformed ({exc}); fix or restore the file") from None


def _new_entry(allow: list[str]) -> tuple[str, dict[str, Any]]:
    """A fresh token, and the entry that keeps only its hash."""
    token = _secrets.token_urlsafe(32)
    return token, {"sha256": _hash(token), "allow": allow, "created_at": now_iso()}


def token_file(state_dir: str | os.PathLike[str], name: str = "default") -> Path:
    return Path(state_dir) / ("client-token" if name == "default" else f"client-token.{name}")


class ClientRegistry:
    """The clients of one state (`<state>/tokens.json`, or the document of that name in the state's database
    replicas share: `Database.document`)."""

    def __init__(self, state_dir: str | os.PathLike[str], document: FileDocument | None = None):
        self.state_dir = Path(state_dir)
        self.document = document or FileDocument(self.state_dir / "tokens.json")
        self.path = self.document.path
        self._seen: Any = None
        self._clients: dict[str, Client] = {}
        self._by_hash: dict[str, Client] = {}

    # ---- reading (the server, on every request) ----------------------------------------------

    def _current(self) -> dict[str, Client]:
        seen = self.document.stamp()  # None: no clients yet (`_read` finds none)
        if seen is None or seen != self._seen:
            clients = {name: _entry_to_client(name, entry) for name, entry in self._read().get("tokens", {}).items()}
            self._clients, self._by_hash, self._seen = clients, {c.sha256: c for c in clients.values()}, seen
        return self._clients

    def _read(self) -> dict[str, Any]:
        try:
            return self._parse(self.document.read())
        except OSError as exc:
            raise KernelError(f"cannot read the clients in {self.path}: {exc}; fix or restore the file") from None

    def _parse(self, text: str | None) -> dict[str, Any]:
        try:
            data = json.loads(text) if text is not None else {"tokens": {}}
        except ValueError as exc:
            raise KernelError(f"cannot read the clients in {self.path}: {exc}; fix or restore the file") from None
        if not isinstance(data, dict) or not isinstance(data.get("tokens", {}), dict):
            raise KernelError(f"{self.path} is not a clients file (expected {{\"tokens\": {{name: entry}}}}); fix or restore it")
        return data

    def identify(self, token: str) -> Client | None:
        """The client this token belongs to, revoked or not; None for an unknown token."""
        if not token:
            return None
        self._current()  # re-read when the file changed
        return self._by_hash.get(_hash(token))

    def verify(self, token: str) -> str | None:
        """The client name of a valid token; None when it is unknown or revoked."""
        client = self.identify(token)
        return client.name if client and not client.revoked else None

    def allowed(self, name: str, tool: str) -> bool:
        client = self._current().get(name)
        return client is not None and client.may_call(tool)

    def get(self, name: str) -> Client | None:
        return self._current().get(name)

    def clients(self) -> list[Client]:
        return sorted(self._current().values(), key=lambda c: c.name)

    def secret_scope(self, principal: str) -> tuple[str, ...] | None:
        """The secret-name patterns a call made for `principal` ("client:<name>") may touch; None: no limit
        (a MAD acting for itself, or a client added without --secret). A revoked or unknown client: nothing."""
        if not principal.startswith("client:"):
            return None
        client = self.get(principal.removeprefix("client:"))
        if client is None or client.revoked:
            return ()
        return client.secrets or None

    # ---- writing (the CLI) -------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under an exclusive lock; the yielded data is written back, if changed, on success."""
        with self.document.locked() as (text, write):
            data = self._parse(text)
            data.setdefault("tokens", {})
            before = json.dumps(data, indent=2, sort_keys=True) + "\n"
            yield data
            after = json.dumps(data, indent=2, sort_keys=True) + "\n"
            if after != before:
                write(after)

    def add(self, name: str, allow: list[str], rate: str | None = None, quota: str | None = None,
            known_tools: Iterable[str] | None = None, secrets: list[str] | None = None) -> str:
        """Register a client; returns its token, which is not stored anywhere."""
        check_name(name)
        if not allow:
            raise InvalidArgument("a client needs at least one --allow PATTERN (use --allow '*' for every tool)")
        known = list(known_tools) if known_tools is not None else None
        patterns = [check_pattern(p, known) for p in allow]
        token, entry = _new_entry(patterns)
        if secrets:
            entry["secrets"] = [check_secret_pattern(p) for p in secrets]
        if rate:
            entry["rate"] = str(parse_rate(rate))
        if quota:
            entry["quota"] = f"{parse_quota(quota)}/day"
        with self._locked() as data:
            existing = data["tokens"].get(name)
            if existing is not None:
                state = "revoked" if existing.get("revoked_at") else "active"
                raise InvalidArgument(f"a client named {name!r} exists already ({state}); choose another name")
            data["tokens"][name] = entry
        return token

    def ensure(self, name: str = "default", allow: list[str] | None = None) -> tuple[Path, str]:
        """Create client `name` (allow default '*') with its token in the 0600 file `token_file()` the first
        time; later calls change nothing (no rotation, no revival of a revoked client).

        Returns the token file and, when it does not hold a usable token, why (else "").
        """
        check_name(name)
        path = token_file(self.state_dir, name)
        patterns = [check_pattern(p) for p in (allow or ["*"])]
        with self._locked() as data:
            entry = data["tokens"].get(name)
            if entry is None:
                token, data["tokens"][name] = _new_entry(patterns)
                write_private(path, (token + "\n").encode())
                return path, ""
        if entry.get("revoked_at"):
            return path, f"client {name!r} was revoked at {entry['revoked_at']}; add a client under another name with `clients add`"
        if not path.exists():
            return path, f"client {name!r} exists and its token was shown once; {path} is gone, the token is unchanged"
        if _hash(path.read_text().strip()) != entry.get("sha256"):
            return path, f"{path} does not hold the token of client {name!r} (was tokens.json restored from a backup?)"
        return path, ""

    def revoke(self, name: str) -> Client:
        """Revoke a client; running servers refuse its token from their next request on."""
        with self._locked() as data:
            entry = data["tokens"].get(name)
            if entry is None:
                known = ", ".join(sorted(data["tokens"])) or "none"
                raise NotFound(f"no client named {name!r}; clients: {known}")
            if not entry.get("revoked_at"):
                entry["revoked_at"] = now_iso()
        return _entry_to_client(name, entry)


# ---- rate limits -------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client (in memory): bursts of up to `rate.calls`, refilled at `rate.per_second`."""

    def __init__(self, clock: Any = time.monotonic, max_keys: int | None = None):
        self._clock = clock
        self._max_keys = max_keys  # keyed by something callers choose (an address): never without bound
        self._buckets: dict[str, tuple[Rate, float, float]] = {}  # client -> (rate, tokens, at)

    def take(self, client: str, rate: Rate) -> float:
        """0.0 when the call may go ahead (a token is taken); else the seconds until one is available."""
        now = self._clock()
        if self._max_keys is not None and client not in self._buckets and len(self._buckets) >= self._max_keys:
            self._buckets.clear()
        held = self._buckets.get(client)  # a new client, or a changed rate: a full bucket
        fresh = held is None or held[0] != rate
        tokens = float(rate.calls) if fresh else min(float(rate.calls), held[1] + (now - held[2]) * rate.per_second)
        if tokens >= 1.0:
            self._buckets[client] = (rate, tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (rate, tokens, now)
        return (1.0 - tokens) / rate.per_second


# ---- the call ledger ---------------------------------------------------------------------

_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    day TEXT NOT NULL,
    client TEXT NOT NULL,
    tool TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    counted INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS gateway_calls_quota ON gateway_calls (client, day, counted);
CREATE TABLE IF NOT EXISTS gateway_quota (client TEXT NOT NULL, day TEXT NOT NULL, used INTEGER NOT NULL,
    PRIMARY KEY (client, day));
"""


class CallLedger:
    """`gateway_calls`: one row per tool call. `counted` rows (calls that passed the pattern, rate
    and quota checks) make up a client's daily quota.

    Rows are committed on a connection of the ledger's own whose commits are not fsynced (`db.unsynced()`): a
    crash of the process loses none of them (only a power cut may lose the newest), and no call
    waits for an fsync of its log row (about 5 ms each on an ordinary disk; benchmarks/gateway_calls.py).
    Everything else in the database keeps synchronous=FULL.
    """

    def __init__(self, db: Database):
        self.db = db
        db.script(_LEDGER_SCHEMA, part="gateway_calls")
        self._conn = db.unsynced()
        self._lock = threading.Lock()

    def take_quota(self, client: str, quota: int) -> bool:
        """Count one call against the client's quota for today; False (nothing counted) when it is used up. One
        statement counts and checks, in the database every replica counts in, so a burst of concurrent calls
        through any replicas cannot all pass before the first is counted. A day's count starts from the calls
        already counted that day (a state from before this table)."""
        day = utc_day()
        with self._lock:
            return self._conn.execute(
                "INSERT INTO gateway_quota (client, day, used) SELECT ?, ?, used FROM (SELECT 1 + COUNT(*) AS used"
                " FROM gateway_calls WHERE client = ? AND day = ? AND counted = 1) AS first WHERE used <= ?"
                " ON CONFLICT (client, day) DO UPDATE SET used = gateway_quota.used + 1 WHERE gateway_quota.used < ?"
                " RETURNING used", (client, day, client, day, quota, quota)).fetchone() is not None

    def calls_today(self, client: str, day: str | None = None) -> int:
        row = self.db.one(
            "SELECT COUNT(*) AS n FROM gateway_calls WHERE client = ? AND day = ? AND counted = 1", (client, day or utc_day())
        )
        return int(row["n"]) if row else 0

    def record(self, client: str, tool: str, correlation_id: str, outcome: str, counted: bool, duration_ms: float,
               detail: str = "") -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO gateway_calls (ts, day, client, tool, correlation_id, outcome, counted, duration_ms, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (now_iso(), utc_day(), client, tool, correlation_id, outcome, 1 if counted else 0, round(duration_ms, 3),
                 detail[:500]),
            )

    def prune(self, keep_days: int, now: float | None = None) -> int:
        """Delete the rows of the UTC days more than `keep_days` ago (today's, which quotas count, always stay);
        returns how many went. The audit log keeps what matters for accountability: denials, secret accesses."""
        cutoff = utc_day((time.time() if now is None else now) - keep_days * 86400)
        with self._lock:
            self._conn.execute("DELETE FROM gateway_quota WHERE day < ?", (min(cutoff, utc_day()),))
            return self._conn.execute("DELETE FROM gateway_calls WHERE day < ?", (min(cutoff, utc_day()),)).rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def calls_today_by_client(state_dir: str | os.PathLike[str], shared: Database | None = None) -> dict[str, int]:
    """Counted calls per client today (for `clients list`): from the `shared` database replicas write to, else
    read-only from the state directory's SQLite."""
    sql = "SELECT client, COUNT(*) AS n FROM gateway_calls WHERE day = ? AND counted = 1 GROUP BY client"
    if shared is not None:
        return {r["client"]: int(r["n"]) for r in shared.query(sql, (utc_day(),))} if shared.has_table("gateway_calls") else {}
    path = Path(state_dir) / "ecosystem.db"
    if not path.exists():
        return {}
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        try:
            rows = conn.execute(sql, (utc_day(),)).fetchall()
        except sqlite3.OperationalError:  # no gateway_calls yet: the server never ran on this state
            return {}
    return {str(client): int(n) for client, n in rows}
