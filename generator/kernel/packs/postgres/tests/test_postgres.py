"""The state in PostgreSQL (the postgres pack): the kernel's tables and the MADs' on a real server, shared by two
runtimes as two replicas share them, and the same numbered migrations as SQLite."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sqlite3
import subprocess
import sys
import threading

import httpx
import psycopg
import pytest
from bus_helpers import bus_eco, redis_url, shared_key  # noqa: F401  (fixtures)
from pg_helpers import pg_server, pg_url  # noqa: F401  (fixtures)

from generator.harness import call_tool, running_ecosystem


@pytest.fixture
def two(bus_eco, pg_url, redis_url, shared_key, tmp_path):  # noqa: F811
    """Two runtimes of one ecosystem on one PostgreSQL database and one Redis bus, as two replicas, each with a
    state directory of its own."""
    made = []
    for name in ("a", "b"):
        made.append(bus_eco.Runtime(bus_eco.config, tmp_path / name, db_url=pg_url, bus_url=redis_url))
    yield made
    for runtime in made:
        runtime.db.close()


def test_a_conversation_made_through_one_replica_is_read_through_the_other(two):
    a, b = two
    conv = a.bus.create("plans", ["rogers"], "turing")
    a.bus.post(conv["id"], "turing", "the quarterly plan is ready")
    assert b.bus.get(conv["id"])["participants"] == ["turing", "rogers"]
    assert [m["content"] for m in b.bus.history(conv["id"])] == ["the quarterly plan is ready"]
    assert [m["content"] for m in b.bus.search("quarterly plan")] == ["the quarterly plan is ready"]
    assert b.bus.search("plan quarterly missing") == []
    b.bus.join(conv["id"], "fiedler")
    assert a.bus.get(conv["id"])["participants"] == ["turing", "rogers", "fiedler"]


def test_a_second_process_on_the_local_bus_is_refused_until_the_first_is_gone(bus_eco, pg_url, shared_key, tmp_path):  # noqa: F811
    """With the local bus a process redelivers at start what the state holds pending: a second one on the same
    database would run the first's requests twice, so it is refused, saying what to do; once the first is gone
    (its connection with it), the next one starts and redelivers what it left."""
    first = bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=pg_url)
    try:
        with pytest.raises(Exception, match="with the local bus: replicas that share a database") as refused:
            bus_eco.Runtime(bus_eco.config, tmp_path / "b", db_url=pg_url)
        assert "--bus redis://" in str(refused.value)
    finally:
        first.db.close()
    bus_eco.Runtime(bus_eco.config, tmp_path / "b", db_url=pg_url).db.close()


def test_a_secret_rotated_on_one_replica_is_read_through_the_other(two):
    a, b = two
    a.secrets.set("turing", "db_password", "one")
    a.secrets.rotate("turing", "db_password", "two")
    assert b.secrets.get("turing", "db_password")["value"] == "two"


def test_the_audit_chain_stays_linear_with_two_writers(two):
    a, b = two

    def burst(runtime, n):
        for i in range(n):
            runtime.audit.append("turing", "test.write", f"{runtime.state_dir.name}-{i}", True)

    threads = [threading.Thread(target=burst, args=(r, 40)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.audit.verify() == [] and b.audit.verify() == []
    assert a.audit.head_id() == b.audit.head_id()


def test_a_client_revoked_through_one_replica_is_refused_by_the_other(two, bus_eco):  # noqa: F811
    a, b = two
    clients = importlib.import_module(f"{bus_eco.name}.kernel.clients")
    on_a = clients.ClientRegistry(a.state_dir, a.db.document("tokens.json"))
    on_b = clients.ClientRegistry(b.state_dir, b.db.document("tokens.json"))
    token = on_a.add("ci", ["*"])
    assert on_b.verify(token) == "ci"
    on_a.revoke("ci")
    assert on_b.verify(token) is None  # at its next request: the document's version changed
    assert not (a.state_dir / "tokens.json").exists()  # nothing was kept per replica


def test_mad_tables_behave_as_in_sqlite(two):
    a, b = two
    notes_a, notes_b = a.table_store("turing"), b.table_store("turing")
    first = notes_a.insert("notes", body="one")
    assert notes_a.insert("notes", id=10, body="ten") == 10
    assert notes_b.insert("notes", body="eleven") == 11  # the largest plus one, as SQLite's rowid
    assert [r["body"] for r in notes_b.select("notes")] == ["one", "ten", "eleven"]
    assert notes_b.select("notes", id=first) == [{"id": first, "body": "one"}]  # no rowid column shows
    assert notes_a.update("notes", {"id": 10}, body="TEN") == 1
    assert [r["body"] for r in notes_b.select("notes", order_by="-id", limit=1)] == ["eleven"]
    assert notes_b.delete("notes", id=first) == 1
    with pytest.raises(sqlite3.IntegrityError):  # the kernel's errors, whatever the backend
        notes_a.insert("notes", id=10, body="again")


def test_the_audit_log_and_secrets_cannot_be_rewritten_in_the_database(two):
    a, _ = two
    a.secrets.set("turing", "db_password", "one")
    for statement in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log",
                      "DELETE FROM secrets", "UPDATE secrets SET created_by = 'x'", "TRUNCATE secrets"):
        with pytest.raises(sqlite3.IntegrityError):
            a.db.execute(statement)
    with pytest.raises(sqlite3.IntegrityError, match="head of the chain"):
        a.db.execute("INSERT INTO audit_log (id, ts, actor, action, subject, ok, detail, on_behalf_of, remote, prev_hash,"
                     " hash) VALUES (999, '', 'x', 'x', '', 1, '', '', '', 'forged', 'forged')")
    assert a.audit.verify() == []


def test_storage_migrations_run_as_numbered_on_sqlite(bus_eco, pg_url, shared_key, tmp_path):  # noqa: F811
    storage = importlib.import_module(f"{bus_eco.name}.kernel.packs.storage.migrations")
    first = storage.Migration(number=1, name="create turing_extra", statements=(
        "CREATE TABLE IF NOT EXISTS turing_extra (id INTEGER PRIMARY KEY, body TEXT)",))
    second = storage.Migration(number=2, name="add column", statements=(
        "ALTER TABLE turing_extra ADD COLUMN score REAL",))
    runtime = bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=pg_url, migrations=[first])
    runtime.db.execute("INSERT INTO turing_extra (body) VALUES (?)", ["kept"])
    runtime.db.close()
    runtime = bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=pg_url, migrations=[first, second])
    try:
        assert [m.number for m in runtime.migrated] == [2]
        assert runtime.db.table_shape("turing_extra") == {"id": ("INTEGER", True, 1), "body": ("TEXT", False, 0),
                                                          "score": ("REAL", False, 0)}
        assert runtime.db.query("SELECT body, score FROM turing_extra") == [{"body": "kept", "score": None}]
    finally:
        runtime.db.close()
    with pytest.raises(Exception, match="newer version"):  # the state is ahead of this code: refused, nothing written
        bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=pg_url, migrations=[first])


@pytest.mark.parametrize("problem", ["wrong password", "wrong password parameter", "unreachable", "no such database"])
def test_a_database_that_cannot_be_used_is_a_clear_error_at_start(bus_eco, pg_server, shared_key, tmp_path,  # noqa: F811
                                                                 problem):
    url = {"wrong password": pg_server.url("postgres", password="wrong"),
           "wrong password parameter": f"postgresql://regen@{pg_server.host}:{pg_server.port}/postgres?password=wrong",
           "unreachable": pg_server.url("postgres").replace(str(pg_server.port), "1"),
           "no such database": pg_server.url("nope")}[problem]
    with pytest.raises(Exception, match="cannot reach the state database") as caught:
        bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=url)
    assert pg_server.password not in str(caught.value) and "wrong" not in str(caught.value)
    assert not (tmp_path / "a" / "ecosystem.db").exists()


def test_two_served_replicas_share_one_state(bus_eco, pg_url, redis_url, shared_key, tmp_path):  # noqa: F811
    """Two `serve` processes on one PostgreSQL database, as a load balancer without sticky sessions sees them."""
    env = {f"{bus_eco.config.env_prefix}_DB_URL": pg_url, f"{bus_eco.config.env_prefix}_BUS_URL": redis_url,
           "PYTHONPATH": os.pathsep.join(sys.path)}
    with running_ecosystem(bus_eco.name, tmp_path / "a", cwd=bus_eco.root, env=env) as a, \
            running_ecosystem(bus_eco.name, tmp_path / "b", cwd=bus_eco.root, env=env, token_name="second") as b:
        a.call("turing.set_secret", name="db_password", value="one")
        # a's client, through b: the clients, the secrets and their versions are the state's, not a replica's
        through_b = lambda tool, **args: asyncio.run(call_tool(b.url, a.token, tool, args))  # noqa: E731
        assert through_b("turing.rotate_secret", name="db_password", value="two")["version"] == 2
        assert a.call("turing.get_secret", name="db_password")["value"] == "two"
        conv = a.call("rogers.create_conversation", title="handover", participants=["fiedler"])
        assert through_b("rogers.history", conversation_id=conv["id"]) == []
        revoked = subprocess.run([sys.executable, "-m", bus_eco.name, "clients", "revoke", "second", "--state",
                                  str(tmp_path / "a")], cwd=bus_eco.root, env={**os.environ, **env}, capture_output=True)
        assert revoked.returncode == 0, revoked.stderr
        refused = httpx.post(b.mcp_url, headers={"Authorization": f"Bearer {b.token}"},
                             json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert refused.status_code == 401, refused.text
        with psycopg.connect(pg_url) as conn:  # the operator's change is in the state's one audit chain
            assert conn.execute("SELECT actor, subject FROM audit_log WHERE action = 'clients.revoke'").fetchall() == [
                ("operator", "second")]
        assert not (tmp_path / "a" / "ecosystem.db").exists() and not (tmp_path / "b" / "ecosystem.db").exists()


def test_the_operator_commands_work_on_the_shared_state(bus_eco, pg_url, pg_server, shared_key, tmp_path):  # noqa: F811
    """token, clients add|list|revoke and audit verify read $<PREFIX>_DB_URL as serve does: one set of clients, one
    audit chain for every replica, whichever host's state directory the operator names."""
    env = {**os.environ, f"{bus_eco.config.env_prefix}_DB_URL": pg_url}

    def run(*args: str, state: str = "a") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", bus_eco.name, *args, "--state", str(tmp_path / state)],
                              cwd=bus_eco.root, env=env, capture_output=True, text=True, timeout=60)

    runtime = bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=pg_url)  # opens the chain, as serve does
    runtime.db.close()
    added = run("clients", "add", "ci", "--allow", "turing.*")
    assert added.returncode == 0, added.stderr
    listed = run("clients", "list", "--json", state="b")  # another host's state directory: the same clients
    assert [c["name"] for c in json.loads(listed.stdout)] == ["ci"]
    assert run("clients", "revoke", "ci", state="b").returncode == 0
    assert json.loads(run("clients", "list", "--json").stdout)[0]["revoked_at"]
    verified = run("audit", "verify", state="b")
    assert verified.returncode == 0 and verified.stdout.startswith("3 entries, chain intact"), verified.stdout + verified.stderr
    # A superuser edits an entry behind the kernel's back (its triggers disabled): verify names it.
    name = pg_url.rsplit("/", 1)[1]
    pg_server.admin("ALTER TABLE audit_log DISABLE TRIGGER USER", database=name)
    pg_server.admin("UPDATE audit_log SET actor = 'nobody' WHERE id = 2", database=name)
    broken = run("audit", "verify")
    assert broken.returncode == 1 and "entry 2" in broken.stderr and "edited" in broken.stderr, broken.stderr
    assert not (tmp_path / "a" / "tokens.json").exists() and not (tmp_path / "a" / "ecosystem.db").exists()


