"""The conversation bus: typed envelopes in conversations, persisted in SQLite, searchable.

It is the only channel between MADs: a request from one MAD to another is an envelope of
kind "request" in a conversation, and the answer is an envelope of kind "reply" (or
"error") carrying the request's correlation id and, in its payload, `in_reply_to`.

Delivery (how a request reaches its MAD: `transport.py`) is at-least-once:

1. Accept: the request envelope and a delivery row (`bus_deliveries`, state "pending") are
   written in ONE transaction before the sender is told the request is accepted. The row
   holds the request's real payload sealed with AES-GCM (the `messages` row holds it redacted,
   and a redelivery needs the real arguments); the sealed copy is dropped at the ack.
2. Deliver: the target MAD's handler runs.
3. Ack: the reply (or error) envelope is written and the delivery marked "acked" with the id
   of that reply, again in ONE transaction. A delivery already acked is never run again:
   a redelivered request gets the recorded reply.
4. Recover: at start-up every delivery still "pending" (the process died between 1 and 3)
   is delivered again, oldest first. One that never completes in `MAX_ATTEMPTS` starts (its
   handler kills the process every time) is acked with an error reply instead: a poison
   request cannot keep the ecosystem from starting.

Contract for MAD authors: a handler runs again only if the process died after it started
and before its ack, so a handler's effects must be idempotent by envelope id. Inside a
bus delivery `current_delivery.get()` is the request's envelope id: make it the key of what
the handler writes (a primary key, checked before inserting), and a second run finds its own
first write. Kernel capabilities that append (conversations.post, a new secret version) append
again on a second run; read before you append when a duplicate matters.

fsync policy: the database runs in WAL mode with `synchronous=FULL` (`db.py`): every commit
is fsynced before it returns. The local bus's accept and ack are group commits instead: the
writes of one event-loop turn share one transaction (`Database.shared_transaction`), written
without its own fsync, and a request's reply is handed back (a `submit` returns) only after
`Database.durable()`, one fdatasync shared by every hop in flight. So an acknowledged request
or reply survives a process crash (SIGKILL) and a power loss or kernel panic alike, and
concurrent hops pay for one commit and one fsync between them (see `benchmarks/bus_hop.py`).
The search index is kept in batches, not per message (`index_new`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from . import logs
from .db import Database
from .errors import InvalidArgument, NotFound
from .logs import new_id

T = TypeVar("T")

KINDS = ("message", "request", "reply", "error", "event", "thought", "report")  # report: an eMAD's (packs/emads/)
MAX_CONTENT = 1_000_000
MAX_ATTEMPTS = 5  # starts of one delivery that never completed before it is given up (poison request)

# The id of the request envelope whose handler is running ("" outside a bus delivery): the key
# that makes a handler's writes idempotent (see the module docstring).
current_delivery: contextvars.ContextVar[str] = contextvars.ContextVar("regen_current_delivery", default="")


# One encoder for what the bus stores (json.dumps with `default` builds a new encoder per call).
to_json = json.JSONEncoder(default=str).encode

log = logs.get("bus")

@functools.lru_cache(maxsize=1)  # the last whole second formatted: a bus hop stamps four times
def _formatted_second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def now_iso() -> str:
    t = time.time()
    whole = int(t)
    return f"{_formatted_second(whole)}.{int((t - whole) * 1_000_000):06d}Z"


class Envelope(BaseModel):
    """One message on the bus."""

    id: str = Field(default_factory=new_id)
    correlation_id: str = ""
    sender: str
    conversation_id: str
    kind: str = "message"
    content: str = ""
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=now_iso)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


# Each b-tree a hop writes is a page in the write-ahead log, written with two system calls, which on a
# journaling file system cost more than the SQL: so the layout keeps them few. No AUTOINCREMENT (a page of
# sqlite_sequence per insert; the kernel never deletes a message, so a seq is never reused), deliveries
# keyed by their envelope id alone (WITHOUT ROWID: no second b-tree for the key), and only pending
# deliveries indexed. A database made by an older kernel is rebuilt into this layout once (`_relayout`).
_MESSAGES = """(
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    correlation_id TEXT NOT NULL DEFAULT '',
    sender TEXT NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    kind TEXT NOT NULL,
    content TEXT NOT NULL DEFAULT '',
    payload TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
)"""
_DELIVERIES = """(
    envelope_id TEXT PRIMARY KEY REFERENCES messages(id),
    target TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'acked')),
    attempts INTEGER NOT NULL DEFAULT 1,
    sealed BLOB,
    reply_id TEXT NOT NULL DEFAULT '',
    accepted_at TEXT NOT NULL,
    acked_at TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    participants TEXT NOT NULL DEFAULT '[]',
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_title ON conversations(title);
CREATE TABLE IF NOT EXISTS messages {_MESSAGES};
CREATE INDEX IF NOT EXISTS messages_conv ON messages(conversation_id, seq);
CREATE INDEX IF NOT EXISTS messages_corr ON messages(correlation_id);
CREATE TABLE IF NOT EXISTS bus_deliveries {_DELIVERIES};
CREATE INDEX IF NOT EXISTS bus_deliveries_pending ON bus_deliveries(state, target) WHERE state = 'pending';
"""

_RELAYOUT_MESSAGES = (
    f"CREATE TABLE messages_relayout {_MESSAGES}",
    "INSERT INTO messages_relayout SELECT seq, id, correlation_id, sender, conversation_id, kind, content, payload,"
    " created_at FROM messages ORDER BY seq",
    "DROP TABLE messages",
    "ALTER TABLE messages_relayout RENAME TO messages",
    "DELETE FROM sqlite_sequence WHERE name = 'messages'",
)
_RELAYOUT_DELIVERIES = (
    f"CREATE TABLE bus_deliveries_relayout {_DELIVERIES}",
    "INSERT INTO bus_deliveries_relayout SELECT envelope_id, target, state, attempts, sealed, reply_id, accepted_at,"
    " acked_at FROM bus_deliveries",
    "DROP TABLE bus_deliveries",
    "ALTER TABLE bus_deliveries_relayout RENAME TO bus_deliveries",
)
COPIED_PER_S = 50_000  # messages a rebuild copies per second, about, on a VM's disk: for the log's estimate


# The search index is kept in batches (`ConversationBus.index_new`), not by a trigger per insert: a bus hop
# writes no index pages, and a search first indexes whatever is new, so it always sees every message.
# Messages are never updated or deleted by the kernel; if one is, an indexed row's tokens follow it.
_FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(content, content='messages', content_rowid='seq');
DROP TRIGGER IF EXISTS messages_fts_ai;
DROP TRIGGER IF EXISTS messages_fts_ad;
DROP TRIGGER IF EXISTS messages_fts_au;
CREATE TRIGGER messages_fts_ad AFTER DELETE ON messages
WHEN EXISTS (SELECT 1 FROM messages_fts_docsize WHERE id = old.seq) BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.seq, old.content);
END;
CREATE TRIGGER messages_fts_au AFTER UPDATE ON messages
WHEN EXISTS (SELECT 1 FROM messages_fts_docsize WHERE id = old.seq) BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.seq, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.seq, new.content);
END;
"""
INDEX_BATCH = 500  # messages indexed per transaction; also how many may wait for the next search

