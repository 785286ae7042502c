"""The compiler end to end on the offline default: spec/ in, an archived, tested artifact out."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kill_at import recorded_sandbox
from repo_specs import CORE_MADS, REPO, builtin_only_spec, repo_spec

from generator.artifact.sign import SIDECARS, verify_artifact
from generator.artifact.store import versions
from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.config import RunOptions, SeniorModel
from generator.errors import BuildFailed
from generator.hashing import sha256_file
from generator.progress import Reporter
from generator.senior.client import LiteLLMClient
from generator.senior.models import ModelReply
from generator.senior.scripted import Reply, ScriptedServer, reference_answer

pytestmark = pytest.mark.slow


REGEN = [sys.executable, "-m", "generator.cli"]


@pytest.fixture(scope="module")
def offline_spec(tmp_path_factory) -> Path:
    return builtin_only_spec(tmp_path_factory.mktemp("spec") / "spec")


@pytest.fixture(scope="module")
def core_spec(tmp_path_factory) -> Path:
    return builtin_only_spec(tmp_path_factory.mktemp("core") / "spec", CORE_MADS)


def _options(out: Path, spec: Path, **more) -> RunOptions:
    return RunOptions(spec_dir=spec, pipeline_file=REPO / "pipelines" / "offline.toml", out_dir=out, **more)


def _build(options: RunOptions, **seams):
    """A build with the default seams but for those given (e.g. `senior=`), quiet."""
    return regenerate(BuildContext(options=options, report=Reporter(quiet=True), **seams))


@pytest.fixture(scope="module")
def built(tmp_path_factory, offline_spec):
    """One full offline build of the repo's spec (builtin tools only), shared by the checks below."""
    out = tmp_path_factory.mktemp("ecosystems")
    result = _build(_options(out, offline_spec))
    return out, result


def test_the_build_is_archived_under_name_and_version(built):
    out, result = built
    assert not result.up_to_date
    assert result.path == out / "madgroup" / "1.0.0"
    assert versions(out / "madgroup") == ["1.0.0"]
    names = {p.name for p in result.path.iterdir()}
    assert {"manifest.json", "manifest.sig", "manifest.pub.pem", "provenance.json", "sbom.cdx.json", "transcript.jsonl",
            "tests.json", "review.json", "review.md", "review.html", "spec", "src"} <= names
    assert not [p for p in (out / "madgroup").iterdir() if p.name.startswith(".staging-")]


def test_the_manifest_lists_every_file_with_a_matching_sha256(built):
    _, result = built
    manifest = json.loads((result.path / "manifest.json").read_text())
    on_disk = {
        p.relative_to(result.path).as_posix()
        for p in result.path.rglob("*")
        if p.is_file() and p.relative_to(result.path).as_posix() not in SIDECARS
    }
    assert set(manifest["outputs"]) == on_disk
    assert any(path.startswith("src/madgroup/kernel/") for path in on_disk)
    for path, digest in manifest["outputs"].items():
        assert sha256_file(result.path / path) == digest, path
    assert manifest["offline"] is True and manifest["parent"] is None
    assert {"spec/ecosystem.yaml", "spec/mads/turing.yaml", "pipeline", "generator/kernel/bus.py"} <= set(manifest["inputs"])


def test_the_artifact_tests_passed_in_the_sandbox_and_say_where(built):
    _, result = built
    tests = json.loads((result.path / "tests.json").read_text())
    assert tests["failed"] == 0 and tests["errors"] == 0 and tests["passed"] >= 15
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["sandbox"]["level"] == tests["level"]
    if shutil.which("bwrap"):
        assert tests["level"] == "bubblewrap"


def test_every_exchange_is_in_the_transcript(built):
    _, result = built
    lines = [json.loads(line) for line in (result.path / "transcript.jsonl").read_text().splitlines()]
    assert [line["unit"] for line in lines] == [u.unit for u in result.manifest.units]  # one exchange per unit, in order
    assert [u.unit for u in result.manifest.units][-5:] == ["mad:turing", "mad:rogers", "mad:fiedler", "mad:grace", "frame"]
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert [u["request_hash"] for u in manifest["units"]] == [line["request_hash"] for line in lines]
    assert all(line["model"] == "offline/reference" for line in lines)


def test_the_artifact_carries_what_a_user_needs_to_run_it(built):
    _, result = built
    src = result.path / "src"
    for path in ["pyproject.toml", "uv.lock", "README.md", "RUNBOOK.md", "deploy/run.sh", "deploy/Dockerfile",
                 "deploy/madgroup.service", "madgroup/__main__.py", "tests/test_ecosystem.py"]:
        assert (src / path).is_file(), path
    assert os.access(src / "deploy" / "run.sh", os.X_OK)
    assert not list(src.rglob("__pycache__")), "the sandbox must not write into the artifact"


