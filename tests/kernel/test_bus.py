from __future__ import annotations

import asyncio

import pytest


def test_conversations_joined_at_start_by_title(runtime):
    convs = {c["title"]: c for c in asyncio.run(runtime.use("conversations.list", caller="rogers"))}
    assert set(convs) == {"general", "security"}
    assert convs["security"]["participants"] == ["turing", "rogers"]
    assert runtime.mad("rogers").conversation_id("general") == convs["general"]["id"]


def test_post_history_order_and_envelope_fields(runtime):
    conv = asyncio.run(runtime.use("conversations.create", caller="rogers", title="ops", participants=["turing"]))
    assert conv["participants"] == ["rogers", "turing"] and conv["created_by"] == "rogers"
    for i in range(5):
        asyncio.run(runtime.use("conversations.post", caller="rogers", conversation_id=conv["id"], content=f"msg {i}"))
    hist = asyncio.run(runtime.use("conversations.history", caller="rogers", conversation_id=conv["id"], limit=3))
    assert [e["content"] for e in hist] == ["msg 2", "msg 3", "msg 4"]
    env = hist[0]
    assert set(env) == {"id", "correlation_id", "sender", "conversation_id", "kind", "content", "payload", "created_at"}
    assert env["sender"] == "rogers" and env["kind"] == "message" and env["correlation_id"] == env["id"]
    reply = asyncio.run(
        runtime.use("conversations.post", caller="turing", conversation_id=conv["id"], content="ack",
                    kind="reply", correlation_id=env["id"])
    )
    assert reply["correlation_id"] == env["id"]


def test_post_errors(runtime):
    from_kernel = type(runtime).__module__.rsplit(".", 1)[0]
    errors = __import__(f"{from_kernel}.errors", fromlist=["x"])
    with pytest.raises(errors.NotFound):
        asyncio.run(runtime.use("conversations.post", caller="rogers", conversation_id="nope", content="x"))
    conv = asyncio.run(runtime.use("conversations.create", caller="rogers", title="t"))
    with pytest.raises(errors.InvalidArgument):
        asyncio.run(runtime.use("conversations.post", caller="rogers", conversation_id=conv["id"], content="x", kind="bogus"))
    with pytest.raises(errors.InvalidArgument):
        asyncio.run(runtime.use("conversations.post", caller="rogers", conversation_id=conv["id"], bogus=1))
    with pytest.raises(errors.AccessDenied, match="may not use nope.nothing"):  # a MAD probing: refused, audited
        asyncio.run(runtime.use("nope.nothing", caller="rogers"))
    with pytest.raises(errors.AccessDenied):
        asyncio.run(runtime.use("conversations.list", caller="mallory"))


def test_search_full_text_and_hostile_queries(runtime):
    conv = asyncio.run(runtime.use("conversations.create", caller="rogers", title="search"))
    for text in ["the quick brown fox", "lazy dog sleeps", "quick thinking wins"]:
        asyncio.run(runtime.use("conversations.post", caller="rogers", conversation_id=conv["id"], content=text))
    hits = asyncio.run(runtime.use("conversations.search", caller="rogers", query="quick"))
    assert sorted(h["content"] for h in hits) == ["quick thinking wins", "the quick brown fox"]
    assert [h["content"] for h in asyncio.run(runtime.use("conversations.search", caller="rogers", query="quick fox"))] == [
        "the quick brown fox"
    ]
    # FTS5 syntax in user input is treated as words, never as a query language
    for hostile in ['"unbalanced', "NEAR(", "a OR", "*", "col:x", "'; DROP TABLE messages; --"]:
        asyncio.run(runtime.use("conversations.search", caller="rogers", query=hostile))
    assert asyncio.run(runtime.use("conversations.search", caller="rogers", query="   ")) == []
    assert len(asyncio.run(runtime.use("conversations.search", caller="rogers", query="quick", limit=1))) == 1


def test_like_fallback_search(runtime):
    runtime.bus.fts = False
    conv = asyncio.run(runtime.use("conversations.create", caller="rogers", title="like"))
    asyncio.run(runtime.use("conversations.post", caller="rogers", conversation_id=conv["id"], content="100% pure_text"))
    assert len(runtime.bus.search("pure_text")) == 1
    assert runtime.bus.search("pureXtext") == []


