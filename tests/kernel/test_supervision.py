"""Fault isolation: a MAD whose handler raises, hangs or leaks does not take the process down.

A `flaky` MAD is added to the tiny ecosystem: its tools raise, hang forever, leak (swallow their
cancellation), wait on a gate the test opens, or answer. Timeouts, cooldowns and backoffs are
configured short (or long, where a test needs a state to hold still), so nothing sleeps for seconds.
"""

from __future__ import annotations

import asyncio
import importlib
import shutil
import signal
import time
from types import SimpleNamespace

import httpx
import pytest

from generator import harness

DETAIL = "internal-detail-7731"  # in exception messages: for the server log, never for the caller


def _flaky_class(kernel, ctl: SimpleNamespace):
    """The misbehaving MAD; `ctl` holds what the test controls and observes (shared by restarts)."""

    class Flaky(kernel.Mad):
        name = "flaky"
        role = "misbehaves on purpose"
        handler_timeout_s = getattr(ctl, "timeout_s", 0.2)
        max_concurrent_calls = 2

        def __init__(self, runtime):
            super().__init__(runtime)
            ctl.instances.append(self)

        async def on_start(self):
            ctl.starts += 1
            if ctl.start_failures > 0:
                ctl.start_failures -= 1
                raise RuntimeError(f"cannot start: {DETAIL}")

        async def on_stop(self):
            ctl.stops += 1
            if getattr(ctl, "hang_on_stop", False):
                await asyncio.Event().wait()

        @kernel.tool
        async def boom(self) -> str:
            """Raises."""
            raise RuntimeError(f"the database said {DETAIL}")

        @kernel.tool
        async def hang(self) -> str:
            """Never finishes on its own."""
            try:
                await asyncio.Event().wait()
            finally:
                ctl.cancelled += 1
            return "unreachable"

        @kernel.tool
        async def leak(self) -> str:
            """Swallows its cancellation and goes on until the test releases it."""
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass
            await ctl.release.wait()
            return "late"

        @kernel.tool
        async def gated(self) -> str:
            """Finishes when the test opens the gate."""
            ctl.entered.set()
            await ctl.gate.wait()
            return "done"

        @kernel.tool
        async def ok(self) -> str:
            """Answers."""
            ctl.ok_calls += 1
            return "fine"

        @kernel.tool
        async def refuse(self) -> str:
            """Refuses, as a MAD may: a KernelError is an answer, not a failure."""
            raise kernel.NotFound("nothing here")

    return Flaky


@pytest.fixture
def sup(eco_modules):
    """The copied kernel's supervisor module."""
    _, kernel, _ = eco_modules
    return importlib.import_module(kernel.__name__ + ".supervisor")


def _scenario(eco_modules, tmp_path, policy: dict, body, **ctl_kw) -> None:
    """Start a runtime with the flaky MAD, run `body(rt, ctl)` in one event loop, always stop."""
    config, kernel, runtime_mod = eco_modules
    sup = importlib.import_module(kernel.__name__ + ".supervisor")

    async def main():
        ctl = SimpleNamespace(**{"instances": [], "starts": 0, "stops": 0, "cancelled": 0, "ok_calls": 0, "start_failures": 0,
                                 "release": asyncio.Event(), "gate": asyncio.Event(), "entered": asyncio.Event(), **ctl_kw})
        flaky = _flaky_class(kernel, ctl)
        rt = runtime_mod.Runtime(config.model_copy(update={"mads": (*config.mads, flaky)}), tmp_path / "state",
                                 supervision=sup.SupervisionPolicy(**policy))
        await rt.start()
        try:
            await asyncio.wait_for(body(rt, ctl), 10)  # a removed protection fails here instead of hanging
        finally:
            ctl.release.set()
            ctl.gate.set()
            if rt.running:
                await asyncio.wait_for(rt.stop(), 10)

    asyncio.run(main())


STILL = {"cooldown_s": 60.0, "restart_backoff_s": 60.0}  # breaker and restarts hold still during the test


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


