"""Storage migrations at start-up: applied once, in order, each whole or not at all; a state from another
history or a newer version is refused (unless what the newer version added is only expand migrations); a state
from before migrations is the baseline; a contract migration waits for the older replicas to stop; `migrate down`
undoes expand migrations, and refuses what it cannot undo before changing anything."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import pytest

NOTES = [{"name": "id", "type": "integer", "primary_key": True, "nullable": False},
         {"name": "body", "type": "text", "primary_key": False, "nullable": True}]
TAG = {"name": "tag", "type": "text", "primary_key": False, "nullable": True}


@pytest.fixture
def kit(eco_modules, monkeypatch):
    """The tiny ecosystem's config, one whose turing_notes has a `tag`, two migrations, and a Runtime maker."""
    config, kernel, runtime_mod = eco_modules
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    migrations = importlib.import_module(f"{kernel.__name__}.packs.storage.migrations")
    table_ddl = importlib.import_module(f"{kernel.__name__}.packs.storage.pack").table_ddl
    turing = next(m for m in config.mads if m.name == "turing")
    tagged = type("Turing", (turing,), {"storage": ({"name": "notes", "columns": [*NOTES, TAG]},)})

    def migration(number, name, *statements, kind="contract", down=()):
        return migrations.Migration(number=number, name=name, statements=list(statements), kind=kind, down=list(down))

    return SimpleNamespace(
        config=config,
        tagged=config.model_copy(update={"mads": tuple(tagged if m is turing else m for m in config.mads)}),
        error=migrations.MigrationError,
        migration=migration,
        create=migration(1, "create turing_notes", table_ddl("turing_notes", NOTES), kind="expand"),
        add_tag=migration(2, "add tag", "ALTER TABLE turing_notes ADD COLUMN tag TEXT"),
        expand_tag=migration(2, "add tag", "ALTER TABLE turing_notes ADD COLUMN tag TEXT", kind="expand",
                             down=["ALTER TABLE turing_notes DROP COLUMN tag"]),
        drop_tag=migration(3, "rebuild turing_notes (drop column tag)", "ALTER TABLE turing_notes DROP COLUMN tag"),
        migrations=migrations,
        replicas=importlib.import_module(f"{kernel.__name__}.packs.storage.replicas"),
        runtime=lambda state, history, cfg=config: runtime_mod.Runtime(cfg, state, migrations=history),
    )


def _close(runtime):
    if runtime.running:
        asyncio.run(runtime.stop())
    else:
        runtime.db.close()


def _recorded(state):
    with sqlite3.connect(state / "ecosystem.db") as conn:
        return [tuple(r) for r in conn.execute("SELECT number, name FROM schema_migrations ORDER BY number")]


def _columns(state, table):
    with sqlite3.connect(state / "ecosystem.db") as conn:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def test_a_fresh_state_applies_every_migration_and_a_restart_none(kit, tmp_path):
    state = tmp_path / "state"
    first = kit.runtime(state, [kit.create, kit.add_tag], kit.tagged)
    assert [m.number for m in first.migrated] == [1, 2]
    _close(first)
    assert _recorded(state) == [(1, "create turing_notes"), (2, "add tag")]
    again = kit.runtime(state, [kit.create, kit.add_tag], kit.tagged)
    assert again.migrated == []
    _close(again)
    assert _recorded(state) == [(1, "create turing_notes"), (2, "add tag")]


def test_an_added_column_keeps_the_rows_already_stored(kit, tmp_path):
    state = tmp_path / "state"
    old = kit.runtime(state, [kit.create])
    asyncio.run(old.start())
    store = old.mad("turing").store
    ids = [store.insert("notes", body=f"note {i}") for i in range(3)]
    asyncio.run(old.stop())

    new = kit.runtime(state, [kit.create, kit.add_tag], kit.tagged)
    asyncio.run(new.start())
    try:
        store = new.mad("turing").store
        assert [(r["id"], r["body"], r["tag"]) for r in store.select("notes")] == [
            (ids[0], "note 0", None), (ids[1], "note 1", None), (ids[2], "note 2", None)]
        store.insert("notes", body="tagged", tag="new")
        assert store.select("notes", tag="new")[0]["body"] == "tagged"
    finally:
        _close(new)


