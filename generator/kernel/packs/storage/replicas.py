"""The replicas serving on a state: a heartbeat row each, so a version about to change the storage knows who
still reads it (a contract migration waits until no older replica is live; `migrate down` until none needs
what it would undo).

A served runtime (Runtime.start) registers itself in `replicas` (its version, its storage level: how many
migrations its code knows, its pid and host, when it was last seen), renews the row every HEARTBEAT_S and
removes it at a clean stop. A replica killed outright stops renewing: once unseen for LIVE_S it no longer
counts, and a later start sweeps its row away. Times are each host's clock (UTC); LIVE_S is generous enough
for the clocks of hosts kept in sync by NTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from ... import logs
from ...bus import now_iso
from ...db import Database

HEARTBEAT_S = 5.0
LIVE_S = 30.0
FORGET_S = 3600.0  # rows unseen this long (killed replicas) are removed when a replica registers

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    level INTEGER NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    last_seen TEXT NOT NULL
)
"""

log = logs.get("storage")


def _ago(seconds: float) -> str:
    """now_iso()'s format, `seconds` ago: the rows' times compare as text."""
    return (datetime.now(UTC) - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def live_replicas(db: Database) -> list[dict[str, Any]]:
    """The replicas seen within LIVE_S, oldest storage level first ([] on a state no replica ever served)."""
    if not db.has_table("replicas"):
        return []
    return db.query("SELECT id, version, level, host, pid, started_at, last_seen FROM replicas"
                    " WHERE last_seen > ? ORDER BY level, started_at", (_ago(LIVE_S),))


class Replica:
    """This process's heartbeat row: `start()` once the runtime serves (on its event loop), `stop()` before the
    database closes."""

    def __init__(self, db: Database, level: int):
        self.db = db
        self.level = level
        self.id = uuid.uuid4().hex
        self.version = ""
        self._task: asyncio.Task[None] | None = None

    def start(self, version: str) -> None:
        """Register (again: a runtime started twice keeps one row) and beat on the running event loop."""
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        self.version = version
        self.db.script(_SCHEMA, part="replicas")
        self.db.execute("DELETE FROM replicas WHERE last_seen < ?", (_ago(FORGET_S),))
        started = now_iso()
        self.db.execute("INSERT INTO replicas (id, version, level, host, pid, started_at, last_seen)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
                        (self.id, version, self.level, socket.gethostname(), os.getpid(), started, started))
        self._task = loop.create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:  # off the event loop: a PostgreSQL round trip must not stall the requests
                await asyncio.to_thread(self.db.execute, "UPDATE replicas SET last_seen = ? WHERE id = ?",
                                        (now_iso(), self.id))
            except Exception as exc:  # noqa: BLE001 - a database hiccup: the next beat tries again
                log.warning("replica heartbeat failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def stop(self) -> None:
        if self._task is None:
            return
        if self._task.get_loop() is asyncio.get_running_loop():  # (one started on a loop since closed is gone)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        try:
            self.db.execute("DELETE FROM replicas WHERE id = ?", (self.id,))
        except Exception as exc:  # noqa: BLE001 - the database is gone: the row lapses after LIVE_S anyway
            log.warning("replica row not removed", extra={"error": f"{type(exc).__name__}: {exc}"})
