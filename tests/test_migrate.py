"""The migration planner: a storage change in the spec becomes a numbered migration that the kernel
applies to a state holding rows; a destructive change needs the spec's consent, or the build stops
with a located spec error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from generator.artifact.migrate import existing_migrations, migration_files, plan_migrations, schema_of
from generator.errors import SpecError
from generator.kernel.db import Database
from generator.kernel.packs.storage.migrations import Migration, apply_migrations, load_migrations
from generator.kernel.packs.storage.pack import check_table, table_ddl
from generator.spec.load import load_spec
from generator.spec.model import Spec

GOOD_SPEC = Path(__file__).parent / "good_spec"
GRACE = (GOOD_SPEC / "mads" / "grace.yaml").read_text()

SESSIONS = """
storage:
  - name: sessions
    columns:
      - {name: id, type: text, primary_key: true}
      - {name: started, type: text}
      - {name: visits, type: integer}
"""


@pytest.fixture
def spec_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(GOOD_SPEC, tmp_path / "spec"))


def grace(spec_dir: Path, storage: str) -> Spec:
    """The good spec with `storage` (YAML, top level of grace.yaml) as Grace's."""
    (spec_dir / "mads" / "grace.yaml").write_text(GRACE + storage)
    return load_spec(spec_dir)


def history(spec_dir: Path, *storages: str) -> tuple[list[Migration], Spec]:
    """The migrations after building each storage in turn, as successive versions; and the last spec."""
    migrations: list[Migration] = []
    previous = None
    for storage in storages:
        spec = grace(spec_dir, storage)
        migrations = plan_migrations(previous, schema_of(spec), spec, migrations)
        previous = schema_of(spec)
    return migrations, spec


def state(tmp_path: Path, migrations: list[Migration], rows: list[dict] | None = None) -> Database:
    """A state database brought to `migrations`, with `rows` put into grace_sessions."""
    db = Database(tmp_path / "state" / "ecosystem.db")
    apply_migrations(db, migrations)
    for row in rows or []:
        db.execute(f"INSERT INTO grace_sessions ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", list(row.values()))
    return db


def sessions(db: Database) -> list[dict]:
    return db.query("SELECT rowid, * FROM grace_sessions ORDER BY rowid")


def test_schema_is_canonical_and_only_for_mads_with_storage(spec_dir):
    spec = grace(spec_dir, SESSIONS)
    assert schema_of(spec) == {"grace": {"sessions": [
        {"name": "id", "type": "text", "primary_key": True, "nullable": True},
        {"name": "started", "type": "text", "primary_key": False, "nullable": True},
        {"name": "visits", "type": "integer", "primary_key": False, "nullable": True},
    ]}}
    assert json.loads(json.dumps(schema_of(spec))) == schema_of(spec)
    assert schema_of(load_spec(GOOD_SPEC)) == {}


def test_the_first_version_creates_its_tables_and_an_unchanged_one_adds_nothing(spec_dir):
    first, _ = history(spec_dir, SESSIONS)
    assert [(m.number, m.name, m.destructive) for m in first] == [(1, "create table grace_sessions", False)]
    assert first[0].statements == ["CREATE TABLE IF NOT EXISTS grace_sessions (id TEXT PRIMARY KEY, started TEXT, visits INTEGER)"]
    spec = grace(spec_dir, SESSIONS)
    assert plan_migrations(schema_of(spec), schema_of(spec), spec, first) == first
    assert plan_migrations(None, {}, load_spec(GOOD_SPEC), []) == []