def test_a_failing_migration_rolls_back_whole_and_the_runtime_refuses_to_start(kit, tmp_path):
    state = tmp_path / "state"
    old = kit.runtime(state, [kit.create])
    asyncio.run(old.start())
    old.mad("turing").store.insert("notes", body="kept")
    asyncio.run(old.stop())

    broken = kit.migration(2, "add tag, then fail", "ALTER TABLE turing_notes ADD COLUMN tag TEXT",
                           "INSERT INTO no_such_table VALUES (1)")
    with pytest.raises(kit.error, match=r"migration 2 'add tag, then fail' failed and was rolled back.*no_such_table"):
        kit.runtime(state, [kit.create, broken], kit.tagged)
    assert _recorded(state) == [(1, "create turing_notes")]
    assert _columns(state, "turing_notes") == ["id", "body"]  # the first statement was undone too
    # The refused runtime let go of the database: the old version starts on it as before.
    again = kit.runtime(state, [kit.create])
    assert again.table_store("turing").select("notes")[0]["body"] == "kept"
    _close(again)


def test_a_state_from_another_history_is_refused(kit, tmp_path):
    state = tmp_path / "state"
    _close(kit.runtime(state, [kit.create, kit.add_tag], kit.tagged))
    other = kit.migration(2, "add label", "ALTER TABLE turing_notes ADD COLUMN label TEXT")
    with pytest.raises(kit.error, match="migration 2 recorded in .* \\('add tag'\\) is not this version's migration 2 "
                                        "\\('add label'\\): the state comes from a different history"):
        kit.runtime(state, [kit.create, other], kit.tagged)


def test_a_state_migrated_by_a_newer_version_is_refused(kit, tmp_path):
    state = tmp_path / "state"
    _close(kit.runtime(state, [kit.create, kit.add_tag], kit.tagged))
    with pytest.raises(kit.error, match="migrated by a newer version .*migration 2 'add tag'; this version knows 1.*forward-only"):
        kit.runtime(state, [kit.create])
    assert _recorded(state) == [(1, "create turing_notes"), (2, "add tag")]


def test_misnumbered_migrations_are_refused(kit, tmp_path):
    with pytest.raises(kit.error, match=r"numbered \[2\]; expected 1, 2, 3"):
        kit.runtime(tmp_path / "state", [kit.add_tag])


def test_a_state_from_before_migrations_is_the_baseline(kit, tmp_path):
    state = tmp_path / "state"
    old = kit.runtime(state, [])
    asyncio.run(old.start())
    old.mad("turing").store.insert("notes", body="from before")
    asyncio.run(old.stop())
    with sqlite3.connect(state / "ecosystem.db") as conn:  # as a kernel without migrations left it
        conn.execute("DROP TABLE schema_migrations")

    new = kit.runtime(state, [kit.create, kit.add_tag], kit.tagged)
    assert [m.number for m in new.migrated] == [1, 2]
    assert [(r["body"], r["tag"]) for r in new.table_store("turing").select("notes")] == [("from before", None)]
    _close(new)
    assert _recorded(state) == [(1, "create turing_notes"), (2, "add tag")]


def test_a_table_not_migrated_to_the_declared_shape_is_refused(kit, tmp_path):
    state = tmp_path / "state"
    _close(kit.runtime(state, []))  # turing_notes (id, body), made without migrations
    # The new version declares a `tag` but its history has no migration adding it.
    with pytest.raises(kit.error, match="table turing_notes in .* does not have the columns MAD 'turing' declares "
                                        "\\(tag: stored absent, declared TEXT\\)"):
        kit.runtime(state, [kit.create], kit.tagged)


