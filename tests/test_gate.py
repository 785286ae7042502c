"""`regen gate` as CI runs it: exit 0 on the clean build, 1 naming a planted defect, 2 undecided."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from review_helpers import REPO, resign, scripted_reviewer, verdict, write_panel

from generator.artifact.store import versions
from generator.senior.scripted import Reply, ScriptedServer

ARCHIVE = REPO / "ecosystems" / "madgroup"
NEWEST = versions(ARCHIVE)[-1]
KEYED = {**os.environ, "SCRIPTED_API_KEY": "scripted"}


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
    resign(archive_copy)  # a bad build, signed by its builder: it verifies, so it is judged
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
    resign(archive_copy)
    result = regen_gate(str(archive_copy), "--report", str(tmp_path / "report"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "veto by tests" in result.stdout and "test_planted_defect" in result.stdout
    assert "failing-test" in result.stdout


def test_a_tampered_copy_is_refused_before_it_is_judged_naming_the_file(tmp_path, archive_copy):
    turing = archive_copy / "src" / "madgroup" / "mads" / "turing.py"
    data = bytearray(turing.read_bytes())
    data[100] ^= 1  # one byte flipped
    turing.write_bytes(bytes(data))
    result = regen_gate(str(archive_copy), "--trust-tests", "--report", str(tmp_path / "report"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "does not verify, so it is not judged" in result.stderr
    assert "src/madgroup/mads/turing.py: its sha256 is not the one manifest.json recorded" in result.stderr
    assert not (tmp_path / "report").exists()  # nothing judged, nothing written


def test_an_unsigned_copy_is_refused(tmp_path, archive_copy):
    (archive_copy / "manifest.sig").unlink()
    result = regen_gate(str(archive_copy), "--trust-tests", "--report", str(tmp_path / "report"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is not signed" in result.stderr and "manifest.sig" in result.stderr


def test_a_copy_signed_by_an_untrusted_key_is_refused_under_trust(tmp_path, archive_copy):
    resign(archive_copy)
    result = regen_gate(str(archive_copy), "--trust-tests", "--trust", str(next((REPO / "keys").glob("*.pub.pem"))), "--report",
                        str(tmp_path / "report"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "does not verify" in result.stderr and "trusted" in result.stderr


def test_without_a_reviewers_key_the_gate_cannot_decide_and_says_why(tmp_path):
    with ScriptedServer([Reply(verdict())], model="scripted-reviewer") as server:
        panel = write_panel(tmp_path, {"alpha": scripted_reviewer(server.base_url)})
        env = {k: v for k, v in os.environ.items() if k != "SCRIPTED_API_KEY"}
        result = regen_gate("--trust-tests", "--panel", str(panel), "--report", str(tmp_path / "report"), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gate: undecided: only 0 of 1 reviewers gave a verdict" in result.stdout
    assert "SCRIPTED_API_KEY" in result.stdout
    assert json.loads((tmp_path / "report" / "review.json").read_text())["outcome"] == "undecided"


def test_a_missing_artifact_is_a_clear_error(tmp_path):
    result = regen_gate(str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "not an artifact" in result.stderr and "Traceback" not in result.stderr


def test_an_llm_gate_reads_the_whole_tree_no_llm_approved_and_binds_its_report(tmp_path):
    # madgroup was only ever approved by the offline panel: an LLM panel must read all of it, not "(no file changed)".
    with ScriptedServer(lambda body: Reply(verdict()), model="scripted-reviewer") as server:
        panel = write_panel(tmp_path, {"alpha": scripted_reviewer(server.base_url)})
        result = regen_gate("--trust-tests", "--panel", str(panel), "--report", str(tmp_path / "report"), env=KEYED)
        prompts = ["\n".join(m["content"] for m in r["messages"]) for r in server.requests]
    assert result.returncode == 0, result.stdout + result.stderr
    whole = "the whole tree: no ancestor's code was read and approved by a panel with every reviewer of test"
    assert f"scope: {whole}" in result.stdout
    assert all("Every file of `src/` is shown as added: the whole tree" in p for p in prompts)
    shown = "".join(prompts)
    assert "added: src/madgroup/kernel/bus.py" in shown and "added: src/madgroup/mads/rogers.py" in shown
    review = json.loads((tmp_path / "report" / "review.json").read_text())
    manifest = json.loads((ARCHIVE / NEWEST / "manifest.json").read_text())
    assert review["bound"]["artifact"] == f"madgroup@{NEWEST}"
    assert review["bound"]["artifact_root_hash"] == manifest["root_hash"]
    assert review["bound"]["scope"] == {"mode": "approved", "baseline": None, "baseline_root_hash": None,
                                        "reason": whole}
    # --scope parent narrows it to the diff, and says so.
    with ScriptedServer(lambda body: Reply(verdict()), model="scripted-reviewer") as server:
        panel = write_panel(tmp_path / "p", {"alpha": scripted_reviewer(server.base_url)})
        result = regen_gate("--trust-tests", "--panel", str(panel), "--scope", "parent", "--report", str(tmp_path / "r2"),
                            env=KEYED)
        prompt = "\n".join(m["content"] for m in server.requests[0]["messages"])
    assert result.returncode == 0 and f"Diff of `src/` against {manifest['parent']} (the changes since the parent" in prompt