def test_an_added_column_keeps_the_stored_rows(spec_dir, tmp_path):
    first, _ = history(spec_dir, SESSIONS)
    db = state(tmp_path, first, [{"id": "a", "started": "monday", "visits": 3}])
    migrations, spec = history(spec_dir, SESSIONS, SESSIONS + "      - {name: note, type: json}\n")
    assert migrations[0] == first[0]  # carried forward as it was
    assert (migrations[1].number, migrations[1].name) == (2, "add column note to grace_sessions")
    assert migrations[1].statements == ["ALTER TABLE grace_sessions ADD COLUMN note TEXT"]
    assert [m.number for m in apply_migrations(db, migrations)] == [2]
    assert sessions(db) == [{"rowid": 1, "id": "a", "started": "monday", "visits": 3, "note": None}]
    check_table(db, "grace", "grace_sessions", schema_of(spec)["grace"]["sessions"])
    db.close()


def test_a_column_that_rows_cannot_fill_is_a_located_spec_error(spec_dir):
    with pytest.raises(SpecError) as caught:
        history(spec_dir, SESSIONS, SESSIONS + "      - {name: owner, type: text, nullable: false}\n")
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == ("spec/mads/grace.yaml", 22)
    assert "column 'owner' is new in table 'sessions' of MAD 'grace'" in problem.message
    assert "NOT NULL" in problem.message and "expected it nullable" in problem.message


def test_a_dropped_column_needs_consent_naming_it(spec_dir, tmp_path):
    dropped = SESSIONS.replace("      - {name: started, type: text}\n", "")
    with pytest.raises(SpecError) as caught:
        history(spec_dir, SESSIONS, dropped)
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == ("spec/mads/grace.yaml", 17)  # the table's name
    assert problem.message.startswith("table 'sessions' of MAD 'grace' changed since the previous version in ways "
                                      "that lose stored data (drop column started: its values are deleted)")
    assert problem.message.endswith('add to the table in this file: allow_destructive: ["drop column started"]')
    # Consent to another change does not cover this one.
    with pytest.raises(SpecError):
        history(spec_dir, SESSIONS, dropped + "    allow_destructive: [drop column legacy]\n")

    first, _ = history(spec_dir, SESSIONS)
    db = state(tmp_path, first, [{"id": "a", "started": "monday", "visits": 3}, {"id": "b", "visits": 1}])
    db.execute("DELETE FROM grace_sessions WHERE id = 'a'")  # rowids are kept: b stays 2
    migrations, spec = history(spec_dir, SESSIONS, dropped + "    allow_destructive: [drop column started]\n")
    assert migrations[1].destructive and migrations[1].name == "rebuild grace_sessions (drop column started)"
    apply_migrations(db, migrations)
    assert sessions(db) == [{"rowid": 2, "id": "b", "visits": 1}]
    check_table(db, "grace", "grace_sessions", schema_of(spec)["grace"]["sessions"])
    db.close()


def test_a_narrowed_type_needs_consent_and_a_widened_one_does_not(spec_dir, tmp_path):
    narrowed = SESSIONS.replace("{name: started, type: text}", "{name: started, type: integer}")
    with pytest.raises(SpecError, match=r'allow_destructive: \["narrow column started to integer"\]'):
        history(spec_dir, SESSIONS, narrowed)
    widened = SESSIONS.replace("{name: visits, type: integer}", "{name: visits, type: real}")
    migrations, _ = history(spec_dir, SESSIONS, widened)
    assert not migrations[1].destructive and migrations[1].name == "rebuild grace_sessions (widen column visits to real)"

    first, _ = history(spec_dir, SESSIONS)
    db = state(tmp_path, first, [{"id": "a", "started": "12", "visits": 3}, {"id": "b", "started": "soon", "visits": 1}])
    migrations, spec = history(spec_dir, SESSIONS, narrowed + "    allow_destructive: [narrow column started to integer]\n")
    apply_migrations(db, migrations)
    assert [(r["id"], r["started"]) for r in sessions(db)] == [("a", 12), ("b", 0)]  # SQLite's CAST, as consented
    check_table(db, "grace", "grace_sessions", schema_of(spec)["grace"]["sessions"])
    db.close()