def test_bus_persists_across_restart(eco_modules, tmp_path):
    config, _, runtime_mod = eco_modules
    rt = runtime_mod.Runtime(config, tmp_path / "st")
    asyncio.run(rt.start())
    conv = asyncio.run(rt.use("conversations.create", caller="rogers", title="durable"))
    asyncio.run(rt.use("conversations.post", caller="rogers", conversation_id=conv["id"], content="still here"))
    asyncio.run(rt.stop())
    rt2 = runtime_mod.Runtime(config, tmp_path / "st")
    asyncio.run(rt2.start())
    try:
        assert [e["content"] for e in rt2.bus.history(conv["id"])] == ["still here"]
        # joining at start is idempotent: still one conversation per title
        titles = [c["title"] for c in rt2.bus.list(50)]
        assert titles.count("general") == 1 and titles.count("security") == 1
        assert rt2.db.one("PRAGMA journal_mode")["journal_mode"] == "wal"
    finally:
        asyncio.run(rt2.stop())


def test_search_sees_every_message_though_the_index_is_kept_in_batches(eco_modules, tmp_path):
    """The search index is written in batches off the hot path: a search still finds a message stored just
    before it, a full batch is indexed without any search, and a database whose index was kept by the
    older per-insert trigger is taken over (its triggers replaced, nothing indexed twice)."""
    import sqlite3

    config, _, runtime_mod = eco_modules
    state = tmp_path / "st"
    rt = runtime_mod.Runtime(config, state)
    asyncio.run(rt.start())
    try:
        bus_mod = type(rt.bus)
        conv = asyncio.run(rt.use("conversations.create", caller="rogers", title="batches"))
        asyncio.run(rt.use("conversations.post", caller="rogers", conversation_id=conv["id"], content="zebra crossing"))
        assert [h["content"] for h in rt.bus.search("zebra")] == ["zebra crossing"]
        batch = __import__(bus_mod.__module__, fromlist=["INDEX_BATCH"]).INDEX_BATCH
        for i in range(batch):
            rt.bus.post(conv["id"], "rogers", f"filler {i}")
        indexed = rt.db.one("SELECT count(*) AS n FROM messages_fts_docsize")["n"]
        total = rt.db.one("SELECT count(*) AS n FROM messages")["n"]
        assert total - indexed < batch  # a full batch went in without a search
    finally:
        asyncio.run(rt.stop())
    with sqlite3.connect(state / "ecosystem.db") as db:  # as an older kernel left it: a trigger per insert
        db.execute("DROP TRIGGER messages_fts_ad")
        db.execute("CREATE TRIGGER messages_fts_ai AFTER INSERT ON messages BEGIN"
                   " INSERT INTO messages_fts(rowid, content) VALUES (new.seq, new.content); END")
        seq = db.execute("INSERT INTO messages (id, sender, conversation_id, kind, content, created_at)"
                         " VALUES ('old-kernel', 'rogers', ?, 'message', 'okapi sighting', 'then')", (conv["id"],)).lastrowid
    rt2 = runtime_mod.Runtime(config, state)
    asyncio.run(rt2.start())
    try:
        assert rt2.db.one("SELECT name FROM sqlite_master WHERE name = 'messages_fts_ai'") is None
        assert [h["content"] for h in rt2.bus.search("okapi")] == ["okapi sighting"]
        assert rt2.db.one("SELECT count(*) AS n FROM messages_fts_docsize WHERE id = ?", (seq,))["n"] == 1
        assert rt2.db.one("PRAGMA integrity_check")["integrity_check"] == "ok"
        rt2.db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")  # raises if the index is off
    finally:
        asyncio.run(rt2.stop())


def test_ids_are_time_ordered_and_unique_and_a_forked_child_draws_other_random_bits(eco_modules):
    """Envelope ids draw their random bits from os.urandom: a forked child never repeats the parent's."""
    import importlib
    import os
    import re

    _, kernel, _ = eco_modules
    logs = importlib.import_module(kernel.__name__ + ".logs")
    ids = [logs.new_id() for _ in range(5000)]  # more than one buffer's worth
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert [i[:12] for i in ids] == sorted(i[:12] for i in ids)  # milliseconds first: later ids sort later
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out
        os.write(write, ",".join(logs.new_id() for _ in range(20)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    parent = [logs.new_id() for _ in range(20)]
    assert len(child) == 20 and not {i[12:] for i in child} & {i[12:] for i in parent}