def test_the_package_migrations_file_is_read_at_start_and_a_refusal_is_a_clean_error(tiny_ecosystem, tmp_path):
    root, name = tiny_ecosystem
    package = shutil.copytree(root / name, tmp_path / "pkgs" / name, ignore=shutil.ignore_patterns("__pycache__"))
    create = {"number": 1, "name": "create turing_notes", "destructive": False,
              "statements": ["CREATE TABLE IF NOT EXISTS turing_notes (id INTEGER PRIMARY KEY, body TEXT)"]}
    (package / "migrations.json").write_text(json.dumps([create]))
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "ecosystem.db") as conn:  # as a newer version leaves it
        conn.execute("CREATE TABLE schema_migrations (number INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "checksum TEXT NOT NULL, applied_at TEXT NOT NULL)")
        conn.execute("INSERT INTO schema_migrations VALUES (2, 'add tag', 'x', 'then')")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pkgs"))
    done = subprocess.run([sys.executable, "-m", name, "serve", "--port", "0", "--state", str(state)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: the state in ") and "migrated by a newer version" in done.stderr
    assert "Traceback" not in done.stderr


def _replicas(state):
    with sqlite3.connect(state / "ecosystem.db") as conn:
        return [tuple(r) for r in conn.execute("SELECT version, level FROM replicas")]


def test_a_state_ahead_by_expand_migrations_is_served_by_the_older_version(kit, tmp_path, caplog):
    """Blue/green: the new version added a column (expand); the old one still starts on that state, with a
    warning, and reads and writes its table without naming the column it does not know."""
    state = tmp_path / "state"
    new = kit.runtime(state, [kit.create, kit.expand_tag], kit.tagged)
    new.table_store("turing").insert("notes", body="by new", tag="t")
    _close(new)
    old = kit.runtime(state, [kit.create])
    asyncio.run(old.start())
    try:
        assert "ahead of this version by expand migrations" in caplog.text
        store = old.mad("turing").store
        store.insert("notes", body="by old")
        assert [r["body"] for r in store.select("notes")] == ["by new", "by old"]
        assert _replicas(state) == [(old.version, 1)]  # live, at its own storage level
    finally:
        _close(old)
    assert _replicas(state) == []  # a clean stop removes its row
    assert _recorded(state) == [(1, "create turing_notes"), (2, "add tag")]


def test_a_state_ahead_by_a_contract_migration_is_refused_as_it_was_found(kit, tmp_path):
    state = tmp_path / "state"
    _close(kit.runtime(state, [kit.create, kit.expand_tag, kit.drop_tag]))
    with pytest.raises(kit.error, match="migrated by a newer version .*migration 3 'rebuild turing_notes .*'; this "
                                        "version knows 1.*contract migration.*forward-only"):
        kit.runtime(state, [kit.create])
    assert _recorded(state)[-1][0] == 3


def test_a_contract_migration_waits_until_no_older_replica_is_live(kit, tmp_path):
    """Version 2 serves; version 3 drops the column version 2 reads: refused while 2 runs (nothing written),
    applied once 2 has stopped; a replica killed outright stops counting once its heartbeat lapses."""
    state = tmp_path / "state"
    older = kit.runtime(state, [kit.create, kit.expand_tag], kit.tagged)
    asyncio.run(older.start())
    try:
        with pytest.raises(kit.error, match=r"migration 3 'rebuild turing_notes \(drop column tag\)' is a contract "
                                            r"migration .*replicas of an older version still serve .*storage level 2.*"
                                            "Nothing was changed. Stop them first"):
            kit.runtime(state, [kit.create, kit.expand_tag, kit.drop_tag])
        assert _recorded(state) == [(1, "create turing_notes"), (2, "add tag")]
        assert _columns(state, "turing_notes") == ["id", "body", "tag"]
        # The same version (or a newer one that only expands) starts beside it.
        _close(kit.runtime(state, [kit.create, kit.expand_tag], kit.tagged))
    finally:
        _close(older)
    with sqlite3.connect(state / "ecosystem.db") as conn:  # a replica SIGKILLed long ago: its row stayed
        conn.execute("INSERT INTO replicas VALUES ('dead', '0.9', 1, 'h', 1, '2020-01-01T00:00:00.000000Z', "
                     "'2020-01-01T00:00:00.000000Z')")
    newest = kit.runtime(state, [kit.create, kit.expand_tag, kit.drop_tag])
    assert [m.number for m in newest.migrated] == [3]
    _close(newest)


def test_migrate_down_undoes_expand_migrations_and_refuses_the_rest_before_changing_anything(kit, tmp_path):
    state = tmp_path / "state"
    _close(kit.runtime(state, [kit.create, kit.expand_tag], kit.tagged))
    db = kit.runtime(state, [kit.create, kit.expand_tag], kit.tagged).db
    try:
        # The first migration adopts tables from before migrations: it has no way back.
        with pytest.raises(kit.error, match="migration 1 'create turing_notes' cannot be undone: it was recorded "
                                            "without down statements.*Nothing was changed"):
            kit.migrations.migrate_down(db, 0, [])
        assert [r["number"] for r in kit.migrations.migrate_down(db, 1, [])] == [2]
        assert kit.migrations.migrate_down(db, 1, []) == []  # already there
    finally:
        db.close()
    assert _recorded(state) == [(1, "create turing_notes")]
    assert _columns(state, "turing_notes") == ["id", "body"]
    # Applied again by the version that has it, with the same record.
    again = kit.runtime(state, [kit.create, kit.expand_tag], kit.tagged)
    assert [m.number for m in again.migrated] == [2]
    _close(again)

    contracted = kit.runtime(state, [kit.create, kit.expand_tag, kit.drop_tag])
    try:
        with pytest.raises(kit.error, match="migration 3 .* cannot be undone: a contract migration .* has no way "
                                            "back: restore the state from a backup"):
            kit.migrations.migrate_down(contracted.db, 1, [])
    finally:
        _close(contracted)
    assert [n for n, _ in _recorded(state)] == [1, 2, 3]


def test_migrate_down_waits_for_the_replicas_that_need_what_it_would_undo(kit, tmp_path):
    state = tmp_path / "state"
    new = kit.runtime(state, [kit.create, kit.expand_tag], kit.tagged)
    asyncio.run(new.start())
    try:
        with pytest.raises(kit.error, match=r"replicas that need migrations above 1 still serve .*storage level 2.*"
                                            "Nothing was changed"):
            kit.migrations.migrate_down(new.db, 1, [])
        assert _columns(state, "turing_notes") == ["id", "body", "tag"]
    finally:
        _close(new)


def test_a_migration_recorded_before_kinds_existed_keeps_its_checksum_and_counts_as_contract(kit, tmp_path):
    """migrations.json files and schema_migrations rows from before kinds: the same checksum (states recorded
    it), read as contract migrations with no down statements."""
    old_file = {"number": 1, "name": "create turing_notes", "destructive": False,
                "statements": [kit.create.statements[0]]}
    loaded = kit.migrations.Migration.model_validate(old_file)
    assert (loaded.kind, loaded.down) == ("contract", [])
    body = {k: old_file[k] for k in ("number", "name", "statements")}
    assert loaded.checksum == hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert kit.migration(1, "create turing_notes", kit.create.statements[0], kind="expand",
                         down=["DROP TABLE turing_notes"]).checksum == loaded.checksum
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "ecosystem.db") as conn:  # as an older version left it, then a newer one
        conn.execute("CREATE TABLE schema_migrations (number INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "checksum TEXT NOT NULL, applied_at TEXT NOT NULL)")
        conn.execute(kit.create.statements[0])
        conn.execute("INSERT INTO schema_migrations VALUES (1, 'create turing_notes', ?, 'then')", (loaded.checksum,))
    new = kit.runtime(state, [loaded, kit.expand_tag], kit.tagged)  # adds the kind columns, then records 2
    assert [m.number for m in new.migrated] == [2]
    assert [(r["number"], r["kind"]) for r in kit.migrations.recorded(new.db)] == [(1, "contract"), (2, "expand")]
    _close(new)


def test_migrate_status_and_down_on_the_command_line(kit, tiny_ecosystem, tmp_path):
    root, name = tiny_ecosystem
    state = tmp_path / "state"
    _close(kit.runtime(state, [kit.create, kit.expand_tag], kit.tagged))
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop(f"{kit.config.env_prefix}_DB_URL", None)

    def run(*args):
        return subprocess.run([sys.executable, "-m", name, "migrate", *args, "--state", str(state)], env=env,
                              capture_output=True, text=True, timeout=60)

    status = json.loads(run("status").stdout)
    assert status["level"] == 2 and status["replicas"] == []
    assert [(m["number"], m["kind"], m["reversible"]) for m in status["migrations"]] == [(1, "expand", False),
                                                                                         (2, "expand", True)]
    refused = run("down", "--to", "0")
    assert refused.returncode == 2 and refused.stderr.startswith("error: migration 1 'create turing_notes' cannot "
                                                                 "be undone") and "Traceback" not in refused.stderr
    assert _recorded(state) == [(1, "create turing_notes"), (2, "add tag")]
    done = run("down", "--to", "1")
    assert done.returncode == 0 and done.stdout == "undid migration 2 'add tag'\n", done.stderr
    assert _recorded(state) == [(1, "create turing_notes")] and _columns(state, "turing_notes") == ["id", "body"]
    with sqlite3.connect(state / "ecosystem.db") as conn:  # the operator's undo is in the audit chain
        assert conn.execute("SELECT actor, subject, detail FROM audit_log WHERE action = 'storage.migrate_down'"
                            ).fetchall() == [("operator", "to 1", "undid 2 'add tag'")]
    assert run("down", "--to", "1").stdout.startswith("nothing to undo")
