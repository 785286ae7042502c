"""The audit log: append-only, hash-chained, checked by `python -m <pkg> audit verify`.

Tampering is done the way an intruder with the database file would: drop the triggers, then
edit, delete, insert or reorder rows. `audit verify` must exit 1 naming the first broken entry.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import os
import sqlite3
import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# What the kernel before the chain created (its secrets and gateway audit tables, unchained).
OLD_KERNEL_SCHEMA = """
CREATE TABLE secrets (name TEXT NOT NULL, version INTEGER NOT NULL, nonce BLOB NOT NULL, ciphertext BLOB NOT NULL,
    created_by TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE secrets_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, actor TEXT NOT NULL,
    on_behalf_of TEXT NOT NULL DEFAULT '', action TEXT NOT NULL, name TEXT NOT NULL, ok INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT '');
CREATE TRIGGER secrets_audit_no_update BEFORE UPDATE ON secrets_audit
BEGIN SELECT RAISE(ABORT, 'secrets_audit is append-only'); END;
CREATE TRIGGER secrets_audit_no_delete BEFORE DELETE ON secrets_audit
BEGIN SELECT RAISE(ABORT, 'secrets_audit is append-only'); END;
CREATE TRIGGER secrets_no_update BEFORE UPDATE ON secrets
BEGIN SELECT RAISE(ABORT, 'secret versions are immutable'); END;
CREATE TABLE gateway_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, client TEXT NOT NULL,
    event TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '', remote TEXT NOT NULL DEFAULT '');
