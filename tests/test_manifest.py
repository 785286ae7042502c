"""The Manifest model is the one way an artifact's record is read and written: every archived manifest reads,
writes back the same bytes, and its artifact still verifies; what cannot be read says so, naming the file."""

import json
import shutil

import pytest
from archive import ARCHIVE

from generator.artifact.manifest import Manifest
from generator.artifact.sign import verify_artifact
from generator.artifact.store import versions
from generator.errors import UserError

ARCHIVED = versions(ARCHIVE)


@pytest.mark.parametrize("version", ARCHIVED)
def test_every_archived_manifest_reads_and_writes_back_the_same_bytes(version):
    folder = ARCHIVE / version
    manifest = Manifest.read(folder)
    assert manifest.bytes() == (folder / "manifest.json").read_bytes()
    assert manifest.version == version and manifest.name == f"madgroup@{version}"
    assert manifest.src_outputs and all(not path.startswith("src/") for path in manifest.src_outputs)


@pytest.mark.parametrize("version", ARCHIVED)
def test_every_archived_version_still_verifies_its_signature_and_every_hash(version):
    check = verify_artifact(ARCHIVE / version)
    assert check.ok, check.problems


def test_the_archive_holds_versions_of_both_schemas():
    schemas = {Manifest.read(ARCHIVE / v).schema_version for v in ARCHIVED}
    assert schemas == {1, 2}


def test_a_manifest_with_a_field_regen_does_not_know_is_refused_by_name(tmp_path):
    folder = tmp_path / "artifact"
    folder.mkdir()
    data = json.loads((ARCHIVE / ARCHIVED[-1] / "manifest.json").read_text())
    data["surprise"] = 1
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"manifest.json: not a manifest regen can read: surprise: Extra inputs"):
        Manifest.read(folder)


def test_a_folder_without_a_manifest_is_not_an_artifact(tmp_path):
    with pytest.raises(UserError, match="not an artifact: it has no manifest.json"):
        Manifest.read(tmp_path)


def test_a_new_field_of_this_compiler_is_written_and_read_back(tmp_path):
    """A schema-2 manifest records where carried tools came from and what migrations were planned from."""
    newest = Manifest.read(ARCHIVE / ARCHIVED[-1])
    assert newest.schema_version == 2 and newest.migration_base is not None
    shutil.copytree(ARCHIVE / ARCHIVED[-1], tmp_path / "copy", ignore=shutil.ignore_patterns("src", "spec"))
    again = Manifest.read(tmp_path / "copy")
    assert again == newest and again.bytes() == newest.bytes()


@pytest.mark.parametrize("content", ["[]", '"a string"', '{"outputs": ["x"]}', '{"outputs": {"a": 1}}'])
def test_verify_names_a_manifest_of_the_wrong_shape_without_an_internal_error(tmp_path, content):
    import subprocess
    import sys

    folder = tmp_path / "artifact"
    shutil.copytree(ARCHIVE / ARCHIVED[-1], folder)
    (folder / "manifest.json").write_text(content)
    done = subprocess.run([sys.executable, "-m", "generator.cli", "verify", str(folder)], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert "manifest.json" in done.stderr


def test_verify_refuses_a_keep_folder_that_holds_a_src_before_replaying(tmp_path):
    from generator.build.verify import verify
    from generator.progress import Reporter

    (tmp_path / "keep" / "src").mkdir(parents=True)
    with pytest.raises(UserError, match="--keep needs a folder without a src/"):
        verify(ARCHIVE / ARCHIVED[-1], report=Reporter(quiet=True), keep=tmp_path / "keep")


def test_a_self_contained_manifest_records_the_pipeline_whole_defaults_included():
    """A replay under another compiler must not fall back on that compiler's defaults."""
    from generator.config import Pipeline, SeniorModel

    for version in ARCHIVED:
        data = json.loads((ARCHIVE / version / "manifest.json").read_text())
        if data["schema"] >= 2:
            assert set(data["pipeline"]) == set(Pipeline.model_fields), version
            assert set(data["pipeline"]["senior"]) == set(SeniorModel.model_fields), version
