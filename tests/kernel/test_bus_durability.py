"""At-least-once delivery on the SQLite bus: what an accepted request survives, and what it does not do twice."""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bus_helpers import bus_eco  # noqa: F401  (fixture)

TRAFFIC = Path(__file__).with_name("bus_traffic.py")
ENVELOPE_ID = re.compile(r"^[0-9a-f]{32}$")
ITERATIONS = 24


def module(eco, name: str):
    return importlib.import_module(f"{eco.name}.kernel.{name}")


def query(state: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with sqlite3.connect(state / "ecosystem.db") as db:
        return db.execute(sql, params).fetchall()


async def accepted_shared(bus, request, target: str, sealed: bytes) -> None:
    await bus.accept_shared(request, target, sealed)


@pytest.fixture
def fresh_key(bus_eco, monkeypatch):  # noqa: F811
    """The key file in the state directory, as a single-process ecosystem keeps it."""
    monkeypatch.delenv(f"{bus_eco.config.env_prefix}_SECRETS_KEY", raising=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_random_points_loses_no_acknowledged_request(bus_eco, fresh_key, tmp_path):  # noqa: F811
    """A child pushes requests and prints each one the bus accepted; it is SIGKILLed at a random point
    (after a random number of acknowledgements, or after a random delay: during start-up, recovery or
    traffic), {ITERATIONS} times on one state. After a last clean start every acknowledged request was
    handled exactly once in effect: one ledger row, one reply, its delivery acked."""
    state = tmp_path / "state"
    seed = int(os.environ.get("BUS_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=str(bus_eco.root))
    acked: list[str] = []
    with open(tmp_path / "children.log", "w") as errors:
        for i in range(ITERATIONS):
            child = subprocess.Popen([sys.executable, str(TRAFFIC), bus_eco.name, str(state), "100000", str(rng.randrange(1 << 30))],
                                     stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
            lines: list[str] = []
            if i % 3 == 2:
                time.sleep(rng.uniform(0.0, 1.0))
            else:
                want = rng.randint(1, 150)
                for line in child.stdout:
                    lines.append(line.strip())
                    if sum(bool(ENVELOPE_ID.match(x)) for x in lines) >= want:
                        break
            child.send_signal(signal.SIGKILL)
            child.wait()
            lines += child.stdout.read().split()
            assert "stopped" not in lines, f"iteration {i} finished before its kill (seed {seed})"
            acked += [x for x in lines if ENVELOPE_ID.match(x)]
    done = subprocess.run([sys.executable, str(TRAFFIC), bus_eco.name, str(state), "0", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["started", "stopped"], done.stderr

    assert len(acked) > ITERATIONS, f"too little traffic to mean anything (seed {seed})"
    assert len(set(acked)) == len(acked)
    why = f"(seed {seed}; rerun with BUS_KILL_SEED={seed})"
    deliveries = dict(query(state, "SELECT envelope_id, state FROM bus_deliveries"))
    lost = [x for x in acked if deliveries.get(x) != "acked"]
    assert not lost, f"{len(lost)} acknowledged requests not handled {why}"
    effects = dict(query(state, "SELECT envelope_id, COUNT(*) FROM ledger_entries GROUP BY envelope_id"))
    assert all(effects.get(x) == 1 for x in acked), why
    replies: dict[str, list[str]] = {}
    for kind, payload in query(state, "SELECT kind, payload FROM messages WHERE kind IN ('reply', 'error')"):
        replies.setdefault(json.loads(payload).get("in_reply_to", ""), []).append(kind)
    assert all(replies.get(x) == ["reply"] for x in acked), f"each request has exactly one reply {why}"
    assert query(state, "SELECT COUNT(*) FROM bus_deliveries WHERE state = 'pending'") == [(0,)]
    # The kills did land between acceptance and ack: some deliveries ran again after a restart.
    redelivered = query(state, "SELECT COUNT(*) FROM bus_deliveries WHERE attempts > 1")[0][0]
    assert redelivered > 0, f"no kill left a delivery pending; the test proved nothing {why}"


def test_an_accepted_request_is_sealed_at_rest_and_runs_after_a_restart(bus_eco, fresh_key, tmp_path):  # noqa: F811
    """A request accepted and then cut off (its event loop ended before the delivery ran) is in the
    database, its secret argument sealed, and runs once at the next start with the real argument."""
    state = tmp_path / "state"
    marker = "sealed-bus-marker"

    async def accept_only():
        rt = bus_eco.Runtime(bus_eco.config, state)
        await rt.start()
        sent = await rt.submit("rogers", "turing", tool="set_secret", args={"name": "db_password", "value": marker})
        return rt, sent  # the loop ends now: the delivery task is cancelled before it ran

    rt, sent = asyncio.run(accept_only())
    rt.db.close()
    assert sent["payload"]["args"] == {"name": "db_password", "value": "[redacted]"}
    assert query(state, "SELECT state, attempts FROM bus_deliveries WHERE envelope_id = ?", (sent["id"],)) == [("pending", 1)]
    at_rest = b"".join(p.read_bytes() for p in state.glob("ecosystem.db*"))
    assert marker.encode() not in at_rest

    async def restart():
        rt2 = bus_eco.Runtime(bus_eco.config, state)
        await rt2.start()
        try:
            return await rt2.request("rogers", "turing", tool="get_secret", args={"name": "db_password"})
        finally:
            await rt2.stop()

    assert asyncio.run(restart())["value"] == marker
    assert query(state, "SELECT state, attempts, sealed FROM bus_deliveries WHERE envelope_id = ?", (sent["id"],)) == [("acked", 2, None)]
    kinds = [k for k, p in query(state, "SELECT kind, payload FROM messages") if json.loads(p).get("in_reply_to") == sent["id"]]
    assert kinds == ["reply"]


def test_a_request_whose_delivery_keeps_dying_is_abandoned_not_retried_forever(bus_eco, fresh_key, tmp_path):  # noqa: F811
    state = tmp_path / "state"
    max_attempts = module(bus_eco, "bus").MAX_ATTEMPTS

    async def accept_only():
        rt = bus_eco.Runtime(bus_eco.config, state)
        await rt.start()
        # The loop ends while the handler holds: its delivery started and never completed.
        return rt, await rt.submit("clerk", "ledger", tool="record", args={"n": 1, "hold_s": 30})

    rt, sent = asyncio.run(accept_only())
    rt.db.close()
    runs = query(state, "SELECT COUNT(*) FROM ledger_runs")
    with sqlite3.connect(state / "ecosystem.db") as db:  # as if the process had died in this delivery every time
        db.execute("UPDATE bus_deliveries SET attempts = ? WHERE envelope_id = ?", (max_attempts, sent["id"]))
    rt2 = bus_eco.Runtime(bus_eco.config, state)
    asyncio.run(rt2.start())
    asyncio.run(rt2.stop())
    assert query(state, "SELECT COUNT(*) FROM ledger_runs") == runs  # not run again
    [(content, payload)] = [(c, p) for k, c, p in query(state, "SELECT kind, content, payload FROM messages")
                            if k == "error" and json.loads(p).get("in_reply_to") == sent["id"]]
    assert json.loads(payload)["code"] == "abandoned" and f"after {max_attempts} deliveries" in content


def test_an_ack_is_recorded_once(bus_eco, fresh_key, tmp_path):  # noqa: F811
    """Two completions of one delivery (a duplicate racing the first): the second writes nothing."""
    rt = bus_eco.Runtime(bus_eco.config, tmp_path / "state")
    try:
        transport = module(bus_eco, "transport")
        conv = rt.bus.create("c", ["clerk", "ledger"], "clerk")
        request = rt.bus.envelope(conv["id"], "clerk", "", "request", "", {"to": "ledger"})
        asyncio.run(accepted_shared(rt.bus, request, "ledger", b"sealed"))
        first = transport.reply_to(request, 1, 1)
        assert rt.bus.complete(request.id, first.stored) is True
        assert rt.bus.complete(request.id, transport.reply_to(request, 2, 2).stored) is False
        assert [e["payload"]["result"] for e in rt.bus.history(conv["id"]) if e["kind"] == "reply"] == [1]
        assert rt.bus.delivery(request.id)["reply_id"] == first.envelope.id
    finally:
        rt.db.close()


def test_concurrent_hops_share_fsyncs_and_no_reply_comes_without_one(bus_eco, fresh_key, tmp_path, monkeypatch):  # noqa: F811
    """Group commit: 30 requests in flight (under the MAD's max_concurrent_calls) are made durable by a few
    shared fdatasyncs of the log; and when that fdatasync fails, not one of them is answered."""
    errors = module(bus_eco, "errors")
    calls: list[int] = []
    real = os.fdatasync

    async def hops(rt, broken: bool):
        def disk(fd: int) -> None:
            calls.append(fd)
            if broken:
                raise OSError(5, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fdatasync", disk)
        try:
            return await asyncio.gather(*(rt.request("clerk", "ledger", tool="record", args={"n": n}) for n in range(30)),
                                        return_exceptions=True)
        finally:
            monkeypatch.setattr(os, "fdatasync", real)

    async def scenario(state, broken: bool):
        rt = bus_eco.Runtime(bus_eco.config, state)
        await rt.start()
        try:
            return await hops(rt, broken)
        finally:
            await rt.stop()

    results = asyncio.run(scenario(tmp_path / "good", broken=False))
    assert [r["n"] for r in results] == list(range(30))
    assert 1 <= len(calls) <= 8, f"{len(calls)} fdatasyncs for 30 concurrent hops: nothing was grouped"
    assert query(tmp_path / "good", "SELECT COUNT(*) FROM bus_deliveries WHERE state = 'acked'") == [(30,)]
    failed = asyncio.run(scenario(tmp_path / "bad", broken=True))
    assert all(isinstance(r, errors.DurabilityError) for r in failed), failed


def test_a_submit_returns_once_its_request_is_on_disk(bus_eco, fresh_key, tmp_path, monkeypatch):  # noqa: F811
    """`submit` acknowledges a request only after an fdatasync that covers it (one per request when
    nothing else is in flight)."""
    synced: list[int] = []
    real = os.fdatasync

    async def scenario():
        rt = bus_eco.Runtime(bus_eco.config, tmp_path / "state")
        await rt.start()
        try:
            monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
            await rt.submit("clerk", "ledger", tool="record", args={"n": 1, "hold_s": 0.2})
            return len(synced)
        finally:
            monkeypatch.setattr(os, "fdatasync", real)
            await rt.stop()

    assert asyncio.run(scenario()) == 1


def test_a_transaction_that_wrote_nothing_does_not_vouch_for_group_commits(bus_eco, fresh_key, tmp_path, monkeypatch):  # noqa: F811
    """SQLite fsyncs nothing for a transaction that changed nothing: it must not mark earlier group commits
    as on disk (a reply would then be acknowledged without any fdatasync behind it)."""
    rt = bus_eco.Runtime(bus_eco.config, tmp_path / "state")
    synced: list[int] = []
    real = os.fdatasync
    try:
        conv = rt.bus.create("c", ["clerk", "ledger"], "clerk")
        request = rt.bus.envelope(conv["id"], "clerk", "", "request", "", {"to": "ledger"})
        asyncio.run(accepted_shared(rt.bus, request, "ledger", b"sealed"))  # a group commit
        rt.bus.join(conv["id"], "ledger")  # already a member: a transaction that writes nothing
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
        asyncio.run(rt.db.durable())
        assert len(synced) == 1
        rt.bus.post(conv["id"], "clerk", "a real write")  # this one fsyncs: nothing is left to sync
        asyncio.run(accepted_shared(rt.bus, rt.bus.envelope(conv["id"], "clerk", "", "request", "", {"to": "ledger"}),
                                    "ledger", b"s"))
        rt.bus.post(conv["id"], "clerk", "another real write")
        asyncio.run(rt.db.durable())
        assert len(synced) == 1
    finally:
        monkeypatch.setattr(os, "fdatasync", real)
        rt.db.close()


def test_when_the_disk_fails_an_fdatasync_nothing_more_is_acknowledged(bus_eco, fresh_key, tmp_path, monkeypatch):  # noqa: F811
    """A failed fdatasync fails the request that waited on it, and every later one (Linux may have dropped
    the pages, and a later fdatasync would succeed without them); the process reports itself unhealthy."""
    errors = module(bus_eco, "errors")
    real = os.fdatasync

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    async def scenario():
        rt = bus_eco.Runtime(bus_eco.config, tmp_path / "state")
        await rt.start()
        try:
            monkeypatch.setattr(os, "fdatasync", broken)
            with pytest.raises(errors.DurabilityError, match="Input/output error"):
                await rt.request("clerk", "ledger", tool="record", args={"n": 1})
            monkeypatch.setattr(os, "fdatasync", real)  # the disk "recovers": still nothing is vouched for
            with pytest.raises(errors.DurabilityError, match="restart"):
                await rt.request("clerk", "ledger", tool="record", args={"n": 2})
            with pytest.raises(errors.DurabilityError):
                await rt.submit("clerk", "ledger", tool="record", args={"n": 3})
            return rt.healthy()
        finally:
            monkeypatch.setattr(os, "fdatasync", real)
            await rt.stop()

    assert asyncio.run(scenario()) is False


def test_writes_that_share_a_transaction_fail_alone(bus_eco, fresh_key, tmp_path):  # noqa: F811
    """Bus writes of one event-loop turn share a transaction; one that fails (here a request accepted twice)
    takes back only itself: its caller gets the error, the others are stored."""
    rt = bus_eco.Runtime(bus_eco.config, tmp_path / "state")
    try:
        conv = rt.bus.create("c", ["clerk", "ledger"], "clerk")
        first, second = (rt.bus.envelope(conv["id"], "clerk", "", "request", "", {"to": "ledger"}) for _ in range(2))
        asyncio.run(accepted_shared(rt.bus, first, "ledger", b"sealed"))

        async def together():
            return await asyncio.gather(rt.bus.accept_shared(first, "ledger", b"again"),
                                        rt.bus.accept_shared(second, "ledger", b"sealed"), return_exceptions=True)

        duplicate, stored = asyncio.run(together())
        assert isinstance(duplicate, sqlite3.IntegrityError) and stored is None
        assert rt.bus.delivery(second.id)["state"] == "pending"
        assert rt.bus.delivery(first.id)["sealed"] == b"sealed"  # the failed write left the first one as it was
    finally:
        rt.db.close()


def test_a_sender_that_stops_waiting_cuts_neither_the_accept_nor_the_delivery_short(bus_eco, fresh_key, tmp_path):  # noqa: F811
    """Requests wait for the commit they share with their event-loop turn; senders cancelled meanwhile (a
    client gone) leave their requests accepted, delivered and acked all the same."""

    async def scenario():
        rt = bus_eco.Runtime(bus_eco.config, tmp_path / "state")
        await rt.start()
        try:
            senders = [asyncio.ensure_future(rt.request("clerk", "ledger", tool="record", args={"n": n})) for n in range(5)]
            await asyncio.sleep(0)  # each has queued its accept for this turn's commit
            for sender in senders:
                sender.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
            for _ in range(100):
                if not rt.transport._inflight:
                    break
                await asyncio.sleep(0.01)
        finally:
            await rt.stop()

    asyncio.run(scenario())
    assert query(tmp_path / "state", "SELECT state, COUNT(*) FROM bus_deliveries GROUP BY state") == [("acked", 5)]
    assert query(tmp_path / "state", "SELECT COUNT(*) FROM ledger_entries") == [(5,)]


def test_stop_drains_deliveries_in_flight_and_then_refuses(bus_eco, fresh_key, tmp_path):  # noqa: F811
    errors = module(bus_eco, "errors")

    async def scenario():
        rt = bus_eco.Runtime(bus_eco.config, tmp_path / "state")
        await rt.start()
        sent = await rt.submit("clerk", "ledger", tool="record", args={"n": 4, "hold_s": 0.3})
        await rt.transport.stop(drain_timeout_s=30)
        with pytest.raises(errors.KernelError, match="closed"):
            await rt.submit("clerk", "ledger", tool="record", args={"n": 5})
        await rt.stop()
        return sent

    sent = asyncio.run(scenario())
    assert query(tmp_path / "state", "SELECT state FROM bus_deliveries WHERE envelope_id = ?", (sent["id"],)) == [("acked",)]


def test_sealed_envelopes_open_only_with_the_same_key_in_the_same_place(bus_eco):  # noqa: F811
    transport = module(bus_eco, "transport")
    key = os.urandom(32)
    sealer = transport.Sealer(key)
    blob = sealer.seal(b"payload", "regen:eco:bus:turing")
    assert transport.Sealer(key).open(blob, "regen:eco:bus:turing") == b"payload"
    with pytest.raises(transport.SealError, match="another secrets key") as other:
        transport.Sealer(os.urandom(32)).open(blob, "regen:eco:bus:turing")
    assert other.value.foreign_key
    with pytest.raises(transport.SealError, match="moved") as moved:
        sealer.open(blob, "regen:eco:bus:rogers")
    assert not moved.value.foreign_key
    assert base64.b64encode(key) not in blob and key not in blob


# The bus tables as kernels up to madgroup 1.1.15 made them (bus.py's _RELAYOUT takes them over).
OLD_LAYOUT = """
CREATE TABLE messages_old (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, correlation_id TEXT NOT NULL DEFAULT '',
    sender TEXT NOT NULL, conversation_id TEXT NOT NULL REFERENCES conversations(id), kind TEXT NOT NULL,
    content TEXT NOT NULL DEFAULT '', payload TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL
);
INSERT INTO messages_old SELECT * FROM messages;
DROP TABLE messages;
ALTER TABLE messages_old RENAME TO messages;
CREATE INDEX messages_conv ON messages(conversation_id, seq);
CREATE INDEX messages_corr ON messages(correlation_id);
CREATE TABLE deliveries_old (
    envelope_id TEXT PRIMARY KEY REFERENCES messages(id), target TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'acked')), attempts INTEGER NOT NULL DEFAULT 1,
    sealed BLOB, reply_id TEXT NOT NULL DEFAULT '', accepted_at TEXT NOT NULL, acked_at TEXT NOT NULL DEFAULT ''
);
INSERT INTO deliveries_old SELECT * FROM bus_deliveries;
DROP TABLE bus_deliveries;
ALTER TABLE deliveries_old RENAME TO bus_deliveries;
CREATE INDEX bus_deliveries_pending ON bus_deliveries(state, target);
"""


def _layout(state: Path) -> dict[str, str]:
    return dict(query(state, "SELECT name, sql FROM sqlite_master WHERE name IN"
                             " ('messages', 'bus_deliveries', 'bus_deliveries_pending')"))


def test_a_database_in_the_older_layout_is_rebuilt_once_keeping_every_message_and_delivery(bus_eco, fresh_key, tmp_path):  # noqa: F811
    """Deliveries keyed by envelope id alone, no AUTOINCREMENT, only pending deliveries indexed: a database an
    older kernel made is rebuilt into that layout at start, with its messages (same seq), its search index,
    its acked deliveries and a pending one, which then runs; a second start changes nothing."""
    state = tmp_path / "state"

    async def hop_then_accept_only():
        rt = bus_eco.Runtime(bus_eco.config, state)
        await rt.start()
        await rt.request("rogers", "turing", tool="set_secret", args={"name": "db_password", "value": "first"})
        conv = await rt.use("conversations.create", caller="rogers", title="relayout")
        await rt.use("conversations.post", caller="rogers", conversation_id=conv["id"], content="quokka census")
        sent = await rt.submit("rogers", "turing", tool="set_secret", args={"name": "db_password", "value": "second"})
        return rt, sent

    rt, sent = asyncio.run(hop_then_accept_only())
    rt.db.close()
    with sqlite3.connect(state / "ecosystem.db", isolation_level=None) as db:
        db.execute("PRAGMA foreign_keys=OFF")
        db.executescript("BEGIN;" + OLD_LAYOUT + "COMMIT;")
    assert "AUTOINCREMENT" in _layout(state)["messages"]
    messages = query(state, "SELECT * FROM messages ORDER BY seq")
    deliveries = query(state, "SELECT * FROM bus_deliveries ORDER BY envelope_id")
    assert ("pending",) in [(d[2],) for d in deliveries] and ("acked",) in [(d[2],) for d in deliveries]

    async def restart():
        rt2 = bus_eco.Runtime(bus_eco.config, state)
        await rt2.start()
        try:
            found = [h["content"] for h in rt2.bus.search("quokka")]
            value = (await rt2.request("rogers", "turing", tool="get_secret", args={"name": "db_password"}))["value"]
            return found, value
        finally:
            await rt2.stop()

    found, value = asyncio.run(restart())
    layout = _layout(state)
    assert "AUTOINCREMENT" not in layout["messages"] and "WITHOUT ROWID" in layout["bus_deliveries"]
    assert "WHERE state = 'pending'" in layout["bus_deliveries_pending"]
    assert found == ["quokka census"] and value == "second"  # the pending request ran after the rebuild
    assert query(state, "SELECT * FROM messages ORDER BY seq")[:len(messages)] == messages
    after = dict((d[0], d) for d in query(state, "SELECT * FROM bus_deliveries"))
    assert all(after[d[0]] == d for d in deliveries if d[2] == "acked")
    assert after[sent["id"]][2:4] == ("acked", 2)
    assert query(state, "SELECT count(*) FROM sqlite_sequence WHERE name = 'messages'") == [(0,)]
    assert query(state, "PRAGMA foreign_key_check") == [] and query(state, "PRAGMA integrity_check") == [("ok",)]
    query(state, "INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")  # raises if the index is off
    before_second = query(state, "SELECT * FROM messages ORDER BY seq")
    asyncio.run(restart())
    assert _layout(state) == layout and query(state, "SELECT * FROM messages ORDER BY seq")[:len(before_second)] == before_second


def test_openers_racing_on_one_database_each_get_the_schema_whole(bus_eco, tmp_path):  # noqa: F811
    """The schema (its DROP/CREATE TRIGGER pairs too) runs in one transaction per opener. One opener is held
    between its DROP TRIGGER and its CREATE TRIGGER while another opens the same database: the other waits
    for it, where two openers' statements interleaving failed with "trigger ... already exists"."""
    import threading

    db_mod, bus_mod = module(bus_eco, "db"), module(bus_eco, "bus")
    first, second = db_mod.Database(tmp_path / "race.db"), db_mod.Database(tmp_path / "race.db")
    held, second_done = threading.Event(), threading.Event()

    def hold(sql: str) -> None:
        if sql.lstrip().startswith("CREATE TRIGGER messages_fts_ad") and not held.is_set():
            held.set()
            second_done.wait(timeout=1.0)  # in one transaction, the second opener waits for this one instead

    def open_second() -> None:
        held.wait(timeout=10)
        bus_mod.ConversationBus(second)
        second_done.set()

    first._conn.set_trace_callback(hold)
    failures = open_buses_at_once(bus_eco, [first], before_joining=open_second)
    second.close()
    assert held.is_set() and failures == []


def open_buses_at_once(eco, databases, before_joining=lambda: None) -> list[BaseException]:
    """A ConversationBus opened on each database, each in a thread, all at once; what the threads raised.
    `before_joining` runs in this thread while they run."""
    import threading

    bus_mod = module(eco, "bus")
    start = threading.Barrier(len(databases))
    failures: list[BaseException] = []

    def open_bus(database):
        try:
            start.wait()
            bus_mod.ConversationBus(database)
        except BaseException as exc:  # noqa: BLE001 - collected: a thread's exception fails nothing by itself
            failures.append(exc)
        finally:
            database.close()

    threads = [threading.Thread(target=open_bus, args=(database,)) for database in databases]
    for t in threads:
        t.start()
    try:
        before_joining()
    finally:
        for t in threads:
            t.join()
    return failures


def test_a_schema_script_is_one_transaction(bus_eco, tmp_path):  # noqa: F811
    """A script that fails part-way leaves nothing of itself behind, and none runs inside an open transaction."""
    db = module(bus_eco, "db").Database(tmp_path / "s.db")
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        db.script("CREATE TABLE a (x);\nCREATE TABLE b (x);\nCREATE TABLE a (x)")
    assert db.query("SELECT name FROM sqlite_master WHERE name IN ('a', 'b')") == []
    db.script("CREATE TABLE a (x); CREATE TRIGGER a_t BEFORE DELETE ON a BEGIN SELECT RAISE(ABORT, 'no'); END;")
    assert sorted(r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE name LIKE 'a%'")) == ["a", "a_t"]
    with pytest.raises(RuntimeError, match="inside an open transaction"), db.transaction():
        db.script("CREATE TABLE c (x)")
    assert db.query("SELECT name FROM sqlite_master WHERE name = 'c'") == []
    db.script("CREATE TABLE IF NOT EXISTS d (x)\n-- a schema may end in a comment")
    assert db.query("SELECT name FROM sqlite_master WHERE name = 'd'") == [{"name": "d"}]


def test_a_table_rebuild_that_would_break_a_foreign_key_changes_nothing(bus_eco, tmp_path):  # noqa: F811
    """Only the rebuilt table's own foreign keys are checked: an older, unrelated violation does not block it."""
    db = module(bus_eco, "db").Database(tmp_path / "t.db")
    db.script("CREATE TABLE parent (id TEXT PRIMARY KEY); CREATE TABLE child (p TEXT REFERENCES parent(id));"
              "CREATE TABLE other (p TEXT REFERENCES parent(id));"
              "INSERT INTO parent VALUES ('a'); INSERT INTO child VALUES ('a');")
    db.execute("PRAGMA foreign_keys=OFF")
    db.execute("INSERT INTO other VALUES ('dangling')")  # an old violation elsewhere
    db.execute("PRAGMA foreign_keys=ON")
    drop_parent = ["CREATE TABLE parent_new (id TEXT PRIMARY KEY)", "DROP TABLE parent",
                   "ALTER TABLE parent_new RENAME TO parent"]
    with pytest.raises(sqlite3.IntegrityError, match="rebuilding table child would break 1 of its foreign keys; nothing was changed"):
        db.rebuild(lambda conn: {"child": drop_parent})
    assert db.query("SELECT id FROM parent") == [{"id": "a"}]
    with pytest.raises(sqlite3.IntegrityError):  # foreign keys are enforced again
        db.execute("INSERT INTO child VALUES ('nobody')")
    keep_child = ["CREATE TABLE child_new (p TEXT REFERENCES parent(id))", "INSERT INTO child_new SELECT p FROM child",
                  "DROP TABLE child", "ALTER TABLE child_new RENAME TO child"]
    assert db.rebuild(lambda conn: {"child": keep_child}) == ["child"]  # 'other' is not its business
    assert db.query("SELECT p FROM child") == [{"p": "a"}] and db.rebuild(lambda conn: {}) == []
    db.close()


def test_a_database_from_before_deliveries_existed_is_rebuilt_and_given_them(bus_eco, fresh_key, tmp_path):  # noqa: F811
    """madgroup 1.0.x had `messages` (with AUTOINCREMENT) and no `bus_deliveries`: it opens, keeps its messages,
    and a hop works."""
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "ecosystem.db") as db:
        db.executescript("""
            CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, participants TEXT NOT NULL DEFAULT '[]',
                                        created_by TEXT NOT NULL, created_at TEXT NOT NULL);
            CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                correlation_id TEXT NOT NULL DEFAULT '', sender TEXT NOT NULL,
                conversation_id TEXT NOT NULL REFERENCES conversations(id), kind TEXT NOT NULL,
                content TEXT NOT NULL DEFAULT '', payload TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL);
            INSERT INTO conversations VALUES ('c1', 'old days', '["rogers"]', 'rogers', 'then');
            INSERT INTO messages (id, sender, conversation_id, kind, content, created_at)
                VALUES ('m1', 'rogers', 'c1', 'message', 'platypus memo', 'then');
        """)

    async def start_and_hop():
        rt = bus_eco.Runtime(bus_eco.config, state)
        await rt.start()
        try:
            await rt.request("rogers", "turing", tool="set_secret", args={"name": "k", "value": "v"})
            return [h["content"] for h in rt.bus.search("platypus")]
        finally:
            await rt.stop()

    assert asyncio.run(start_and_hop()) == ["platypus memo"]
    layout = _layout(state)
    assert "AUTOINCREMENT" not in layout["messages"] and "WITHOUT ROWID" in layout["bus_deliveries"]
    assert query(state, "SELECT seq, content FROM messages WHERE id = 'm1'") == [(1, "platypus memo")]


def test_two_processes_opening_an_old_database_at_once_rebuild_it_once(bus_eco, fresh_key, tmp_path):  # noqa: F811
    """The layout is read inside the rebuild's transaction: the second opener finds it done."""
    state = tmp_path / "state"

    async def fill():
        rt = bus_eco.Runtime(bus_eco.config, state)
        await rt.start()
        for n in range(30):
            await rt.request("rogers", "turing", tool="set_secret", args={"name": f"k{n}", "value": "v"})
        await rt.stop()

    asyncio.run(fill())
    with sqlite3.connect(state / "ecosystem.db", isolation_level=None) as db:
        db.execute("PRAGMA foreign_keys=OFF")
        db.executescript("BEGIN;" + OLD_LAYOUT + "COMMIT;")
    before = query(state, "SELECT * FROM messages ORDER BY seq")
    db_mod = module(bus_eco, "db")
    rebuilt: list[list[str]] = []

    class Counting(db_mod.Database):
        def rebuild(self, plan):
            done = super().rebuild(plan)
            rebuilt.append(done)
            return done

    assert open_buses_at_once(bus_eco, [Counting(state / "ecosystem.db") for _ in range(2)]) == []
    assert sorted(rebuilt) == [[], ["messages", "bus_deliveries"]]
    assert query(state, "SELECT * FROM messages ORDER BY seq") == before
    assert query(state, "PRAGMA integrity_check") == [("ok",)]