"""


@pytest.fixture
def kit(eco_modules, monkeypatch):
    config, kernel, runtime_mod = eco_modules
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    cli = importlib.import_module(kernel.__name__ + ".cli")
    audit_mod = importlib.import_module(kernel.__name__ + ".audit")
    db_mod = importlib.import_module(kernel.__name__ + ".db")
    return config, runtime_mod, cli, audit_mod, db_mod


def _activity(kit, state) -> None:
    """A stopped state with a few audited events of each kind."""
    config, runtime_mod, *_ = kit
    rt = runtime_mod.Runtime(config, state)
    asyncio.run(rt.start())
    asyncio.run(rt.use("secrets.set", caller="turing", name="db_password", value="pw-1"))
    asyncio.run(rt.use("secrets.get", caller="rogers", name="db_password"))
    with pytest.raises(Exception):
        asyncio.run(rt.use("secrets.get", caller="fiedler", name="db_password"))
    rt.audit.append("anonymous", "gateway.unauthorized", "mcp", False, "invalid bearer token", remote="127.0.0.1:5")
    asyncio.run(rt.stop())


def _verify(kit, state, capsys) -> tuple[int, str, str]:
    config, _, cli, *_ = kit
    code = cli.main(config, ["audit", "verify", "--state", str(state)])
    out = capsys.readouterr()
    return code, out.out.strip(), out.err.strip()


def _tamper(state, *statements: str) -> None:
    conn = sqlite3.connect(state / "ecosystem.db")
    conn.executescript("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete; "
                       "DROP TRIGGER audit_log_chain_head;" + "".join(s + ";" for s in statements))
    conn.close()


def test_every_entry_is_chained_and_verify_reports_the_head(kit, tmp_path, capsys):
    state = tmp_path / "state"
    _activity(kit, state)
    *_, audit_mod, _ = kit
    conn = sqlite3.connect(state / "ecosystem.db")
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY id")]
    conn.close()
    assert rows[0]["action"] == "audit.genesis" and rows[0]["prev_hash"] == "0" * 64
    assert {"secrets.set", "secrets.get", "gateway.unauthorized"} <= {r["action"] for r in rows}
    for before, entry in zip(rows, rows[1:], strict=False):
        assert entry["prev_hash"] == before["hash"]
        assert entry["hash"] == audit_mod.entry_hash(entry, entry["prev_hash"])
    code, out, _ = _verify(kit, state, capsys)
    assert code == 0
    assert out == f"{len(rows)} entries, chain intact, head {rows[-1]['hash']}"


def test_the_database_refuses_updates_deletes_and_forks(kit, tmp_path):
    state = tmp_path / "state"
    _activity(kit, state)
    conn = sqlite3.connect(state / "ecosystem.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit_log SET ok = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_log WHERE id = 2")
    genesis = conn.execute("SELECT hash FROM audit_log WHERE id = 1").fetchone()[0]
    with pytest.raises(sqlite3.IntegrityError, match="extend the head"):  # a second entry after genesis: a fork
        conn.execute("INSERT INTO audit_log (id, ts, actor, action, subject, ok, prev_hash, hash) "
                     "VALUES ((SELECT MAX(id) + 1 FROM audit_log), 'now', 'x', 'y', 'z', 1, ?, 'h')", (genesis,))
    conn.close()


@pytest.mark.parametrize(("tampering", "first_broken"), [
    (["UPDATE audit_log SET detail = 'nothing to see' WHERE id = 3"], "entry 3 "),
    (["UPDATE audit_log SET ok = 1 - ok WHERE id = 4"], "entry 4 "),
    (["DELETE FROM audit_log WHERE id = 3"], "entry 4 "),
    (["DELETE FROM audit_log WHERE id = 1"], "entry 2 "),
    # two entries swapped, each carrying its own chain fields along
    (["UPDATE audit_log SET id = -3 WHERE id = 3", "UPDATE audit_log SET id = 3 WHERE id = 4",
      "UPDATE audit_log SET id = 4 WHERE id = -3"], "entry 3 "),
    # an entry slipped in between 2 and 3 (with a made-up hash; a recomputed one is the next test)
    (["UPDATE audit_log SET id = id + 100 WHERE id >= 3", "UPDATE audit_log SET id = id - 99 WHERE id >= 103",
      "INSERT INTO audit_log (id, ts, actor, action, subject, ok, detail, on_behalf_of, remote, prev_hash, hash) "
      "SELECT 3, ts, 'turing', 'secrets.get', 'db_password', 1, '', '', '', hash, 'forged' FROM audit_log WHERE id = 2"],
     "entry 3 "),
])
def test_verify_names_the_first_broken_entry(kit, tmp_path, capsys, tampering, first_broken):
    state = tmp_path / "state"
    _activity(kit, state)
    assert _verify(kit, state, capsys)[0] == 0
    _tamper(state, *tampering)
    code, out, err = _verify(kit, state, capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"audit log broken: {first_broken}"), err


def test_an_inserted_entry_with_a_recomputed_hash_still_breaks_the_next_link(kit, tmp_path, capsys):
    state = tmp_path / "state"
    _activity(kit, state)
    *_, audit_mod, _ = kit
    conn = sqlite3.connect(state / "ecosystem.db")
    conn.row_factory = sqlite3.Row
    two = dict(conn.execute("SELECT * FROM audit_log WHERE id = 2").fetchone())
    conn.close()
    forged = {**two, "id": 3, "actor": "turing", "action": "secrets.get", "subject": "db_password", "ok": 1}
    forged["prev_hash"] = two["hash"]
    forged["hash"] = audit_mod.entry_hash(forged, forged["prev_hash"])
    _tamper(state, "UPDATE audit_log SET id = id + 1000 WHERE id >= 3",
            "UPDATE audit_log SET id = id - 999 WHERE id >= 1003",
            f"INSERT INTO audit_log (id, ts, actor, action, subject, ok, detail, on_behalf_of, remote, prev_hash, hash) "
            f"VALUES (3, '{forged['ts']}', 'turing', 'secrets.get', 'db_password', 1, '{forged['detail']}', '', '', "
            f"'{forged['prev_hash']}', '{forged['hash']}')")
    code, _, err = _verify(kit, state, capsys)
    assert code == 1 and err.startswith("audit log broken: entry 4 ") and "prev_hash" in err


def test_verify_refuses_a_directory_that_is_not_a_state(kit, tmp_path, capsys):
    code, _, err = _verify(kit, tmp_path / "nothing", capsys)
    assert code == 2 and "no database" in err


def test_concurrent_appends_from_two_connections_never_fork(kit, tmp_path):
    *_, audit_mod, db_mod = kit
    path = tmp_path / "state" / "ecosystem.db"
    logs = [audit_mod.AuditLog(db_mod.Database(path)) for _ in range(2)]  # as two processes would
    errors: list[BaseException] = []

    def writer(log, who: str) -> None:
        try:
            for i in range(150):
                log.append(who, "test.append", str(i), True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(logs[i % 2], f"w{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    count, _, problems = audit_mod.walk_chain(logs[0].db.query)
    assert problems == [] and count == 1 + 4 * 150
    for log in logs:
        log.db.close()


def test_a_state_from_the_previous_kernel_opens_and_its_audit_rows_join_the_chain(kit, tmp_path, capsys):
    """The old kernel's unchained rows are copied into the chain, oldest first, after a genesis entry; once."""
    config, runtime_mod, *_ = kit
    state = tmp_path / "state"
    (state / "keys").mkdir(parents=True)
    key = AESGCM.generate_key(bit_length=256)
    (state / "keys" / "secrets.key").write_bytes(base64.b64encode(key) + b"\n")
    os.chmod(state / "keys" / "secrets.key", 0o600)
    conn = sqlite3.connect(state / "ecosystem.db")
    conn.executescript(OLD_KERNEL_SCHEMA)
    nonce = os.urandom(12)
    conn.execute("INSERT INTO secrets VALUES ('db_password', 1, ?, ?, 'turing', '2025-01-01T00:00:00.000Z')",
                 (nonce, AESGCM(key).encrypt(nonce, b"old-pw", b"db_password")))
    conn.execute("INSERT INTO secrets_audit (ts, actor, action, name, ok) VALUES ('2025-01-01T00:00:00.000Z', 'turing', 'set', "
                 "'db_password', 1)")
    conn.execute("INSERT INTO gateway_audit (ts, client, event, detail, remote) VALUES ('2025-01-01T00:00:01.000Z', "
                 "'anonymous', 'unauthorized', 'missing bearer token', '10.0.0.9:1')")
    conn.execute("INSERT INTO secrets_audit (ts, actor, action, name, ok) VALUES ('2025-01-01T00:00:02.000Z', 'rogers', 'get', "
                 "'db_password', 1)")
    conn.commit()
    conn.close()

    rt = runtime_mod.Runtime(config, state)
    asyncio.run(rt.start())
    assert asyncio.run(rt.use("secrets.get", caller="turing", name="db_password"))["value"] == "old-pw"
    asyncio.run(rt.stop())
    rt = runtime_mod.Runtime(config, state)  # a second start copies nothing again
    asyncio.run(rt.start())
    entries = list(reversed(rt.audit.recent(100)))
    asyncio.run(rt.stop())
    assert [(e["actor"], e["action"], e["subject"]) for e in entries[:4]] == [
        ("kernel", "audit.genesis", "audit_log"),
        ("turing", "secrets.set", "db_password"),
        ("anonymous", "gateway.unauthorized", "mcp"),
        ("rogers", "secrets.get", "db_password"),
    ]
    assert "3 entries that follow were copied" in entries[0]["detail"]
    assert entries[2]["remote"] == "10.0.0.9:1" and entries[2]["ok"] is False
    assert [e["action"] for e in entries].count("audit.genesis") == 1
    assert _verify(kit, state, capsys)[0] == 0


