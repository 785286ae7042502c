"""How request envelopes travel to the MAD that handles them, and how replies travel back.

Two transports, chosen by configuration (`serve --bus URL`, or `<ECO>_BUS_URL`): the SQLite bus here, and
Redis Streams in the `redis` pack (packs/redis/), which an artifact carries only when its spec names
that pack (`packs: {redis: {}}` in ecosystem.yaml).

- `LocalTransport` (the default, no URL or `local`): one process, the SQLite bus. A request is
  accepted once its envelope and delivery row are committed (`ConversationBus.accept`); the
  delivery then runs as a task on the sender's event loop, and its reply is recorded and the
  delivery acked in one transaction. Both are group commits (db.py): the reply is handed back,
  or a `submit` returns, only after an fdatasync that covers them, shared by every hop in flight.
  Deliveries left pending by a crash run again at start-up.

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
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel

from . import logs, packs
from .bus import MAX_ATTEMPTS, ConversationBus, Envelope, to_json
from .errors import DurabilityError, InvalidArgument, KernelError

log = logs.get("transport")


class TransportError(KernelError):
    """The bus cannot take or carry a request (shutting down, Redis unreachable, no reply in time)."""

    code = "unavailable"


class SealError(KernelError):
    """A sealed envelope does not open: another key (`foreign_key`), or damaged or moved."""

    code = "sealed"

    def __init__(self, message: str, *, foreign_key: bool = False):
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
            raise SealError("not a sealed bus envelope")
        if blob[1:head] != self.fingerprint:
            raise SealError(
                f"sealed under another secrets key (fingerprint {blob[1:head].hex()}; this process has "
                f"{self.fingerprint.hex()}): every process on one bus needs the same secrets key",
                foreign_key=True,
            )
        try:
            return self._aead.decrypt(blob[head:head + 12], blob[head + 12:], context.encode())
        except InvalidTag:
            raise SealError(f"envelope failed authentication for {context!r} (damaged, or moved from "
                            "elsewhere)") from None


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


def _error_class(code: str) -> type[KernelError]:
    """The KernelError subclass with this code whose constructor takes just a message (KernelError if none)."""
    stack: list[type[KernelError]] = [KernelError]
    while stack:
        cls = stack.pop()
        if cls.code == code and cls.__init__ is KernelError.__init__:
            return cls
        stack.extend(cls.__subclasses__())
    return KernelError


def _answer(request: Envelope, kind: str, content: str, payload: dict[str, Any], stored: dict[str, Any],
            code: str = "") -> Reply:
    """The envelope of kind `kind` answering `request`, from the MAD it was sent to, back to its sender."""
    base = {"to": request.sender, "in_reply_to": request.id}
    env = Envelope(correlation_id=request.correlation_id, sender=str(request.payload.get("to", "")),
                   conversation_id=request.conversation_id, kind=kind, content=content, payload={**base, **payload})
    return Reply(envelope=env, stored_payload={**base, **stored}, code=code)


def reply_to(request: Envelope, result: Any, stored_result: Any) -> Reply:
    """The reply envelope answering `request` with `result` (`stored_result`: its redacted form)."""
    content = result if isinstance(result, str) else to_json(stored_result)[:10_000]
    return _answer(request, "reply", content, {"result": result}, {"result": stored_result})


def error_to(request: Envelope, code: str, message: str) -> Reply:
    """The error envelope answering `request` (`message` must be safe to show and to store)."""
    return _answer(request, "error", message, {"code": code}, {"code": code}, code)


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
        error = None if task.cancelled() else task.exception()
        if isinstance(error, DurabilityError):  # acked, but not known to be on disk: not acknowledged
            log.error("bus delivery done but not acknowledged: the disk did not confirm it",
                      extra={"error": str(error)})
        elif error is not None:
            log.error("bus delivery failed; it stays pending and runs again", exc_info=error)

    async def _drain(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        # Deliveries may start deliveries (a handler asking another MAD): wait until none is left, or the deadline.
        while ((mine := {t for t in self._inflight if t.get_loop() is loop and not t.done()})
               and (left := deadline - time.monotonic()) > 0):
            await asyncio.wait(mine, timeout=left)
        if mine:
            log.warning("bus drain deadline passed; cut-off deliveries stay pending and run again",
                        extra={"in_flight": len(mine)})
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
        if not acked and (row := self._bus.delivery(request.id)):  # acked meanwhile: the first reply stands,
            first = self._bus.message(row["reply_id"])  # as stored: its redacted payload is all there is
            return Reply(envelope=first, stored_payload=first.payload, code=str(first.payload.get("code", "")))
        return reply

    async def _recover(self) -> None:
        """Deliver again, oldest first, what a crash left pending."""
        if pending := self._bus.pending(self._hosted):
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


def redact_url(url: str) -> str:
    """The URL without its password (in its user part, or a `password=` parameter), for messages and logs."""
    parts = urlsplit(url)
    parts = parts._replace(query=re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query))
    if parts.password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")  # the host as written (an IPv6 one keeps its brackets)
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}")
    return urlunsplit(parts)


def is_local(url: str) -> bool:
    """Whether a bus URL names the local bus: this process's own, on its state database."""
    return (url or "").strip() in ("", "local")


def make_transport(url: str, *, ecosystem: str, bus: ConversationBus, sealer: Sealer, dispatch: Dispatch,
                   claim_idle_s: float = 30.0) -> Transport:
    """The transport `url` names: "" or "local" for the SQLite bus, redis://, rediss:// or unix:// for Redis
    (the redis pack's, when this build carries it)."""
    if is_local(url):
        return LocalTransport(bus, sealer, dispatch)
    url = url.strip()
    if urlsplit(url).scheme in ("redis", "rediss", "unix"):
        pack = packs.module("redis", packs.NO_REDIS)  # a build without the pack says so, and how to get it
        return pack.RedisTransport(url, ecosystem, bus, sealer, dispatch, claim_idle_s=claim_idle_s)
    raise InvalidArgument(
        f"unknown bus {redact_url(url)!r}: use 'local' (the default, one process) or a Redis URL "
        "such as redis://127.0.0.1:6379/0"
    )