def test_a_rerun_with_nothing_changed_writes_nothing(built, offline_spec, capsys):
    out, result = built
    before = sorted(p.as_posix() for p in out.rglob("*"))
    again = regenerate(BuildContext(options=_options(out, offline_spec), report=Reporter()))
    assert again.up_to_date and again.version == "1.0.0"
    assert sorted(p.as_posix() for p in out.rglob("*") if p.name != ".lock") == [
        p for p in before if not p.endswith("/.lock")
    ]
    assert "Up to date" in capsys.readouterr().err


def test_a_changed_spec_makes_a_new_version_and_leaves_the_old_one_alone(built, offline_spec, tmp_path):
    out, result = built
    spec = tmp_path / "spec"
    shutil.copytree(offline_spec, spec)
    old_manifest = (result.path / "manifest.json").read_bytes()
    text = (spec / "mads" / "grace.yaml").read_text()
    (spec / "mads" / "grace.yaml").write_text(text.replace("Health of the ecosystem", "Health of all"))
    scratch = tmp_path / "out"
    shutil.copytree(out, scratch)
    second = _build(_options(scratch, spec))
    assert second.version == "1.0.1" and second.manifest.parent == "1.0.0"
    assert (scratch / "madgroup" / "1.0.0" / "manifest.json").read_bytes() == old_manifest


class ScriptedModel:
    """A fake senior that answers every unit with the same canned content."""

    def __init__(self, content: str):
        self.content = content

    def complete(self, request):
        return ModelReply(content=self.content, finish_reason="stop")


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"files": [{"path": "../../escape.py", "content": "x = 1"}]}', "must stay inside the tree"),
        ('{"files": [{"path": "madgroup/mads/turing.py", "content": "def (:"}]}', "does not parse"),
        ("Sure! Here is the code you asked for.", 'not {"files"'),
    ],
)
def test_a_bad_answer_stops_the_build_and_leaves_no_version(tmp_path, core_spec, content, expected):
    with pytest.raises(BuildFailed) as err:
        _build(_options(tmp_path, core_spec), senior=ScriptedModel(content))
    assert expected in str(err.value)
    assert versions(tmp_path / "madgroup") == []
    assert not list((tmp_path / "madgroup").glob(".staging-*"))  # nor the folder, unless it holds something


