"""Emit: nothing lands outside the tree, and an archived version is never touched."""

import json
import os

import pytest

from generator.artifact.store import publish, remove_stale_staging, staging, versions, write_tree
from generator.errors import BuildFailed


def test_a_symlink_inside_the_stage_cannot_carry_a_write_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(BuildFailed, match="outside the output tree"):
        write_tree(root, {"link/evil.py": "x = 1\n"})
    with pytest.raises(BuildFailed, match="outside the output tree"):
        write_tree(root, {"link/deep/er/evil.py": "x = 1\n"})
    assert list(outside.iterdir()) == [], "not even a folder may be made outside"


def test_a_symlinked_file_is_not_followed(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("precious")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(target, root / "a.txt")
    with pytest.raises(OSError):
        write_tree(root, {"a.txt": "overwritten"})
    assert target.read_text() == "precious"


def test_publish_never_overwrites_an_existing_version(tmp_path):
    eco = tmp_path / "demo"
    (eco / "1.0.0").mkdir(parents=True)
    (eco / "1.0.0" / "manifest.json").write_text("{}")
    with staging(eco) as stage:
        (stage / "manifest.json").write_text('{"new": true}')
        with pytest.raises(BuildFailed, match="never overwritten"):
            publish(stage, eco, "1.0.0")
    assert (eco / "1.0.0" / "manifest.json").read_text() == "{}"
    assert versions(eco) == ["1.0.0"]


def test_a_failed_build_leaves_no_staging_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with staging(tmp_path) as stage:
            (stage / "half.txt").write_text("half")
            raise RuntimeError("model died")
    assert list(tmp_path.iterdir()) == []


def test_staging_of_dead_builds_is_swept_but_a_live_one_is_kept(tmp_path):
    dead = tmp_path / ".staging-999999999-abcd"
    live = tmp_path / f".staging-{os.getppid()}-abcd"
    dead.mkdir()
    live.mkdir()
    remove_stale_staging(tmp_path)
    assert not dead.exists() and live.exists()


def test_versions_sort_as_semver(tmp_path):
    for v in ["1.0.10", "1.0.2", "2.0.0", ".staging-1-x", "notes"]:
        (tmp_path / v).mkdir()
    assert versions(tmp_path) == ["1.0.2", "1.0.10", "2.0.0"]


def test_the_build_stamp_sets_the_projects_version_and_no_other():
    from generator.build.produce import BuildStamp, stamped

    stamp = BuildStamp(ecosystem="notes", version="1.4.2", inputs_hash="ab" * 32)
    pyproject = '[project]\nname = "notes"\nversion = "0"\n\n[tool.other]\nversion = "7"\n'
    files = stamped({"pyproject.toml": pyproject, "notes/x.py": "x = 1\n"}, "notes", stamp)
    assert files["pyproject.toml"] == pyproject.replace('version = "0"', 'version = "1.4.2"')
    assert json.loads(files["notes/build.json"]) == {"ecosystem": "notes", "version": "1.4.2", "inputs_hash": "ab" * 32}
    assert files["notes/x.py"] == "x = 1\n"
    # A [project] table without a version keeps none; a later table's version is not the project's.
    unversioned = '[project]\nname = "notes"\n\n[tool.other]\nversion = "7"\n'
    assert stamped({"pyproject.toml": unversioned}, "notes", stamp)["pyproject.toml"] == unversioned


def test_mcp_annotations_come_from_the_capability_and_the_specs_hints(tmp_path):
    """A tool bound to a read capability is read-only for MCP clients; a spec's `hints` say so of any tool."""
    import shutil
    from pathlib import Path

    import yaml

    from generator.senior.offline import render_unit
    from generator.senior.synthesise import unit_spec
    from generator.spec.load import load_spec
    from generator.spec.plan import make_plan

    repo = Path(__file__).resolve().parents[1]
    spec_dir = tmp_path / "spec"
    shutil.copytree(repo / "spec", spec_dir)
    rogers = spec_dir / "mads" / "rogers.yaml"
    mad = yaml.safe_load(rogers.read_text())
    for tool in mad["tools"]:
        if tool["name"] == "summarise":
            tool["hints"] = {"read_only": True, "idempotent": True}
    rogers.write_text(yaml.safe_dump(mad, sort_keys=False))
    spec = load_spec(spec_dir)
    plan = make_plan(spec)
    frame = next(u for u in plan.units if u.name == "frame")
    files = {f["path"]: f["content"] for f in render_unit(unit_spec(spec, plan, frame))}
    config = files["madgroup/ecosystem.py"]
    assert "'rogers.history': {'readOnlyHint': True, 'destructiveHint': False, 'idempotentHint': True, 'openWorldHint': False}" in config
    assert ("'turing.set_secret': {'readOnlyHint': False, 'destructiveHint': False, 'idempotentHint': True,"
            " 'openWorldHint': False}") in config
    assert "'rogers.summarise': {'readOnlyHint': True, 'idempotentHint': True}" in config  # the spec's own, unbound
    assert "'fiedler.compare_models'" not in config  # no capability, no hints: MCP's cautious defaults
    # A spec without hints asks what it always asked: the key is left out of the unit's JSON.
    plain = load_spec(repo / "spec")
    assert '"hints"' not in json.dumps(unit_spec(plain, make_plan(plain), frame))
