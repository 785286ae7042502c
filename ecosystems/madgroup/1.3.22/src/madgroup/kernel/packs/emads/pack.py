"""The eMADs pack: instances of a role (an ephemeral MAD), spawned by a MAD for one task, gone when it is done.

An artifact carries this pack only when its spec has a role (`lifecycle: ephemeral`); the core checks
every MAD's lifecycle and `spawns` (runtime.py) and, without roles, refuses every spawn.

A MAD class with `lifecycle = "ephemeral"` is a *role*, not a running MAD: it gets no slot at start,
serves no tool and is never asked over the bus. A MAD whose `spawns` names the role calls
`self.spawn(role, task)`, and the kernel:

1. waits for room: at most the role's `max_instances` instances run at once; the others wait
   their turn, first come first served;
2. names the instance `<role>-<n>` (n counts per role in the `emad_instances` table, so a name
   never comes back, not even after a restart) and records it "running";
3. makes it with a kernel handle of its own: its name is the caller of its capabilities, the
   sender of its posts and asks, the actor in the audit log; its grants, tables and model
   budget are its role's (one budget per role, however many instances spend it);
4. joins it to the task conversation, where the spawner's task is posted, and runs its
   `on_start`, then `work(task)` under the role's `task_timeout_s`, contained by the supervisor
   (an exception or an overrun fails the instance, never the process);
5. records and posts (kind "report", sent by the instance) what it reported, or that it failed
   and how: the exception's type, never its message (it may hold anything); runs its `on_stop`;
   and forgets it: from then on its name is refused as a caller.

The spawner gets {instance, role, conversation_id, state ("reported" or "failed"), report}.
What earlier instances of a role reported stays in the table and the next instance reads it
(`Mad.earlier_reports`): the role's memory across instances (the seed's role model shared by
every instance of the role: here their reports, not trained weights). An instance a dead process
left "running" is marked "failed" (interrupted) when the next runtime opens the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ... import logs
from ...bus import MAX_CONTENT, ConversationBus, now_iso, to_json
from ...db import Database
from ...errors import InvalidArgument, KernelError

if TYPE_CHECKING:
    from ...mad import Mad
    from ...metrics import Metrics
    from ...supervisor import Supervisor

log = logs.get("emads")

INTERRUPTED = "interrupted: the process ended before the instance reported"

# The kernel never deletes a row: `n` (the next is the role's largest + 1) is never handed out twice.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS emad_instances (
    id INTEGER PRIMARY KEY,
    role TEXT NOT NULL,
    n INTEGER NOT NULL,
    instance TEXT NOT NULL UNIQUE,
    spawned_by TEXT NOT NULL,
    task TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'reported', 'failed')),
    report TEXT NOT NULL DEFAULT '',
    started_at TEXT NOT NULL,
    ended_at TEXT NOT NULL DEFAULT '',
    UNIQUE (role, n)
);
CREATE INDEX IF NOT EXISTS emad_instances_state ON emad_instances (state);
"""


