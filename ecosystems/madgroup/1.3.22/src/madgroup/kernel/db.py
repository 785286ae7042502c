"""The ecosystem's single SQLite database (WAL mode), shared by the bus, secrets, budgets and the MADs' own
tables (the storage pack).

Calls are synchronous and short; one lock serialises them so the connection can be used
from the event loop and from worker threads alike.

Durability: every commit is fsynced before it returns (`synchronous=FULL`), except the bus's
hot path: the writes of one event-loop turn share one transaction (`shared_transaction`), a
group commit written without its own fsync, and nobody is told until `durable()`: one
fdatasync of the write-ahead log covers every commit made before it, so concurrent bus hops
share their commits and their fsyncs. A group commit is on disk before `durable()` returns;
before that it is already in the OS page cache, so a crashed process (SIGKILL) loses nothing;
only a power loss could.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from . import packs
from .errors import DurabilityError, InvalidArgument

T = TypeVar("T")
# A write queued for a shared transaction: the write, what follows its commit, its future, its tag.
SharedWrite = tuple[Callable[..., Any], Callable[..., Any] | None, asyncio.Future[Any], str]

IDENT = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def ident(name: str) -> str:
    """Validate an SQL identifier (table or column name) built from spec'd names."""
    if not isinstance(name, str) or not IDENT.match(name):
        raise InvalidArgument(f"invalid identifier {name!r}")
    return name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600 (keys, tokens): a temp file, fsync, rename, fsync the
    directory, so a crash leaves the old file or the new one, never a torn or world-readable one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # a new file, mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


