"""The Redis Streams transport: one ecosystem as several processes sharing a real redis-server.

Each test runs its runtimes in one event loop (the Redis transport's tasks live on the loop
that started it); two Runtime objects with their own state directories stand for two processes.
Process-level failover (two servers, SIGKILL) is in tests/kernel/test_failover.py.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
import redis
from bus_helpers import bus_eco, redis_url, shared_key  # noqa: F401  (fixtures)

ALL = ("turing", "rogers", "fiedler", "grace", "ledger", "clerk")


@pytest.fixture
def bus(redis_url):  # noqa: F811
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def ledger_rows(state: Path, table: str = "entries") -> list[tuple]:
    with sqlite3.connect(state / "ecosystem.db") as db:
        return db.execute(f"SELECT * FROM ledger_{table}").fetchall()


def module(eco, name: str):
    return importlib.import_module(f"{eco.name}.kernel.{name}")


async def _until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_a_request_crosses_processes_and_the_bus_never_holds_a_secret_in_clear(bus_eco, redis_url, shared_key, bus, tmp_path):  # noqa: F811
    """Rogers (process A) asks Turing (process B) to store and read a secret: the reply comes back to A,
    the secret is stored in B's state, and neither Redis's memory nor its append-only file ever holds it."""
    marker = "hunter2-bus-marker"

    async def scenario():
        a = bus_eco.Runtime(bus_eco.config, tmp_path / "a", bus_url=redis_url, serve_mads=[m for m in ALL if m != "turing"])
        b = bus_eco.Runtime(bus_eco.config, tmp_path / "b", bus_url=redis_url, serve_mads=["turing"])
        await a.start()
        await b.start()
        try:
            await a.request("rogers", "turing", tool="set_secret", args={"name": "db_password", "value": marker})
            got = await a.request("rogers", "turing", tool="get_secret", args={"name": "db_password"})
            with pytest.raises(bus_eco.kernel.NotFound, match="another process"):
                a.mad("turing")
            # A client of A calling a tool of Turing: A's gateway forwards it over the bus to B.
            listed = await a.invoke_tool("turing", "list_secrets", {}, principal="client:ops")
            return got, listed
        finally:
            await a.stop()
            await b.stop()

    got, listed = asyncio.run(scenario())
    assert got["value"] == marker
    assert [s["name"] for s in listed] == ["db_password"]
    # A's history has both hops, redacted; B's has none of A's conversation (history is per process).
    with sqlite3.connect(tmp_path / "a" / "ecosystem.db") as db:
        hops = db.execute("SELECT sender, kind FROM messages WHERE sender IN ('rogers', 'turing', 'gateway') ORDER BY seq").fetchall()
        assert hops == [("rogers", "request"), ("turing", "reply")] * 2 + [("gateway", "request"), ("turing", "reply")]
        assert not db.execute("SELECT 1 FROM messages WHERE content LIKE ? OR payload LIKE ?", (f"%{marker}%",) * 2).fetchall()
    # Nothing Redis holds, or wrote to its append-only file, contains the secret.
    dump = []
    for key in bus.keys("*"):
        kind = bus.type(key)
        if kind == b"stream":
            dump += [json.dumps({k.decode(): v.hex() for k, v in f.items()}) for _, f in bus.xrange(key)]
        elif kind == b"string":
            dump.append(bus.get(key).hex())
    assert dump, "the handled replies should still be in Redis"
    assert marker.encode().hex() not in "".join(dump)
    aof = Path(bus.config_get("dir")["dir"])
    written = b"".join(p.read_bytes() for p in aof.rglob("*") if p.is_file())
    assert b"set_secret" not in written and marker.encode() not in written


def test_a_delivery_left_pending_by_a_dead_consumer_is_taken_over(bus_eco, redis_url, shared_key, bus, tmp_path):  # noqa: F811
    """B1 takes a request and stops in the middle of it (as a dead process would: no ack, no more
    renewals); B2 takes the entry over after claim_idle_s, runs it, and A gets B2's reply; B1's
    consumer, left holding nothing, is removed from the group (XGROUP DELCONSUMER)."""

    async def scenario():
        a = bus_eco.Runtime(bus_eco.config, tmp_path / "a", bus_url=redis_url, serve_mads=["clerk"])
        b1 = bus_eco.Runtime(bus_eco.config, tmp_path / "b1", bus_url=redis_url, serve_mads=["ledger"],
                             supervision=module(bus_eco, "supervisor").SupervisionPolicy(drain_timeout_s=0.1))
        await a.start()
        await b1.start()
        asked = asyncio.create_task(a.request("clerk", "ledger", tool="record", args={"n": 1, "hold_s": 3}))
        stream = b1.transport.stream("ledger")
        await _until(lambda: b1.transport.describe()["in_flight"] > 0, "B1 to take the request")
        await b1.stop()  # cut off mid-handler: not acked
        assert bus.xpending(stream, "mads")["pending"] == 1
        b2 = bus_eco.Runtime(bus_eco.config, tmp_path / "b2", bus_url=redis_url, serve_mads=["ledger"], claim_idle_s=0.3)
        await b2.start()
        try:
            result = await asyncio.wait_for(asked, 60)
        finally:
            await b2.stop()
            await a.stop()
        return result, b1.transport.consumer

    result, dead = asyncio.run(scenario())
    assert result["n"] == 1
    assert [r[0] for r in ledger_rows(tmp_path / "b2")] == [result["envelope_id"]]
    stream = f"regen:{bus_eco.config.name}:bus:ledger"
    assert bus.xpending(stream, "mads")["pending"] == 0 and bus.xlen(stream) == 0
    # B1 stopped holding an entry, so it stayed in the group (for others to take it over); B2 took the
    # entry over and then removed B1's consumer, which held nothing more; B2 stopped holding nothing and left.
    assert dead.split(":")[1].isdigit()  # host:pid:tag
    assert [c["name"].decode() for c in bus.xinfo_consumers(stream, "mads")] == []
    assert bus.hget(f"regen:{bus_eco.config.name}:takeovers", "ledger") == b"1"  # `bus status` counts it


def test_a_request_delivered_twice_runs_once_and_both_get_the_reply(bus_eco, redis_url, shared_key, bus, tmp_path):  # noqa: F811
    """The same request entered twice (a duplicate after a takeover): the second delivery finds the
    stored reply and sends it again, the handler does not run a second time."""
    kernel = bus_eco.kernel
    transport = module(bus_eco, "transport")
    sealer = transport.Sealer(base64.b64decode(shared_key))
    stream = f"regen:{bus_eco.config.name}:bus:ledger"
    replies = "test-replies"

    async def scenario():
        b = bus_eco.Runtime(bus_eco.config, tmp_path / "b", bus_url=redis_url, serve_mads=["ledger", "clerk"])
        conv = b.bus.create("dup", ["clerk", "ledger"], "clerk")
        request = kernel.Envelope(sender="clerk", conversation_id=conv["id"], kind="request",
                                  payload={"to": "ledger", "tool": "record", "args": {"n": 5}})
        body = json.dumps({"request": request.model_dump(), "reply_to": replies}).encode()
        for _ in range(2):
            bus.xadd(stream, {"e": sealer.seal(body, stream)})
        await b.start()
        try:
            await _until(lambda: bus.xlen(replies) == 2, "two replies")
        finally:
            await b.stop()
        return request.id

    request_id = asyncio.run(scenario())
    assert ledger_rows(tmp_path / "b", "runs") == [(1, request_id)]  # one run
    got = [transport.Reply.model_validate_json(sealer.open(f[b"r"], f"reply:{request_id}")) for _, f in bus.xrange(replies)]
    assert [r.result["n"] for r in got] == [5, 5] and got[0].envelope.id == got[1].envelope.id


def test_stop_drains_deliveries_in_flight_then_refuses(bus_eco, redis_url, shared_key, bus, tmp_path):  # noqa: F811
    async def scenario():
        a = bus_eco.Runtime(bus_eco.config, tmp_path / "a", bus_url=redis_url, serve_mads=["clerk"])
        b = bus_eco.Runtime(bus_eco.config, tmp_path / "b", bus_url=redis_url, serve_mads=["ledger"])
        await a.start()
        await b.start()
        asked = asyncio.create_task(a.request("clerk", "ledger", tool="record", args={"n": 2, "hold_s": 0.5}))
        await _until(lambda: b.transport.describe()["in_flight"] > 0, "the delivery to start")
        await b.transport.stop(drain_timeout_s=30)  # returns once the delivery in flight is acked
        result = await asyncio.wait_for(asked, 30)
        with pytest.raises(module(bus_eco, "errors").KernelError, match="closed"):
            await b.request("clerk", "ledger", tool="record", args={"n": 3})  # b's own bus is closed
        await a.stop()
        await b.stop()
        return result

    assert asyncio.run(scenario())["n"] == 2
    assert bus.xpending(f"regen:{bus_eco.config.name}:bus:ledger", "mads")["pending"] == 0


def test_bus_configuration_errors_are_clear(bus_eco, shared_key, tmp_path, monkeypatch):  # noqa: F811
    errors = module(bus_eco, "errors")
    with pytest.raises(errors.InvalidArgument, match="needs a bus shared"):
        bus_eco.Runtime(bus_eco.config, tmp_path / "s1", serve_mads=["ledger"])
    with pytest.raises(errors.InvalidArgument, match="unknown MAD"):
        bus_eco.Runtime(bus_eco.config, tmp_path / "s2", bus_url="redis://127.0.0.1:1/0", serve_mads=["nobody"])
    with pytest.raises(errors.InvalidArgument, match="unknown bus 'amqp://u:\\*\\*\\*@h/'"):
        bus_eco.Runtime(bus_eco.config, tmp_path / "s3", bus_url="amqp://u:secret@h/")
    rt = bus_eco.Runtime(bus_eco.config, tmp_path / "s4", bus_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    with pytest.raises(errors.KernelError, match="cannot reach the bus at redis://127.0.0.1:1/0"):
        asyncio.run(rt.start())
    # serve takes the bus from --bus, else from <ECO>_BUS_URL
    cli = module(bus_eco, "cli")
    monkeypatch.setenv(f"{bus_eco.config.env_prefix}_BUS_URL", "redis://10.0.0.9:6379/2")
    args = cli._parser(bus_eco.config).parse_args(["serve", "--state", "s", "--mads", "rogers,turing"])
    assert (args.bus, args.mads) == ("redis://10.0.0.9:6379/2", ["rogers", "turing"])
    args = cli._parser(bus_eco.config).parse_args(["serve", "--state", "s", "--bus", "local"])
    assert args.bus == "local" and args.mads is None


@pytest.mark.slow
def test_a_slow_delivery_on_a_live_process_is_not_taken_over(bus_eco, redis_url, shared_key, bus, tmp_path):  # noqa: F811
    """A handler that runs longer than claim_idle_s keeps its entry while its process lives: the process
    renews its claim, so the entry never looks idle long enough for another replica to take it over
    (and run it a second time); a second replica running meanwhile does not run it."""
    stream = f"regen:{bus_eco.config.name}:bus:ledger"
    claim_idle_s = 2.0  # renewed every third of it: a loop stalled for over a second would still pass

    async def scenario():
        a = bus_eco.Runtime(bus_eco.config, tmp_path / "a", bus_url=redis_url, serve_mads=["clerk"])
        b1 = bus_eco.Runtime(bus_eco.config, tmp_path / "b1", bus_url=redis_url, serve_mads=["ledger"], claim_idle_s=claim_idle_s)
        await a.start()
        await b1.start()
        asked = asyncio.create_task(a.request("clerk", "ledger", tool="record", args={"n": 9, "hold_s": 2.5 * claim_idle_s}))
        await _until(lambda: b1.transport.describe()["in_flight"] > 0, "B1 to take the request")
        b2 = bus_eco.Runtime(bus_eco.config, tmp_path / "b2", bus_url=redis_url, serve_mads=["ledger"], claim_idle_s=claim_idle_s)
        await b2.start()
        idle_ms = []
        try:
            while not asked.done():
                idle_ms += [p["time_since_delivered"] for p in bus.xpending_range(stream, "mads", "-", "+", 10)]
                await asyncio.sleep(0.05)
            return await asked, max(idle_ms)
        finally:
            for rt in (a, b1, b2):
                await rt.stop()

    result, longest_idle_ms = asyncio.run(scenario())
    assert result["n"] == 9
    assert longest_idle_ms < 900 * claim_idle_s, "the entry looked abandoned while its handler ran"
    assert len(ledger_rows(tmp_path / "b1", "runs")) == 1
    assert ledger_rows(tmp_path / "b2", "runs") == []


def test_two_thousand_requests_in_flight_all_succeed_on_a_bounded_pool(bus_eco, redis_url, shared_key, bus, tmp_path):  # noqa: F811
    """2,000 requests sent at once through two runtimes that share one redis-server (both run the ledger,
    so they share the work): every one is answered, once, none fails with "Too many connections" nor
    with "overloaded" (more deliveries than the MAD's max_concurrent_calls wait for room); each
    process waits for a pooled connection instead (backpressure), so Redis never sees more than the
    pools' bound of connections, and the blocking reads keep connections of their own."""
    count = 2000
    ran: dict[str, list[str]] = {"a": [], "b": []}

    def counted(rt, name: str) -> None:  # the request ids each runtime answered (not "overloaded")
        inner = rt.transport._dispatch

        async def dispatch(request):
            reply = await inner(request)
            if reply.code != "overloaded":
                ran[name].append(request.id)
            return reply

        rt.transport._dispatch = dispatch

    # The state directories in memory when there is a tmpfs: this measures the bus, not the disk's fsyncs
    # (each process records every request and reply in its history, one fsync each).
    state = Path(tempfile.mkdtemp(dir="/dev/shm")) if os.access("/dev/shm", os.W_OK) else tmp_path

    async def scenario():
        a = bus_eco.Runtime(bus_eco.config, state / "a", bus_url=redis_url, serve_mads=["clerk", "ledger"])
        b = bus_eco.Runtime(bus_eco.config, state / "b", bus_url=redis_url, serve_mads=["ledger"])
        counted(a, "a")
        counted(b, "b")
        await a.start()
        await b.start()
        most = 0
        sent = [asyncio.create_task(a.request("clerk", "ledger", tool="echo", args={"n": i})) for i in range(count)]
        try:
            while not all(t.done() for t in sent):
                most = max(most, len(bus.client_list()))
                await asyncio.sleep(0.05)
            return await asyncio.gather(*sent, return_exceptions=True), a.transport, most
        finally:
            await a.stop()
            await b.stop()

    try:
        results, transport, most = asyncio.run(scenario())
    finally:
        if state != tmp_path:
            shutil.rmtree(state, ignore_errors=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} of {count} failed, e.g. {failed[0]!r}"
    assert sorted(r["n"] for r in results) == list(range(count))
    bound = 2 * (transport.max_connections + transport.BLOCKING_CONNECTIONS) + 1  # two runtimes, and this test's client
    assert most <= bound, f"{most} connections to Redis, more than the pools allow ({bound})"
    assert len(ran["a"]) + len(ran["b"]) == len(set(ran["a"]) | set(ran["b"])) == count  # each ran once
    assert ran["a"] and ran["b"], "both replicas took a share"


def test_an_overloaded_answer_from_the_handler_itself_is_not_run_again(bus_eco, redis_url, shared_key, bus, tmp_path):  # noqa: F811
    """Only the supervisor's refusal before a handler ran is retried on the Redis bus; a handler that
    answers "overloaded" after writing something has answered, and runs once."""
    errors = module(bus_eco, "errors")

    async def scenario():
        a = bus_eco.Runtime(bus_eco.config, tmp_path / "a", bus_url=redis_url, serve_mads=["clerk"])
        b = bus_eco.Runtime(bus_eco.config, tmp_path / "b", bus_url=redis_url, serve_mads=["ledger"])
        await a.start()
        await b.start()
        try:
            with pytest.raises(errors.KernelError, match="own queue is full"):
                await a.request("clerk", "ledger", tool="busy", args={"n": 1})
            return b.db.query("SELECT envelope_id FROM ledger_runs")
        finally:
            await a.stop()
            await b.stop()

    assert len(asyncio.run(scenario())) == 1


def test_one_process_on_a_redis_bus_uses_it_and_bus_status_tells_the_truth(bus_eco, redis_url, shared_key, bus, tmp_path, capsys):  # noqa: F811
    """`serve --bus redis://` in one process: bus status lists the process as a live consumer of every
    MAD's group from its start (Redis 7.0 creates a reading consumer only at its first entry), a request
    between its MADs goes over Redis (its stream counts it), and the process leaves the bus when it stops.
    A client's tool call on a MAD the process runs is run in the process (RUNBOOK), not over the bus."""
    cli = module(bus_eco, "cli")

    def status() -> dict:
        assert cli.main(bus_eco.config, ["bus", "status", "--bus", redis_url]) == 0
        return json.loads(capsys.readouterr().out)["mads"]

    async def scenario():
        rt = bus_eco.Runtime(bus_eco.config, tmp_path / "one", bus_url=redis_url)
        await rt.start()
        try:
            me = rt.transport.consumer
            first = status()
            await rt.request("clerk", "ledger", tool="record", args={"n": 1})
            await rt.invoke_tool("ledger", "record", {"n": 2}, principal="client:ops")
            return me, first, status()
        finally:
            await rt.stop()

    me, first, after = asyncio.run(scenario())
    assert set(first) == set(ALL)
    for mad, entry in first.items():
        assert entry["consumers"] == [{"name": me, "pending": 0, "idle_s": entry["consumers"][0]["idle_s"], "alive": True}], mad
        assert entry["added"] == 0 and entry["taken_over"] == 0
    assert after["ledger"]["added"] == 1 and after["ledger"]["queued"] == after["ledger"]["pending"] == 0
    assert [c["name"] for c in after["ledger"]["consumers"]] == [me]
    gone = status()  # stopped: it left every group, and its heartbeat is gone
    assert all(entry["consumers"] == [] for entry in gone.values()), gone
    assert bus.keys(f"regen:{bus_eco.config.name}:alive:*") == []


def test_drill_hold_needs_a_redis_bus(bus_eco, shared_key, tmp_path, capsys):  # noqa: F811
    """`serve --drill-hold` (failover drills) holds Redis deliveries; on the local bus it is refused before serving."""
    cli = module(bus_eco, "cli")
    assert cli.main(bus_eco.config, ["serve", "--state", str(tmp_path / "s"), "--drill-hold", "5"]) == 2
    assert "--drill-hold takes a number of seconds and needs a Redis bus" in capsys.readouterr().err