async def _others_answer(rt) -> None:
    convs = await rt.invoke_tool("rogers", "list_conversations", {})
    assert {c["title"] for c in convs} >= {"general", "security"}


def test_a_raising_handler_is_contained_and_named_without_its_message(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        with pytest.raises(sup.MadFault) as err:
            await rt.invoke_tool("flaky", "boom", {})
        message = f"{err.value.code}: {err.value}"
        assert message.startswith("mad_error: MAD 'flaky' failed in 'boom' (RuntimeError)")
        assert DETAIL not in message
        # a refusal is passed on as it is, and is no failure of the MAD
        with pytest.raises(sup.KernelError, match="nothing here") as refused:
            await rt.invoke_tool("flaky", "refuse", {})
        assert refused.value.code == "not_found"
        health = rt.supervisor.health("flaky")
        assert health["failures_total"] == 1 and health["failures"] == 0  # the refusal answered: the run is reset
        assert health["last_error"] == "boom: RuntimeError" and DETAIL not in str(health)
        assert await rt.invoke_tool("flaky", "ok", {}) == "fine"
        await _others_answer(rt)

    _scenario(eco_modules, tmp_path, STILL, body)


def test_a_hanging_handler_times_out_and_is_cancelled_while_others_answer(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        hung = asyncio.create_task(rt.invoke_tool("flaky", "hang", {}))
        await _others_answer(rt)  # the event loop is not held by the hanging handler
        with pytest.raises(sup.HandlerTimeout) as err:
            await hung
        assert err.value.code == "timeout"
        assert "MAD 'flaky' did not finish 'hang' within 0.2 s" in str(err.value)
        assert ctl.cancelled == 1  # the handler itself was cancelled, not just abandoned
        health = rt.supervisor.health("flaky")
        assert health["in_flight"] == 0 and health["leaked"] == 0
        assert health["last_error"] == "hang: timed out after 0.2 s" and health["failures"] == 1

    _scenario(eco_modules, tmp_path, STILL, body)


def test_leaked_calls_are_bounded_per_mad_and_shown_until_they_end(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        for _ in range(2):  # max_concurrent_calls = 2
            with pytest.raises(sup.HandlerTimeout):
                await rt.invoke_tool("flaky", "leak", {})
        health = rt.supervisor.health("flaky")
        assert (health["leaked"], health["in_flight"], health["ok"]) == (2, 2, False)
        with pytest.raises(sup.Overloaded, match=r"MAD 'flaky' has 2 calls in flight .*2 of them leaked past their timeout"):
            await rt.invoke_tool("flaky", "ok", {})
        assert ctl.ok_calls == 0  # refused before any of the MAD's code ran
        status = await rt.use("ecosystem.status", caller="grace")
        assert status["status"] == "degraded" and not rt.healthy()
        await _others_answer(rt)  # the leak is the flaky MAD's problem only
        ctl.release.set()
        await _until(lambda: rt.supervisor.health("flaky")["in_flight"] == 0)
        assert rt.supervisor.health("flaky")["leaked"] == 0
        assert await rt.invoke_tool("flaky", "ok", {}) == "fine"
        assert rt.healthy()

    _scenario(eco_modules, tmp_path, {**STILL, "cancel_grace_s": 0.02}, body)


def test_the_breaker_opens_after_failures_in_a_row_and_fails_fast(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        for _ in range(3):
            with pytest.raises(sup.MadFault):
                await rt.invoke_tool("flaky", "boom", {})
        with pytest.raises(sup.CircuitOpen) as err:
            await rt.invoke_tool("flaky", "ok", {})
        assert f"{err.value.code}: {err.value}" == (
            "circuit_open: MAD 'flaky' is failing (3 failures in a row, last: boom: RuntimeError); retrying after 60 s"
        )
        assert ctl.ok_calls == 0
        health = rt.supervisor.health("flaky")
        assert health["breaker"] == "open" and health["failures"] == 3 and not health["ok"]
        assert 0 < health["retry_in_s"] <= 60
        status = await rt.use("ecosystem.status", caller="grace")
        entry = next(m for m in status["mads"] if m["name"] == "flaky")
        assert status["status"] == "degraded" and entry["breaker"] == "open" and entry["failures"] == 3
        assert "health" not in entry  # a probe is not spent as the trial of an open breaker
        await _others_answer(rt)

    _scenario(eco_modules, tmp_path, {**STILL, "failure_threshold": 3}, body)


def test_the_breaker_half_opens_for_one_trial_then_closes_or_reopens(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        for _ in range(2):
            with pytest.raises(sup.MadFault):
                await rt.invoke_tool("flaky", "boom", {})
        assert rt.supervisor.health("flaky")["breaker"] == "open"
        # cooldown 0: the next call is the half-open trial; others fail fast while it runs
        trial = asyncio.create_task(rt.invoke_tool("flaky", "gated", {}))
        await ctl.entered.wait()
        assert rt.supervisor.health("flaky")["breaker"] == "half_open"
        with pytest.raises(sup.CircuitOpen, match="a trial call is running"):
            await rt.invoke_tool("flaky", "ok", {})
        ctl.gate.set()
        assert await trial == "done"
        health = rt.supervisor.health("flaky")
        assert (health["breaker"], health["failures"], health["ok"]) == ("closed", 0, True)
        assert await rt.invoke_tool("flaky", "ok", {}) == "fine"
        # open again; a failed trial reopens it at once
        for _ in range(2):
            with pytest.raises(sup.MadFault):
                await rt.invoke_tool("flaky", "boom", {})
        with pytest.raises(sup.MadFault):
            await rt.invoke_tool("flaky", "boom", {})  # the trial
        assert rt.supervisor.health("flaky")["breaker"] == "open"
        assert rt.supervisor.health("flaky")["failures"] == 3

    _scenario(eco_modules, tmp_path, {"failure_threshold": 2, "cooldown_s": 0.0, "restart_backoff_s": 60.0}, body)


def test_an_open_breaker_restarts_the_mad_with_a_new_instance(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        first = ctl.instances[-1]
        for _ in range(2):
            with pytest.raises(sup.MadFault):
                await rt.invoke_tool("flaky", "boom", {})
        await _until(lambda: rt.supervisor.health("flaky")["restarts"] == 1)
        assert ctl.stops == 1 and ctl.starts == 2 and ctl.instances[-1] is not first
        assert rt.mad("flaky") is ctl.instances[-1]
        assert rt.mad("flaky").conversation_ids == first.conversation_ids
        health = rt.supervisor.health("flaky")
        assert health["state"] == "running" and health["breaker"] == "half_open"  # the new instance earns a trial
        assert await rt.invoke_tool("flaky", "ok", {}) == "fine"
        assert rt.supervisor.health("flaky")["breaker"] == "closed" and rt.healthy()

    _scenario(eco_modules, tmp_path, {"failure_threshold": 2, "cooldown_s": 60.0, "restart_backoff_s": 0.005}, body)


def test_a_mad_that_fails_to_start_is_restarted_with_backoff(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        assert rt.slots["flaky"].state == "failed" and not rt.healthy()
        with pytest.raises(sup.Unavailable, match=r"MAD 'flaky' is not running \(MAD 'flaky' failed in 'on_start' "
                                                  r"\(RuntimeError\).*\); the supervisor restarts it in"):
            await rt.invoke_tool("flaky", "ok", {})
        await _until(lambda: rt.slots["flaky"].state == "running")
        health = rt.supervisor.health("flaky")
        assert ctl.starts == 3 and health["restarts"] == 1 and health["failures_total"] == 2
        assert health["last_error"] == "on_start: RuntimeError" and DETAIL not in str(health)
        assert await rt.invoke_tool("flaky", "ok", {}) == "fine" and rt.healthy()

    _scenario(eco_modules, tmp_path, {"restart_backoff_s": 0.02, "restart_backoff_max_s": 0.05}, body, start_failures=2)


def test_restart_delays_grow_exponentially_with_jitter_up_to_a_cap(eco_modules, tmp_path, sup):
    config, _, _ = eco_modules
    s = sup.Supervisor(config.mads, restart=None, state=lambda name: "running",
                       policy=sup.SupervisionPolicy(restart_backoff_s=1.0, restart_backoff_max_s=10.0))
    for attempts, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (50, 10.0)]:
        delays = {s.restart_delay(attempts) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered


def test_shutdown_refuses_new_calls_and_drains_the_ones_in_flight(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        call = asyncio.create_task(rt.invoke_tool("flaky", "gated", {}))
        await ctl.entered.wait()
        stopping = asyncio.create_task(rt.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done() and rt.slots["flaky"].state == "running"  # MADs wait for the drain
        with pytest.raises(sup.Unavailable, match="shutting down"):
            await rt.invoke_tool("rogers", "list_conversations", {})
        status = await rt.use("ecosystem.status", caller="grace")
        assert status["status"] == "draining" and not status["healthy"]
        ctl.gate.set()
        assert await call == "done"
        await stopping
        assert {s.state for n, s in rt.slots.items() if n != "grace"} == {"stopped"} and ctl.stops == 1

    _scenario(eco_modules, tmp_path, {**STILL, "drain_timeout_s": 30.0}, body)


def test_the_drain_gives_up_at_its_deadline(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        call = asyncio.create_task(rt.invoke_tool("flaky", "hang", {}))  # outlives the drain deadline
        await _until(lambda: rt.supervisor.health("flaky")["in_flight"] == 1)
        await rt.stop()
        assert rt.slots["flaky"].state == "stopped" and not call.done()
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)

    _scenario(eco_modules, tmp_path, {**STILL, "drain_timeout_s": 0.05}, body, timeout_s=60.0)


def test_a_hanging_on_stop_does_not_hold_up_the_shutdown(eco_modules, tmp_path, sup):
    async def body(rt, ctl):
        await rt.stop()
        assert ctl.stops == 1 and {s.state for n, s in rt.slots.items() if n != "grace"} == {"stopped"}
        assert rt.supervisor.health("flaky")["last_error"] == "on_stop: timed out after 0.05 s"

    _scenario(eco_modules, tmp_path, {**STILL, "stop_timeout_s": 0.05}, body, hang_on_stop=True)


# ---- the real server ---------------------------------------------------------------------------

FLAKY_SRC = '''from __future__ import annotations
import asyncio, os
from ..kernel import Mad, tool


class Flaky(Mad):
    name = "flaky"
    role = "misbehaves on purpose"

    @tool
    async def boom(self) -> str:
        """Raises."""
        raise RuntimeError("the database said %s")

    @tool
    async def wait_for(self, path: str) -> str:
        """Finishes once `path` exists."""
        while not os.path.exists(path):
            await asyncio.sleep(0.01)
        return "done"
''' % DETAIL


@pytest.fixture(scope="module")
def flaky_ecosystem(tiny_ecosystem, tmp_path_factory):
    """The tiny ecosystem plus the flaky MAD, as a package of its own (for a server subprocess)."""
    tiny_root, tiny_name = tiny_ecosystem
    root = tmp_path_factory.mktemp("flakyeco")
    name = "flakyeco_supervision"
    pkg = root / name
    shutil.copytree(tiny_root / tiny_name, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "mads" / "flaky.py").write_text(FLAKY_SRC)
    with open(pkg / "mads" / "__init__.py", "a") as init:
        init.write("from .flaky import Flaky\n\nMADS = (*MADS, Flaky)\n")
    return root, name


def test_server_healthz_breaker_restart_and_sigterm_drain(flaky_ecosystem, tmp_path, eco_modules):
    root, name = flaky_ecosystem
    _, kernel, _ = eco_modules
    with harness.running_ecosystem(name, tmp_path / "state", cwd=root) as eco:

        def healthz():
            r = httpx.get(f"{eco.url}/healthz", timeout=10)
            return r.status_code, r.json()

        async def fail_until_open():
            async with eco.client() as client:
                for _ in range(5):  # the default failure_threshold
                    res = await client.call_tool("flaky.boom", {})
                    text = res.content[0].text
                    assert res.is_error and text.startswith("mad_error: MAD 'flaky' failed in 'boom' (RuntimeError)")
                    assert DETAIL not in text
                res = await client.call_tool("flaky.boom", {})
                return res.content[0].text

        assert asyncio.run(fail_until_open()).startswith(
            "circuit_open: MAD 'flaky' is failing (5 failures in a row, last: boom: RuntimeError); retrying after "
        )
        code, body = healthz()
        assert code == 503 and body["status"] == "degraded"
        flaky = body["mads"]["flaky"]
        assert flaky["breaker"] in ("open", "half_open")  # half-open once the background restart is done
        assert flaky["failures"] == 5 and flaky["last_error"] == "boom: RuntimeError"
        assert DETAIL not in str(body) and "Traceback" not in str(body)
        assert body["mads"]["rogers"]["ok"] and body["mads"]["rogers"]["breaker"] == "closed"
        assert eco.call("rogers.list_conversations")  # the others keep answering
        deadline = time.monotonic() + 20
        while healthz()[1]["mads"]["flaky"]["restarts"] < 1:  # restarted in the background
            assert time.monotonic() < deadline, "the flaky MAD was not restarted"
            time.sleep(0.05)

        # SIGTERM while a call is in flight: it completes, new calls are refused, the exit code is 0
        flag = tmp_path / "finish"
        proc = eco.process

        async def slow_call():
            async with eco.client() as client:
                await client.list_tools()  # else the client lists them after the result (to check it), when the server is gone
                return harness.result_value(await client.call_tool("flaky.wait_for", {"path": str(flag)}))

        async def scenario():
            call = asyncio.create_task(slow_call())
            while (await asyncio.to_thread(healthz))[1]["mads"]["flaky"]["in_flight"] == 0:
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            code, body = await asyncio.to_thread(healthz)
            while body["status"] != "draining":
                code, body = await asyncio.to_thread(healthz)
            assert code == 503
            # New requests are turned away at the door (503, Retry-After), in words an MCP client shows.
            with pytest.raises(Exception, match="unavailable: the ecosystem is shutting down; retry after 5 s"):
                await harness.call_tool(eco.url, eco.token, "rogers.list_conversations")
            door = await asyncio.to_thread(httpx.get, f"{eco.url}/metrics", timeout=10)
            assert door.status_code == 503 and door.headers["retry-after"] == "5"
            assert door.json()["message"].startswith("unavailable: the ecosystem is shutting down")
            assert not call.done() and proc.poll() is None
            flag.touch()
            return await call

        assert asyncio.run(scenario()) == "done"
        assert proc.wait(timeout=30) == 0, eco.logs()[-3000:]
        # the operator's log has what the caller did not get: the exception, message and traceback
        assert "Traceback" in eco.logs() and f"RuntimeError: the database said {DETAIL}" in eco.logs()


def test_sigterm_under_load_completes_every_response_and_refuses_new_ones_503(flaky_ecosystem, tmp_path, eco_modules):
    """Clients keep calling while the server is told to stop: every response already begun completes; new
    requests get 503 with Retry-After; nothing is cut off (no half response, no dropped connection)."""
    root, name = flaky_ecosystem
    _, kernel, _ = eco_modules
    flag = tmp_path / "finish"
    with harness.running_ecosystem(name, tmp_path / "state", cwd=root) as eco:
        proc = eco.process
        outcomes: list[str] = []

        def classify(exc: BaseException) -> str:
            leaf = exc
            while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
                leaf = leaf.exceptions[0]
            text = f"{type(leaf).__name__}: {leaf}"
            if "shutting down" in text:
                return "refused"
            if type(leaf).__name__ in ("ConnectError", "ConnectionRefusedError"):
                return "closed"  # the port was closed: nothing was begun, nothing cut
            return f"cut: {text}"

        async def busy(stop: asyncio.Event) -> None:
            while not stop.is_set():
                try:
                    await harness.call_tool(eco.url, eco.token, "rogers.list_conversations")
                    outcomes.append("ok")
                except BaseException as exc:  # noqa: BLE001 - every outcome is classified
                    outcomes.append(classify(exc))
                    if outcomes[-1] != "refused":
                        return

        async def slow() -> str:
            async with harness.mcp_client(eco.url, eco.token) as client:
                await client.list_tools()  # else the client lists them after the result, to check it
                return harness.result_value(await client.call_tool("flaky.wait_for", {"path": str(flag)}))

        async def scenario():
            stop = asyncio.Event()
            workers = [asyncio.create_task(busy(stop)) for _ in range(24)]
            slows = [asyncio.create_task(slow()) for _ in range(6)]
            while httpx.get(f"{eco.url}/healthz", timeout=10).json()["mads"]["flaky"]["in_flight"] < 6:
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.5)  # the busy clients keep knocking while the slow calls hold the drain open
            refused = httpx.post(f"{eco.url}/mcp", json={}, headers={"Authorization": f"Bearer {eco.token}"}, timeout=10)
            stop.set()  # (a request sent at the very instant the port closes meets a closed port: no response begun)
            await asyncio.gather(*workers)
            assert proc.poll() is None, "the drain waits for the calls in flight"
            flag.touch()
            done = await asyncio.gather(*slows, return_exceptions=True)
            return refused, done

        refused, done = asyncio.run(scenario())
        assert proc.wait(timeout=60) == 0
        assert done == ["done"] * 6, done
        assert [o for o in outcomes if o.startswith("cut")] == [], outcomes
        assert "ok" in outcomes and "refused" in outcomes
        assert "ASGI callable returned without completing response" not in eco.logs()
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0


# ---- tools whose code never awaits run in place (Mad.answers_at_once, Supervisor._run_at_once) ----


def test_which_tools_run_in_place_is_read_from_their_code(eco_modules, tmp_path):
    _, kernel, _ = eco_modules
    ctl = SimpleNamespace(instances=[])
    flaky = _flaky_class(kernel, ctl)

    class Shapes(flaky):
        @kernel.tool
        async def loops(self) -> int:
            """Awaits only inside an async for."""
            total = 0
            async for n in _numbers():
                total += n
            return total

        @kernel.tool
        async def guarded(self) -> str:
            """Awaits only through an async with."""
            async with asyncio.Lock():
                return "held"

        @kernel.tool
        async def comprehends(self) -> list[int]:
            """Awaits only in an async comprehension."""
            return [n async for n in _numbers()]

    at_once = importlib.import_module(kernel.__name__ + ".runtime")._runs_in_place
    mad = Shapes.__new__(Shapes)  # the check reads the class and the instance's own attributes, nothing else
    assert at_once(mad, "ok") and at_once(mad, "boom") and at_once(mad, "refuse")
    for tool in ("hang", "leak", "gated", "loops", "guarded", "comprehends", "no_such_tool", ""):
        assert not at_once(mad, tool), tool
    mad.ok = lambda: asyncio.sleep(0)  # shadowed on the instance: not the code that was read
    assert not at_once(mad, "ok")

    class Overrides(flaky):
        async def ok(self) -> str:  # replaces the tool without @tool: call_tool runs this one
            await asyncio.sleep(0)
            return "overridden"

    assert not at_once(Overrides.__new__(Overrides), "ok")

    class OwnHandle(flaky):
        async def handle(self, envelope):
            await asyncio.sleep(0)
            return await super().handle(envelope)

    assert not at_once(OwnHandle.__new__(OwnHandle), "ok")


async def _numbers():
    for n in (1, 2, 3):
        await asyncio.sleep(0)
        yield n


def test_a_tool_run_in_place_is_judged_as_one_run_in_a_task(eco_modules, tmp_path, sup):
    """Answer, refusal, crash and self-cancellation give the same verdicts, breaker and counts both ways."""
    async def body(rt, ctl):
        for at_once in (True, False):
            run = lambda fn: rt.supervisor.call("flaky", "op", fn, at_once=at_once)  # noqa: E731
            assert await run(_answer) == 42
            with pytest.raises(sup.KernelError, match="nothing here") as refused:
                await run(lambda: _refuse(sup))
            assert refused.value.code == "not_found"
            with pytest.raises(sup.MadFault, match=r"failed in 'op' \(RuntimeError\)"):
                await run(_crash)
            with pytest.raises(sup.MadFault, match=r"failed in 'op' \(CancelledError\)"):
                await run(_cancel_itself)
            health = rt.supervisor.health("flaky")
            assert health["in_flight"] == 0, at_once
        assert rt.supervisor.health("flaky")["failures_total"] == 4
        # through a tool call, an answering tool and a crashing one, in place
        assert await rt.invoke_tool("flaky", "ok", {}) == "fine"
        with pytest.raises(sup.MadFault):
            await rt.invoke_tool("flaky", "boom", {})
        assert rt.supervisor.health("flaky")["failures_total"] == 5

    _scenario(eco_modules, tmp_path, {**STILL, "failure_threshold": 100}, body)  # failures counted, the breaker shut


async def _answer():
    return 42


async def _refuse(sup):
    raise sup.NotFound("nothing here")


async def _crash():
    raise RuntimeError(DETAIL)


async def _cancel_itself():
    raise asyncio.CancelledError


def test_a_tool_run_in_place_keeps_its_context_to_itself(eco_modules, tmp_path, sup):
    """As in a task of its own: what the tool sets in a context variable does not reach the caller."""
    import contextvars

    var = contextvars.ContextVar("test_var", default="caller's")

    async def sets():
        seen = var.get()
        var.set("tool's")
        return seen

    async def body(rt, ctl):
        assert await rt.supervisor.call("flaky", "op", sets, at_once=True) == "caller's"
        assert var.get() == "caller's"

    _scenario(eco_modules, tmp_path, STILL, body)


def test_a_coroutine_that_suspends_after_all_finishes_in_a_task_with_timeout_and_cancellation(eco_modules, tmp_path, sup):
    """`at_once` given for code that does suspend: the rest runs in a task of its own, which the timeout
    still cancels; values and the cancellation reach the coroutine."""
    async def body(rt, ctl):
        caller = asyncio.current_task()
        seen = {}

        async def suspends():
            await asyncio.sleep(0)  # a bare yield
            fut = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.01, fut.set_result, "sent in")
            seen["value"] = await fut
            seen["task"] = asyncio.current_task()
            return "finished"

        assert await rt.supervisor.call("flaky", "op", suspends, at_once=True) == "finished"
        assert seen["value"] == "sent in" and seen["task"] is not caller

        async def hangs():
            await asyncio.sleep(0)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:  # thrown in, as into a task of its own
                ctl.cancelled += 1
                raise

        with pytest.raises(sup.HandlerTimeout):
            await rt.supervisor.call("flaky", "op", hangs, at_once=True, timeout_s=0.05)
        assert ctl.cancelled == 1
        assert rt.supervisor.health("flaky")["in_flight"] == 0

    _scenario(eco_modules, tmp_path, STILL, body)


def test_the_rest_of_a_coroutine_stepped_by_hand_gets_a_cancellation_that_comes_before_its_task_ran(sup):
    """`_Rest`: a task cancelled before its first step still throws the cancellation into the coroutine."""
    seen = []

    async def tool():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main():
        coro = tool()
        yielded = coro.send(None)  # stepped by hand: suspended on the event's future
        task = asyncio.get_running_loop().create_task(sup._Rest(coro, yielded))
        task.cancel()  # before the task's first step
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cancelled"]
