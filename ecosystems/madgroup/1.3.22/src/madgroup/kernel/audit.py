"""The ecosystem's audit log: one append-only table, every entry hash-chained to the one before.

Each entry carries `prev_hash` (the previous entry's hash; 64 zeros for the first) and
`hash = sha256(canonical(entry fields) + prev_hash)`, where the canonical form is sorted-key
compact JSON of id, ts, actor, action, subject, ok, detail, on_behalf_of and remote. Binding
the id and the previous hash means an entry edited, deleted, inserted or moved breaks the
chain at that point, and `verify()` names it.

Three layers of protection:
- SQLite triggers abort any UPDATE or DELETE, and an INSERT whose `prev_hash` is not the
  current head (so no writer, not even raw SQL, can fork the chain);
- appends read the head and insert inside one BEGIN IMMEDIATE transaction, so concurrent
  appends (threads, or another process on the same state) serialise instead of forking;
- `verify()` (`python -m <pkg> audit verify`) recomputes the whole chain, which catches
  someone who dropped the triggers and edited the file.
What a chain cannot show on its own is the newest entries being cut off together: compare
the printed head hash with one recorded elsewhere for that.

A state created by a kernel before the chain had two unchained tables, `secrets_audit` and
`gateway_audit`. At the first start of this kernel a genesis entry opens the chain and their
rows are copied into it (oldest first) in the same transaction; the old tables are kept
(append-only, never written again), so their names stay reserved and an earlier kernel can
still open the state.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from .bus import now_iso
from .db import Database
from .errors import KernelError

GENESIS_PREV = "0" * 64
MAX_DETAIL = 500


def _append_only(table: str) -> str:
    """Triggers that abort any UPDATE or DELETE of `table`'s rows."""
    return "".join(f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table}\n"
                   f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END;\n" for op in ("UPDATE", "DELETE"))


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '',
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    on_behalf_of TEXT NOT NULL DEFAULT '',
    remote TEXT NOT NULL DEFAULT '',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS audit_log_action ON audit_log (action);
{_append_only("audit_log")}
CREATE TRIGGER IF NOT EXISTS audit_log_chain_head BEFORE INSERT ON audit_log
WHEN NEW.prev_hash IS NOT COALESCE((SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1), '{GENESIS_PREV}')
  OR NEW.id IS NOT COALESCE((SELECT MAX(id) FROM audit_log), 0) + 1
BEGIN SELECT RAISE(ABORT, 'audit_log: an entry must extend the head of the chain'); END;
"""

# The unchained tables of earlier kernels. Still created (and still append-only) so their names stay
# reserved against MAD tables, and a state this kernel opened can still be opened by an earlier one;
# this kernel only reads them, once, when it opens the chain.
_LEGACY_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS secrets_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    actor TEXT NOT NULL,
    on_behalf_of TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL,
    name TEXT NOT NULL,
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
{_append_only("secrets_audit")}
CREATE TABLE IF NOT EXISTS gateway_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    client TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    remote TEXT NOT NULL DEFAULT ''
);
{_append_only("gateway_audit")}
"""

_FIELDS = ("id", "ts", "actor", "action", "subject", "ok", "detail", "on_behalf_of", "remote")


def entry_hash(entry: dict[str, Any], prev_hash: str) -> str:
    """sha256 over the canonical JSON of the entry's fields followed by the previous hash."""
    body = {f: entry[f] for f in _FIELDS}
    body["ok"] = bool(body["ok"])
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((canonical + prev_hash).encode("utf-8")).hexdigest()


ANCHOR_FILE = "audit-anchor.json"  # beside the database (ship copies of it elsewhere)