def test_a_daily_quota_counts_the_calls_of_every_replica(two, bus_eco):  # noqa: F811
    a, b = two
    clients = importlib.import_module(f"{bus_eco.name}.kernel.clients")
    ledgers = [clients.CallLedger(runtime.db) for runtime in (a, b)]
    try:
        results = []
        threads = [threading.Thread(target=lambda ledger=ledger: results.extend(ledger.take_quota("ci", 5) for _ in range(6)))
                   for ledger in ledgers for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 5  # 24 attempts through two replicas: exactly the quota passes
        assert not ledgers[1].take_quota("other", 0)
    finally:
        for ledger in ledgers:
            ledger.close()


def test_a_database_set_up_by_a_newer_kernel_is_refused_with_nothing_written(bus_eco, pg_url, pg_server, shared_key,  # noqa: F811
                                                                              tmp_path):
    bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=pg_url).db.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE documents SET body = '99' WHERE name = 'kernel-schema'")
        conn.execute("CREATE OR REPLACE FUNCTION regen_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
        before = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    with pytest.raises(Exception, match="set up by a newer version of this ecosystem .kernel schema 99"):
        bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=pg_url)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == before
        assert "RETURN NULL" in conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'regen_append_only'").fetchone()[0]


def test_a_replica_carries_on_after_the_server_drops_its_connections(two, bus_eco, pg_server, pg_url):  # noqa: F811
    """A PostgreSQL restart or failover ends every session: reads are asked again on a new connection, and the
    call ledger's own connection is opened again too (else every MCP call would fail until a restart)."""
    a, _ = two
    clients = importlib.import_module(f"{bus_eco.name}.kernel.clients")
    ledger = clients.CallLedger(a.db)
    try:
        ledger.record("ci", "turing.get_secret", "c1", "ok", True, 1.0)
        pg_server.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{pg_url.rsplit('/', 1)[1]}'"
                        " AND pid <> pg_backend_pid()")
        assert a.db.one("SELECT 1 AS ok") == {"ok": 1} and a.db.healthy()
        for attempt in range(2):  # a write is not repeated for its caller: at most its first try fails
            try:
                ledger.record("ci", "turing.get_secret", f"c{attempt + 2}", "ok", True, 1.0)
            except sqlite3.OperationalError:
                assert attempt == 0
        assert ledger.take_quota("ci", 100) and ledger.calls_today("ci") >= 2
        a.audit.append("turing", "test.after_restart", "x", True)
        assert a.audit.verify() == []
    finally:
        ledger.close()


