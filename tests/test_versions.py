"""Versions follow the tool surface; rebuilds redo only what changed; two builds are the same bytes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_regenerate import REPO, builtin_only_spec

from generator.config import RunOptions
from generator.emit import tree_hashes
from generator.pipeline import regenerate, verify
from generator.progress import Reporter
from generator.surface import bump_for, bumped, surface_changes

OLD = {"rogers.post": {"params": {"text": {"type": "str", "required": True}}, "returns": "dict"}}


@pytest.mark.parametrize(("new", "kind", "what"), [
    ({}, "major", "tool rogers.post removed"),
    ({**OLD, "rogers.ping": {"params": {}, "returns": "dict"}}, "minor", "tool rogers.ping added"),
    ({"rogers.post": {"params": {"text": {"type": "int", "required": True}}, "returns": "dict"}}, "major",
     "rogers.post: parameter text str -> int"),
    ({"rogers.post": {"params": {"text": {"type": "str", "required": True}, "tag": {"type": "str", "required": True}},
                      "returns": "dict"}}, "major", "rogers.post: required parameter tag added"),
    ({"rogers.post": {"params": {"text": {"type": "str", "required": True}, "tag": {"type": "str", "required": False}},
                      "returns": "dict"}}, "minor", "rogers.post: optional parameter tag added"),
    ({"rogers.post": {"params": {"text": {"type": "str", "required": True}}, "returns": "list[dict]"}}, "major",
     "rogers.post: result dict -> list[dict]"),
])
def test_the_bump_follows_the_tool_surface(new, kind, what):
    changes = surface_changes(OLD, new, {}, {})
    assert bump_for(changes) == kind and what in [c.what for c in changes]


def test_the_bump_follows_the_storage_schema():
    table = {"rogers_tags": {"name": {"type": "text", "primary_key": True, "nullable": False}}}
    wider = {"rogers_tags": {**table["rogers_tags"], "colour": {"type": "text", "primary_key": False, "nullable": True}}}
    assert bump_for(surface_changes({}, {}, table, wider)) == "minor"
    assert bump_for(surface_changes({}, {}, wider, table)) == "major"
    assert bump_for(surface_changes({}, {}, table, {})) == "major"
    assert bump_for(surface_changes({}, {}, {}, {})) == "patch"
    assert [bumped("1.4.2", k) for k in ("major", "minor", "patch")] == ["2.0.0", "1.5.0", "1.4.3"]




@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    return builtin_only_spec(tmp_path_factory.mktemp("spec") / "spec")


def _build(spec: Path, out: Path):
    return regenerate(RunOptions(spec_dir=spec, pipeline_file=REPO / "pipelines" / "offline.toml", out_dir=out),
                      report=Reporter(quiet=True))


@pytest.mark.slow
def test_two_builds_of_the_same_spec_in_different_folders_are_byte_identical(tmp_path, spec_dir):
    first, second = _build(spec_dir, tmp_path / "one"), _build(spec_dir, tmp_path / "two")
    assert first.version == second.version == "1.0.0"
    a, b = tree_hashes(first.path), tree_hashes(second.path)
    assert a == b and len(a) > 40
    modes = {p.relative_to(first.path).as_posix(): p.stat().st_mode & 0o777 for p in first.path.rglob("*")}
    assert modes["src/deploy/run.sh"] == 0o755 and modes["manifest.json"] == 0o644 and modes["src"] == 0o755
    assert str(tmp_path) not in (first.path / "manifest.json").read_text()


@pytest.mark.slow
def test_changing_one_mad_regenerates_it_and_its_dependants_reuses_the_rest_and_bumps_minor(tmp_path, spec_dir):
    spec = tmp_path / "spec"
    shutil.copytree(spec_dir, spec)
    out = tmp_path / "out"
    first = _build(spec, out)
    # Grace talks to every MAD and no MAD talks to Grace: a change to her alone leaves the others be.
    grace = spec / "mads" / "grace.yaml"
    mad = yaml.safe_load(grace.read_text())
    health = next(t for t in mad["tools"] if t.get("builtin") == "ecosystem.status")
    mad["tools"].append({**health, "name": "status_again", "description": "The ecosystem status (an alias)."})
    grace.write_text(yaml.safe_dump(mad, sort_keys=False))
    second = _build(spec, out)
    assert (first.version, second.version) == ("1.0.0", "1.1.0")
    lock = second.manifest["lock"]
    assert {u for u, e in lock.items() if e["reused_from"] == "1.0.0"} == {"mad:turing", "mad:rogers", "mad:fiedler"}
    assert "spec/mads/grace.yaml" in lock["mad:grace"]["regenerated_because"]
    assert lock["frame"]["regenerated_because"]
    assert second.manifest["bump"]["kind"] == "minor" and "tool grace.status_again added" in second.manifest["bump"]["reason"]
    for unit in ("mad:turing", "mad:rogers", "mad:fiedler"):
        assert lock[unit]["outputs"] == first.manifest["lock"][unit]["outputs"]
    assert second.manifest["tokens"] == {"prompt": 0, "completion": 0}
    diff = subprocess.run([sys.executable, "-m", "generator.cli", "diff", "madgroup@1.0.0", "madgroup@1.1.0", "--out",
                           str(out), "--json"], capture_output=True, text=True, cwd=REPO, check=True)
    found = json.loads(diff.stdout)
    assert found["surface"] == ["[minor] tool grace.status_again added"]
    assert found["spec"] == {"mads/grace.yaml": "modified"}
    assert any(f["path"] == "src/madgroup/mads/grace.py" for f in found["files"])
    assert "+  - name: status_again" in found["spec_diff"]
    versions_out = subprocess.run([sys.executable, "-m", "generator.cli", "versions", "madgroup", "--out", str(out)],
                                  capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "1.1.0     minor" in versions_out and "tool grace.status_again added" in versions_out
    # The reused units come from 1.0.0 when the new version is verified.
    assert verify(second.path, spec, report=Reporter(quiet=True)).first_difference is None
