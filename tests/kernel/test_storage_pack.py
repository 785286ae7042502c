"""The MADs' own tables are the `storage` pack: a build has it only when a MAD declares tables (or its storage
history has a migration). Without it, a MAD's store has no table, the state gets no migration bookkeeping, and
a state that another build migrated, or a MAD that declares tables, is a clear refusal at start."""

from __future__ import annotations

import asyncio
import importlib
import sqlite3

import pytest
from conftest import importable, without_pack

NOTES = [{"name": "id", "type": "integer", "primary_key": True, "nullable": False},
         {"name": "body", "type": "text", "primary_key": False, "nullable": True}]


@pytest.fixture(scope="module")
def no_storage(tmp_path_factory):
    """An ecosystem built without the storage pack: its package name."""
    root, name = without_pack(tmp_path_factory, "nostorage", "storage")
    with importable(root):
        yield name


def _without_tables(config):
    """The config with no MAD declaring tables (the tiny ecosystem's Turing has `notes`)."""
    return config.model_copy(update={"mads": tuple(type(m.__name__, (m,), {"storage": ()}) if m.storage else m
                                                   for m in config.mads)})


def _modules(name):
    return importlib.import_module(f"{name}.ecosystem").CONFIG, importlib.import_module(f"{name}.kernel.runtime")


def _tables(state):
    with sqlite3.connect(state / "ecosystem.db") as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_without_the_pack_a_mad_has_no_table_and_the_state_no_migration_bookkeeping(no_storage, tmp_path, monkeypatch):
    config, runtime_mod = _modules(no_storage)
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    runtime = runtime_mod.Runtime(_without_tables(config), tmp_path / "state")
    asyncio.run(runtime.start())
    try:
        assert runtime.migrated == [] and runtime._storage is None
        store = runtime.slots["turing"].mad.store
        for call in (lambda: store.insert("notes", body="x"), lambda: store.select("notes"),
                     lambda: store.update("notes", {"id": 1}, body="y"), lambda: store.delete("notes", id=1)):
            with pytest.raises(runtime_mod.InvalidArgument, match="MAD 'turing' has no table 'notes'; it has \\[\\]"):
                call()
    finally:
        asyncio.run(runtime.stop())
    assert "schema_migrations" not in _tables(tmp_path / "state")
    assert not any(name.startswith("turing_") for name in _tables(tmp_path / "state"))


def test_a_mad_declaring_tables_in_a_build_without_the_pack_is_refused_at_start(no_storage, tmp_path, monkeypatch):
    config, runtime_mod = _modules(no_storage)
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    assert any(m.storage for m in config.mads)
    with pytest.raises(runtime_mod.InvalidArgument, match="MADs declare `storage:` tables, or its package has "
                                                          "migrations, but its build has no storage pack.*nox -s regenerate"):
        runtime_mod.Runtime(config, tmp_path / "state")


def test_a_package_history_in_a_build_without_the_pack_is_refused_at_start(no_storage, tmp_path, monkeypatch):
    """A migrations.json that lists a migration (or is not a list) needs the pack that applies it; none or `[]` not."""
    config, runtime_mod = _modules(no_storage)
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    history = tmp_path / "package" / "migrations.json"
    history.parent.mkdir()
    monkeypatch.setattr(runtime_mod, "PACKAGE_DIR", history.parent)
    for text, refused in [(None, False), ("[]\n", False), ('[{"number": 1, "name": "x", "statements": []}]', True),
                          ("not json", True)]:
        if text is not None:
            history.write_text(text)
        state = tmp_path / f"state-{len(list(tmp_path.iterdir()))}"
        if refused:
            with pytest.raises(runtime_mod.InvalidArgument, match="its package has migrations"):
                runtime_mod.Runtime(_without_tables(config), state)
        else:
            runtime_mod.Runtime(_without_tables(config), state).db.close()


def test_a_state_migrated_by_a_build_with_tables_is_refused_by_one_without_them(no_storage, eco_modules, tmp_path,
                                                                                monkeypatch):
    config, kernel, full_runtime = eco_modules
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    storage = importlib.import_module(f"{kernel.__name__}.packs.storage.pack")
    migrations = importlib.import_module(f"{kernel.__name__}.packs.storage.migrations")
    create = migrations.Migration(number=1, name="create turing_notes",
                                  statements=[storage.table_ddl("turing_notes", NOTES)])
    full_runtime.Runtime(config, tmp_path / "state", migrations=[create]).db.close()
    lean_config, lean_runtime = _modules(no_storage)
    with pytest.raises(lean_runtime.KernelError, match="migrated by a newer version of this ecosystem \\(migration 1 "
                                                       "'create turing_notes'\\).*run that newer version"):
        lean_runtime.Runtime(_without_tables(lean_config), tmp_path / "state")
    # A state that only has the older builds' empty bookkeeping (every build before the pack made it) starts.
    with sqlite3.connect(tmp_path / "state" / "ecosystem.db") as conn:
        conn.execute("DELETE FROM schema_migrations")
    lean_runtime.Runtime(_without_tables(lean_config), tmp_path / "state").db.close()