class _Cap:
    """At most `limit` holders at once, served first come first served. Not asyncio.Semaphore: that one binds
    to the first event loop it waits on, and one runtime may be driven by several asyncio.run calls in turn."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn  # done when a holder hands its place over
        except asyncio.CancelledError:
            if turn.cancelled():
                self._waiters.remove(turn)
            else:  # handed over, then cancelled before it ran: pass the place on
                self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the place goes to it: `held` stays
                return
        self.held -= 1


class Emads:
    """The eMAD instances of one runtime: the `emad_instances` table, the live instances and each role's cap."""

    def __init__(self, db: Database, roles: dict[str, type[Mad]], bus: ConversationBus, supervisor: Supervisor,
                 metrics: Metrics):
        self.db = db
        self.bus = bus
        self.supervisor = supervisor
        self.metrics = metrics
        self._caps = {name: _Cap(cls.max_instances) for name, cls in roles.items()}
        self.live: dict[str, str] = {}  # instance -> its role, from its start to its end
        db.script(_SCHEMA, part="emads")
        # A SQLite state is one process's: what it finds running, a previous process left. On a database replicas
        # share, the others run theirs: only an instance older than the longest task timeout (and a minute) is no one's.
        stale_before = "~"  # sorts after every timestamp: all of them
        if db.dialect != "sqlite":
            longest = max((cls.task_timeout_s for cls in roles.values()), default=0.0) + 60
            stale_before = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - longest))
        interrupted = db.execute("UPDATE emad_instances SET state = 'failed', report = ?, ended_at = ?"
                                 " WHERE state = 'running' AND started_at < ?", (INTERRUPTED, now_iso(), stale_before)).rowcount
        if interrupted:
            log.warning("eMAD instances a previous process left running are marked failed", extra={"instances": interrupted})

    def running(self, role: str) -> int:
        """How many instances of `role` are live now."""
        return sum(1 for r in self.live.values() if r == role)

    def reports(self, instance: str, limit: int = 20) -> list[dict[str, Any]]:
        """What the ended instances of live `instance`'s role reported, the `limit` newest, oldest first."""
        role = self.live.get(instance)
        if role is None:
            raise InvalidArgument(f"{instance!r} is no live eMAD: earlier_reports is for an instance of a role, "
                                  "to read what earlier instances of its role reported")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InvalidArgument(f"limit must be a positive integer, got {limit!r}")
        return self.db.query(
            "SELECT instance, task, state, report, started_at, ended_at FROM (SELECT * FROM emad_instances"
            " WHERE role = ? AND state != 'running' ORDER BY id DESC LIMIT ?) AS newest ORDER BY id", (role, min(limit, 1000)))

    async def run(self, cls: type[Mad], spawner: str, task: str, conversation_id: str,
                  make: Callable[[str], Mad]) -> dict[str, Any]:
        """Run one instance of role `cls` on `task` in the conversation (steps 1 to 5 of the module docstring);
        `make(instance)` builds it with its kernel handle. The caller checked the spawner's grants."""
        role = cls.name
        async with self._caps[role]:
            instance = self._begin(role, spawner, task, conversation_id)
            token = logs.mad.set(instance)
            mad: Mad | None = None
            state, report = "failed", ""
            try:
                title = self.bus.join(conversation_id, instance)["title"]
                self.bus.post(conversation_id, spawner, task, payload={"spawned": instance, "role": role})
                mad = started = make(instance)
                started.conversation_ids[title] = conversation_id  # so self.conversation_id() is the task's
                await self.supervisor.start(role, started.on_start)
                result = await self.supervisor.task(role, lambda: started.work(task), cls.task_timeout_s)
                state, report = "reported", (result if isinstance(result, str) else to_json(result))[:MAX_CONTENT]
            except KernelError as exc:  # a refusal, or what the supervisor made of a raise or an overrun
                report = str(exc)
            except BaseException as exc:  # its spawner stopped waiting (cancelled), or a fault of the kernel's
                report = ("cancelled: its spawner stopped waiting" if isinstance(exc, asyncio.CancelledError)
                          else f"failed in the kernel ({type(exc).__name__})")
                raise
            finally:
                try:
                    self._end(instance, role, conversation_id, state, report)
                    if mad is not None:
                        with contextlib.suppress(KernelError):  # logged by the supervisor; the report stands
                            await self.supervisor.stop(role, mad.on_stop)
                finally:
                    del self.live[instance]
                    logs.mad.reset(token)
        return {"instance": instance, "role": role, "conversation_id": conversation_id, "state": state,
                "report": report}

    def _begin(self, role: str, spawner: str, task: str, conversation_id: str) -> str:
        with self.db.transaction() as conn:
            n = conn.execute("SELECT coalesce(max(n), 0) + 1 FROM emad_instances WHERE role = ?", (role,)).fetchone()[0]
            instance = f"{role}-{n}"
            conn.execute("INSERT INTO emad_instances (role, n, instance, spawned_by, task, conversation_id, started_at)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)", (role, n, instance, spawner, task, conversation_id, now_iso()))
        self.live[instance] = role
        log.info("eMAD spawned", extra={"instance": instance, "spawned_by": spawner})
        return instance

    def _end(self, instance: str, role: str, conversation_id: str, state: str, report: str) -> None:
        self.db.execute("UPDATE emad_instances SET state = ?, report = ?, ended_at = ? WHERE instance = ?",
                        (state, report, now_iso(), instance))
        self.bus.post(conversation_id, instance, report, "report", payload={"role": role, "state": state})
        self.metrics.spawn(role, state)
        log.info("eMAD ended", extra={"instance": instance, "state": state})
