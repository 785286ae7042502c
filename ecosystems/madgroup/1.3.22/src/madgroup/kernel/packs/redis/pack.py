"""The Redis pack: the bus transport for several processes, and the operator's view of it.

`RedisTransport` (`redis://host:port/db`, `rediss://...`, `unix://...`): several processes,
on one host or several, share one Redis. Each MAD has a stream (`regen:<eco>:bus:<mad>`)
and a consumer group ("mads"); every process serving that MAD is a consumer of the group
(XREADGROUP), so replicas share the work. The handler's reply is stored (`...:handled:<mad>:
<id>`, kept 7 days), sent to the requesting process's reply stream, and the entry acked and
deleted, all in one MULTI/EXEC: an entry is acked only once its result is in Redis. A live
process renews its claim on the entries it is working on (XCLAIM JUSTID), so an entry idle
for `claim_idle_s` belongs to a dead process, and any other process takes it over
(XAUTOCLAIM) and runs it. A request whose id was handled already gets the stored reply,
not a second run. Durability is Redis's: run it with `appendonly yes` (and
`appendfsync always` for the guarantee the SQLite bus gives; `everysec` may lose the
last second on a power loss).
Every process joins the groups of the MADs it serves at its start (XGROUP CREATECONSUMER)
and keeps a heartbeat key while it lives; a consumer whose heartbeat lapsed and that holds
no entry (its entries were taken over, or it had none) is removed by a live process
(XGROUP DELCONSUMER, checked and done in one script). Under load, commands share a bounded
pool (BlockingConnectionPool) and wait for a free connection; the two blocking reads, the claim
renewals and the heartbeat have connections of their own, so a busy pool never delays a
delivery or a reply, nor lets a live process's work be taken over.

The pack enters an artifact only when its spec names it (`packs: {redis: {}}` in ecosystem.yaml), with the
`redis` package; without it, `serve --bus redis://...` and `bus status|forget|send` (parsed by the pack's
`cli.py`; `bus_command`, here, runs them) say so. Sealing, replies and the `Transport` contract
are the core's (transport.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import socket
import sqlite3
import sys
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from ... import logs
from ...bus import MAX_ATTEMPTS, ConversationBus, Envelope
from ...errors import InvalidArgument, KernelError
from ...transport import Dispatch, Reply, Sealer, SealError, Transport, TransportError, _json, abandoned, redact_url

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logs.get("transport")

GROUP = "mads"  # the consumer group of every MAD stream
HANDLED_TTL_S = 7 * 24 * 3600  # how long a handled request's reply is kept to answer a duplicate
REPLY_TTL_S = 24 * 3600  # a reply stream nobody reads (its process died) expires


def takeovers_key(prefix: str) -> str:
    """The hash counting, per MAD, the deliveries taken over from a process that went silent."""
    return f"{prefix}:takeovers"


def heartbeat_key(prefix: str, consumer: str) -> str:
    """Exists while the process of this consumer lives (see RedisTransport.heartbeat)."""
    return f"{prefix}:alive:{consumer}"


def _redis_module() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:  # pragma: no cover - the pack's pinned dependency
        raise KernelError("the Redis bus transport needs the `redis` package (pip install redis)") from None
    return aioredis


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisTransport(Transport):
    """Redis Streams shared by several processes (see the module docstring)."""

    name = "redis"
    SENDING_CONNECTIONS = 16  # the pool's room beyond one connection per delivery in flight
    # Off the shared pool, so bulk traffic never delays them: the deliveries' and the replies' blocking
    # reads, one each, and the claim renewals and heartbeat, whose lateness would let another process
    # take this one's deliveries over (and run them twice) while it is alive.
    BLOCKING_CONNECTIONS = 3
    # redis-py gives up on a connect or a reply after 5 s by default; a burst of thousands of requests
    # can keep this process's event loop busy that long, and a reply that arrived in time then counts
    # as lost. 30 s still tells a Redis that is gone; ?socket_timeout=... in the URL overrides it.
    SOCKET_TIMEOUT_S = 30.0
    # Removes consumer ARGV[2] from group ARGV[1] of stream KEYS[1], atomically, only if its process is
    # gone (no heartbeat at KEYS[2]: -2) and it holds no entry (-1): a consumer removed while holding
    # entries would drop them from the pending list, and no process would ever run them.
    DROP_DEAD_CONSUMER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

    def __init__(
        self,
        url: str,
        ecosystem: str,
        bus: ConversationBus,
        sealer: Sealer,
        dispatch: Dispatch,
        *,
        claim_idle_s: float = 30.0,
        reply_timeout_s: float = 120.0,
        batch: int = 16,
        max_in_flight: int = 64,
        block_s: float = 1.0,
        max_connections: int = 0,
        pool_timeout_s: float = 60.0,
    ):
        """`max_in_flight`: deliveries this process runs at once; `max_connections`: the pool every
        command but the blocking reads shares (0: `max_in_flight` + SENDING_CONNECTIONS). A command
        finding every connection busy waits up to `pool_timeout_s` for one (backpressure) instead of
        failing; the blocking reads, claim renewals and heartbeat have connections of their own."""
        super().__init__(bus, sealer, dispatch)
        if not claim_idle_s > 0 or not reply_timeout_s > 0 or not pool_timeout_s > 0:
            raise InvalidArgument("claim_idle_s, reply_timeout_s and pool_timeout_s must be > 0 seconds")
        self._aioredis = _redis_module()
        self.url = url
        self.prefix = f"regen:{ecosystem}"
        # Unique per process start: a restarted process is a new consumer, its predecessor's
        # pending entries are taken over like any dead consumer's.
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.replies = f"{self.prefix}:replies:{self.consumer}"
        # Set while this process lives (renewed with its claims, expires claim_idle_s after its last
        # renewal): a consumer without one belongs to a process that is gone (`bus status`: alive).
        self.heartbeat = heartbeat_key(self.prefix, self.consumer)
        self.claim_idle_s = claim_idle_s
        self.reply_timeout_s = reply_timeout_s
        self._batch = batch
        self._max_in_flight = max_in_flight
        self._block_ms = int(block_s * 1000)
        self.max_connections = max_connections or max_in_flight + self.SENDING_CONNECTIONS
        self.pool_timeout_s = pool_timeout_s
        # Drills only (`serve --drill-hold`): each delivery waits this long, pending here, before it runs.
        self.hold_s = 0.0
        self._redis: Redis | None = None
        self._blocking: Redis | None = None  # blocking reads, claim renewals, heartbeat: off the shared pool
        self._drop_consumer: Any = None  # the DROP_DEAD_CONSUMER script, registered at start
        self._mad_of: dict[str, str] = {}
        self._working: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._by_request: dict[str, asyncio.Lock] = {}
        self._reader: asyncio.Task[None] | None = None
        self._claimer: asyncio.Task[None] | None = None
        self._replier: asyncio.Task[None] | None = None
        self._paused = False

    def stream(self, mad: str) -> str:
        return f"{self.prefix}:bus:{mad}"

    def _handled_key(self, mad: str, request_id: str) -> str:
        return f"{self.prefix}:handled:{mad}:{request_id}"

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise TransportError("the Redis bus is not started")
        return self._redis

    @property
    def blocking(self) -> Redis:
        if self._blocking is None:
            raise TransportError("the Redis bus is not started")
        return self._blocking

    def _client(self, max_connections: int) -> Redis:
        """A client on a pool of its own: at most `max_connections`, a command waits for a free one."""
        pool = self._aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=max_connections, timeout=self.pool_timeout_s,
            socket_timeout=self.SOCKET_TIMEOUT_S, socket_connect_timeout=self.SOCKET_TIMEOUT_S)
        return self._aioredis.Redis.from_pool(pool)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": redact_url(self.url), "consumer": self.consumer,
                "key_fingerprint": self._sealer.fingerprint.hex()}

    async def start(self, hosted: Sequence[str]) -> None:
        self._hosted = list(hosted)
        self._mad_of = {self.stream(m): m for m in self._hosted}
        self._redis = self._client(self.max_connections)
        self._blocking = self._client(self.BLOCKING_CONNECTIONS)
        self._drop_consumer = self._redis.register_script(self.DROP_DEAD_CONSUMER)
        try:
            await self.redis.ping()
            await self._beat()
            await self._ensure_groups()
        except self._aioredis.RedisError as exc:
            await self.redis.aclose()
            await self.blocking.aclose()
            self._redis = self._blocking = None
            raise TransportError(
                f"cannot reach the bus at {redact_url(self.url)} ({type(exc).__name__}: {exc}); "
                "start redis-server there, or fix serve --bus / the <ECO>_BUS_URL variable"
            ) from None
        self._closed = self._paused = False
        loop = asyncio.get_running_loop()
        self._replier = loop.create_task(self._read_replies(), name="bus replies")
        self._claimer = loop.create_task(self._claim_loop(), name="bus claims")
        if self._hosted:
            self._reader = loop.create_task(self._consume(), name="bus deliveries")
        log.info("bus on Redis", extra={"bus": redact_url(self.url), "consumer": self.consumer, "serves": self._hosted,
                                        "key_fingerprint": self._sealer.fingerprint.hex()})

    async def _ensure_groups(self) -> None:
        for stream in self._mad_of:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except self._aioredis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self._ensure_consumer()

    async def _ensure_consumer(self) -> None:
        """Join each group now, not at the first entry read (Redis 7.0 creates a reading consumer only
        then): `bus status` lists a live process from its start, and again if it was removed meanwhile."""
        for stream in self._mad_of:
            await self.redis.xgroup_createconsumer(stream, GROUP, self.consumer)

    # ---- sending -----------------------------------------------------------------------------

    async def submit(self, request: Envelope, stored_payload: dict[str, Any], *, want_reply: bool) -> Awaitable[Reply] | None:
        self._check_open()
        target = str(request.payload["to"])
        stream = self.stream(target)
        # The sender's history; Redis holds the request itself. A group commit: on disk by the time its reply
        # is handed back (the reply reader syncs), or with the next fsync of anything else.
        self._bus.record(request.model_copy(update={"payload": stored_payload}), group_commit=True)
        future: asyncio.Future[Reply] | None = None
        if want_reply:
            future = asyncio.get_running_loop().create_future()
            self._waiting[request.id] = future
        body = {"request": request.model_dump(), "reply_to": self.replies}
        try:
            await self.redis.xadd(stream, {"e": self._sealer.seal(_json(body), stream)})
        except self._aioredis.RedisError as exc:
            self._waiting.pop(request.id, None)
            raise TransportError(f"the bus at {redact_url(self.url)} did not take the request to {target!r}: {exc}") from None
        return None if future is None else self._await_reply(request, future)

    async def _await_reply(self, request: Envelope, future: asyncio.Future[Reply]) -> Reply:
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.reply_timeout_s)
        except TimeoutError:
            target = request.payload.get("to")
            raise TransportError(
                f"no reply from MAD {target!r} within {self.reply_timeout_s:g} s: is a process serving it running? "
                f"(`python -m <package> bus status`) The request stays queued and runs when one is."
            ) from None
        finally:
            self._waiting.pop(request.id, None)

    async def _read_replies(self) -> None:
        last = "0-0"
        # Loops end on a flag, not only on cancellation: redis-py can swallow a cancellation that
        # lands as a blocking read returns, and the loop must still end within one block_s.
        while not self._closed:
            try:
                got = await self.blocking.xread({self.replies: last}, count=100, block=self._block_ms)
            except self._aioredis.RedisError as exc:
                log.warning("bus unreachable while reading replies; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
                continue
            for _stream, entries in got:
                last = _s(entries[-1][0])
                await self._hand_back([self._take_reply(fields) for _entry_id, fields in entries])
                try:
                    await self.blocking.xdel(self.replies, *[e[0] for e in entries])
                except self._aioredis.RedisError as exc:  # they expire with the stream (REPLY_TTL_S)
                    log.warning("replies read but not deleted from the bus", extra={"error": str(exc)})

    async def _hand_back(self, answered: list[tuple[asyncio.Future[Reply], Reply] | None]) -> None:
        """Give a batch of replies to their senders once their history rows are on disk (one shared fsync);
        if that fails, or this loop is stopped meanwhile, the senders get the error, not a hang."""
        waiting = [pair for pair in answered if pair is not None]
        try:
            await self._bus.db.durable()
        except BaseException as exc:
            for future, _reply in waiting:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, KernelError) else TransportError(
                        f"the reply arrived but could not be recorded here ({type(exc).__name__}: {exc})"))
            if isinstance(exc, Exception):
                log.error("replies not handed back: recording them failed", extra={"error": str(exc)})
                return
            raise
        for future, reply in waiting:
            if not future.done():
                future.set_result(reply)

    def _take_reply(self, fields: dict[bytes, bytes]) -> tuple[asyncio.Future[Reply], Reply] | None:
        """Record a reply in the local history (a group commit); the waiting sender and its reply, if any."""
        request_id = _s(fields.get(b"id", b""))
        try:
            reply = Reply.model_validate_json(self._sealer.open(fields.get(b"r"), f"reply:{request_id}"))
        except SealError as exc:
            log.error("a reply on the bus does not open; dropped", extra={"in_reply_to": request_id, "error": str(exc)})
            return None
        try:
            self._bus.record(reply.stored, group_commit=True)
        except (KernelError, sqlite3.Error) as exc:  # history is best effort here; the reply still reaches its sender
            log.warning("reply not recorded in the local history", extra={"in_reply_to": request_id, "error": str(exc)})
        future = self._waiting.pop(request_id, None)
        return (future, reply) if future is not None else None

    # ---- delivering --------------------------------------------------------------------------

    async def _consume(self) -> None:
        streams = {stream: ">" for stream in self._mad_of}
        backoff = 0.1
        while not self._paused:
            room = self._max_in_flight - len(self._working)
            if room <= 0:
                await asyncio.sleep(0.01)
                continue
            try:
                got = await self.blocking.xreadgroup(GROUP, self.consumer, streams, count=min(room, self._batch),
                                                     block=self._block_ms)
            except self._aioredis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("bus consumer groups missing (Redis lost its data?); recreating them")
                await self._ensure_groups()
                continue
            except self._aioredis.RedisError as exc:
                log.warning("bus unreachable; retrying", extra={"error": str(exc), "retry_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            for stream, entries in got:
                for entry_id, fields in entries:
                    self._start(_s(stream), _s(entry_id), fields, claimed=False)

    def _start(self, stream: str, entry_id: str, fields: dict[bytes, bytes], *, claimed: bool) -> None:
        key = (stream, entry_id)
        if key in self._working:
            return
        task = self._spawn(self._handle(stream, entry_id, fields, claimed=claimed))
        self._working[key] = task
        task.add_done_callback(lambda _t: self._working.pop(key, None))

    async def _handle(self, stream: str, entry_id: str, fields: dict[bytes, bytes], *, claimed: bool) -> None:
        mad = self._mad_of[stream]
        if self.hold_s > 0:  # a drill: the entry stays pending here, its claim renewed, until the kill
            await asyncio.sleep(self.hold_s)
        try:
            body = json.loads(self._sealer.open(fields.get(b"e"), stream))
            request = Envelope.model_validate(body["request"])
            reply_stream = str(body["reply_to"])
        except SealError as exc:
            if exc.foreign_key:  # a process with the right key may take it over
                log.error("bus entry sealed under another key; left pending", extra={"mad": mad, "entry": entry_id, "error": str(exc)})
                return
            log.error("bus entry damaged; dropped", extra={"mad": mad, "entry": entry_id, "error": str(exc)})
            await self._ack(stream, entry_id)
            return
        # Two entries of one request in this process run one after the other: the second finds the first's reply.
        lock = self._by_request.setdefault(request.id, asyncio.Lock())
        try:
            async with lock:
                await self._run_once(mad, stream, entry_id, request, reply_stream, claimed=claimed)
        finally:
            if self._by_request.get(request.id) is lock and not lock.locked():
                del self._by_request[request.id]

    async def _run_once(self, mad: str, stream: str, entry_id: str, request: Envelope, reply_stream: str, *, claimed: bool) -> None:
        handled = self._handled_key(mad, request.id)
        blob = await self.redis.get(handled)
        if blob is None:
            attempts = await self._deliveries(stream, entry_id) if claimed else 1
            if attempts > MAX_ATTEMPTS:
                log.error("request abandoned: every delivery died", extra={"mad": mad, "envelope_id": request.id})
                reply = abandoned(request, attempts)
            else:
                reply = await self._dispatch_when_admitted(request)
            blob = self._sealer.seal(_json(reply.model_dump()), f"reply:{request.id}")
        # Result first, ack last, in one MULTI/EXEC: an entry is never acked without its result.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(handled, blob, ex=HANDLED_TTL_S)
            pipe.xadd(reply_stream, {"id": request.id, "r": blob})
            pipe.expire(reply_stream, REPLY_TTL_S)
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def _dispatch_when_admitted(self, request: Envelope) -> Reply:
        """Dispatch; a MAD at its max_concurrent_calls refuses it before its handler runs (`overloaded`, not
        admitted), which for a queued delivery means "not yet": it waits (pending here, its claim renewed)
        and runs once the MAD has room, up to reply_timeout_s (by then its sender stopped waiting), instead
        of failing under load. An `overloaded` raised by the handler itself is its answer: never run twice."""
        deadline = time.monotonic() + self.reply_timeout_s
        wait = 0.02
        reply = await self._dispatch(request)
        while not reply.admitted and time.monotonic() < deadline:
            await asyncio.sleep(wait * (0.5 + random.random()))
            wait = min(wait * 2, 1.0)
            reply = await self._dispatch(request)
        return reply

    async def _deliveries(self, stream: str, entry_id: str) -> int:
        rows = await self.redis.xpending_range(stream, GROUP, entry_id, entry_id, 1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _ack(self, stream: str, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def _claim_loop(self) -> None:
        """Renew the claim on entries this process works on; take over those a dead process left."""
        interval = max(self.claim_idle_s / 3, 0.05)
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                await self._renew()
                await self._beat()
                if not self._paused:
                    await self._ensure_consumer()
                    for stream in self._mad_of:
                        await self._take_over(stream)
                        await self._sweep(stream)
            except self._aioredis.RedisError as exc:
                log.warning("bus unreachable while claiming; retrying", extra={"error": str(exc)})

    async def _beat(self) -> None:
        if self._mad_of:
            await self.blocking.set(self.heartbeat, b"1", px=max(int(self.claim_idle_s * 1000), 1000))

    async def _sweep(self, stream: str) -> None:
        """Remove the consumers of processes that are gone (no heartbeat) and hold nothing more: those
        whose deliveries were taken over, and those of a dead process in groups where it held none."""
        for row in await self.redis.xinfo_consumers(stream, GROUP):
            name = _s(row["name"])
            if name == self.consumer or int(row["pending"]) > 0:
                continue
            if await self._drop_consumer(keys=[stream, heartbeat_key(self.prefix, name)], args=[GROUP, name]) >= 0:
                log.info("removed the consumer of a process that is gone; it held nothing",
                         extra={"mad": self._mad_of[stream], "consumer": name})

    async def _renew(self) -> None:
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in list(self._working):
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            await self.blocking.xclaim(stream, GROUP, self.consumer, 0, ids, justid=True)

    async def _take_over(self, stream: str) -> None:
        """Claim the entries idle for claim_idle_s (their process is dead, or frozen), run them, and
        count them in `bus status` (taken_over); `_sweep` then removes the consumer they came from."""
        idle_ms = int(self.claim_idle_s * 1000)
        start = "-"
        while (room := min(self._batch, self._max_in_flight - len(self._working))) > 0:
            rows = await self.redis.xpending_range(stream, GROUP, start, "+", room, idle=idle_ms)
            if not rows:
                return
            start = "(" + _s(rows[-1]["message_id"])
            owners = {_s(r["message_id"]): _s(r["consumer"]) for r in rows}
            # XCLAIM with the idle time: an entry renewed since XPENDING (its process lives) stays put.
            claimed = await self.redis.xclaim(stream, GROUP, self.consumer, idle_ms, list(owners))
            taken = 0
            for entry_id, fields in claimed:
                if not fields:  # an entry deleted meanwhile comes back without fields (or not at all)
                    continue
                owner = owners.get(_s(entry_id), "")
                if owner != self.consumer:
                    taken += 1
                    log.info("taking over a delivery a dead process left pending",
                             extra={"mad": self._mad_of[stream], "entry": _s(entry_id), "from": owner})
                self._start(stream, _s(entry_id), fields, claimed=True)
            if taken:
                await self.redis.hincrby(takeovers_key(self.prefix), self._mad_of[stream], taken)
            if len(rows) < room:
                return

    # ---- shutdown ----------------------------------------------------------------------------

    async def pause(self) -> None:
        self._paused = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None

    async def _close(self) -> None:
        for task in (self._claimer, self._replier):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._claimer, self._replier) if t is not None), return_exceptions=True)
        self._claimer = self._replier = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(TransportError("the bus closed before the reply came (shutting down)"))
        self._waiting.clear()
        if self._redis is not None:
            try:
                await self._forget_self()
            except self._aioredis.RedisError as exc:
                log.warning("could not leave the consumer groups cleanly", extra={"error": str(exc)})
            await self._redis.aclose()
            self._redis = None
        if self._blocking is not None:
            await self._blocking.aclose()
            self._blocking = None

    async def _forget_self(self) -> None:
        """Leave each group, unless entries are still pending here (others take them over, then remove it)."""
        await self.redis.delete(self.heartbeat)
        for stream in self._mad_of:
            await self._drop_consumer(keys=[stream, self.heartbeat], args=[GROUP, self.consumer])
        await self.redis.delete(self.replies)


def bus_status(url: str, ecosystem: str, mads: Sequence[str]) -> dict[str, Any]:
    """What an operator needs during a failover, per MAD: `queued` (entries on its stream, handled
    ones are deleted), `pending` (read by a process, not yet answered), `added` (requests ever sent
    to it over this Redis; None before Redis 7), `taken_over` (deliveries taken over from a process
    that went silent), and per consumer (one per process start, listed from the start) how many it
    holds pending, how long it has been idle (since it last got or claimed an entry) and whether its
    process is alive (its heartbeat, renewed with its claims)."""
    import redis

    prefix = f"regen:{ecosystem}:bus:"
    client = redis.Redis.from_url(url)
    try:
        out: dict[str, Any] = {"bus": redact_url(url), "mads": {}}
        taken = client.hgetall(takeovers_key(f"regen:{ecosystem}"))
        for mad in mads:
            stream = prefix + mad
            entry: dict[str, Any] = {"queued": client.xlen(stream), "pending": 0, "added": 0,
                                     "taken_over": int(taken.get(mad.encode(), 0)), "consumers": []}
            try:
                info = client.xinfo_stream(stream)
                entry["added"] = int(info["entries-added"]) if "entries-added" in info else None
                groups = {_s(g["name"]): g for g in client.xinfo_groups(stream)}
            except redis.ResponseError:  # no stream yet: no process ever served this MAD
                groups = {}
            if GROUP in groups:
                entry["pending"] = int(groups[GROUP]["pending"])
                entry["consumers"] = [
                    {"name": _s(c["name"]), "pending": int(c["pending"]), "idle_s": round(int(c["idle"]) / 1000, 1),
                     "alive": bool(client.exists(heartbeat_key(f"regen:{ecosystem}", _s(c["name"]))))}
                    for c in client.xinfo_consumers(stream, GROUP)
                ]
            out["mads"][mad] = entry
        return out
    except redis.RedisError as exc:
        raise TransportError(f"cannot reach the bus at {redact_url(url)}: {exc}") from None
    finally:
        client.close()


def bus_forget(url: str, ecosystem: str, mads: Sequence[str], consumer: str, wait_s: float = 0.0) -> list[str]:
    """Remove a dead process's consumer from every MAD's group it is in; returns those MADs. Refused
    while its process lives (heartbeat; `wait_s`: how long to wait for it to lapse, as it does
    claim_idle_s after the process died), and while it still holds entries (removing it would drop
    them from the pending lists, and no process would ever run them): checked and removed atomically."""
    import redis

    prefix = f"regen:{ecosystem}:bus:"
    client = redis.Redis.from_url(url)
    try:
        drop = client.register_script(RedisTransport.DROP_DEAD_CONSUMER)
        heartbeat = heartbeat_key(f"regen:{ecosystem}", consumer)
        deadline = time.monotonic() + wait_s
        while client.exists(heartbeat) and time.monotonic() < deadline:
            time.sleep(0.2)
        if client.exists(heartbeat):
            raise TransportError(f"consumer {consumer!r} belongs to a live process (its heartbeat is renewed): stop "
                                 "that process instead; it leaves the bus when it stops")
        member, holding = [], []
        for mad in mads:
            try:
                names = {_s(c["name"]) for c in client.xinfo_consumers(prefix + mad, GROUP)}
            except redis.ResponseError:  # no such stream or group
                continue
            if consumer not in names:
                continue
            member.append(mad)
            if client.xpending_range(prefix + mad, GROUP, "-", "+", 1, consumername=consumer):
                holding.append(mad)
        forgotten = []
        for mad in [] if holding else member:
            if drop(keys=[prefix + mad, heartbeat], args=[GROUP, consumer]) < 0:  # it took an entry meanwhile: alive
                holding.append(mad)
            else:
                forgotten.append(mad)
        if holding:
            raise TransportError(
                f"consumer {consumer!r} still holds deliveries ({', '.join(sorted(holding))}): a live process takes "
                f"them over once they are idle for its --claim-idle, and then removes it; run `bus status` until "
                f"they are gone, then retry"
            )
        return forgotten
    except redis.RedisError as exc:
        raise TransportError(f"cannot reach the bus at {redact_url(url)}: {exc}") from None
    finally:
        client.close()


def bus_command(config: Any, args: Any) -> int:
    """`bus status|forget|send` (the pack's cli.py parses them): the operator's view of the shared bus, and a drill's sender."""
    mads = [m.name for m in config.persistent_mads]  # a role has no stream: it is spawned, never asked
    if args.bus_command == "status":
        print(json.dumps(bus_status(args.bus, config.name, mads), indent=2))
        return 0
    if args.bus_command == "forget":
        refused = 0
        for consumer in args.consumer:
            try:
                gone = bus_forget(args.bus, config.name, mads, consumer, wait_s=args.wait)
            except KernelError as exc:
                print(f"error: {exc}", file=sys.stderr)
                refused += 1
                continue
            print(f"consumer {consumer!r} removed from the groups of {', '.join(gone)}" if gone
                  else f"consumer {consumer!r} is in no MAD's group (removed already, or never on this bus)")
        return 2 if refused else 0
    return asyncio.run(_send(config, args))


async def _send(config: Any, args: Any) -> int:
    """`bus send`: `--count` requests at once as MAD `--from` to `--to`, one JSON line per reply; 0 if all answered."""
    from ...runtime import Runtime

    runtime = Runtime(config, args.state, bus_url=args.bus, serve_mads=[])
    runtime.transport.reply_timeout_s = args.timeout
    await runtime.start()

    async def one() -> bool:
        try:
            result = await runtime.request(args.sender, args.target, prose=args.prose, tool=args.tool, args=args.args)
        except KernelError as exc:
            print(json.dumps({"ok": False, "code": exc.code, "error": str(exc)}), flush=True)
            return False
        print(json.dumps({"ok": True, "result": result}, default=str), flush=True)
        return True

    try:
        answered = await asyncio.gather(*(one() for _ in range(args.count)))
    finally:
        await runtime.stop()
    return 0 if all(answered) else 1
