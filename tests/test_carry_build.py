"""Maintenance is regeneration on the offline default: after a spec edit that reaches the MADs with model-written
tools, the build carries those tools from the archive, and the new version is reproducible, self-contained and
never half-written."""

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from archive import ARCHIVE
from repo_specs import CORE_MADS, repo_spec

from generator.artifact.manifest import Manifest
from generator.artifact.sign import verify_artifact
from generator.artifact.store import versions
from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.build.verify import verify
from generator.config import RunOptions
from generator.hashing import tree_hashes
from generator.progress import Reporter

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
REGEN = [sys.executable, "-m", "generator.cli"]
NEWEST = versions(ARCHIVE)[-1]
LINE = "\nR30. **Retention.** Conversations older than a year may be archived on request.\n"


def clone(folder: Path) -> tuple[Path, Path]:
    """What a user has after `git clone` and one edit: the repo's spec with a line appended, and its archive.
    The spec is cut to the core MADs (tests/repo_specs.py): the carrying is the same, the builds are cheaper."""
    spec, out = folder / "spec", folder / "ecosystems"
    repo_spec(spec, CORE_MADS)
    with (spec / "requirements.md").open("a") as f:
        f.write(LINE)
    rogers = spec / "mads" / "rogers.yaml"  # Rogers's tests are to prove it: the matrix must show it covered
    mad = yaml.safe_load(rogers.read_text())
    mad["requirements"] = ["R1", "R30"]
    rogers.write_text(yaml.safe_dump(mad, sort_keys=False))
    shutil.copytree(ARCHIVE, out / "madgroup", ignore=shutil.ignore_patterns(".lock", ".staging-*"))
    return spec, out


def _options(spec: Path, out: Path, **more) -> RunOptions:
    return RunOptions(spec_dir=spec, pipeline_file=REPO / "pipelines" / "offline.toml", out_dir=out, **more)


def _build(spec: Path, out: Path, **more):
    return regenerate(BuildContext(options=_options(spec, out, **more), report=Reporter(quiet=True)))


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """The same edit, built in two clones in different folders."""
    builds = []
    for name in ("one", "two"):
        spec, out = clone(tmp_path_factory.mktemp(name))
        builds.append((spec, out, _build(spec, out)))
    return builds


def test_a_requirements_edit_builds_offline_carrying_the_model_written_tools(edited):
    _, _, result = edited[0]
    manifest = result.manifest
    assert manifest.offline and manifest.parent == NEWEST and manifest.sandbox.failed == 0
    assert sorted(manifest.carried) == ["fiedler.compare_models", "rogers.summarise"]
    for tool, carried in manifest.carried.items():
        assert "requirements.md" in carried.changed_since, carried
        assert carried.written_by != "offline/reference"
    assert manifest.lock["mad:rogers"].regenerated_because.startswith("inputs changed")
    review = (result.path / "review.md").read_text()
    assert "rogers.summarise: carried from" in review and "requirements.md changed since" in review
    matrix = {r["id"]: r for r in json.loads((result.path / "review.json").read_text())["requirements"]}
    assert matrix["R30"]["covered"] and all(t["id"].startswith("tests.test_rogers::") for t in matrix["R30"]["tests"])
    assert all(r["covered"] for r in matrix.values())


def test_the_same_edit_in_two_clones_gives_byte_identical_versions(edited):
    (_, _, one), (_, _, two) = edited
    assert one.version == two.version
    assert tree_hashes(one.path) == tree_hashes(two.path)
    assert str(one.path.parent.parent.parent) not in (one.path / "manifest.json").read_text()


