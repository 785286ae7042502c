"""How request envelopes travel to the MAD that handles them, and how replies travel back.

Two transports, chosen by configuration (`serve --bus URL`, or `<ECO>_BUS_URL`):

- `LocalTransport` (the default, no URL or `local`): one process, the SQLite bus. A request is
  accepted once its envelope and delivery row are committed (`ConversationBus.accept`); the
  delivery then runs as a task on the sender's event loop, and its reply is recorded and the
  delivery acked in one transaction. Both are group commits (db.py): the reply is handed back,
  or a `submit` returns, only after an fdatasync that covers them, shared by every hop in flight.
  Deliveries left pending by a crash run again at start-up.
- `RedisTransport` (`redis://host:port/db`, `rediss://...`, `unix://...`): several processes,
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

Everything a transport keeps outside the secrets store is sealed (AES-GCM, a key derived from
the secrets key with HKDF): a pending delivery's real payload in SQLite, and every envelope and
reply on Redis, bound to the stream (or request) it belongs to. Redis never sees a tool's
arguments or results in clear, and an entry moved to another stream does not open. So every
process on one bus needs the same secrets key (`<ECO>_SECRETS_KEY`); an entry sealed under
another key is logged and left pending for a process that can open it.

Handlers run through the runtime's `dispatch` (under the supervisor); a handler that raises is
an answer (an error reply), not a lost delivery. Only a process that dies mid-delivery leaves
it pending, and then it runs again: see the contract for MAD authors in `bus.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import socket
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel

from . import logs
from .bus import MAX_ATTEMPTS, ConversationBus, Envelope, to_json
from .errors import DurabilityError, InvalidArgument, KernelError

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logs.get("transport")

GROUP = "mads"  # the consumer group of every MAD stream
HANDLED_TTL_S = 7 * 24 * 3600  # how long a handled request's reply is kept to answer a duplicate
REPLY_TTL_S = 24 * 3600  # a reply stream nobody reads (its process died) expires
REDIS_SCHEMES = ("redis", "rediss", "unix")



class TransportError(KernelError):
    """The bus cannot take or carry a request (shutting down, Redis unreachable, no reply in time)."""

    code = "unavailable"


class SealError(KernelError):
    """A sealed envelope does not open: another key (`foreign_key`), or damaged or moved."""

    code = "sealed"

    def __init__(self, message: str, *, foreign_key: bool):
        super().__init__(message)
        self.foreign_key = foreign_key


class Sealer:
    """AES-GCM under a key derived from the secrets key; the context (a stream name, an id) is the
    associated data, so a sealed blob opens only where it was sealed for."""

    _VERSION = b"\x01"

    def __init__(self, secrets_key: bytes):
        def derive(info: bytes, length: int) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secrets_key)

        self._aead = AESGCM(derive(b"regen bus envelopes v1", 32))
        # Names the key without revealing it; shown in logs so an operator can tell replicas' keys apart.
        self.fingerprint = derive(b"regen bus key fingerprint v1", 6)

    def seal(self, data: bytes, context: str) -> bytes:
        nonce = os.urandom(12)
        return self._VERSION + self.fingerprint + nonce + self._aead.encrypt(nonce, data, context.encode())

    def open(self, blob: bytes | None, context: str) -> bytes:
        head = 1 + len(self.fingerprint)
        if not blob or len(blob) < head + 12 + 16 or blob[:1] != self._VERSION:
            raise SealError("not a sealed bus envelope", foreign_key=False)
        if blob[1:head] != self.fingerprint:
            raise SealError(
                f"sealed under another secrets key (fingerprint {blob[1:head].hex()}; this process has "
                f"{self.fingerprint.hex()}): every process on one bus needs the same secrets key",
                foreign_key=True,
            )
        try:
            return self._aead.decrypt(blob[head:head + 12], blob[head + 12:], context.encode())
        except InvalidTag:
            raise SealError(f"envelope failed authentication for {context!r} (damaged, or moved from elsewhere)",
                            foreign_key=False) from None


_compact = json.JSONEncoder(default=str, separators=(",", ":")).encode  # one encoder, not one per call


def _json(obj: Any) -> bytes:
    return _compact(obj).encode()


class Reply(BaseModel):
    """The answer to one request: the envelope as the requester gets it (payload with the real
    result), the payload as it may be stored (redacted), and the error code of an error reply."""

    envelope: Envelope
    stored_payload: dict[str, Any]
    code: str = ""
    admitted: bool = True  # False: refused before the handler ran (NotAdmitted), so it may be tried again

    @property
    def stored(self) -> Envelope:
        return self.envelope.model_copy(update={"payload": self.stored_payload})

    @property
    def result(self) -> Any:
        return self.envelope.payload.get("result")

    def unwrap(self) -> Any:
        """The result; for an error reply, the KernelError it carries (its class found by code)."""
        if self.envelope.kind != "error":
            return self.result
        raise _error_class(self.code)(self.envelope.content)

    @classmethod
    def recorded(cls, envelope: Envelope) -> Reply:
        """A reply as stored (a redelivered request's): the redacted payload is all there is."""
        return cls(envelope=envelope, stored_payload=envelope.payload, code=str(envelope.payload.get("code", "")))


def _error_class(code: str) -> type[KernelError]:
    """The KernelError subclass with this code whose constructor takes just a message (KernelError if none)."""
    stack: list[type[KernelError]] = [KernelError]
    while stack:
        cls = stack.pop()
        if cls.code == code and cls.__init__ is KernelError.__init__:
            return cls
        stack.extend(cls.__subclasses__())
    return KernelError


def reply_to(request: Envelope, result: Any, stored_result: Any) -> Reply:
    """The reply envelope answering `request` with `result` (`stored_result`: its redacted form)."""
    content = result if isinstance(result, str) else to_json(stored_result)[:10_000]
    base = {"to": request.sender, "in_reply_to": request.id}
    env = Envelope(correlation_id=request.correlation_id, sender=str(request.payload.get("to", "")),
                   conversation_id=request.conversation_id, kind="reply", content=content,
                   payload={**base, "result": result})
    return Reply(envelope=env, stored_payload={**base, "result": stored_result})


def error_to(request: Envelope, code: str, message: str) -> Reply:
    """The error envelope answering `request` (`message` must be safe to show and to store)."""
    payload = {"to": request.sender, "in_reply_to": request.id, "code": code}
    env = Envelope(correlation_id=request.correlation_id, sender=str(request.payload.get("to", "")),
                   conversation_id=request.conversation_id, kind="error", content=message, payload=payload)
    return Reply(envelope=env, stored_payload=dict(payload), code=code)


def abandoned(request: Envelope, attempts: int) -> Reply:
    return error_to(
        request, "abandoned",
        f"given up after {attempts - 1} deliveries that never completed (the process died during each); "
        "the request was not handled",
    )


Dispatch = Callable[[Envelope], Awaitable[Reply]]


class Transport(ABC):
    """Carries requests to the MADs this process serves and replies back to their senders."""

    name: ClassVar[str]

    def __init__(self, bus: ConversationBus, sealer: Sealer, dispatch: Dispatch):
        self._bus = bus
        self._sealer = sealer
        self._dispatch = dispatch
        self._hosted: list[str] = []
        self._inflight: set[asyncio.Task[Any]] = set()
        self._closed = False

    @abstractmethod
    async def start(self, hosted: Sequence[str]) -> None:
        """Begin delivering to these MADs (after delivering whatever a crash left pending)."""

    @abstractmethod
    async def submit(self, request: Envelope, stored_payload: dict[str, Any], *, want_reply: bool) -> Awaitable[Reply] | None:
        """Hand a request to the bus; returns once it is durably accepted. With `want_reply`, the
        awaitable gives its reply; without, the reply is recorded and nobody waits for it."""

    async def pause(self) -> None:
        """Stop taking new deliveries from other processes (shutdown began); in-flight work goes on."""

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop taking new deliveries, wait up to `drain_timeout_s` for those in flight, then close.
        A delivery cut off at the deadline is not acked: it runs again (here after a restart, or
        on another process of a shared bus)."""
        await self.pause()
        await self._drain(drain_timeout_s)
        self._closed = True
        await self._close()

    async def _close(self) -> None:
        """Release connections and background tasks (after the drain)."""

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, "serves": list(self._hosted), "in_flight": len(self._inflight)}

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the bus of this process is closed (shutting down); retry on another replica or after the restart")

    def _spawn(self, coro: Coroutine[Any, Any, Reply | None]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), DurabilityError):  # acked, but not known to be on disk: not acknowledged
            log.error("bus delivery done but not acknowledged: the disk did not confirm it", extra={"error": str(task.exception())})
        else:
            log.error("bus delivery failed; it stays pending and runs again", exc_info=task.exception())

    async def _drain(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while True:  # deliveries may start deliveries (a handler asking another MAD)
            mine = {t for t in self._inflight if t.get_loop() is loop and not t.done()}
            if not mine:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(mine, timeout=left)
        log.warning("bus drain deadline passed; cut-off deliveries stay pending and run again", extra={"in_flight": len(mine)})
        for task in mine:
            task.cancel()
        await asyncio.wait(mine, timeout=1.0)


class LocalTransport(Transport):
    """The SQLite bus of one process (see the module docstring)."""

    name = "local"

    async def start(self, hosted: Sequence[str]) -> None:
        self._hosted = list(hosted)
        self._closed = False
        await self._recover()

    async def submit(self, request: Envelope, stored_payload: dict[str, Any], *, want_reply: bool) -> Awaitable[Reply] | None:
        self._check_open()
        target = str(request.payload["to"])
        if target not in self._hosted:
            raise TransportError(f"no process serves MAD {target!r}: with the local bus every MAD runs in this process")
        sealed = self._sealer.seal(_json(request.payload), request.id)
        # A group commit (db.py), in the transaction of this turn's other bus writes: committed before the
        # handler runs, on disk before the sender is acknowledged, which for a request that waits for its
        # reply is when the reply (committed after it, in the same log) is. At once when nothing is in flight
        # and requests came one at a time lately; when they come in bursts, even the first of a burst waits
        # for the turn's commit (else it commits, and later syncs, alone). The delivery starts from the commit
        # itself (`then` runs whether anyone still waits or not): a sender that stops waiting cuts neither short.
        alone = not self._inflight and self._bus.db.last_batch.get("accept", 1) <= 1
        task = await self._bus.accept_shared(request, target, sealed, stored_payload=stored_payload, alone=alone,
                                             then=lambda: self._spawn(self._deliver(request)))
        if not want_reply:
            await self._bus.db.durable()
            return None
        return asyncio.shield(task)

    async def _deliver(self, request: Envelope) -> Reply:
        reply = await self._dispatch(request)
        alone = len(self._inflight) <= 1  # just this delivery: nothing to share a commit with
        acked = await self._bus.complete_shared(request.id, reply.envelope, stored_payload=reply.stored_payload, alone=alone)
        await self._bus.db.durable()
        if not acked:  # acked meanwhile: the first reply stands
            row = self._bus.delivery(request.id)
            return Reply.recorded(self._bus.message(row["reply_id"])) if row else reply
        return reply

    async def _recover(self) -> None:
        """Deliver again, oldest first, what a crash left pending."""
        pending = self._bus.pending(self._hosted)
        if pending:
            log.info("redelivering requests a previous run accepted and did not finish", extra={"count": len(pending)})
        for row in pending:
            try:
                payload = json.loads(self._sealer.open(row["sealed"], row["envelope_id"]))
            except SealError as exc:
                log.error("cannot redeliver a pending request; it stays pending",
                          extra={"envelope_id": row["envelope_id"], "error": str(exc)})
                continue
            request = self._bus.message(row["envelope_id"]).model_copy(update={"payload": payload})
            attempts = self._bus.count_attempt(request.id)
            if attempts > MAX_ATTEMPTS:
                log.error("request abandoned: every delivery died", extra={"envelope_id": request.id, "attempts": attempts - 1})
                self._bus.complete(request.id, abandoned(request, attempts).stored)
                continue
            # A delivery that fails outside its handler is logged (_ended) and stays pending; start-up goes on.
            await asyncio.wait({self._spawn(self._deliver(request))})


def takeovers_key(prefix: str) -> str:
    """The hash counting, per MAD, the deliveries taken over from a process that went silent."""
    return f"{prefix}:takeovers"


def heartbeat_key(prefix: str, consumer: str) -> str:
    """Exists while the process of this consumer lives (see RedisTransport.heartbeat)."""
    return f"{prefix}:alive:{consumer}"


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _redis_module() -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:  # pragma: no cover - redis is a dependency of every generated ecosystem
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


def make_transport(
    url: str,
    *,
    ecosystem: str,
    bus: ConversationBus,
    sealer: Sealer,
    dispatch: Dispatch,
    claim_idle_s: float = 30.0,
) -> Transport:
    """The transport `url` names: "" or "local" for the SQLite bus, redis://, rediss:// or unix:// for Redis."""
    url = (url or "").strip()
    if url in ("", "local"):
        return LocalTransport(bus, sealer, dispatch)
    scheme = urlsplit(url).scheme
    if scheme in REDIS_SCHEMES:
        return RedisTransport(url, ecosystem, bus, sealer, dispatch, claim_idle_s=claim_idle_s)
    raise InvalidArgument(
        f"unknown bus {redact_url(url)!r}: use 'local' (the default, one process) or a Redis URL "
        "such as redis://127.0.0.1:6379/0"
    )


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
