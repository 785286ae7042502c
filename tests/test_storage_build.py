"""Data gravity through `regenerate`: a new column is a migration the upgrade test proves; a dropped one needs consent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repo_specs import CORE_MADS, REPO, builtin_only_spec

from generator.artifact.store import versions
from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.config import RunOptions
from generator.errors import SpecError
from generator.progress import Reporter

pytestmark = pytest.mark.slow

NOTES = {"name": "notes", "columns": [{"name": "id", "type": "text", "primary_key": True, "nullable": False},
                                      {"name": "body", "type": "text"}]}


def _turing_storage(spec: Path, tables: list[dict]) -> None:
    path = spec / "mads" / "turing.yaml"
    mad = yaml.safe_load(path.read_text())
    mad["storage"] = tables
    path.write_text(yaml.safe_dump(mad, sort_keys=False))


def _storage_pack(built) -> bool:
    return (built.path / "src" / "madgroup" / "kernel" / "packs" / "storage" / "pack.py").is_file()


def _build(spec: Path, out: Path):
    options = RunOptions(spec_dir=spec, pipeline_file=REPO / "pipelines" / "offline.toml", out_dir=out)
    return regenerate(BuildContext(options=options, report=Reporter(quiet=True)))


def test_a_new_column_is_migrated_and_read_back_and_a_dropped_one_needs_consent(tmp_path):
    spec = builtin_only_spec(tmp_path / "spec", CORE_MADS)
    out = tmp_path / "out"
    _turing_storage(spec, [NOTES])
    first = _build(spec, out)
    assert [m.number for m in first.manifest.migrations] == [1]
    assert _storage_pack(first), "a MAD with tables brings the storage pack"

    wider = {**NOTES, "columns": [*NOTES["columns"], {"name": "tag", "type": "text"}]}
    _turing_storage(spec, [wider])
    second = _build(spec, out)
    assert second.version == "1.1.0" and "table turing_notes: column tag added" in second.manifest.bump.reason
    assert [m.number for m in second.manifest.migrations] == [1, 2]
    migrations = json.loads((second.path / "src" / "madgroup" / "migrations.json").read_text())
    assert any("ADD COLUMN" in statement for statement in migrations[1]["statements"])
    upgrade = second.manifest.upgrade
    assert upgrade.ok and any("turing.notes" in c.what and c.ok and not c.skipped for c in upgrade.checks)

    _turing_storage(spec, [NOTES])  # drop `tag` again, without saying it may go
    with pytest.raises(SpecError) as err:
        _build(spec, out)
    assert "turing.yaml" in str(err.value) and 'allow_destructive: ["drop column tag"]' in str(err.value)
    assert versions(out / "madgroup") == ["1.0.0", "1.1.0"]
    cli = subprocess.run([sys.executable, "-m", "generator.cli", "regenerate", "--spec", str(spec), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr and "drop column tag" in cli.stderr

    _turing_storage(spec, [{**NOTES, "allow_destructive": ["drop column tag"]}])
    third = _build(spec, out)
    assert third.version == "2.0.0" and third.manifest.bump.kind == "major"
    assert third.manifest.migrations[-1].destructive is True

    # The last table goes: no MAD declares one, but the history does, and a state must still be brought to it.
    mad = yaml.safe_load((spec / "mads" / "turing.yaml").read_text())
    del mad["storage"]
    mad["allow_destructive"] = ["drop table notes"]
    (spec / "mads" / "turing.yaml").write_text(yaml.safe_dump(mad, sort_keys=False))
    fourth = _build(spec, out)
    assert [m.name for m in fourth.manifest.migrations][-1] == "drop table turing_notes"
    assert _storage_pack(fourth) and fourth.manifest.upgrade.ok and fourth.manifest.sandbox.failed == 0
    shutil.rmtree(tmp_path / "spec")