def test_deleting_the_newest_entries_is_caught_by_the_anchor_kept_elsewhere(kit, tmp_path, capsys):
    """A truncated chain is still a valid chain: only an anchor of its head, kept outside the database, shows it."""
    config, _, cli, audit_mod, _ = kit
    state = tmp_path / "state"
    _activity(kit, state)
    anchor = state / audit_mod.ANCHOR_FILE
    head = sqlite3.connect(state / "ecosystem.db").execute("SELECT MAX(id), (SELECT hash FROM audit_log "
                                                           "ORDER BY id DESC LIMIT 1) FROM audit_log").fetchone()
    import json

    anchored = json.loads(anchor.read_text())
    assert (anchored["id"], anchored["hash"]) == head and anchored["ts"]
    shipped = tmp_path / "elsewhere.json"
    shipped.write_text(anchor.read_text())
    assert _verify(kit, state, capsys)[0] == 0

    _tamper(state, f"DELETE FROM audit_log WHERE id >= {head[0] - 1}")  # the intruder's last two entries
    code, _, err = _verify(kit, state, capsys)  # the state's own anchor, if the intruder left it
    assert code == 1 and f"entry {head[0]}" in err and "is gone: the newest entries were deleted" in err

    anchor.unlink()  # a careful intruder removes it too: the walk alone then finds nothing wrong ...
    assert _verify(kit, state, capsys)[0] == 0
    code = cli.main(config, ["audit", "verify", "--state", str(state), "--anchor", str(shipped)])
    err = capsys.readouterr().err
    assert code == 1 and f"entry {head[0]}" in err and "elsewhere.json" in err  # ... the copy kept elsewhere does


def test_the_audit_log_length_is_a_metric(kit, tmp_path):
    config, runtime_mod, *_ = kit
    rt = runtime_mod.Runtime(config, tmp_path / "state")
    asyncio.run(rt.start())
    try:
        before = rt.audit.head_id()
        rt.audit.append("anonymous", "gateway.unauthorized", "mcp", False, "probe")
        text = rt.metrics.render().decode()
        assert f"regen_audit_entries {float(before + 1)}" in text
    finally:
        asyncio.run(rt.stop())