class AuditLog:
    """The hash-chained, append-only audit log of one state database.

    After each append the newest entry's id and hash are written to `audit-anchor.json` beside the
    database. The chain alone cannot show that its newest entries were deleted (what is left is a
    valid chain); a copy of an anchor kept elsewhere can: `audit verify --anchor FILE`."""

    def __init__(self, db: Database):
        self.db = db
        db.script(_LEGACY_SCHEMA + _SCHEMA, part="audit")
        with db.transaction() as conn:
            if conn.execute("SELECT 1 FROM audit_log LIMIT 1").fetchone() is None:
                self._open_chain(conn)

    # ---- writing -----------------------------------------------------------------------------

    def append(self, actor: str, action: str, subject: str, ok: bool, detail: str = "", on_behalf_of: str = "",
               remote: str = "") -> dict[str, Any]:
        """Append one entry (its own transaction); returns it with id and hash."""
        with self.db.transaction() as conn:
            entry = self.append_in(conn, actor, action, subject, ok, detail, on_behalf_of, remote)
        self.anchor()
        return entry

    def anchor(self) -> dict[str, Any]:
        """Write the newest entry's id, hash and time to the anchor file (atomically); returns what was written."""
        row = self.db.one("SELECT id, ts, hash FROM audit_log ORDER BY id DESC LIMIT 1") or {"id": 0, "ts": "", "hash": ""}
        path = self.db.folder / ANCHOR_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(row, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return row

    def head_id(self) -> int:
        row = self.db.one("SELECT MAX(id) AS id FROM audit_log")
        return int(row["id"] or 0) if row else 0

    def append_in(self, conn: sqlite3.Connection, actor: str, action: str, subject: str, ok: bool, detail: str = "",
                  on_behalf_of: str = "", remote: str = "", ts: str = "") -> dict[str, Any]:
        """Append inside a transaction the caller holds open (so the entry commits or rolls back with it)."""
        head = conn.execute("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
        prev_hash = head["hash"] if head else GENESIS_PREV
        # Text as every backend stores it (PostgreSQL's cannot hold a NUL), so the hash is of what is stored.
        text = {k: str(v).replace("\x00", "\ufffd") for k, v in (("actor", actor), ("action", action), ("subject", subject),
                ("detail", str(detail)[:MAX_DETAIL]), ("on_behalf_of", on_behalf_of), ("remote", remote))}
        entry: dict[str, Any] = {"id": (head["id"] if head else 0) + 1, "ts": ts or now_iso(), **text,
                                 "ok": 1 if ok else 0, "prev_hash": prev_hash}
        entry["hash"] = entry_hash(entry, prev_hash)
        marks = ", ".join("?" for _ in entry)
        conn.execute(f"INSERT INTO audit_log ({', '.join(entry)}) VALUES ({marks})", list(entry.values()))
        return entry

    def _open_chain(self, conn: sqlite3.Connection) -> None:
        """Genesis entry, then the rows of the previous kernel's unchained audit tables, oldest first."""
        # ISO timestamps: text order is time order; on a tie, secrets rows first, each table in its own order.
        legacy = conn.execute(
            "SELECT ts, actor, 'secrets.' || action AS action, name AS subject, ok, detail, on_behalf_of, '' AS remote,"
            " 0 AS source, id FROM secrets_audit UNION ALL SELECT ts, client, 'gateway.' || event, 'mcp', 0, detail, '',"
            " remote, 1, id FROM gateway_audit ORDER BY ts, source, id").fetchall()
        detail = "chain opened"
        if legacy:
            detail += f"; the {len(legacy)} entries that follow were copied from the previous kernel's unchained audit tables"
        self.append_in(conn, "kernel", "audit.genesis", "audit_log", True, detail)
        for r in legacy:
            self.append_in(conn, r["actor"], r["action"], r["subject"], r["ok"], r["detail"], r["on_behalf_of"],
                           r["remote"], ts=r["ts"])

    # ---- reading -----------------------------------------------------------------------------

    def recent(self, limit: int = 50, action_prefix: str = "") -> list[dict[str, Any]]:
        """The newest `limit` entries, newest first (only actions starting with `action_prefix` when set)."""
        # substr: a prefix compared as it is, with no LIKE wildcards to escape
        return self._entries("WHERE substr(action, 1, ?) = ? ORDER BY id DESC LIMIT ?",
                             (len(action_prefix), action_prefix, max(1, min(int(limit), 1000))))

    def since(self, after_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to `limit` entries with an id above `after_id`, oldest first: a reader that keeps its place."""
        return self._entries("WHERE id > ? ORDER BY id LIMIT ?", (int(after_id), max(1, min(int(limit), 10_000))))

    def _entries(self, where: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        rows = self.db.query(f"SELECT {', '.join(_FIELDS)} FROM audit_log {where}", params)
        for r in rows:
            r["ok"] = bool(r["ok"])
        return rows

    def verify(self) -> list[str]:
        """Walk the chain from the start; the problems found, first broken entry first (empty: intact)."""
        return walk_chain(self.db.query)[2]


Query = Callable[[str, Sequence[Any]], list[dict[str, Any]]]


def walk_chain(query: Query) -> tuple[int, str, list[str]]:
    """Recompute the chain through `query`: (entries, head hash, problems in chain order)."""
    problems: list[str] = []
    count, prev_hash, prev_id = 0, GENESIS_PREV, 0
    cols = f"{', '.join(_FIELDS)}, prev_hash, hash"
    while True:  # in pages, so a long log is never loaded whole
        rows = query(f"SELECT {cols} FROM audit_log WHERE id > ? ORDER BY id LIMIT 5000", (prev_id,))
        if not rows:
            return count, prev_hash, problems
        for entry in rows:
            count += 1
            where = f"entry {entry['id']} ({entry['ts']} {entry['actor']} {entry['action']})"
            if entry["id"] != prev_id + 1:
                problems.append(f"{where}: follows entry {prev_id}; entries {prev_id + 1}..{entry['id'] - 1} were deleted")
            if entry["prev_hash"] != prev_hash:
                problems.append(f"{where}: prev_hash does not match the entry before it (an entry was deleted, "
                                "inserted or moved here)")
            if entry_hash(entry, entry["prev_hash"]) != entry["hash"]:
                problems.append(f"{where}: hash does not match its contents (the entry was edited)")
            prev_hash, prev_id = entry["hash"], entry["id"]


def check_anchor(query: Query, anchor: dict[str, Any], where: str) -> list[str]:
    """An anchored entry must still be in the chain, unchanged: else the log was truncated or rewritten."""
    try:
        anchored_id, anchored_hash = int(anchor["id"]), str(anchor["hash"])
    except (KeyError, TypeError, ValueError):
        return [f"{where} is not an audit anchor (expected {{\"id\", \"hash\", \"ts\"}})"]
    rows = query("SELECT hash FROM audit_log WHERE id = ?", (anchored_id,))
    when = f" (anchored {anchor.get('ts', '')})" if anchor.get("ts") else ""
    if not rows:
        return [f"entry {anchored_id}{when}, named by {where}, is gone: the newest entries were deleted"]
    if rows[0]["hash"] != anchored_hash:
        return [f"entry {anchored_id}{when} differs from {where}: the log was rewritten from there"]
    return []


def verify_file(db_path: Path, anchor: Path | None = None) -> tuple[int, str, list[str]]:
    """Verify the chain of a state database opened read-only (nothing is written): (entries, head, problems).
    With `anchor` (an audit-anchor.json, perhaps a copy kept elsewhere), its entry must still be there."""
    if not db_path.is_file():
        raise KernelError(f"no database at {db_path}: pass the ecosystem's state directory as --state")
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_log'").fetchone() is None:
            raise KernelError(f"{db_path} has no hash-chained audit log yet: start the ecosystem once with this "
                              "version to open the chain (earlier audit entries are copied into it)")
        return verify_chain(lambda sql, params: [dict(r) for r in conn.execute(sql, params)], anchor)


def verify_chain(query: Query, anchor: Path | None = None) -> tuple[int, str, list[str]]:
    """Walk the chain through `query` (entries, head, problems); with `anchor`, its entry must still be there."""
    count, head, problems = walk_chain(query)
    if anchor is not None:
        try:
            anchored = json.loads(anchor.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KernelError(f"cannot read the audit anchor {anchor}: {exc}") from None
        problems += check_anchor(query, anchored if isinstance(anchored, dict) else {}, str(anchor))
    return count, head, problems