def test_json_and_text_are_stored_alike_so_switching_needs_no_migration(spec_dir):
    first, _ = history(spec_dir, SESSIONS)
    migrations, _ = history(spec_dir, SESSIONS, SESSIONS.replace("{name: started, type: text}", "{name: started, type: json}"))
    assert migrations == first


def test_requiring_a_column_drops_its_null_rows_once_consented(spec_dir, tmp_path):
    required = SESSIONS.replace("{name: started, type: text}", "{name: started, type: text, nullable: false}")
    with pytest.raises(SpecError, match=r"require column started: rows where it is NULL are deleted"):
        history(spec_dir, SESSIONS, required)
    first, _ = history(spec_dir, SESSIONS)
    db = state(tmp_path, first, [{"id": "a", "started": "monday"}, {"id": "b"}])
    migrations, _ = history(spec_dir, SESSIONS, required + "    allow_destructive: [require column started]\n")
    apply_migrations(db, migrations)
    assert [r["id"] for r in sessions(db)] == ["a"]
    db.close()


def test_a_new_primary_key_keeps_the_first_row_of_each_key_once_consented(spec_dir, tmp_path):
    rekeyed = SESSIONS.replace("{name: id, type: text, primary_key: true}", "{name: id, type: text}").replace(
        "{name: started, type: text}", "{name: started, type: text, primary_key: true}")
    with pytest.raises(SpecError, match=r'allow_destructive: \["change primary key to started"\]'):
        history(spec_dir, SESSIONS, rekeyed)
    # Widening the key keeps it unique: no consent needed.
    widened = SESSIONS.replace("{name: started, type: text}", "{name: started, type: text, primary_key: true}")
    assert not history(spec_dir, SESSIONS, widened)[0][1].destructive

    first, _ = history(spec_dir, SESSIONS)
    db = state(tmp_path, first, [{"id": "a", "started": "monday"}, {"id": "b", "started": "monday"}, {"id": "c", "started": "friday"}])
    migrations, _ = history(spec_dir, SESSIONS, rekeyed + "    allow_destructive: [change primary key to started]\n")
    apply_migrations(db, migrations)
    assert [(r["id"], r["started"]) for r in sessions(db)] == [("a", "monday"), ("c", "friday")]
    db.close()


def test_a_dropped_table_needs_the_mads_consent(spec_dir, tmp_path):
    with pytest.raises(SpecError) as caught:
        history(spec_dir, SESSIONS, "storage: []\n")
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == ("spec/mads/grace.yaml", 15)
    assert problem.message.startswith("MAD 'grace' changed since the previous version in ways that lose stored data "
                                      "(drop table sessions: its rows are deleted)")
    assert problem.message.endswith('add to the MAD (top level) in this file: allow_destructive: ["drop table sessions"]')

    first, _ = history(spec_dir, SESSIONS)
    db = state(tmp_path, first, [{"id": "a"}])
    migrations, _ = history(spec_dir, SESSIONS, "storage: []\nallow_destructive: [drop table sessions]\n")
    assert migrations[1].statements == ["DROP TABLE grace_sessions"] and migrations[1].destructive
    apply_migrations(db, migrations)
    assert db.one("SELECT name FROM sqlite_master WHERE name = 'grace_sessions'") is None
    db.close()


def test_a_removed_mad_with_tables_says_how_to_accept_it(spec_dir):
    spec = grace(spec_dir, SESSIONS)
    previous = schema_of(spec) | {"rogers": {"tags": [{"name": "tag", "type": "text", "primary_key": False, "nullable": True}]}}
    with pytest.raises(SpecError) as caught:
        plan_migrations(previous, schema_of(spec), spec, [Migration(number=1, name="create", statements=[])])
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == ("spec/mads/rogers.yaml", 0)
    assert "MAD 'rogers' is gone" in problem.message and 'allow_destructive: ["drop table tags"]' in problem.message