def test_a_tool_no_build_ever_wrote_is_named_and_nothing_is_built(tmp_path):
    spec = tmp_path / "spec"
    shutil.copytree(REPO / "spec", spec)
    done = subprocess.run(
        REGEN + ["regenerate", "--spec", str(spec), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "these tools cannot be carried:\n" in done.stderr
    for tool in ("hopper.run_task", "rogers.summarise", "fiedler.compare_models"):
        assert f"  {tool}: no archived build wrote it\n" in done.stderr
    assert "--pipeline pipelines/frontier.toml" in done.stderr
    assert "Traceback" not in done.stderr
    assert versions(tmp_path / "out" / "madgroup") == []
    assert not (tmp_path / "out" / "madgroup").exists() or not list((tmp_path / "out" / "madgroup").iterdir())


def _complete_or_absent(ecosystem_dir: Path) -> None:
    for version in versions(ecosystem_dir):
        check = verify_artifact(ecosystem_dir / version)  # signature, provenance, every output and the root hash
        assert check.ok, check.problems


@pytest.mark.parametrize("moment", ["transcript.jsonl", "src/uv.lock", "tests.json", "published"])
def test_sigkill_at_any_moment_leaves_no_version_or_a_complete_one(tmp_path, built, core_spec, moment):
    """The sandbox's results are recorded ones (the full build's): what is tested is the kill and the next run."""
    out = tmp_path / "out"
    recorded = built[1].path / "tests.json"
    killed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "kill_at.py"), moment, "--sandbox-result", str(recorded), "--",
         "regenerate", "--spec", str(core_spec), "--out", str(out), "--quiet", "--no-cache"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, "the build ended before the moment it should be killed at"
    ecosystem_dir = out / "madgroup"
    _complete_or_absent(ecosystem_dir)
    assert versions(ecosystem_dir) == (["1.0.0"] if moment == "published" else [])
    # The next run sweeps the dead build's staging folder and finishes the job.
    result = _build(_options(out, core_spec), sandbox=recorded_sandbox(recorded))
    assert versions(ecosystem_dir) == [result.version] == ["1.0.0"]
    assert not list(ecosystem_dir.glob(".staging-*"))
    _complete_or_absent(ecosystem_dir)


class PlantedFailingTest:
    """The offline senior, except that Grace's tests gain one that fails, whatever it is asked."""

    def __init__(self):
        self.offline = LiteLLMClient(SeniorModel(model="offline/reference"))
        self.units_asked: list[str] = []

    def complete(self, request):
        self.units_asked.append(request.unit)
        reply = self.offline.complete(request)
        if request.unit != "mad:grace":
            return reply
        answer = json.loads(reply.content)
        for f in answer["files"]:
            if f["path"] == "tests/test_grace.py":
                f["content"] += "\n\ndef test_planted_defect():\n    assert 1 + 1 == 3\n"
        return reply.model_copy(update={"content": json.dumps(answer)})


def test_failing_tests_go_back_to_their_unit_then_the_build_stops_and_archives_nothing(tmp_path, core_spec):
    senior = PlantedFailingTest()
    with pytest.raises(BuildFailed) as err:
        _build(_options(tmp_path, core_spec), senior=senior)
    message = str(err.value)
    assert "tests failed in the sandbox" in message and "1 failed" in message
    assert "test_planted_defect" in message
    assert "the same as before the last repair; stopped early" in message
    # One repair request, to the unit that wrote the failing test, and to no other.
    assert senior.units_asked.count("mad:grace") == 2
    assert all(senior.units_asked.count(u) == 1 for u in ["mad:turing", "mad:rogers", "mad:fiedler", "frame"])
    assert versions(tmp_path / "madgroup") == []


def test_offline_builds_carry_model_written_tools_from_an_archived_build(tmp_path, monkeypatch):
    """Tools only a model can write were once written by one (here the scripted senior over HTTP); the
    offline default carries them into its own build, and says where they came from and who wrote them."""
    monkeypatch.setenv("SCRIPTED_API_KEY", "sk")
    out = tmp_path / "out"
    spec = repo_spec(tmp_path / "spec", CORE_MADS)
    with ScriptedServer(lambda body: Reply(reference_answer(body))) as server:
        pipeline = tmp_path / "scripted.toml"
        pipeline.write_text((REPO / "pipelines" / "scripted.toml").read_text().replace(
            "http://127.0.0.1:8911/v1", server.base_url))
        first = _build(RunOptions(spec_dir=spec, pipeline_file=pipeline, out_dir=out))
    assert first.manifest.offline is False and first.manifest.carried == {}
    second = _build(_options(out, spec))
    assert second.manifest.offline is True and second.version == "1.0.1"
    carried = second.manifest.carried
    assert sorted(carried) == ["fiedler.compare_models", "rogers.summarise"]
    assert {c.source for c in carried.values()} == {"madgroup@1.0.0"}
    assert {c.written_by for c in carried.values()} == {"openai/scripted-senior"}
    assert second.manifest.sandbox.failed == 0
    src = second.path / "src"
    assert "async def summarise(self, conversation_id: str, max_messages: int = 50) -> dict:" in (
        src / "madgroup" / "mads" / "rogers.py").read_text()
    assert "def test_compare_models_answers_from_every_alias" in (src / "tests" / "test_fiedler.py").read_text()
    # What the scripted senior wrote is what the offline build carries, byte for byte.
    for path in ["madgroup/mads/rogers.py", "tests/test_rogers.py", "madgroup/mads/fiedler.py", "tests/test_fiedler.py"]:
        assert (src / path).read_bytes() == (first.path / "src" / path).read_bytes(), path


def test_sigkill_anywhere_in_emit_a_dozen_times_never_leaves_a_partial_or_unverifiable_version(tmp_path, built, core_spec):
    """Emit writes the transcript, the reports, the SBOM, the spec, the manifest, its signature and the
    provenance, fsyncs and renames: killed at random steps of it, a version is whole and verifiable, or absent."""
    _, result = built
    recorded_tests = result.path / "tests.json"

    def build(moment: str, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "tests" / "kill_at.py"), moment, "--sandbox-result", str(recorded_tests), "--",
             "regenerate", "--spec", str(core_spec), "--out", str(out), "--quiet", "--no-cache"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )

    counted = build("emit:count", tmp_path / "count")
    assert counted.returncode == 0, counted.stderr
    steps = int(counted.stderr.rsplit("emit steps: ", 1)[1].split()[0])
    assert steps >= 20
    moments = sorted(random.Random(20).sample(range(1, steps + 1), 12))
    killed = build("emit:" + ",".join(map(str, moments)), tmp_path / "kill{n}")
    assert killed.returncode == 0, killed.stderr
    statuses = json.loads(killed.stdout.strip().splitlines()[-1])
    assert statuses == {str(n): -signal.SIGKILL for n in moments}, killed.stderr
    published = 0
    for n in moments:
        _complete_or_absent(tmp_path / f"kill{n}" / "madgroup")
        published += bool(versions(tmp_path / f"kill{n}" / "madgroup"))
    assert published < len(moments)  # most kills land before the rename: nothing is left behind then
