"""The upgrade test in the sandbox: the new version reads what the parent version wrote.

The archived madgroup builds predate storage and migrations, so the versions with tables are
made from 1.0.2 as a build would make them: today's kernel, Turing's module rendered by the
offline templates from a spec with a table, and the migrations the planner gives that spec.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from archive import ARCHIVE, NEWEST, PARENT

from generator.artifact.migrate import migration_files, plan_migrations, schema_of
from generator.config import SandboxSettings
from generator.kernel.packs.storage.migrations import Migration
from generator.kernel_contract import kernel_files
from generator.sandbox.run import available_level
from generator.sandbox.upgrade import capability_tools, run_upgrade_test
from generator.senior.offline import render_unit
from generator.senior.synthesise import unit_spec
from generator.spec.load import load_spec
from generator.spec.model import Spec
from generator.spec.plan import make_plan

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SETTINGS = SandboxSettings(timeout_seconds=300)

ROTATIONS = """
storage:
  - name: rotations
    columns:
      - {name: id, type: integer, primary_key: true, nullable: false}
      - {name: secret, type: text}
      - {name: rotated_at, type: real}
"""


def spec_with(tmp_path: Path, name: str, turing_storage: str) -> Spec:
    spec_dir = shutil.copytree(REPO / "spec", tmp_path / name)
    with (spec_dir / "mads" / "turing.yaml").open("a") as turing:
        turing.write(turing_storage)
    return load_spec(spec_dir)


def build(tmp_path: Path, name: str, spec: Spec, migrations: list[Migration]) -> Path:
    """madgroup 1.0.2 as a build of `spec` would make it now: today's kernel, Turing rendered, migrations."""
    src = shutil.copytree(ARCHIVE / NEWEST / "src", tmp_path / name / "src")
    shutil.rmtree(src / "madgroup" / "kernel")
    for path, data in kernel_files("madgroup", spec.packs).items():  # as a build copies it: no test of regen's
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    plan = make_plan(spec)
    for file in render_unit(unit_spec(spec, plan, plan.unit("mad:turing"))):
        (src / file["path"]).write_text(file["content"])
    for path, content in migration_files("madgroup", migrations).items():
        (src / path).write_text(content)
    return src


def upgrade(tmp_path: Path, parent: Path, new: Path, spec: Spec):
    return run_upgrade_test(parent, new, spec, SETTINGS, tmp_path / "work", available_level())


def checks(result) -> dict[str, tuple[bool, bool]]:
    return {c.what: (c.ok, c.skipped) for c in result.checks}


def test_the_capability_tools_come_from_the_spec():
    assert capability_tools(load_spec(REPO / "spec")) == {
        "conversations.create": "rogers.create_conversation", "conversations.post": "rogers.post",
        "conversations.history": "rogers.history", "secrets.set": "turing.set_secret", "secrets.get": "turing.get_secret",
    }


def test_archived_1_0_1_to_1_0_2_keeps_conversations_and_secrets(tmp_path):
    result = upgrade(tmp_path, ARCHIVE / PARENT / "src", ARCHIVE / NEWEST / "src", load_spec(REPO / "spec"))
    assert result.ok, result.output_tail
    assert checks(result) == {
        "the parent version serves and takes writes": (True, False),
        "a row written to every table of the parent": (True, False),
        "the new version starts on the parent's state": (True, False),
        "the parent's conversation and message are readable": (True, False),
        "the parent's secret decrypts to its value": (True, False),
    }
    assert "upgrade-check-value" not in result.record().model_dump_json()  # the secret's value is never reported


def test_a_version_with_migrations_starts_on_state_from_before_them(tmp_path):
    spec = spec_with(tmp_path, "spec", ROTATIONS)
    new = build(tmp_path, "new", spec, plan_migrations(None, schema_of(spec), spec, []))
    result = upgrade(tmp_path, ARCHIVE / NEWEST / "src", new, spec)
    assert result.ok, result.output_tail
    assert checks(result)["the new version starts on the parent's state"] == (True, False)


def test_rows_survive_a_column_added_by_the_new_version(tmp_path):
    parent_spec = spec_with(tmp_path, "spec1", ROTATIONS)
    parent_migrations = plan_migrations(None, schema_of(parent_spec), parent_spec, [])
    parent = build(tmp_path, "parent", parent_spec, parent_migrations)
    new_spec = spec_with(tmp_path, "spec2", ROTATIONS + "      - {name: note, type: text}\n")
    new_migrations = plan_migrations(schema_of(parent_spec), schema_of(new_spec), new_spec, parent_migrations)
    assert [m.name for m in new_migrations] == ["create table turing_rotations", "add column note to turing_rotations"]
    result = upgrade(tmp_path, parent, build(tmp_path, "new", new_spec, new_migrations), new_spec)
    assert result.ok, result.output_tail
    found = {c.what: c for c in result.checks}
    row = found["the parent's row in turing.rotations is readable"]
    assert row.ok and row.detail == "compared on id, secret, rotated_at"
    assert found["a row written to every table of the parent"].detail == "1 table(s)"


def test_a_new_version_whose_migration_fails_is_caught(tmp_path):
    spec = spec_with(tmp_path, "spec", ROTATIONS)
    migrations = plan_migrations(None, schema_of(spec), spec, [])
    parent = build(tmp_path, "parent", spec, migrations)
    broken = [*migrations, Migration(number=2, name="broken", statements=["ALTER TABLE no_such_table ADD COLUMN x TEXT"])]
    result = upgrade(tmp_path, parent, build(tmp_path, "new", spec, broken), spec)
    assert not result.ok
    failed = [c for c in result.checks if not c.ok]
    assert [c.what for c in failed] == ["the new version starts on the parent's state"]
    assert "migration 2 'broken' failed and was rolled back" in failed[0].detail