_WORD = re.compile(r"\w+", re.UNICODE)


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or limit < 1:
        raise InvalidArgument(f"limit must be a positive integer, got {limit!r}")
    return min(limit, 1000)


class ConversationBus:
    def __init__(self, db: Database):
        self.db = db
        self._relayout()
        self.fts = db.fts5
        db.script(_SCHEMA + (_FTS_SCHEMA if self.fts else ""), part="bus")
        self._unindexed = 0  # messages stored by this process since the last index_new
        if self.fts:
            self.index_new()

    def _relayout(self) -> None:
        """Rebuild the bus tables an older kernel made into today's layout (see _MESSAGES), each table on its
        own (a database from before deliveries existed has only `messages` to rebuild); the indexes and the
        search triggers are made again by the schema after it."""
        def plan(conn: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
            layouts = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"
                                        " AND name IN ('messages', 'bus_deliveries')").fetchall())
            tables = {}
            if "AUTOINCREMENT" in layouts.get("messages", "").upper():
                tables["messages"] = _RELAYOUT_MESSAGES
            if "bus_deliveries" in layouts and "WITHOUT ROWID" not in layouts["bus_deliveries"].upper():
                tables["bus_deliveries"] = _RELAYOUT_DELIVERIES
            if tables:
                count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
                log.warning("rebuilding the bus tables in the leaner layout, once: other processes wait for the "
                            "database meanwhile", extra={"tables": sorted(tables), "messages": count,
                                                         "expected_s": round(count / COPIED_PER_S, 1)})
            return tables

        if rebuilt := self.db.rebuild(plan):
            log.info("bus tables rebuilt", extra={"tables": rebuilt})

    def index_new(self) -> None:
        """Add every message stored since the last call to the search index, INDEX_BATCH per transaction
        (group commits: the index is derived, and the log keeps it in step with the messages)."""
        while True:
            with self.db.transaction(group_commit=True) as conn:
                done = conn.execute("SELECT coalesce(max(id), 0) FROM messages_fts_docsize").fetchone()[0]
                added = conn.execute("INSERT INTO messages_fts(rowid, content) SELECT seq, content FROM messages"
                                     " WHERE seq > ? ORDER BY seq LIMIT ?", (done, INDEX_BATCH)).rowcount
            if added < INDEX_BATCH:
                self._unindexed = 0
                return

    def _stored(self) -> None:
        """Count a message stored; a full batch is indexed at once, so a search never has much to catch up on."""
        self._unindexed += 1
        if self.fts and self._unindexed >= INDEX_BATCH:
            self.index_new()

    # ---- conversations -----------------------------------------------------------------------

    @staticmethod
    def _conv(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "participants": json.loads(row["participants"])}

    def create(self, title: str, participants: list[str], created_by: str) -> dict[str, Any]:
        title = (title or "").strip()
        if not title:
            raise InvalidArgument("a conversation needs a non-empty title")
        people = list(dict.fromkeys([created_by, *[str(p) for p in participants or []]]))
        row = {"id": new_id(), "title": title[:500], "participants": json.dumps(people), "created_by": created_by,
               "created_at": now_iso()}
        self.db.execute("INSERT INTO conversations (id, title, participants, created_by, created_at)"
                        " VALUES (:id, :title, :participants, :created_by, :created_at)", row)
        return self._conv(row)

    def get(self, conversation_id: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if row is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return self._conv(row)

    def find_by_title(self, title: str) -> dict[str, Any] | None:
        row = self.db.one("SELECT * FROM conversations WHERE title = ? ORDER BY created_at LIMIT 1", (title,))
        return self._conv(row) if row else None

    def join(self, conversation_id: str, who: str) -> dict[str, Any]:
        # Read and written in one write transaction: concurrent joins, from any process, all count.
        with self.db.transaction() as conn:
            row = conn.execute("SELECT participants FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            if row is not None and who not in (people := json.loads(row["participants"])):
                conn.execute("UPDATE conversations SET participants = ? WHERE id = ?",
                             (json.dumps([*people, who]), conversation_id))
        return self.get(conversation_id)  # NotFound when missing

    def ensure(self, title: str, who: str) -> dict[str, Any]:
        """The conversation with this title (created if missing), with `who` among its participants."""
        existing = self.find_by_title(title)
        return self.create(title, [], who) if existing is None else self.join(existing["id"], who)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The conversations with the newest messages first, each with its `message_count`."""
        rows = self.db.query(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
            " FROM conversations c"
            " ORDER BY COALESCE((SELECT MAX(m.seq) FROM messages m WHERE m.conversation_id = c.id), 0) DESC,"
            " c.created_at DESC LIMIT ?", (_limit(limit),))
        return [self._conv(row) for row in rows]

    # ---- messages ----------------------------------------------------------------------------

    @staticmethod
    def _env(row: dict[str, Any]) -> dict[str, Any]:
        """A stored message as an envelope's dict (the columns are the envelope's fields, in order, after `seq`)."""
        return {key: json.loads(value) if key == "payload" else value for key, value in row.items() if key != "seq"}

    def envelope(self, conversation_id: str, sender: str, content: str = "", kind: str = "message",
                 correlation_id: str = "", payload: dict[str, Any] | None = None, *,
                 known_conversation: bool = False) -> Envelope:
        """A new, checked envelope (not yet stored); its correlation id defaults to its own id.
        `known_conversation`: the caller got the conversation from the bus itself, so it is not looked up."""
        if kind not in KINDS:
            raise InvalidArgument(f"unknown envelope kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(content, str) or len(content) > MAX_CONTENT:
            raise InvalidArgument(f"content must be a string of at most {MAX_CONTENT} characters")
        if not known_conversation:
            self.get(conversation_id)  # NotFound when missing
        env = Envelope(sender=sender, conversation_id=conversation_id, kind=kind, content=content, payload=payload or {})
        env.correlation_id = correlation_id or env.id
        return env

    @staticmethod
    def _insert(conn: sqlite3.Connection, env: Envelope, *, or_ignore: bool = False,
                payload: dict[str, Any] | None = None) -> bool:
        """Store `env`, with `payload` in place of its own when given (what may be persisted of it)."""
        return conn.execute("INSERT INTO messages (id, correlation_id, sender, conversation_id, kind, content, payload,"
                            f" created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?){' ON CONFLICT DO NOTHING' if or_ignore else ''}",
                            (env.id, env.correlation_id, env.sender, env.conversation_id, env.kind, env.content,
                             to_json(env.payload if payload is None else payload), env.created_at)).rowcount == 1

    def post(self, conversation_id: str, sender: str, content: str = "", kind: str = "message",
             correlation_id: str = "", payload: dict[str, Any] | None = None) -> dict[str, Any]:
        env = self.envelope(conversation_id, sender, content, kind, correlation_id, payload)
        self._write(lambda conn: self._insert(conn, env))
        return env.as_dict()

    def _write(self, write: Callable[[sqlite3.Connection], T], *, group_commit: bool = False) -> T:
        """`write(conn)` in a transaction of its own, which stores messages."""
        with self.db.transaction(group_commit=group_commit) as conn:
            result = write(conn)
        self._stored()
        return result

    def record(self, env: Envelope, *, group_commit: bool = False) -> bool:
        """Store an envelope made elsewhere (a reply that came over Redis); False when its id is stored already.
        With `group_commit`, await `db.durable()` before relying on it."""
        return self._write(lambda conn: self._insert(conn, env, or_ignore=True), group_commit=group_commit)

    # ---- deliveries (see the module docstring) -------------------------------------------------

    def _write_shared(self, write: Callable[[sqlite3.Connection], Any], *, alone: bool,
                      then: Callable[[], Any] | None = None, tag: str = "") -> asyncio.Future[Any]:
        """`write(conn)`, which stores messages, in the transaction the bus writes of this event-loop turn share;
        the future gives what `then()` returned once it is committed (what `write` returned, without `then`)."""
        def committed(result: Any) -> Any:
            self._stored()
            return then() if then is not None else result

        return self.db.shared_transaction(write, alone=alone, then=committed, tag=tag)

    def accept_shared(self, request: Envelope, target: str, sealed: bytes, *, stored_payload: dict[str, Any] | None = None,
                      alone: bool = False, then: Callable[[], T] | None = None) -> asyncio.Future[T | None]:
        """Store a request (`stored_payload` in place of its own payload, when given: what may be persisted of it)
        and its pending delivery, in the transaction the other bus writes of this event-loop turn share (a group
        commit: await `db.durable()` before acknowledging it). `then()` runs once it is committed, and the future
        gives what it returned; `alone`: see `Database.shared_transaction`."""
        def accept(conn: sqlite3.Connection) -> None:
            self._insert(conn, request, payload=stored_payload)
            conn.execute("INSERT INTO bus_deliveries (envelope_id, target, sealed, accepted_at) VALUES (?, ?, ?, ?)",
                         (request.id, target, sealed, now_iso()))

        return self._write_shared(accept, alone=alone, tag="accept", then=then)

    def complete(self, request_id: str, reply: Envelope) -> bool:
        """Store the reply and ack the delivery, in one transaction; False (nothing written) when it was acked already."""
        return self._write(lambda conn: self._complete(conn, request_id, reply))

    def complete_shared(self, request_id: str, reply: Envelope, *, stored_payload: dict[str, Any] | None = None,
                        alone: bool = False) -> asyncio.Future[bool]:
        """`complete` (storing `stored_payload` in place of the reply's own, when given), in the transaction the
        other bus writes of this event-loop turn share (a group commit: await `db.durable()` before handing the
        reply on; `alone`: see `Database.shared_transaction`)."""
        return self._write_shared(lambda conn: self._complete(conn, request_id, reply, stored_payload), alone=alone)

    def _complete(self, conn: sqlite3.Connection, request_id: str, reply: Envelope,
                  stored_payload: dict[str, Any] | None = None) -> bool:
        acked = conn.execute("UPDATE bus_deliveries SET state = 'acked', reply_id = ?, sealed = NULL, acked_at = ?"
                             " WHERE envelope_id = ? AND state = 'pending'", (reply.id, now_iso(), request_id)).rowcount
        if acked == 1:
            self._insert(conn, reply, payload=stored_payload)
        return acked == 1

    def delivery(self, request_id: str) -> dict[str, Any] | None:
        """The delivery row of a request: envelope_id, target, state, attempts, sealed, reply_id."""
        return self.db.one("SELECT envelope_id, target, state, attempts, sealed, reply_id FROM bus_deliveries"
                           " WHERE envelope_id = ?", (request_id,))

    def pending(self, targets: list[str]) -> list[dict[str, Any]]:
        """Deliveries to these MADs not acked yet, oldest first."""
        return self.db.query("SELECT d.envelope_id, d.target, d.attempts, d.sealed FROM bus_deliveries d"
                             " JOIN messages m ON m.id = d.envelope_id WHERE d.state = 'pending'"
                             f" AND d.target IN ({', '.join('?' * len(targets)) or 'NULL'}) ORDER BY m.seq", targets)

    def count_attempt(self, request_id: str) -> int:
        """Note one more start of a pending delivery; returns how many starts it has had."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE bus_deliveries SET attempts = attempts + 1 WHERE envelope_id = ?", (request_id,))
            row = conn.execute("SELECT attempts FROM bus_deliveries WHERE envelope_id = ?", (request_id,)).fetchone()
        return int(row["attempts"]) if row else 0

    def message(self, envelope_id: str) -> Envelope:
        row = self.db.one("SELECT * FROM messages WHERE id = ?", (envelope_id,))
        if row is None:
            raise NotFound(f"no envelope {envelope_id!r}")
        return Envelope.model_validate(self._env(row))

    def _envelopes(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        return [self._env(row) for row in self.db.query(sql, params)]

    def history(self, conversation_id: str, limit: int = 50) -> list[dict[str, Any]]:
        self.get(conversation_id)
        return self._envelopes("SELECT * FROM (SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq DESC"
                               " LIMIT ?) AS newest ORDER BY seq ASC", (conversation_id, _limit(limit)))

    def by_correlation(self, correlation_id: str) -> list[dict[str, Any]]:
        return self._envelopes("SELECT * FROM messages WHERE correlation_id = ? ORDER BY seq", (correlation_id,))

    def search(self, query: str, limit: int = 20) -> list[dict[str, Any]]:
        words = _WORD.findall(query or "")
        if not words:
            return []
        limit = _limit(limit)
        if (found := self.db.search(words, limit)) is not None:  # the backend's own (PostgreSQL's)
            return [self._env(row) for row in found]
        if self.fts:
            self.index_new()  # what was stored since the last batch
            # Each word quoted: user text is never parsed as FTS5 syntax.
            match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
            return self._envelopes("SELECT m.* FROM messages_fts f JOIN messages m ON m.seq = f.rowid"
                                   " WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?", (match, limit))
        clause = " AND ".join("content LIKE ? ESCAPE '\\'" for _ in words)
        params: list[Any] = ["%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%" for w in words]
        return self._envelopes(f"SELECT * FROM messages WHERE {clause} ORDER BY seq DESC LIMIT ?", [*params, limit])
