"""`regen gate` as CI runs it: exit 0 on the clean build, 1 naming a planted defect, 2 undecided."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from review_helpers import REPO, scripted_reviewer, verdict, write_panel

from generator.artifact.store import versions
from generator.senior.scripted import Reply, ScriptedServer

ARCHIVE = REPO / "ecosystems" / "madgroup"
NEWEST = versions(ARCHIVE)[-1]


def regen_gate(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "generator.cli", "gate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture
def archive_copy(tmp_path) -> Path:
    """The newest build and its parent, copied, so a test can plant a defect in it."""
    out = tmp_path / "ecosystems" / "madgroup"
    manifest = json.loads((ARCHIVE / NEWEST / "manifest.json").read_text())
    for version in filter(None, (manifest["parent"], NEWEST)):
        shutil.copytree(ARCHIVE / version, out / version)
    return out / NEWEST


def test_the_offline_panel_passes_the_newest_archived_build(tmp_path):
    result = regen_gate("--trust-tests", "--report", str(tmp_path / "report"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gate: approve: 3 of 3 reviewers approve" in result.stdout
    report = json.loads((tmp_path / "report" / "review.json").read_text())
    assert report["version"] == NEWEST and report["outcome"] == "approve"
    assert {"review.md", "review.html"} <= {p.name for p in (tmp_path / "report").iterdir()}


def test_a_secret_written_to_a_log_is_rejected_and_named(tmp_path, archive_copy):
    turing = archive_copy / "src" / "madgroup" / "mads" / "turing.py"
    source = turing.read_text()
    source = source.replace("from ..kernel import Mad, tool\n",
                            "import logging\n\nfrom ..kernel import Mad, tool\n\nlog = logging.getLogger(__name__)\n")
    planted = ("        secret = await self.use('secrets.get', name=name)\n"
               "        log.info('read %s: %s', name, secret['value'])\n"
               "        return secret\n")
    source = source.replace("        return await self.use('secrets.get', name=name)\n", planted)
    turing.write_text(source)
    line = source.splitlines().index("        log.info('read %s: %s', name, secret['value'])") + 1
    result = regen_gate(str(archive_copy), "--trust-tests", "--report", str(tmp_path / "report"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"gate: reject: veto by static: src/madgroup/mads/turing.py:{line} secret-in-log" in result.stdout
    review = (tmp_path / "report" / "review.md").read_text()
    assert "secret-in-log" in review and "src/madgroup/mads/turing.py" in review


@pytest.mark.slow
def test_a_planted_failing_test_is_caught_by_running_the_tests_again(tmp_path, archive_copy):
    tests = archive_copy / "src" / "tests" / "test_grace.py"
    tests.write_text(tests.read_text() + "\n\ndef test_planted_defect():\n    assert 1 + 1 == 3\n")
    result = regen_gate(str(archive_copy), "--report", str(tmp_path / "report"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "veto by tests" in result.stdout and "test_planted_defect" in result.stdout
    assert "failing-test" in result.stdout


def test_without_a_reviewers_key_the_gate_cannot_decide_and_says_why(tmp_path):
    with ScriptedServer([Reply(verdict())], model="scripted-reviewer") as server:
        panel = write_panel(tmp_path, {"alpha": scripted_reviewer(server.base_url)})
        env = {k: v for k, v in __import__("os").environ.items() if k != "SCRIPTED_API_KEY"}
        result = regen_gate("--trust-tests", "--panel", str(panel), "--report", str(tmp_path / "report"), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gate: undecided: only 0 of 1 reviewers gave a verdict" in result.stdout
    assert "SCRIPTED_API_KEY" in result.stdout
    assert json.loads((tmp_path / "report" / "review.json").read_text())["outcome"] == "undecided"


def test_a_missing_artifact_is_a_clear_error(tmp_path):
    result = regen_gate(str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "not an artifact" in result.stderr and "Traceback" not in result.stderr