def test_replicas_starting_at_once_apply_a_pending_migration_once(bus_eco, pg_url, shared_key, tmp_path):  # noqa: F811
    storage = importlib.import_module(f"{bus_eco.name}.kernel.packs.storage.migrations")
    database = importlib.import_module(f"{bus_eco.name}.kernel.packs.postgres.pack").PostgresDatabase
    history = [storage.Migration(number=1, name="create t", statements=("CREATE TABLE IF NOT EXISTS m_t (id INTEGER PRIMARY KEY)",)),
               storage.Migration(number=2, name="add w", statements=("ALTER TABLE m_t ADD COLUMN w TEXT",), kind="expand",
                                 down=("ALTER TABLE m_t DROP COLUMN w",))]
    dbs = [database(pg_url, tmp_path / str(n)) for n in range(4)]
    storage.apply_migrations(dbs[0], history[:1])
    outcomes: list = []
    threads = [threading.Thread(target=lambda db=db: outcomes.append(storage.apply_migrations(db, history))) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(len(applied) for applied in outcomes) == [0, 0, 0, 1]  # one applied it; none failed
        assert [r["number"] for r in dbs[0].query("SELECT number FROM schema_migrations ORDER BY number")] == [1, 2]
    finally:
        for db in dbs:
            db.close()


def test_what_sqlite_stores_postgresql_stores_too(two):
    """A message of a million characters is stored and found by its first words (a tsvector holds 1 MB); a NUL in a
    hostile tool name does not keep its refusal out of the audit log; a day's first call past a quota is refused."""
    a, b = two
    conv = a.bus.create("big", [], "turing")
    a.bus.post(conv["id"], "turing", "needle " + "haystack words " * 66_000)
    assert len(b.bus.search("needle")) == 1
    entry = a.audit.append("anonymous", "gateway.tool-denied", "evil\x00tool", False)
    assert a.audit.verify() == [] and entry["subject"] == "evil\ufffdtool" == b.audit.recent(1)[0]["subject"]


def test_a_database_holding_another_applications_tables_is_refused(bus_eco, pg_url, shared_key, tmp_path):  # noqa: F811
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE audit_log (id serial PRIMARY KEY, what text)")
    with pytest.raises(Exception, match="already has tables named like the ecosystem's own .audit_log.*a database of its own"):
        bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=pg_url)
    with psycopg.connect(pg_url) as conn:  # nothing of the kernel's was put on it
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal").fetchone()[0] == 0