class FileDocument:
    """A JSON document of the state (tokens.json) in a file of the state directory, mode 0600, replaced atomically
    under a lock file: `stamp()` changes whenever it does (None: none yet), `read()`, and `locked()` gives its text
    and how to replace it while no other process may. The postgres pack's PgDocument is one in the database."""

    def __init__(self, path: Path):
        self.path = path

    def stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    @contextmanager
    def locked(self) -> Iterator[tuple[str | None, Callable[[str], None]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.read(), lambda text: write_private(self.path, text.encode())
        finally:
            os.close(fd)


class Database:
    """The SQLite database of a state directory. The postgres pack's PostgresDatabase is another of these
    (`open_database`): the kernel's SQL is written in what the two share, with `?` and `:name` parameters,
    and a backend's errors are raised as sqlite3's classes (IntegrityError, OperationalError, DatabaseError)."""

    dialect = "sqlite"

    def __init__(self, path: Path):
        self._lock = threading.RLock()
        # Group commit (see the module docstring): group commits counted, and how many are known on disk.
        self._committed = self._synced = 0
        self._sync_failure: str = ""  # once an fdatasync failed, nothing more is acknowledged (see durable)
        # Writes waiting for the transaction they share with the rest of their event-loop turn, per loop.
        self._shared: dict[asyncio.AbstractEventLoop, list[SharedWrite]] = {}
        self._closed = False
        self.last_batch: dict[str, int] = {}  # tag -> how many writes so tagged the last batch had: bursts, or one at a time?
        self._open(path)

    def _open(self, path: Path) -> None:
        self.path = Path(path)
        self.folder = self.path.parent  # where the files kept beside the database go (the audit anchor)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The database (and its -wal/-shm files) holds ciphertexts and audit records: owner only.
        previous_umask = os.umask(0o077)
        try:
            self._conn = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
        finally:
            os.umask(previous_umask)
        os.chmod(self.path, 0o600)
        # FULL: a call that returned has its write on disk, even across a power loss. Group commits run
        # at NORMAL; the mode is switched only when the kind of write changes (`_sync_mode`).
        self._conn.execute("PRAGMA synchronous=FULL")
        self._full = True
        self._conn.execute("PRAGMA foreign_keys=ON")
        self.fts5 = bool(self.one("SELECT sqlite_compileoption_used('ENABLE_FTS5') AS yes")["yes"])
        self._wal_fd: int | None = None
        self._wal_lock = threading.Lock()

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            self._sync_mode(full=True)  # it may write, in autocommit
            return self._conn.execute(sql, params)

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._conn.execute(sql, params).fetchall()]

    def one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute(sql, params).fetchone()
            return dict(row) if row is not None else None

    def script(self, sql: str, part: str = "") -> None:
        """Run an SQL script (schema DDL) in one BEGIN IMMEDIATE transaction, so processes opening the
        database at once take turns (one's DROP TRIGGER between another's DROP and CREATE would collide).
        `part` names the kernel's schema it is (another backend runs its own DDL for it)."""
        with self._lock:
            if self._conn.in_transaction:  # executescript would COMMIT it first, whatever it held so far
                raise RuntimeError("Database.script cannot run inside an open transaction")
            self._sync_mode(full=True)
            with self._conn:  # ROLLBACK if the script fails midway (nothing to do once it committed)
                self._conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\n;\nCOMMIT;")  # own line: the script may end in a comment

    def rebuild(self, plan: Callable[[sqlite3.Connection], dict[str, Sequence[str]]]) -> list[str]:
        """Change tables' layouts SQLite's way (a table made anew, copied, the old one dropped, the new one
        renamed), in one transaction with foreign keys off, as that recipe asks. `plan(conn)` runs inside the
        transaction, so of two processes opening the database at once only the first rebuilds: it gives
        {table: its statements} for the tables still in an old layout (statements, not a script: the sqlite3
        module runs a script only after committing whatever transaction is open). Taken back, changing nothing,
        if a rebuilt table breaks a foreign key. Returns the tables rebuilt; the log they filled is then given back."""
        with self._lock:
            self._conn.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set before it
            try:
                with self.transaction() as conn:
                    tables = plan(conn)
                    for statements in tables.values():
                        for statement in statements:
                            conn.execute(statement)
                    for table in tables:
                        if broken := conn.execute(f"PRAGMA foreign_key_check({ident(table)})").fetchall():
                            raise sqlite3.IntegrityError(f"rebuilding table {table} would break {len(broken)} of its "
                                                         "foreign keys; nothing was changed")
            finally:
                self._conn.execute("PRAGMA foreign_keys=ON")
            if tables:  # the copy went through the write-ahead log: give its space back
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return list(tables)

    def _sync_mode(self, *, full: bool) -> None:
        """FULL for a write that must be on disk when it returns, NORMAL for a group commit (under the lock)."""
        if self._full != full:
            self._conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full = full

    @contextmanager
    def transaction(self, *, group_commit: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); yields the raw connection.

        With `group_commit` the COMMIT does not fsync: await `durable()` before anyone relies on it."""
        with self._lock:
            self._sync_mode(full=not group_commit)
            changes_before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            with self._conn:  # COMMIT; ROLLBACK if the body raises (or the COMMIT fails)
                yield self._conn
            if group_commit:
                self._committed += 1
            elif self._conn.total_changes != changes_before:
                # This commit wrote, so SQLite fsynced the WAL: every group commit before it is on disk too.
                # (A transaction that changed nothing writes and fsyncs nothing.)
                self._synced = self._committed

    def shared_transaction(self, write: Callable[[sqlite3.Connection], Any], *, alone: bool = False,
                           then: Callable[[Any], T] | None = None, tag: str = "") -> asyncio.Future[T]:
        """Run `write(conn)` in one transaction with every other write queued here in the same event-loop turn;
        the future gives what it returned, or what `then` made of it. `then` runs as soon as the batch is
        committed, whether anyone still waits or not: what must follow the commit (a delivery) goes there.

        If a write raises, the batch is taken back and each write runs again alone, so only that one fails
        (its caller gets the exception): a write must do nothing but write through `conn`. A group commit:
        committed when the future is done, on disk after `durable()`. Concurrent bus hops so share their
        commits as well as their fsyncs. `alone`: the caller knows nothing else is on its way: commit now.
        `tag`: a kind of write whose batch sizes `last_batch` keeps."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        queue = self._shared.get(loop)
        if alone and queue is None:  # a batch of one, committed now
            self._commit_batch([(write, then, done, tag)])
            return done
        if queue is None:
            queue = self._shared[loop] = []
            loop.call_soon(lambda: self._commit_batch(self._shared.pop(loop, [])))
        queue.append((write, then, done, tag))
        return done

    def _commit_batch(self, batch: list[SharedWrite]) -> None:
        for tag in {tag for _write, _then, _done, tag in batch if tag}:
            self.last_batch[tag] = sum(1 for *_, t in batch if t == tag)
        outcomes = self._outcomes([write for write, *_ in batch])
        for (_write, then, done, _tag), (value, exc) in zip(batch, outcomes, strict=True):
            if exc is None and then is not None:
                try:
                    value = then(value)
                except Exception as failed:  # noqa: BLE001 - the caller's, through the future
                    exc = failed
            if done.done():  # its caller stopped waiting; what it wrote stands
                continue
            if exc is None:
                done.set_result(value)
            else:
                done.set_exception(exc)

    def _outcomes(self, writes: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[Any, BaseException | None]]:
        """What each write returned, or raised: all in one group commit; if one raises, the batch is taken back
        and each write runs again alone, so only a failing one fails (its caller gets the exception)."""
        try:
            with self.transaction(group_commit=True) as conn:
                return [(write(conn), None) for write in writes]
        except Exception as exc:  # noqa: BLE001 - handed to the caller whose write it was, through the future
            if len(writes) == 1:
                return [(None, exc)]
        return [outcome for write in writes for outcome in self._outcomes([write])]

    async def durable(self) -> None:
        """Return once every commit made so far is on disk. Group commit: one fdatasync covers every
        commit before it, so of the hops whose commits one event-loop turn made, the first to get here
        syncs for all, and the others find their commits on disk already. (It runs on the loop, as a
        FULL commit's fsync does: a hand-off to a thread costs more than it overlaps.)

        Raises DurabilityError once an fdatasync has failed: after a failed fdatasync Linux may have
        dropped the dirty pages and a later one succeeds without them, so no later commit can be
        vouched for; the process must restart (healthy() turns false)."""
        if self._synced < self._committed and not self._sync_failure:
            covered = self._committed
            with self._wal_lock:
                try:
                    self._fdatasync_wal()
                    self._synced = max(self._synced, covered)
                except OSError as exc:
                    self._sync_failure = f"fdatasync of {self.path}-wal failed ({exc})"
        if self._sync_failure:
            raise DurabilityError(f"{self._sync_failure}; nothing written since can be acknowledged as durable: "
                                  "check the disk, then restart the process")

    def _fdatasync_wal(self) -> None:
        if self._closed:
            raise OSError("the database is closed")
        # The WAL lives as long as a connection is open (a checkpoint rewinds it in place and fsyncs it
        # first); reopen if it was replaced anyway (unlinked: no links left).
        if self._wal_fd is not None and os.fstat(self._wal_fd).st_nlink == 0:
            os.close(self._wal_fd)
            self._wal_fd = None
        if self._wal_fd is None:
            try:
                self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY)
            except FileNotFoundError:  # no WAL: every commit was checkpointed into the database, which is synced
                return
        os.fdatasync(self._wal_fd)

    def healthy(self) -> bool:
        try:
            return not self._sync_failure and self.one("SELECT 1 AS ok") == {"ok": 1}
        except sqlite3.Error:
            return False

    def close(self) -> None:
        with self._lock:
            with suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            with self._wal_lock:  # not under an fdatasync running on another thread
                self._closed = True
                if self._wal_fd is not None:
                    os.close(self._wal_fd)
                    self._wal_fd = None

    def document(self, name: str) -> FileDocument:
        """The state's document `name`: a file beside the database."""
        return FileDocument(self.folder / name)

    def serve_alone(self) -> None:
        """Claim the state for this process's local bus, which redelivers at start what the state holds pending
        (a SQLite state is one process's already; a shared database refuses a second claimant)."""

    def has_table(self, table: str) -> bool:
        return self.one("SELECT 1 AS yes FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)) is not None

    def unsynced(self) -> sqlite3.Connection:
        """A connection of its own whose commits are not fsynced (synchronous=NORMAL: a crash of the process
        loses none of them, a power cut the newest), for derived rows written on every call (the call ledger)."""
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def search(self, words: list[str], limit: int) -> list[dict[str, Any]] | None:
        """Messages matching every word, best first, by the backend's own text search; None: the bus searches."""
        return None

    def table_shape(self, table: str) -> dict[str, tuple[str, bool, int]]:
        """The columns of `table` as stored: name -> (SQL type, NOT NULL, position in the primary key)."""
        with self._lock:
            return stored_shape(self._conn, table)


def stored_shape(conn: sqlite3.Connection, table: str) -> dict[str, tuple[str, bool, int]]:
    rows = conn.execute(f"PRAGMA table_info({ident(table)})").fetchall()
    return {row[1]: (str(row[2]).upper(), bool(row[3]), int(row[5])) for row in rows}


def open_database(state_dir: Path, url: str = "") -> Database:
    """The state's database: SQLite in the state directory ("", the default), or the PostgreSQL server a
    postgresql:// URL names (the postgres pack's, when the build carries it), shared by replicas."""
    url = (url or "").strip()
    if not url:
        return Database(state_dir / "ecosystem.db")
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        return packs.module("postgres", packs.NO_POSTGRES).PostgresDatabase(url, state_dir)
    raise InvalidArgument(f"unknown database URL scheme {urlsplit(url).scheme!r}: leave --db out for the state "
                          "directory's SQLite, or give a PostgreSQL URL such as postgresql://regen@db.internal/shop")
