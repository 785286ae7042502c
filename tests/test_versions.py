"""Versions follow the tool surface; rebuilds redo only what changed; two builds are the same bytes."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repo_specs import CORE_MADS, REPO, builtin_only_spec

from generator.artifact.surface import bump_for, bumped, surface_changes
from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.build.verify import verify
from generator.config import RunOptions
from generator.hashing import tree_hashes
from generator.progress import Reporter

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
    return builtin_only_spec(tmp_path_factory.mktemp("spec") / "spec", CORE_MADS)


def _build(spec: Path, out: Path, report: Reporter | None = None, **more):
    options = RunOptions(spec_dir=spec, pipeline_file=REPO / "pipelines" / "offline.toml", out_dir=out, **more)
    return regenerate(BuildContext(options=options, report=report or Reporter(quiet=True)))


@pytest.mark.slow
def test_two_builds_of_the_same_spec_in_different_folders_are_byte_identical(tmp_path, spec_dir):
    """The second build's tree is the first's, which passed in the sandbox: its tests are not run again, and
    nothing in the artifact says so (only the build's output)."""
    from rich.console import Console

    said = io.StringIO()
    first = _build(spec_dir, tmp_path / "one")
    second = _build(spec_dir, tmp_path / "two", report=Reporter(console=Console(file=said, width=400)))
    assert first.version == second.version == "1.0.0"
    assert "not run again" in said.getvalue() and "this exact tree passed at" in said.getvalue()
    a, b = tree_hashes(first.path), tree_hashes(second.path)
    assert a == b and len(a) > 40
    modes = {p.relative_to(first.path).as_posix(): p.stat().st_mode & 0o777 for p in first.path.rglob("*")}
    assert modes["src/deploy/run.sh"] == 0o755 and modes["manifest.json"] == 0o644 and modes["src"] == 0o755
    assert str(tmp_path) not in (first.path / "manifest.json").read_text()


@pytest.mark.slow
def test_verify_names_a_flipped_byte_and_a_tampered_manifest_and_openssl_agrees(tmp_path, spec_dir):
    built = _build(spec_dir, tmp_path / "out")
    assert verify(built.path, report=Reporter(quiet=True)).ok
    openssl = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "manifest.pub.pem", "-rawin", "-in", "manifest.json",
               "-sigfile", "manifest.sig"]
    if shutil.which("openssl"):
        assert subprocess.run(openssl, cwd=built.path, capture_output=True).returncode == 0
    flipped = tmp_path / "flipped"
    shutil.copytree(built.path, flipped)
    target = flipped / "src" / "madgroup" / "mads" / "turing.py"
    data = bytearray(target.read_bytes())
    data[10] ^= 1
    target.write_bytes(bytes(data))
    result = verify(flipped, report=Reporter(quiet=True))
    assert not result.ok and any("src/madgroup/mads/turing.py" in p for p in result.problems)
    assert "madgroup/mads/turing.py" in result.differences
    tampered = tmp_path / "tampered"
    shutil.copytree(built.path, tampered)
    manifest = tampered / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"offline": true', '"offline": false'))
    result = verify(tampered, report=Reporter(quiet=True))
    assert "manifest.json does not match its signature" in result.problems
    if shutil.which("openssl"):
        assert subprocess.run(openssl, cwd=tampered, capture_output=True).returncode != 0


@pytest.mark.slow
def test_changing_one_mad_regenerates_it_and_its_dependants_reuses_the_rest_and_bumps_by_surface(tmp_path, spec_dir):
    spec = tmp_path / "spec"
    shutil.copytree(spec_dir, spec)
    out = tmp_path / "out"
    first = _build(spec, out)
    # Grace talks to every MAD and no MAD talks to Grace: a change to her alone leaves the others be.
    grace = spec / "mads" / "grace.yaml"
    mad = yaml.safe_load(grace.read_text())
    mad["tools"][0]["description"] += " Served at /healthz too."
    grace.write_text(yaml.safe_dump(mad, sort_keys=False))
    second = _build(spec, out)
    assert (first.version, second.version) == ("1.0.0", "1.0.1")
    lock = second.manifest.lock
    assert {u for u, e in lock.items() if e.reused_from == "1.0.0"} == {"mad:turing", "mad:rogers", "mad:fiedler"}, lock
    assert "spec/mads/grace.yaml" in lock["mad:grace"].regenerated_because
    assert lock["frame"].regenerated_because
    for unit in ("mad:turing", "mad:rogers", "mad:fiedler"):
        assert lock[unit].outputs == first.manifest.lock[unit].outputs
    assert second.manifest.bump.kind == "patch"
    # The reused units' exchanges came along into the new transcript: the version verifies alone.
    lone = tmp_path / "lone" / "1.0.1"
    shutil.copytree(second.path, lone)
    assert verify(lone, report=Reporter(quiet=True)).ok

    # A tool added to Turing: every MAD talks to Turing, so all are made again; the surface grew: minor.
    turing = spec / "mads" / "turing.yaml"
    mad = yaml.safe_load(turing.read_text())
    listing = next(t for t in mad["tools"] if t.get("builtin") == "secrets.list")
    mad["tools"].append({**listing, "name": "secret_names", "description": "The secrets' names (an alias)."})
    turing.write_text(yaml.safe_dump(mad, sort_keys=False))
    third = _build(spec, out)
    assert third.version == "1.1.0" and "tool turing.secret_names added" in third.manifest.bump.reason
    assert not any(e.reused_from for e in third.manifest.lock.values())
    diff = subprocess.run([sys.executable, "-m", "generator.cli", "diff", "madgroup@1.0.1", "madgroup@1.1.0", "--out",
                           str(out), "--json"], capture_output=True, text=True, cwd=REPO, check=True)
    found = json.loads(diff.stdout)
    assert found["surface"] == ["[minor] tool turing.secret_names added"]
    assert found["spec"] == {"mads/turing.yaml": "modified"}
    assert any(f["path"] == "src/madgroup/mads/turing.py" for f in found["files"])
    assert "+- name: secret_names" in found["spec_diff"] or "+  - name: secret_names" in found["spec_diff"]
    versions_out = subprocess.run([sys.executable, "-m", "generator.cli", "versions", "madgroup", "--out", str(out)],
                                  capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "1.1.0     minor" in versions_out and "tool turing.secret_names added" in versions_out
    assert "1.0.1     patch" in versions_out and "2 synthesised, 3 reused" in versions_out