def test_the_new_version_verifies_alone_copied_anywhere(edited, tmp_path):
    _, _, result = edited[0]
    lone = tmp_path / "downloaded" / result.version
    shutil.copytree(result.path, lone)
    done = subprocess.run(REGEN + ["verify", str(lone)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "reproduced byte for byte" in done.stdout


def test_a_flipped_byte_in_a_lone_copy_fails_naming_the_file_without_an_internal_error(edited, tmp_path):
    _, _, result = edited[0]
    lone = tmp_path / result.version
    shutil.copytree(result.path, lone)
    target = lone / "src" / "madgroup" / "mads" / "rogers.py"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    done = subprocess.run(REGEN + ["verify", str(lone)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "src/madgroup/mads/rogers.py: its sha256 is not the one manifest.json recorded" in done.stderr
    assert "✗ check" in done.stderr and "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert "first madgroup/mads/rogers.py" in done.stderr


def test_a_lone_copy_with_a_tampered_transcript_is_named_and_not_replayed(edited, tmp_path):
    _, _, result = edited[0]
    lone = tmp_path / result.version
    shutil.copytree(result.path, lone)
    with (lone / "transcript.jsonl").open("a") as f:
        f.write("\n")
    found = verify(lone, report=Reporter(quiet=True))
    assert not found.ok and any(p.startswith("transcript.jsonl: does not match") for p in found.problems)


def test_a_lone_copy_replays_into_another_archive(edited, tmp_path):
    _, _, result = edited[0]
    lone = tmp_path / "lone" / result.version
    shutil.copytree(result.path, lone)
    done = subprocess.run(REGEN + ["regenerate", "--spec", str(lone / "spec"), "--replay", str(lone), "--out",
                                   str(tmp_path / "other")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    rebuilt = Manifest.read(tmp_path / "other" / "madgroup" / "1.0.0")
    # The same files, but for the build stamp: in the other archive the replay is version 1.0.0, and says so.
    stamped = {"pyproject.toml", "uv.lock", "madgroup/build.json"}
    assert {k: v for k, v in rebuilt.src_outputs.items() if k not in stamped} == {
        k: v for k, v in result.manifest.src_outputs.items() if k not in stamped}
    build = json.loads((tmp_path / "other" / "madgroup" / "1.0.0" / "src" / "madgroup" / "build.json").read_text())
    assert build["version"] == "1.0.0" and build["inputs_hash"] == rebuilt.inputs_hash
    assert rebuilt.replayed_from == f"madgroup@{result.version}"


def test_fresh_synthesises_every_unit_again_and_still_carries(edited):
    spec, out, result = edited[1]
    fresh = _build(spec, out, fresh=True)
    manifest = fresh.manifest
    assert manifest.parent == result.version and manifest.fresh
    assert not any(lock.reused_from for lock in manifest.lock.values())
    assert all("--fresh" in lock.regenerated_because for lock in manifest.lock.values())
    assert sorted(manifest.carried) == ["fiedler.compare_models", "rogers.summarise"]
    assert {c.source for c in manifest.carried.values()} == {f"madgroup@{result.version}"}
    # Without --fresh, the next build is up to date: nothing about the inputs changed.
    assert _build(spec, out).up_to_date


def test_fresh_with_replay_is_a_usage_error(tmp_path):
    done = subprocess.run(REGEN + ["regenerate", "--fresh", "--replay", str(ARCHIVE / NEWEST)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--fresh and --replay do not go together" in done.stderr


def test_sigkill_at_random_moments_of_the_carrying_build_leaves_no_partial_version(tmp_path):
    moments = random.Random(10).sample(["transcript.jsonl", "src/uv.lock", "tests.json", "published"], 2)
    for moment in moments:
        spec, out = clone(tmp_path / moment.replace("/", "_"))
        killed = subprocess.run(
            [sys.executable, str(REPO / "tests" / "kill_at.py"), moment, "--",
             "regenerate", "--spec", str(spec), "--out", str(out), "--quiet"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600,
        )
        assert killed.returncode == -signal.SIGKILL, f"the build ended before {moment}"
        found = versions(out / "madgroup")
        assert found[:-1] == versions(ARCHIVE) if moment == "published" else found == versions(ARCHIVE)
        for version in found:
            check = verify_artifact(out / "madgroup" / version)
            assert check.ok, (moment, version, check.problems)


def _hostile(newest: Path, update_lock: bool) -> None:
    """Edit the answer of mad:rogers in `newest` so it no longer parses, and re-sign the artifact: a hostile
    archive, or a buggy tool; with `update_lock`, the unit's lock is made to match the edited answer too."""
    from generator.artifact.manifest import root_hash
    from generator.artifact.sign import load_signing_key, sign_artifact, write_provenance
    from generator.hashing import canonical_json, sha256_file, sha256_text

    lines = [json.loads(line) for line in (newest / "transcript.jsonl").read_text().splitlines()]
    for line in lines:
        if line["unit"] == "mad:rogers":
            answer = json.loads(line["response"])
            for f in answer["files"]:
                if f["path"].endswith("mads/rogers.py"):
                    f["content"] = f["content"].replace("async def summarise(self,", "async def summarise(self,,")
                    edited = f
            line["response"] = json.dumps(answer)
    (newest / "transcript.jsonl").write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    manifest = json.loads((newest / "manifest.json").read_text())
    if update_lock:
        manifest["lock"]["mad:rogers"]["outputs"][edited["path"]] = sha256_text(edited["content"])
    key = load_signing_key()
    manifest["outputs"]["transcript.jsonl"] = sha256_file(newest / "transcript.jsonl")
    manifest["root_hash"] = root_hash(manifest["outputs"])
    manifest["signing"]["key_id"], manifest["signing"]["development"] = key.key_id, key.development
    for name in ("manifest.sig", "manifest.pub.pem", "provenance.json"):
        (newest / name).unlink()
    (newest / "manifest.json").write_text(canonical_json(manifest))
    sign_artifact(newest, key)
    write_provenance(newest)


def test_an_answer_that_does_not_match_its_lock_is_never_carried_from(tmp_path):
    spec, out = clone(tmp_path)
    _hostile(out / "madgroup" / NEWEST, update_lock=False)
    result = _build(spec, out)
    assert result.manifest.carried["rogers.summarise"].source != f"madgroup@{NEWEST}"
    assert "summarise(self,," not in (result.path / "src" / "madgroup" / "mads" / "rogers.py").read_text()


def test_a_carried_tool_whose_recorded_code_no_longer_parses_stops_the_build_by_name(tmp_path):
    spec, out = clone(tmp_path)
    _hostile(out / "madgroup" / NEWEST, update_lock=True)
    before = sorted(p.name for p in (out / "madgroup").iterdir())
    done = subprocess.run(REGEN + ["regenerate", "--spec", str(spec), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert f"rogers.summarise: its recorded code in madgroup@{NEWEST} cannot be carried: the module of rogers " \
           "does not parse" in done.stderr
    assert "fiedler.compare_models" not in done.stderr.split("cannot be carried:")[1]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in (out / "madgroup").iterdir() if p.name != ".lock") == [p for p in before if p != ".lock"]