def test_a_shared_state_needs_the_secrets_key_in_the_environment(bus_eco, pg_url, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv(f"{bus_eco.config.env_prefix}_SECRETS_KEY", raising=False)
    with pytest.raises(Exception, match=f"set {bus_eco.config.env_prefix}_SECRETS_KEY .base64 of 32 bytes. for every replica"):
        bus_eco.Runtime(bus_eco.config, tmp_path / "a", db_url=pg_url)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('audit_log')").fetchone()[0] is None  # refused before writing


def test_a_consented_lossy_rebuild_runs_on_postgresql_and_skips_the_rows_the_new_table_refuses(bus_eco, pg_url, shared_key,  # noqa: F811
                                                                                             tmp_path):
    """The compiler's rebuild of a table (a column made NOT NULL and narrowed to integer, consented): the same
    numbered migration as on SQLite; rows the new shape refuses are skipped, the others kept with their rowids."""
    from generator.artifact.migrate import _rebuild

    storage = importlib.import_module(f"{bus_eco.name}.kernel.packs.storage.migrations")
    table = importlib.import_module(f"{bus_eco.name}.kernel.packs.storage.pack")
    before = [{"name": "id", "type": "text", "primary_key": True, "nullable": False},
              {"name": "v", "type": "text", "primary_key": False, "nullable": True}]
    after = [before[0], {"name": "v", "type": "integer", "primary_key": False, "nullable": False}]
    create = storage.Migration(number=1, name="create", statements=(table.table_ddl("m_t", before),))
    rebuild = storage.Migration(number=2, name="rebuild", statements=_rebuild(
        "m_t", after, table.declared_shape("m_t", before), table.declared_shape("m_t", after), True))
    database = importlib.import_module(f"{bus_eco.name}.kernel.packs.postgres.pack").PostgresDatabase
    db = database(pg_url, tmp_path)
    try:
        storage.apply_migrations(db, [create])
        for key, value in (("a", "5"), ("b", "abc"), ("c", None), ("d", "7")):
            db.execute("INSERT INTO m_t (id, v) VALUES (?, ?)", (key, value))
        rowids = {r["id"]: r["rowid"] for r in db.query("SELECT id, rowid FROM m_t")}
        assert [m.number for m in storage.apply_migrations(db, [create, rebuild])] == [2]
        assert db.query("SELECT id, v, rowid FROM m_t ORDER BY id") == [
            {"id": "a", "v": 5, "rowid": rowids["a"]}, {"id": "d", "v": 7, "rowid": rowids["d"]}]
        assert db.one("SELECT to_regclass(?) IS NULL AS gone", ("_old_m_t",)) == {"gone": True}
    finally:
        db.close()
