"""The security pack: McNamara's watch over the ecosystem's audit log, and the findings it posts.

The pack sees the ecosystem through its PackContext only: `audit_entries(after_id, limit)` (the hash-chained
audit log, oldest first) and `post(actor, title, content)` (a message to the conversation of that title).
`security.scan` reads the entries that are new since the last scan, keeps a rolling baseline of what each
actor normally does, and turns what stands out into findings:

- `denial-spike`: a principal (the client a MAD acted for, else the actor) with at least `denial_threshold`
  refusals (audit entries with ok=false, sign-ins aside) within the window; unauthenticated refusals
  (actor "anonymous") are counted per remote address instead.
- `signin-burst`: failed sign-ins (Grace's `grace.signin` refused, the gateway's `gateway.unauthorized` and
  `gateway.revoked`) from one address, at least `signin_threshold` within the window, and overall, at least
  `signin_total_threshold`. The gateway writes one row per address per minute and folds the rest into its
  detail ("; and 12 more from ..."), so such a row counts for what it stands for.
- `new-action`: after the warm-up (the first `warmup_entries` entries the pack ever scanned), an actor doing
  something it was not seen doing within `baseline_days`: an action, a capability it tried to use
  (`kernel.use`), a MAD it asked (`bus.ask`), a secret it wrote; a refusal of a kind never seen before is one too.
- `secret-read`: after the warm-up, a secret read (`secrets.get`, or the kernel's own `secrets.use`) by an actor
  (or for a client) that had not read that secret within `baseline_days`.
- `audit-chain`: what the log shows of tampering from where the pack stands: ids that skip (entries deleted),
  or the entry the cursor stands on gone or changed (the log truncated, rewritten or restored from a backup:
  the pack then rescans it from the start; its dedupe keeps old findings from being raised again).
- `report`: a MAD's own report (`security.report`).

A window is `window_minutes` long (the scan's argument, else the setting). A finding is raised once per
kind, principal and window: it covers the window that starts at its first event, and events in that window
that arrive in later scans are not raised again; the next finding of that kind for that principal starts
after it. Its count is what was seen when it was raised (at least that many).

Guards, and why:
- Everything read from the log is untrusted text: a subject is whatever a rogue MAD or client named (a path,
  a tool, an origin). Nothing of an entry's `detail` is ever stored or posted (only a count parsed from the
  gateway's); actors, addresses and subjects are scrubbed before they are stored or posted: control and
  bidirectional-override characters and line breaks become spaces (no forged lines in the message), what looks
  like a credential (`Bearer ...`, `password=...`, long runs mixing letters and digits) becomes `[redacted]`,
  and each field is cut to a short length. So no secret value can reach the conversation or the pack's files.
- The log is read in batches of `batch_entries`, at most `max_entries_per_scan` per scan (`backlog` tells the
  caller to scan again), so a flood of entries costs bounded memory and time per call, and the flood itself
  is a denial spike. The pack's stored events, baseline and findings are pruned to bounded sizes.
- Crash safety: one SQLite transaction stores the baseline, the events, the findings and the cursor together,
  so after a crash either all of a scan is stored or none of it (the same entries are read again). Findings
  are posted after that commit and marked posted after the post: a crash in between posts them again (at
  least once, never lost); a post that fails leaves them for the next scan's post.
- A MAD's report is stored under its own name (the caller, never an argument), its summary scrubbed like the
  log's text, and at most `max_reports_per_hour` per MAD: a MAD flooding the channel is refused, and the
  refusal audited (so it shows up in the next scan).
- The kernel's grant check keeps a MAD that does not own the `security` family out of all of this.

Storage: `security.db` (SQLite, WAL, synchronous=FULL) in the pack's folder (mode 0700; the file 0600), one
connection used under one lock: the findings are queried (newest first, by severity), deduplicated by a
unique key, and the cursor must commit with them atomically, which JSON lines with atomic replace would give
only by rewriting every file on every scan.

What the pack cannot see: the kernel audits refusals, secrets access, and what the packs change, but not a
successful capability use or tool call (those go to logs, metrics and the gateway's call ledger), so "unusual
tool use" is judged from the audited actions, the capabilities MADs tried and were refused, and the secrets
they read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ...errors import InvalidArgument, KernelError
from .. import Pack, PackContext, implements

SEVERITIES = ("info", "low", "medium", "high", "critical")
RANK = {name: i for i, name in enumerate(SEVERITIES)}
MAX_WINDOW_MINUTES = 1440
MAX_LIMIT = 1000
MAX_REPORT_CHARS = 2000
FIELD_CHARS = 120  # an actor, an address or a subject, as stored and posted
SUMMARY_CHARS = 600
MAX_EVENTS = 200_000  # stored refusal and sign-in events, oldest dropped beyond this
MAX_POSTED_FINDINGS = 25  # lines in one message; the rest are named by count
MAX_BASELINE_KEYS_SHOWN = 5
DB_FILE = "security.db"
_HOUR_US = 3_600_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

DEFAULTS: dict[str, Any] = {
    "conversation": "security",
    "window_minutes": 60,
    "denial_threshold": 10,
    "signin_threshold": 5,
    "signin_total_threshold": 20,
    "warmup_entries": 500,
    "max_entries_per_scan": 10_000,
    "batch_entries": 1000,
    "baseline_days": 30,
    "max_reports_per_hour": 20,
    "max_findings_kept": 100_000,
}
_RANGES: dict[str, tuple[int, int]] = {
    "window_minutes": (1, MAX_WINDOW_MINUTES),
    "denial_threshold": (1, 1_000_000),
    "signin_threshold": (1, 1_000_000),
    "signin_total_threshold": (1, 1_000_000),
    "warmup_entries": (0, 1_000_000_000),
    "max_entries_per_scan": (1, 10_000_000),
    "batch_entries": (1, 10_000),  # the audit log answers at most 10,000 entries a read
    "baseline_days": (1, 3650),
    "max_reports_per_hour": (1, 100_000),
    "max_findings_kept": (100, 10_000_000),
}

SIGNIN_ACTIONS = frozenset({"grace.signin", "gateway.unauthorized", "gateway.revoked"})
SECRET_READS = frozenset({"secrets.get", "secrets.use"})
OWN_RECORDS = frozenset({"security.scan", "security.report"})  # the pack's own records: a report is a finding already
_SUBJECT_KEYED = ("kernel.use", "bus.ask")  # the subject is what was tried: a capability, a MAD

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u206f\ufeff]")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+\S+")
_KEY_VALUE = re.compile(r"(?i)\b(token|password|passwd|pwd|secret|api[_-]?key|apikey|authorization|cookie|session)"
                        r"(\s*[:=]\s*)\S+")
_RUN = re.compile(r"[A-Za-z0-9+/=_\-]{24,}")
_MORE = re.compile(r"; and (\d{1,9}) more from ")
_FLUSHED = re.compile(r"^(\d{1,9}) more refused requests from ")
_HOST_PORT = re.compile(r"^(.*):(\d{1,5})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS findings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dedupe TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    rank INTEGER NOT NULL,
    actor TEXT NOT NULL DEFAULT '',
    remote TEXT NOT NULL DEFAULT '',
    count INTEGER NOT NULL,
    first_ts TEXT NOT NULL,
    last_ts TEXT NOT NULL,
    summary TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    posted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS findings_rank ON findings (rank, id);
CREATE INDEX IF NOT EXISTS findings_pending ON findings (posted, id);
CREATE INDEX IF NOT EXISTS findings_reports ON findings (kind, actor, created_us);
CREATE TABLE IF NOT EXISTS baseline (
    actor TEXT NOT NULL, key TEXT NOT NULL, count INTEGER NOT NULL, first_t INTEGER NOT NULL, last_t INTEGER NOT NULL,
    PRIMARY KEY (actor, key)
);
CREATE INDEX IF NOT EXISTS baseline_last ON baseline (last_t);
CREATE TABLE IF NOT EXISTS actors (actor TEXT PRIMARY KEY, entries REAL NOT NULL, denials REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL, scope TEXT NOT NULL, who TEXT NOT NULL,
    t INTEGER NOT NULL, weight INTEGER NOT NULL, entry_id INTEGER NOT NULL,
    UNIQUE (kind, scope, who, entry_id, t)
);
CREATE INDEX IF NOT EXISTS events_group ON events (kind, scope, who, t);
CREATE INDEX IF NOT EXISTS events_t ON events (t);
CREATE TABLE IF NOT EXISTS suppress (kind TEXT NOT NULL, scope TEXT NOT NULL, who TEXT NOT NULL, until INTEGER NOT NULL,
    PRIMARY KEY (kind, scope, who));
"""

