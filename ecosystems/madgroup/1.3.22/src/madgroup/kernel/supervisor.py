"""Fault isolation: a MAD whose code raises, hangs or leaks cannot take the process down.

Every call into a MAD made for someone else (a client's tool call, a bus delivery, a health
probe) goes through `Supervisor.call`; its on_start and on_stop through `Supervisor.start`/`stop`,
an eMAD instance's work through `Supervisor.task`.

- **Timeout** (`Mad.handler_timeout_s`; `stop_timeout_s` for on_stop): the handler runs in a task
  of its own; at the deadline it is cancelled and the caller gets `timeout` at once, whether or
  not the handler obeys.
- **Containment**: an exception that is not a `KernelError` (a refusal the MAD meant) is logged
  with its traceback and reaches the caller as `mad_error`, naming the MAD, the operation and
  the exception type; never the message (it may hold anything) nor the traceback.
- **Circuit breaker** per MAD: `failure_threshold` failures or timeouts in a row open it; while
  open, calls fail fast with `circuit_open`. After `cooldown_s`, or once a supervised restart
  succeeded, it is half-open: one trial call goes through; success closes it, failure opens
  it again. Refusals (`KernelError`s raised by the MAD, including a failure of another MAD it
  asked) count as answers, so one MAD's failures never open its callers' breakers.
- **Bound on calls in flight** per MAD (`Mad.max_concurrent_calls`); past it a call fails fast
  with `overloaded`. A *leaked* call is one still running `cancel_grace_s` after it was
  cancelled at its timeout (a handler that swallows the cancellation or waits on a thread).
  It keeps its place in the bound until it really ends, so a leaking MAD runs out of room
  and is refused, instead of the process running out of tasks and memory; health shows it.
- **Supervised restart**: a MAD that fails to start, or whose breaker opens, is restarted in
  a background task (the runtime's `on_stop` best effort, a new instance, `on_start`) with
  exponential backoff and jitter until it starts; restarts are counted.
- **Graceful shutdown**: `begin_shutdown` refuses new outside calls (`admission`), `drain`
  waits for the ones in flight up to a deadline, `close` cancels pending restarts.

Out of reach of any in-process supervisor: a handler that blocks the event loop (time.sleep,
long CPU work without awaiting) stalls every MAD; such work belongs in a thread or a process.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import dis
import functools
import inspect
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from . import logs
from .bus import now_iso
from .errors import InvalidArgument, KernelError, NotFound

if TYPE_CHECKING:
    from .mad import Mad

T = TypeVar("T")
log = logs.get("supervisor")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
UP_STATES = ("running", "idle")
HEALTH_PROBE_S = 5.0  # the longest a MAD's health() hook may take before its probe reports a timeout


class MadFault(KernelError):
    """The MAD's own code failed (raised something unexpected), as opposed to refusing."""

    code = "mad_error"


class HandlerTimeout(MadFault):
    """The MAD's handler overran its `handler_timeout_s` and was cancelled."""

    code = "timeout"


class CircuitOpen(KernelError):
    """The MAD failed too often in a row; calls fail fast until its breaker lets a trial through."""

    code = "circuit_open"


class Overloaded(KernelError):
    """The MAD has `max_concurrent_calls` calls in flight already."""

    code = "overloaded"


class NotAdmitted(Overloaded):
    """Overloaded, raised by the supervisor before the handler ran: a queued delivery may simply wait
    and try again (an `Overloaded` raised from inside a handler came after its effects)."""


class Unavailable(KernelError):
    """The MAD is not running (failed to start, restarting), or the ecosystem is shutting down."""

    code = "unavailable"


@dataclass(frozen=True)
class SupervisionPolicy:
    """Process-wide supervision settings (per-MAD timeouts and bounds are `Mad` class attributes)."""

    failure_threshold: int = 5  # failures or timeouts in a row that open a MAD's breaker
    cooldown_s: float = 30.0  # how long an open breaker fails fast before a half-open trial
    cancel_grace_s: float = 1.0  # a call still running this long after its cancellation is leaked
    restart_backoff_s: float = 0.5  # delay before the first restart; doubles per attempt, with jitter
    restart_backoff_max_s: float = 60.0
    drain_timeout_s: float = 20.0  # graceful shutdown: how long in-flight calls get to finish
    stop_timeout_s: float = 5.0  # how long a MAD's on_stop may take (at shutdown, before a restart)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise InvalidArgument(f"failure_threshold must be at least 1, not {self.failure_threshold}")
        for f in fields(self):
            if f.name.endswith("_s") and not getattr(self, f.name) >= 0:
                raise InvalidArgument(f"{f.name} must be a number of seconds >= 0, not {getattr(self, f.name)!r}")