def test_a_parent_from_before_migrations_gets_a_baseline_that_keeps_its_tables(spec_dir, tmp_path):
    spec = grace(spec_dir, SESSIONS)
    # The parent recorded no migrations: its tables, made by the kernel, are the baseline.
    migrations = plan_migrations(schema_of(spec), schema_of(spec), spec, [])
    assert [m.name for m in migrations] == ["create table grace_sessions"]
    db = Database(tmp_path / "state" / "ecosystem.db")
    db.execute(table_ddl("grace_sessions", schema_of(spec)["grace"]["sessions"]))
    db.execute("INSERT INTO grace_sessions (id) VALUES ('kept')")
    apply_migrations(db, migrations)
    assert [r["id"] for r in sessions(db)] == ["kept"]
    db.close()


def test_migrations_render_to_the_package_file_the_kernel_reads(spec_dir, tmp_path):
    migrations, _ = history(spec_dir, SESSIONS, SESSIONS + "      - {name: note, type: text}\n")
    files = migration_files("demo", migrations)
    assert list(files) == ["demo/migrations.json"]
    (tmp_path / "src" / "demo").mkdir(parents=True)
    (tmp_path / "src" / "demo" / "migrations.json").write_text(files["demo/migrations.json"])
    read = existing_migrations(tmp_path / "src", "demo")
    assert read == migrations and [m.checksum for m in read] == [m.checksum for m in migrations]
    assert load_migrations(tmp_path / "src" / "demo" / "migrations.json") == migrations
    assert existing_migrations(tmp_path / "elsewhere", "demo") == []
    assert migration_files("demo", []) == {"demo/migrations.json": "[]\n"}


NOTES = """
  - name: notes
    columns:
      - {name: id, type: integer, primary_key: true}
      - {name: body, type: text}
"""


def test_each_migration_has_a_kind_and_expand_ones_a_way_back(spec_dir, tmp_path):
    """Additions are expand migrations with down statements (the first one, adopting older tables, has none);
    anything else is a contract one, irreversible; the undo runs on the state, and the version before reads it."""
    from generator.kernel.packs.storage.migrations import migrate_down

    added = SESSIONS + "      - {name: note, type: json}\n      - {name: seen, type: integer}\n"
    migrations, spec = history(spec_dir, SESSIONS, added, added + NOTES,
                               added.replace("      - {name: visits, type: integer}\n", "")
                               + "    allow_destructive: [drop column visits]\n" + NOTES)
    assert [(m.kind, m.down) for m in migrations] == [
        ("expand", []),
        ("expand", ["ALTER TABLE grace_sessions DROP COLUMN seen", "ALTER TABLE grace_sessions DROP COLUMN note"]),
        ("expand", ["DROP TABLE grace_notes"]),
        ("contract", []),
    ]
    db = state(tmp_path, migrations[:3], [{"id": "a", "started": "monday", "visits": 3, "note": "x", "seen": 1}])
    assert [r["number"] for r in migrate_down(db, 1, migrations[:3])] == [3, 2]
    assert not db.has_table("grace_notes")
    assert sessions(db) == [{"rowid": 1, "id": "a", "started": "monday", "visits": 3}]
    check_table(db, "grace", "grace_sessions", schema_of(grace(spec_dir, SESSIONS))["grace"]["sessions"])
    db.close()
    # Written to the package file, and read back the same.
    path = tmp_path / "pkg" / "migrations.json"
    path.parent.mkdir()
    path.write_text(migration_files("pkg", migrations)["pkg/migrations.json"])
    assert load_migrations(path) == migrations


def test_a_migration_that_both_adds_and_contracts_is_a_contract_one(spec_dir):
    added = SESSIONS + "      - {name: note, type: json}\n"
    migrations, _ = history(spec_dir, SESSIONS, added.replace("      - {name: started, type: text}\n", "")
                            + "    allow_destructive: [drop column started]\n" + NOTES)
    assert migrations[1].name == ("create table grace_notes; "
                                  "rebuild grace_sessions (drop column started, add column note)")
    assert (migrations[1].kind, migrations[1].down) == ("contract", [])