_FINDING_COLS = "id, kind, severity, actor, remote, count, first_ts, last_ts, summary, created_at"


# ---- text from the log -----------------------------------------------------------------------------


def _credential_run(match: re.Match[str]) -> str:
    run = match.group(0)
    digits = sum(c.isdigit() for c in run)
    letters = sum(c.isalpha() for c in run)
    return "[redacted]" if len(run) >= 40 or (digits >= 3 and letters >= 3) else run


def scrub(value: Any, limit: int = FIELD_CHARS) -> str:
    """Untrusted text made safe to store and post: one line, printable, no credential-like runs, cut to `limit`."""
    text = value if isinstance(value, str) else str(value)
    text = text[: limit * 8]  # what follows is linear, but there is no need to look at megabytes
    text = _CONTROL.sub(" ", text)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} [redacted]", text)
    text = _KEY_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)
    text = _RUN.sub(_credential_run, text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quoted(value: str) -> str:
    return f'"{value}"'


def _iso(us: int) -> str:
    """Microseconds since the epoch as the kernel writes times: ISO-8601 UTC with microseconds and Z."""
    seconds, micros = divmod(int(us), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def _parse_ts(value: Any) -> int | None:
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // timedelta(microseconds=1)


def _now_us() -> int:
    return time.time_ns() // 1000


def fingerprint(entry: dict[str, Any]) -> str:
    """A digest of an audit entry's fields as the pack read them: the cursor's entry must not change."""
    body = {k: entry.get(k) for k in ("id", "ts", "actor", "action", "subject", "ok", "detail", "on_behalf_of",
                                      "remote")}
    body["ok"] = bool(body["ok"])
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Entry:
    """One audit entry as the pack uses it: scrubbed text, a time in microseconds, no detail."""

    id: int
    t: int
    actor: str
    action: str
    subject: str
    ok: bool
    obo: str
    host: str
    weight: int  # how many refusals this row stands for (the gateway folds a minute's into one row)

    @property
    def principal(self) -> str:
        """Who did it: the client a MAD acted for, else the actor."""
        return self.obo or self.actor

    @property
    def baseline_actor(self) -> str:
        return f"{self.obo} via {self.actor}" if self.obo else self.actor

    @property
    def key(self) -> str:
        """What the baseline learns the actor does: the action, with the subject where it says what was tried."""
        base = self.action
        if self.action in _SUBJECT_KEYED or self.action.startswith("secrets."):
            base = f"{self.action} {self.subject}"
        return base if self.ok else f"{base} (refused)"

    @property
    def failed_signin(self) -> bool:
        return not self.ok and self.action in SIGNIN_ACTIONS


def _entry(raw: dict[str, Any], last_t: int) -> _Entry:
    action = scrub(raw.get("action", ""), 64)
    remote = str(raw.get("remote") or "")
    if action.startswith("gateway.") and (m := _HOST_PORT.match(remote)):
        remote = m.group(1)  # the gateway writes host:port; a port changes per connection, the host does not
    detail = raw.get("detail") if isinstance(raw.get("detail"), str) else ""
    weight = 1
    if not raw.get("ok") and action.startswith("gateway."):
        if m := _FLUSHED.match(detail):
            weight = max(1, int(m.group(1)))
        elif m := _MORE.search(detail):
            weight = 1 + int(m.group(1))
    t = _parse_ts(raw.get("ts"))
    return _Entry(id=int(raw["id"]), t=last_t if t is None else t, actor=scrub(raw.get("actor", ""), 64) or "?",
                  action=action or "?", subject=scrub(raw.get("subject", "")), ok=bool(raw.get("ok")),
                  obo=scrub(raw.get("on_behalf_of") or "", 64), host=scrub(remote, 64), weight=min(weight, 1_000_000))


@dataclass
class _Finding:
    kind: str
    severity: str
    actor: str
    remote: str
    count: int
    first_t: int
    last_t: int
    summary: str
    dedupe: str


class SecurityPack(Pack):
    """The `security.*` capabilities: scan the audit log, list findings, take a MAD's report."""

    name = "security"

    def __init__(self, context: PackContext):
        super().__init__(context)
        self._settings = {key: self._setting(key) for key in DEFAULTS}
        folder = Path(context.folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.is_symlink() or not folder.is_dir():
            raise KernelError(f"the security pack's folder {str(folder)!r} is not a directory; remove what is there "
                              "and restart")
        os.chmod(folder, 0o700)
        path = folder / DB_FILE
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise KernelError(f"{str(path)!r} is not a regular file (a link or something else); the security pack "
                              "keeps its findings there: remove it and restart")
        previous = os.umask(0o077)
        try:
            self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise KernelError(f"the security pack cannot open {str(path)!r} ({exc}); move the file aside and restart: "
                              "the pack then starts over and rescans the whole audit log") from None
        finally:
            os.umask(previous)
        os.chmod(path, 0o600)
        self._lock = threading.Lock()  # one writer: scans and reports take turns

    def _setting(self, key: str) -> Any:
        value = self.context.settings.get(key, DEFAULTS[key])
        if key == "conversation":
            if (not isinstance(value, str) or not value.strip() or value != value.strip() or len(value) > 200
                    or not value.isprintable()):
                raise KernelError(f"pack setting security.conversation must be a conversation title (1 to 200 "
                                  f"printable characters, no space at either end), not {value!r} (default "
                                  f"{DEFAULTS[key]!r})")
            return value
        low, high = _RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise KernelError(f"pack setting security.{key} must be a whole number from {low} to {high}, not "
                              f"{value!r} (default {DEFAULTS[key]})")
        return value

    async def close(self) -> None:
        def shut() -> None:
            with self._lock:  # after a scan under way
                self._conn.close()

        await asyncio.to_thread(shut)

    # ---- storage ------------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _state(self, key: str, default: str = "") -> str:
        row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def _set_state(self, key: str, value: Any) -> None:
        self._conn.execute("INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                           "excluded.value", (key, str(value)))

    def _store(self, finding: _Finding, posted: int) -> dict[str, Any] | None:
        """Insert a finding unless its dedupe key is stored already; the stored row, or None when it was."""
        now = _now_us()
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO findings (dedupe, kind, severity, rank, actor, remote, count, first_ts, last_ts, "
            "summary, created_at, created_us, posted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (finding.dedupe, finding.kind, finding.severity, RANK[finding.severity], finding.actor, finding.remote,
             finding.count, _iso(finding.first_t), _iso(finding.last_t), scrub(finding.summary, SUMMARY_CHARS),
             _iso(now), now, posted))
        if cur.rowcount != 1:
            return None
        row = self._conn.execute(f"SELECT {_FINDING_COLS} FROM findings WHERE id = ?", (cur.lastrowid,)).fetchone()
        return dict(row)

    # ---- reading the log ----------------------------------------------------------------------------

    def _read(self, after: int, limit: int) -> list[dict[str, Any]]:
        rows = self.context.audit_entries(after, limit)
        if not isinstance(rows, list):
            raise KernelError("the audit log answered something other than a list of entries")
        good = []
        for row in rows:
            try:
                if isinstance(row, dict) and int(row["id"]) > after:
                    good.append(row)
            except (KeyError, TypeError, ValueError):
                continue  # an entry without an id cannot be placed; the id check below sees the hole
        good.sort(key=lambda r: int(r["id"]))
        return good[:limit]

    # ---- capabilities -------------------------------------------------------------------------------

    @implements("security.scan")
    async def scan(self, caller: str, window_minutes: int = 0, post: bool = True) -> dict:
        """Read the audit entries new since the last scan, store what stands out as findings, and (when `post`)
        post the findings not yet posted to the security conversation as the caller. `window_minutes` 0 uses
        the `window_minutes` setting."""
        if isinstance(window_minutes, bool) or not isinstance(window_minutes, int) or not (
                0 <= window_minutes <= MAX_WINDOW_MINUTES):
            raise InvalidArgument(f"window_minutes must be a whole number of minutes from 1 to {MAX_WINDOW_MINUTES}, "
                                  f"or 0 for the pack's setting (now {self._settings['window_minutes']}), not "
                                  f"{scrub(repr(window_minutes), 40)}")
        if not isinstance(post, bool):
            raise InvalidArgument(f"post must be true or false, not {scrub(repr(post), 40)}")
        window = window_minutes or self._settings["window_minutes"]
        return await asyncio.to_thread(self._scan, caller, window * 60_000_000, post)

    @implements("security.findings")
    async def findings(self, caller: str, limit: int = 50, severity: str = "") -> list[dict]:
        """Stored findings, newest first; with `severity`, only those at least that severe."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise InvalidArgument(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {limit!r}")
        if not isinstance(severity, str) or (severity != "" and severity not in RANK):
            raise InvalidArgument(f"severity must be '' (all) or one of {', '.join(SEVERITIES)}, not "
                                  f"{scrub(repr(severity), 40)}")
        least = RANK[severity] if severity else 0

        def read() -> list[dict]:
            with self._lock:
                rows = self._conn.execute(f"SELECT {_FINDING_COLS} FROM findings WHERE rank >= ? ORDER BY id DESC "
                                          "LIMIT ?", (least, limit)).fetchall()
            return [dict(r) for r in rows]

        return await asyncio.to_thread(read)

    @implements("security.report")
    async def report(self, caller: str, summary: str, severity: str = "info") -> dict:
        """A MAD's own report, stored as a finding of kind "report" under the caller's name; the next scan that
        posts carries it to the security conversation."""
        if not isinstance(summary, str) or not summary.strip():
            raise InvalidArgument("summary must be a non-empty string saying what the MAD saw")
        if len(summary) > MAX_REPORT_CHARS:
            raise InvalidArgument(f"summary is at most {MAX_REPORT_CHARS} characters; this one has {len(summary)}: "
                                  "say what was seen and where, not the data itself")
        if not isinstance(severity, str) or severity not in RANK:
            raise InvalidArgument(f"severity must be one of {', '.join(SEVERITIES)}, not {scrub(repr(severity), 40)}")
        return await asyncio.to_thread(self._report, caller, summary, severity)

    def _report(self, caller: str, summary: str, severity: str) -> dict:
        op = "security.report"
        limit = self._settings["max_reports_per_hour"]
        with self._lock:
            now = _now_us()
            sent = self._conn.execute("SELECT COUNT(*) AS n FROM findings WHERE kind = 'report' AND actor = ? AND "
                                      "created_us > ?", (scrub(caller, 64), now - _HOUR_US)).fetchone()["n"]
            if sent >= limit:
                raise self.context.denied(caller, op, severity,
                                          f"MAD {caller!r} made {sent} reports in the last hour, its limit (setting "
                                          "security.max_reports_per_hour); put what it saw in fewer reports")
            finding = _Finding("report", severity, scrub(caller, 64), "", 1, now, now,
                               f"report by {scrub(caller, 64)}: {scrub(summary, SUMMARY_CHARS)}",
                               f"report:{scrub(caller, 64)}:{secrets.token_hex(8)}")
            with self._transaction():
                stored = self._store(finding, posted=0)
                self._prune_findings()
        assert stored is not None
        self.context.audit(caller, op, severity, True, f"finding {stored['id']}")
        return stored

    # ---- the scan -----------------------------------------------------------------------------------

    def _scan(self, caller: str, window_us: int, post: bool) -> dict:
        with self._lock:
            cursor = int(self._state("cursor", "0"))
            with self._transaction():
                found, since, until, scanned, backlog, quiet = self._read_and_find(cursor, window_us, post)
            posted, error = self._post(caller) if post else (0, "")
        result: dict[str, Any] = {"scanned": scanned, "since_id": since, "until_id": until, "findings": found,
                                  "posted": posted, "backlog": backlog}
        if error:
            result["post_error"] = error
        if not quiet or found or posted:
            self.context.audit(caller, "security.scan", self._settings["conversation"], True,
                               f"entries {since + 1}..{until}: {len(found)} new findings, {posted} posted")
        return result

    def _read_and_find(self, cursor: int, window_us: int, post: bool
                       ) -> tuple[list[dict], int, int, int, bool, bool]:
        """Inside the scan's transaction: read, learn, detect, store. (findings, since, until, scanned, backlog,
        quiet: nothing but the pack's own scan entries was read)."""
        new: list[_Finding] = []
        cursor = self._check_cursor(cursor, new)
        since = last_id = cursor
        last_t = int(self._state("last_t", "0"))
        seen = int(self._state("seen", "0"))
        most = self._settings["max_entries_per_scan"]
        batch = self._settings["batch_entries"]
        scanned, quiet, last_raw = 0, True, None
        fresh: dict[str, list[_Entry]] = {}  # baseline actor -> its entries with a key new after the warm-up
        events: list[tuple[str, str, str, int, int, int]] = []
        while scanned < most:
            want = min(batch, most - scanned)
            rows = self._read(last_id, want)
            if not rows:
                break
            for raw in rows:
                e = _entry(raw, last_t)
                if e.id != last_id + 1:
                    new.append(_Finding("audit-chain", "critical", "", "", e.id - last_id - 1, last_t or e.t, e.t,
                                        f"audit entries {last_id + 1}..{e.id - 1} are missing (deleted?): the log's "
                                        "ids never skip; check it with `audit verify`",
                                        f"audit-chain:gap:{last_id + 1}-{e.id - 1}"))
                quiet = quiet and e.action == "security.scan"
                self._learn(e, seen, fresh)
                events.extend(self._events(e))
                last_id, last_t, last_raw = e.id, e.t, raw
                seen += 1
                scanned += 1
            if len(rows) < want:
                break
        backlog = scanned >= most and bool(self._read(last_id, 1))
        new.extend(self._fresh_findings(fresh))
        new.extend(self._spikes(events, window_us))
        self._prune(last_t)
        stored = [row for f in new if (row := self._store(f, posted=0 if post else 2)) is not None]
        self._prune_findings()
        self._set_state("cursor", last_id)
        self._set_state("last_t", last_t)
        self._set_state("seen", seen)
        if last_raw is not None:
            self._set_state("cursor_fp", fingerprint(last_raw))
        elif last_id != cursor:  # pragma: no cover - last_id moves only with an entry read
            raise KernelError("internal: cursor moved without an entry")
        return stored, since, last_id, scanned, backlog, quiet

    def _check_cursor(self, cursor: int, new: list[_Finding]) -> int:
        """The entry the cursor stands on must still be there, unchanged; else the log was cut or rewritten (or
        restored from a backup): a critical finding, and the cursor goes back to the start."""
        if cursor <= 0:
            return 0
        at = self._read(cursor - 1, 1)
        known = self._state("cursor_fp")
        last_t = int(self._state("last_t", "0")) or _now_us()
        if not at or int(at[0]["id"]) != cursor:
            why, tag = f"audit entry {cursor}, the last one scanned, is gone: the log was truncated (or the state " \
                       "restored from an older backup)", "gone"
        elif known and fingerprint(at[0]) != known:
            why, tag = f"audit entry {cursor}, the last one scanned, has changed since: the log was rewritten", "changed"
        else:
            return cursor
        new.append(_Finding("audit-chain", "critical", "", "", 1, last_t, last_t,
                            f"{why}; check it with `audit verify` against a copy of its anchor. The whole log is "
                            "scanned again", f"audit-chain:{tag}:{cursor}:{known}"))
        return 0

    def _learn(self, e: _Entry, seen: int, fresh: dict[str, list[_Entry]]) -> None:
        """Add an entry to its actor's baseline; past the warm-up, note what the actor had not done before."""
        actor, key = e.baseline_actor, e.key
        row = self._conn.execute("SELECT last_t FROM baseline WHERE actor = ? AND key = ?", (actor, key)).fetchone()
        stale = row is not None and row["last_t"] < e.t - self._settings["baseline_days"] * 24 * _HOUR_US
        if row is None or stale:  # never seen, or not within baseline_days: new again
            self._conn.execute("INSERT INTO baseline (actor, key, count, first_t, last_t) VALUES (?, ?, 1, ?, ?) ON "
                               "CONFLICT (actor, key) DO UPDATE SET count = 1, first_t = excluded.first_t, "
                               "last_t = excluded.last_t", (actor, key, e.t, e.t))
            if seen >= self._settings["warmup_entries"] and not (e.ok and e.action in OWN_RECORDS):
                fresh.setdefault(actor, []).append(e)
        else:
            self._conn.execute("UPDATE baseline SET count = count + 1, last_t = MAX(last_t, ?) WHERE actor = ? AND "
                               "key = ?", (e.t, actor, key))
        denied = 0 if e.ok or e.failed_signin else 1
        self._conn.execute(
            "INSERT INTO actors (actor, entries, denials) VALUES (?, 1, ?) ON CONFLICT (actor) DO UPDATE SET "
            "entries = CASE WHEN entries >= 10000 THEN entries / 2 ELSE entries END + 1, "
            "denials = CASE WHEN entries >= 10000 THEN denials / 2 ELSE denials END + excluded.denials",
            (e.principal, denied))

    @staticmethod
    def _events(e: _Entry) -> list[tuple[str, str, str, int, int, int]]:
        """The refusal and sign-in events an entry adds: (kind, scope, who, t, weight, entry id)."""
        if e.ok:
            return []
        if e.failed_signin:
            return [("signin", "remote", e.host or "unknown", e.t, e.weight, e.id),
                    ("signin", "all", "*", e.t, e.weight, e.id)]
        if e.principal == "anonymous" and e.host:
            return [("denial", "remote", e.host, e.t, e.weight, e.id)]
        return [("denial", "actor", e.principal, e.t, e.weight, e.id)]

    def _fresh_findings(self, fresh: dict[str, list[_Entry]]) -> list[_Finding]:
        out = []
        for actor, entries in sorted(fresh.items()):
            reads = [e for e in entries if e.ok and e.action in SECRET_READS]
            for e in reads:
                who = f"{e.obo} (through {e.actor})" if e.obo else e.actor
                out.append(_Finding("secret-read", "medium" if e.actor == "kernel" else "high", e.principal, e.host, 1,
                                    e.t, e.t, f"{who} read secret {_quoted(e.subject)} ({e.action}), which it had not "
                                              "read before", f"secret-read:{actor}:{e.subject}:{e.id}"))
            others = [e for e in entries if e not in reads]
            if not others:
                continue
            keys = [e.key for e in others]
            risky = any(not e.ok or e.action.startswith(("secrets.", "security.")) for e in others)
            shown = ", ".join(_quoted(k) for k in keys[:MAX_BASELINE_KEYS_SHOWN])
            more = f" and {len(keys) - MAX_BASELINE_KEYS_SHOWN} more" if len(keys) > MAX_BASELINE_KEYS_SHOWN else ""
            first = others[0]
            out.append(_Finding("new-action", "medium" if risky else "low", first.principal, first.host, len(keys),
                                first.t, others[-1].t, f"{actor} did what it was not seen doing before: {shown}{more}",
                                f"new-action:{actor}:{first.id}"))
        return out

    def _spikes(self, events: list[tuple[str, str, str, int, int, int]], window_us: int) -> list[_Finding]:
        """Store the scan's events; in each group they touched, the windows that reach the group's threshold."""
        if not events:
            return []
        self._conn.executemany("INSERT OR IGNORE INTO events (kind, scope, who, t, weight, entry_id) VALUES "
                               "(?, ?, ?, ?, ?, ?)", events)
        earliest: dict[tuple[str, str, str], int] = {}
        for kind, scope, who, t, _w, _id in events:
            group = (kind, scope, who)
            earliest[group] = min(t, earliest.get(group, t))
        out = []
        for group, first_new in sorted(earliest.items()):
            kind, scope, who = group
            threshold = self._threshold(kind, scope)
            row = self._conn.execute("SELECT until FROM suppress WHERE kind = ? AND scope = ? AND who = ?",
                                     group).fetchone()
            until = row["until"] if row else 0
            rows = self._conn.execute("SELECT t, weight FROM events WHERE kind = ? AND scope = ? AND who = ? AND t >= ? "
                                      "ORDER BY t, entry_id", (*group, max(until, first_new - window_us))).fetchall()
            times = [r["t"] for r in rows]
            weights = [r["weight"] for r in rows]
            i = j = total = 0
            while j < len(times):
                total += weights[j]
                while times[i] <= times[j] - window_us:
                    total -= weights[i]
                    i += 1
                if total < threshold:
                    j += 1
                    continue
                start, end = times[i], times[i] + window_us
                k = j + 1
                while k < len(times) and times[k] < end:
                    total += weights[k]
                    k += 1
                out.append(self._spike(group, threshold, total, start, times[k - 1], window_us))
                until = end
                i = j = k
                total = 0
            if row is None or until != row["until"]:
                self._conn.execute("INSERT INTO suppress (kind, scope, who, until) VALUES (?, ?, ?, ?) ON CONFLICT "
                                   "(kind, scope, who) DO UPDATE SET until = excluded.until", (*group, until))
                self._conn.execute("DELETE FROM events WHERE kind = ? AND scope = ? AND who = ? AND t < ?",
                                   (*group, until))
        return out

    def _threshold(self, kind: str, scope: str) -> int:
        if kind == "denial":
            return self._settings["denial_threshold"]
        return self._settings["signin_total_threshold" if scope == "all" else "signin_threshold"]

    def _spike(self, group: tuple[str, str, str], threshold: int, count: int, start: int, last: int,
               window_us: int) -> _Finding:
        kind, scope, who = group
        minutes = window_us // 60_000_000
        severity = "high" if count >= 4 * threshold else "medium"
        dedupe = f"{kind}:{scope}:{who}:{start}"
        if kind == "signin":
            if scope == "all":
                return _Finding("signin-burst", "high", "", "", count, start, last,
                                f"at least {count} failed sign-ins from all addresses within {minutes} min "
                                f"(threshold {threshold}, setting security.signin_total_threshold)", dedupe)
            return _Finding("signin-burst", severity, "", who, count, start, last,
                            f"at least {count} failed sign-ins from {_quoted(who)} within {minutes} min "
                            f"(threshold {threshold}, setting security.signin_threshold)", dedupe)
        if scope == "remote":
            return _Finding("denial-spike", severity, "anonymous", who, count, start, last,
                            f"at least {count} refused unauthenticated requests from {_quoted(who)} within {minutes} "
                            f"min (threshold {threshold})", dedupe)
        usual = self._conn.execute("SELECT entries, denials FROM actors WHERE actor = ?", (who,)).fetchone()
        rate = ""
        if usual and usual["entries"] >= 1:
            share = usual["denials"] / usual["entries"]
            rate = f"; {share:.0%} of its audited actions refused overall"
            if usual["entries"] >= 50 and share < 0.05:
                severity = "high"  # refusals are rare for this one
        return _Finding("denial-spike", severity, who, "", count, start, last,
                        f"at least {count} refusals for {_quoted(who)} within {minutes} min (threshold {threshold}, "
                        f"setting security.denial_threshold){rate}", dedupe)

    def _prune(self, newest_t: int) -> None:
        """Keep the stored events and baseline bounded: a day of events at most, the baseline's days of keys."""
        self._conn.execute("DELETE FROM events WHERE t < ?", (newest_t - MAX_WINDOW_MINUTES * 60_000_000,))
        extra = self._conn.execute("SELECT COUNT(*) AS n FROM events").fetchone()["n"] - MAX_EVENTS
        if extra > 0:
            self._conn.execute("DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY t, id LIMIT ?)",
                               (extra,))
        self._conn.execute("DELETE FROM baseline WHERE last_t < ?",
                           (newest_t - self._settings["baseline_days"] * 24 * _HOUR_US,))

    def _prune_findings(self) -> None:
        keep = self._settings["max_findings_kept"]
        extra = self._conn.execute("SELECT COUNT(*) AS n FROM findings").fetchone()["n"] - keep
        if extra > 0:
            self._conn.execute("DELETE FROM findings WHERE id IN (SELECT id FROM findings ORDER BY id LIMIT ?)",
                               (extra,))

    # ---- posting ------------------------------------------------------------------------------------

    def _post(self, caller: str) -> tuple[int, str]:
        """Post the findings not yet posted (this scan's, reports, earlier ones a failed post left) as one message;
        (how many it carried, why the post failed)."""
        rows = [dict(r) for r in self._conn.execute(f"SELECT {_FINDING_COLS} FROM findings WHERE posted = 0 "
                                                     "ORDER BY rank DESC, id").fetchall()]
        if not rows:
            return 0, ""
        title = self._settings["conversation"]
        try:
            self.context.post(caller, title, message(rows))
        except Exception as exc:  # noqa: BLE001 - the findings are stored; the next scan posts them again
            return 0, scrub(f"{type(exc).__name__}: {exc}", 300)
        ids = [r["id"] for r in rows]
        with self._transaction():
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                self._conn.execute(f"UPDATE findings SET posted = 1 WHERE id IN ({', '.join('?' * len(chunk))})",
                                   chunk)
        return len(rows), ""


def message(rows: list[dict[str, Any]]) -> str:
    """The one message a scan posts: a line per finding, most severe first, at most MAX_POSTED_FINDINGS lines."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["severity"]] = counts.get(r["severity"], 0) + 1
    tally = ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES) if s in counts)
    lines = [f"Security scan: {len(rows)} finding{'s' if len(rows) != 1 else ''} ({tally})."]
    for r in rows[:MAX_POSTED_FINDINGS]:
        span = r["first_ts"] if r["first_ts"] == r["last_ts"] else f"{r['first_ts']} to {r['last_ts']}"
        lines.append(f"- [{r['severity'].upper()}] {r['kind']} #{r['id']}: {r['summary']} ({span})")
    if len(rows) > MAX_POSTED_FINDINGS:
        lines.append(f"... and {len(rows) - MAX_POSTED_FINDINGS} more: security.findings lists them all.")
    return "\n".join(lines)