@dataclass
class _Record:
    """What the supervisor knows about one MAD."""

    mad: str
    timeout_s: float
    limit: int
    breaker: str = CLOSED
    failures: int = 0  # in a row; what the breaker counts
    failures_total: int = 0
    restarts: int = 0
    restart_attempts: int = 0  # since the last successful call; drives the backoff
    in_flight: int = 0
    leaked: set[asyncio.Task[Any]] = field(default_factory=set)
    trial: bool = False  # a half-open trial call is running
    opened_at: float = 0.0
    restart_due: float = 0.0
    restart_task: asyncio.Task[None] | None = None
    last_error: str = ""
    last_error_at: str = ""


class Supervisor:
    """Runs MAD code for others under timeouts, a circuit breaker and a concurrency bound.

    `restart(name)` replaces a MAD's instance (stop the old one best effort, start a new one)
    and raises when the new one fails to start; `state(name)` is the MAD's lifecycle state.
    """

    def __init__(self, mads: Iterable[type[Mad]], restart: Callable[[str], Awaitable[None]],
                 state: Callable[[str], str], policy: SupervisionPolicy | None = None):
        self.policy = policy or SupervisionPolicy()
        self._restart, self._state = restart, state
        self._records: dict[str, _Record] = {}
        for cls in mads:
            if not cls.handler_timeout_s > 0:
                raise InvalidArgument(f"MAD {cls.name!r}: handler_timeout_s must be > 0 seconds, not {cls.handler_timeout_s!r}")
            if cls.max_concurrent_calls < 1:
                raise InvalidArgument(f"MAD {cls.name!r}: max_concurrent_calls must be at least 1, not {cls.max_concurrent_calls!r}")
            self._records[cls.name] = _Record(cls.name, float(cls.handler_timeout_s), int(cls.max_concurrent_calls))
        self.accepting = True
        self._admitted = 0  # outside calls admitted and not finished
        self.drain_deadline = 0.0  # time.monotonic() when drain() gives up; set when shutdown begins, once

    def _record(self, mad: str) -> _Record:
        rec = self._records.get(mad)
        if rec is None:
            raise NotFound(f"no MAD {mad!r}; known: {', '.join(self._records) or 'none'}")
        return rec

    # ---- calls -------------------------------------------------------------------------------

    async def call(self, mad: str, op: str, fn: Callable[[], Coroutine[Any, Any, T]], *, timeout_s: float | None = None,
                   at_once: bool = False) -> T:
        """Run `fn()` (MAD code doing `op`) under the MAD's timeout, breaker and bound.

        Returns its result or re-raises its `KernelError`; anything else it raises, and a
        timeout, becomes a `MadFault` that counts against the breaker. `at_once`: the caller knows
        the coroutine cannot suspend (Mad.answers_at_once), so it runs in place (`_run_at_once`).
        """
        rec = self._record(mad)
        trial = self._admit(mad, rec)
        timeout = rec.timeout_s if timeout_s is None else timeout_s
        try:
            task = self._run_at_once(rec, fn) if at_once else self._spawn(rec, fn)
            finished = await self._wait(mad, op, rec, task, timeout)
        except BaseException:  # the caller itself was cancelled: no verdict on the MAD
            if trial:
                rec.trial = False
            raise
        fault = self._fault(mad, op, rec, task) if finished else self._timed_out(mad, op, rec, timeout, "handler_timeout_s")
        if fault is not None:
            self._failed(mad, rec, trial)
            raise fault
        self._answered(mad, rec, trial)
        return task.result()  # re-raises a refusal as it is

    async def start(self, mad: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run the MAD's on_start under its handler_timeout_s (no breaker: a failed start is restarted)."""
        await self._lifecycle(mad, "on_start", fn, self._record(mad).timeout_s, "handler_timeout_s")

    async def stop(self, mad: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run the MAD's on_stop under the policy's stop_timeout_s (at shutdown, before a restart)."""
        await self._lifecycle(mad, "on_stop", fn, self.policy.stop_timeout_s, "stop_timeout_s")

    async def task(self, role: str, fn: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """Run an eMAD's work (kernel/packs/emads/) under its role's task_timeout_s, contained like a call but with
        no breaker: each instance is new, and its failure is its spawner's answer, not the role's fault."""
        return await self._lifecycle(role, "work", fn, timeout_s, "task_timeout_s")

    async def _lifecycle(self, mad: str, op: str, fn: Callable[[], Awaitable[T]], timeout: float, setting: str) -> T:
        rec = self._record(mad)
        task = self._spawn(rec, fn)
        if not await self._wait(mad, op, rec, task, timeout):
            raise self._timed_out(mad, op, rec, timeout, setting)
        fault = self._fault(mad, op, rec, task)
        if fault is not None:
            raise fault
        return task.result()

    async def probe(self, mad: str, fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run the MAD's `health()` hook as a supervised call, capped at `HEALTH_PROBE_S`: a hanging
        hook must not hang /healthz. A failure is reported as {"ok": False, "error": <code>}."""
        try:
            report = await self.call(mad, "health", fn, timeout_s=min(HEALTH_PROBE_S, self._record(mad).timeout_s))
        except KernelError as exc:
            return {"ok": False, "error": exc.code}
        return report if isinstance(report, dict) else {"ok": False, "error": "health() did not return a dict"}

    def _admit(self, mad: str, rec: _Record) -> bool:
        """Fail fast when the breaker is open or the MAD is full; True when this call is the half-open trial."""
        if rec.breaker == OPEN:
            wait = rec.opened_at + self.policy.cooldown_s - time.monotonic()
            if wait > 0:
                raise CircuitOpen(
                    f"MAD {mad!r} is failing ({rec.failures} failures in a row, last: {rec.last_error}); "
                    f"retrying after {math.ceil(wait)} s"
                )
            rec.breaker = HALF_OPEN
            log.info("circuit half-open: the next call is a trial", extra={"mad": mad})
        if rec.in_flight >= rec.limit:
            leaked = f", {len(rec.leaked)} of them leaked past their timeout" if rec.leaked else ""
            raise NotAdmitted(f"MAD {mad!r} has {rec.in_flight} calls in flight (its max_concurrent_calls){leaked}; retry later")
        if rec.breaker == HALF_OPEN:
            if rec.trial:
                raise CircuitOpen(f"MAD {mad!r} is failing ({rec.failures} failures in a row); a trial call is running, retry shortly")
            rec.trial = True
            return True
        return False

    def _spawn(self, rec: _Record, fn: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        async def run() -> T:
            return await fn()

        # The task runs in a copy of the caller's context: correlation id, principal, MAD.
        task = asyncio.get_running_loop().create_task(run())
        rec.in_flight += 1
        task.add_done_callback(lambda t: self._ended(rec, t))
        return task

    def _run_at_once(self, rec: _Record, fn: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Future[T]:
        """Run a coroutine that cannot suspend to its end, here: as its own task would, in a copy of the
        caller's context, but without the task, its scheduling and the wake-up of the waiter (a tool whose
        code never awaits: the supervisor could not time it out in a task either, as it never yields the
        loop). The outcome comes as a finished future, judged like a task's. Should it suspend after all,
        the rest of it runs in a task of its own, as `_spawn` would have run all of it."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        outcome: asyncio.Future[T] = loop.create_future()
        rec.in_flight += 1
        try:
            coro = fn()
            yielded = context.run(coro.send, None)
        except StopIteration as stop:
            outcome.set_result(stop.value)
        except asyncio.CancelledError:
            outcome.cancel()
        except (KeyboardInterrupt, SystemExit):
            rec.in_flight -= 1
            raise
        except BaseException as exc:  # noqa: BLE001 - judged by call(), as a task's exception would be
            outcome.set_exception(exc)
        else:
            task = loop.create_task(_Rest(coro, yielded), context=context)
            task.add_done_callback(lambda t: self._ended(rec, t))
            return task
        rec.in_flight -= 1
        return outcome

    def _ended(self, rec: _Record, task: asyncio.Task[Any]) -> None:
        rec.in_flight -= 1
        if task in rec.leaked:
            rec.leaked.discard(task)
            log.info("a leaked call ended", extra={"mad": rec.mad, "leaked": len(rec.leaked)})
        if not task.cancelled():
            task.exception()  # retrieved, so an abandoned call's error is not reported as never retrieved

    async def _wait(self, mad: str, op: str, rec: _Record, task: asyncio.Task[Any], timeout: float) -> bool:
        """Wait for the call; False when it timed out (then it is cancelled, and leaked if it does not end)."""
        try:
            if await _finished_within(task, timeout):
                return True
            task.cancel()
            await asyncio.wait({task}, timeout=self.policy.cancel_grace_s)
        except asyncio.CancelledError:
            task.cancel()  # the caller gave up (client gone, shutdown deadline): so does the handler
            raise
        if not task.done():
            rec.leaked.add(task)
            log.error("call leaked: still running after its cancellation", extra={"mad": mad, "op": op, "leaked": len(rec.leaked)})
        return False

    def _timed_out(self, mad: str, op: str, rec: _Record, timeout: float, setting: str) -> HandlerTimeout:
        self._note(rec, f"{op}: timed out after {timeout:g} s")
        log.warning("call timed out and was cancelled", extra={"mad": mad, "op": op, "timeout_s": timeout})
        return HandlerTimeout(f"MAD {mad!r} did not finish {op!r} within {timeout:g} s ({setting}); the call was cancelled")

    def _fault(self, mad: str, op: str, rec: _Record, task: asyncio.Task[Any]) -> MadFault | None:
        """The fault of a finished call, None when it answered (a result or a refusal)."""
        if task.cancelled():
            what = "CancelledError"
            log.error("MAD code cancelled itself", extra={"mad": mad, "op": op})
        else:
            exc = task.exception()
            if exc is None or isinstance(exc, KernelError):
                return None
            what = type(exc).__name__
            log.error("MAD code raised", exc_info=exc, extra={"mad": mad, "op": op})
        self._note(rec, f"{op}: {what}")
        cid = logs.correlation_id.get()
        where = f"the server log (correlation id {cid})" if cid else "the server log"
        return MadFault(f"MAD {mad!r} failed in {op!r} ({what}); the details are in {where}")

    def _note(self, rec: _Record, error: str) -> None:
        rec.last_error = error
        rec.last_error_at = now_iso()

    def _answered(self, mad: str, rec: _Record, trial: bool) -> None:
        if trial:
            rec.trial = False
            rec.breaker = CLOSED
            log.info("circuit closed: the trial call succeeded", extra={"mad": mad})
        if rec.breaker == CLOSED:
            rec.failures = 0
            rec.restart_attempts = 0

    def _failed(self, mad: str, rec: _Record, trial: bool) -> None:
        rec.failures += 1
        rec.failures_total += 1
        if trial:
            rec.trial = False
        if trial or (rec.breaker == CLOSED and rec.failures >= self.policy.failure_threshold):
            rec.breaker = OPEN
            rec.opened_at = time.monotonic()
            log.error("circuit open: calls fail fast", extra={"mad": mad, "failures": rec.failures, "last_error": rec.last_error})
            self._schedule_restart(mad, rec)

    # ---- restarts ----------------------------------------------------------------------------

    def start_failed(self, mad: str, exc: BaseException) -> None:
        """A MAD's start failed: note it and restart it with backoff (call from the event loop)."""
        rec = self._record(mad)
        self._start_failure(rec, "on_start", exc)
        self._schedule_restart(mad, rec)

    def _start_failure(self, rec: _Record, op: str, exc: BaseException) -> None:
        rec.failures_total += 1
        if not isinstance(exc, MadFault):  # a fault noted itself, with the exception type
            self._note(rec, f"{op}: {exc.code if isinstance(exc, KernelError) else type(exc).__name__}")

    def _schedule_restart(self, mad: str, rec: _Record) -> None:
        if not self.accepting or (rec.restart_task is not None and not rec.restart_task.done()):
            return
        # A context of its own: the restart is not part of the call that tripped it (its logs carry no
        # correlation id or principal of that call).
        rec.restart_task = asyncio.get_running_loop().create_task(
            self._restart_loop(mad, rec), name=f"restart {mad}", context=contextvars.Context()
        )

    def restart_delay(self, attempts: int) -> float:
        """Seconds before restart attempt `attempts + 1`: exponential, capped, with jitter."""
        ceiling = min(self.policy.restart_backoff_max_s, self.policy.restart_backoff_s * 2 ** min(attempts, 32))
        return ceiling * random.uniform(0.5, 1.0)  # jitter: MADs failing together do not restart in lockstep

    async def _restart_loop(self, mad: str, rec: _Record) -> None:
        try:
            while self.accepting:
                delay = self.restart_delay(rec.restart_attempts)
                rec.restart_due = time.monotonic() + delay
                log.info("restart scheduled", extra={"mad": mad, "in_s": round(delay, 3), "attempt": rec.restart_attempts + 1})
                await asyncio.sleep(delay)
                rec.restart_attempts += 1
                try:
                    await self._restart(mad)
                except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure; it retries
                    self._start_failure(rec, "restart", exc)
                    log.warning("restart failed", extra={"mad": mad, "attempt": rec.restart_attempts, "error": rec.last_error})
                    continue
                rec.restarts += 1
                if rec.breaker == OPEN:
                    rec.breaker = HALF_OPEN  # the new instance earns a trial call
                log.info("MAD restarted", extra={"mad": mad, "restarts": rec.restarts})
                return
        finally:
            rec.restart_due = 0.0

    # ---- health and shutdown -----------------------------------------------------------------

    def health(self, mad: str) -> dict[str, Any]:
        """Supervision state of one MAD: never a secret, never a traceback."""
        rec = self._record(mad)
        state = self._state(mad)
        now = time.monotonic()
        out: dict[str, Any] = {"state": state, "ok": state in UP_STATES and rec.breaker == CLOSED and not rec.leaked}
        out |= {key: getattr(rec, key) for key in ("breaker", "failures", "failures_total", "restarts", "in_flight")}
        out |= {"leaked": len(rec.leaked), "last_error": rec.last_error, "last_error_at": rec.last_error_at}
        if rec.breaker == OPEN:
            out["retry_in_s"] = round(max(0.0, rec.opened_at + self.policy.cooldown_s - now), 1)
        if rec.restart_due:
            out["restart_in_s"] = round(max(0.0, rec.restart_due - now), 1)
        return out

    @contextmanager
    def admission(self) -> Iterator[None]:
        """An outside call (a client's tool call): refused once shutdown began, counted until it ends."""
        if not self.accepting:
            raise Unavailable("the ecosystem is shutting down and takes no new calls; retry on another replica or after the restart")
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    def begin_shutdown(self) -> None:
        """Refuse new outside calls from now on; work in flight has `drain_timeout_s` to finish."""
        if self.accepting:
            self.accepting = False
            self.drain_deadline = time.monotonic() + self.policy.drain_timeout_s
            log.info("shutting down: new calls are refused, calls in flight drain")

    def busy(self) -> int:
        """Outside calls and supervised calls still running, leaked ones aside (they may never end)."""
        return self._admitted + sum(r.in_flight - len(r.leaked) for r in self._records.values())

    async def drain(self) -> bool:
        """Begin shutdown and wait for the work in flight; False when the deadline passed first."""
        self.begin_shutdown()
        while self.busy():
            if time.monotonic() >= self.drain_deadline:
                log.warning("drain deadline passed with calls in flight", extra={"in_flight": self.busy()})
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self) -> None:
        """Cancel pending restarts (after the drain, before the MADs stop)."""
        self.begin_shutdown()
        pending = [r.restart_task for r in self._records.values() if r.restart_task is not None and not r.restart_task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


@functools.cache
def never_suspends(fn: Callable[..., Any] | None) -> bool:
    """`fn` is a coroutine function whose own code has no await, async for or async with: each of those
    compiles to a YIELD_VALUE, so without one its coroutine ends at its first step (`call(..., at_once=True)`)."""
    code = getattr(fn, "__code__", None)
    return (code is not None and inspect.iscoroutinefunction(fn)
            and not any(op.opname == "YIELD_VALUE" for op in dis.get_instructions(code)))


class _Rest(collections.abc.Coroutine):
    """The rest of a coroutine stepped once by hand, for a task to drive: the task's first step gets what the
    coroutine yielded, and everything after (values sent, a cancellation thrown in, even before that first
    step) goes to the coroutine itself. What ran before it suspended ran in the caller's task: only code
    `never_suspends` misjudged gets here."""

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any):
        self._coro, self._yielded, self._handed = coro, yielded, False

    def send(self, value: Any) -> Any:
        if not self._handed:
            self._handed = True
            return self._yielded
        return self._coro.send(value)

    def throw(self, *exc: Any) -> Any:  # close() is Coroutine's: it throws GeneratorExit in through here
        self._handed = True
        return self._coro.throw(*exc)

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield from self._coro.__await__())  # pragma: no cover - tasks drive it by send and throw


async def _finished_within(task: asyncio.Task[Any], timeout: float) -> bool:
    """asyncio.wait({task}, timeout) for one task, without its per-call set and bookkeeping: every bus
    delivery and tool call waits like this. True when the task finished in time."""
    if task.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    task.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        task.remove_done_callback(wake)
    return task.done()
