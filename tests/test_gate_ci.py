"""`regen gate` in CI: SARIF for code scanning, GitHub annotations, and exit codes kept through nox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nox.command import CommandFailed
from review_helpers import REPO, scripted_reviewer, write_panel

from generator import __version__
from generator.artifact.store import versions
from generator.cli import main
from generator.review.models import EXIT_CODES, Consensus, Finding, PanelReport, Round, Verdict
from generator.review.sarif import escape_data, escape_property, github_annotations, sarif, write_sarif

ARCHIVE = REPO / "ecosystems" / "madgroup"
NEWEST = versions(ARCHIVE)[-1]
PANEL = {"name": "ci", "reviewers": {"security": {"kind": "llm", "focus": "security"},
                                     "static": {"kind": "static", "focus": "security"},
                                     "tests": {"kind": "tests", "focus": "tests"}}}

SECRET = Finding(file="src/madgroup/mads/turing.py", line=12, severity="critical", rule="secret-in-log",
                 message="the API key is logged", suggestion="log a hash instead")
SHELL = Finding(file="src/madgroup/run.py", line=3, severity="major", rule="no-shell", message="shell=True")
NO_LINE = Finding(file="src/madgroup/__init__.py", severity="minor", rule="docs", message="no module docstring")
TRICKY = Finding(file="src/a,b:c.py", line=7, severity="minor", rule="odd",
                 message="100% sure: a, b\nsecond line\r", suggestion="rename it: a_b.py")
WHOLE = Finding(severity="info", rule="overall", message="fine on the whole")
EARLIER = Finding(file="src/old.py", line=1, severity="critical", rule="repaired", message="fixed since round 1")


def verdict(reviewer: str, decision: str, *findings: Finding, kind: str = "llm", round: int = 2) -> Verdict:
    return Verdict(reviewer=reviewer, kind=kind, round=round, decision=decision, summary=f"{reviewer} says {decision}",
                   findings=findings)


def consensus(outcome: str, reason: str) -> Consensus:
    return Consensus(rule="unanimous, veto on critical", outcome=outcome, reason=reason, arithmetic="1 approve, 2 reject",
                     approvals=1, rejections=2, abstentions=0, quorum=3)


def panel_report(outcome: str = "reject", reverse: bool = False) -> PanelReport:
    """Round 1 with a finding the final round no longer has; round 2 with one of every kind."""
    final = [verdict("security", "request_changes", SECRET, WHOLE, TRICKY),
             verdict("static", "request_changes", NO_LINE, SHELL, kind="static"),
             verdict("tests", "approve", kind="tests")]
    reason = "veto by security: src/madgroup/mads/turing.py:12 secret-in-log: the API key is logged"
    rounds = (Round(number=1, verdicts=(verdict("security", "request_changes", EARLIER, round=1),),
                    consensus=consensus("reject", "changes requested")),
              Round(number=2, phase="revision", verdicts=tuple(reversed(final) if reverse else final),
                    consensus=consensus(outcome, reason)))
    return PanelReport(ecosystem="madgroup", version="1.2.0", parent="1.1.0", panel="ci", panel_definition=PANEL,
                       rounds=rounds, outcome=outcome, reason=reason)


@pytest.fixture
def layout(tmp_path) -> tuple[Path, Path]:
    """A repository root and an artifact inside it."""
    return tmp_path / "ecosystems" / "madgroup" / "1.2.0", tmp_path


def assert_sarif_shape(log: dict) -> None:
    """What SARIF 2.1.0 requires of what we write, checked by hand (no schema offline)."""
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json" and log["version"] == "2.1.0"
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "regen" and driver["version"] == __version__
    ids = [rule["id"] for rule in driver["rules"]]
    assert ids == sorted(set(ids))
    assert all(rule["shortDescription"]["text"] for rule in driver["rules"])
    assert run["invocations"] == [{"executionSuccessful": True}]
    for result in run["results"]:
        assert result["ruleId"] in ids
        assert result["level"] in {"error", "warning", "note"}
        assert result["message"]["text"]
        (location,) = result["locations"]
        physical = location["physicalLocation"]
        assert physical["artifactLocation"]["uri"]
        assert set(physical) <= {"artifactLocation", "region"}
        if "region" in physical:
            assert isinstance(physical["region"]["startLine"], int) and physical["region"]["startLine"] >= 1
        assert set(result["properties"]) == {"reviewer", "severity", "round"}


def test_sarif_has_a_result_per_finding_of_the_final_round(layout):
    artifact, root = layout
    log = json.loads(sarif(panel_report(), artifact, root))
    assert_sarif_shape(log)
    (run,) = log["runs"]
    assert run["properties"]["outcome"] == "reject" and "secret-in-log" in run["properties"]["reason"]
    rules = {rule["id"]: rule for rule in run["tool"]["driver"]["rules"]}
    assert sorted(rules) == ["security/odd", "security/overall", "security/secret-in-log", "static/docs",
                             "static/no-shell"]  # round 1's security/repaired is gone
    assert rules["static/no-shell"]["properties"] == {"focus": "security"}
    base = "ecosystems/madgroup/1.2.0"
    found = {r["ruleId"]: r for r in run["results"]}
    assert len(run["results"]) == 5
    assert {rule: r["level"] for rule, r in found.items()} == {
        "security/secret-in-log": "error", "static/no-shell": "error", "static/docs": "warning",
        "security/odd": "warning", "security/overall": "note"}
    secret = found["security/secret-in-log"]
    assert secret["message"]["text"] == "the API key is logged Fix: log a hash instead"
    assert secret["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": f"{base}/src/madgroup/mads/turing.py"}, "region": {"startLine": 12}}
    assert secret["properties"] == {"reviewer": "security", "severity": "critical", "round": 2}
    assert found["static/no-shell"]["message"]["text"] == "shell=True"  # no suggestion, no "Fix:"
    assert found["static/docs"]["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": f"{base}/src/madgroup/__init__.py"}}  # no line, no region
    assert found["security/overall"]["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": f"{base}/manifest.json"}}  # no file: the build itself
    assert found["security/odd"]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == f"{base}/src/a%2Cb%3Ac.py"
    keys = [(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
             r["locations"][0]["physicalLocation"].get("region", {}).get("startLine", 0), r["ruleId"])
            for r in run["results"]]
    assert keys == sorted(keys)


def test_the_same_report_gives_the_same_bytes_whatever_the_verdicts_order(layout):
    artifact, root = layout
    once = sarif(panel_report(), artifact, root)
    assert once == sarif(panel_report(), artifact, root) == sarif(panel_report(reverse=True), artifact, root)
    assert once.endswith("}\n") and json.dumps(json.loads(once), indent=2, sort_keys=True, ensure_ascii=False) + "\n" == once


def test_an_artifact_outside_the_root_is_located_by_a_file_uri(tmp_path):
    artifact = tmp_path / "elsewhere" / "madgroup 1.2.0"
    log = json.loads(sarif(panel_report(), artifact, tmp_path / "repo"))
    uris = {r["ruleId"]: r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in log["runs"][0]["results"]}
    assert uris["security/secret-in-log"] == (artifact.resolve() / "src/madgroup/mads/turing.py").as_uri()
    assert uris["security/secret-in-log"].startswith("file:///") and "madgroup%201.2.0" in uris["security/secret-in-log"]


def test_a_relative_artifact_is_relative_to_the_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = json.loads(sarif(panel_report(), Path("ecosystems/madgroup/1.2.0"), Path.cwd()))
    uris = [r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in log["runs"][0]["results"]]
    assert all(uri.startswith("ecosystems/madgroup/1.2.0/") for uri in uris)


def test_write_sarif_makes_the_folders_and_leaves_no_temporary_file(layout):
    artifact, root = layout
    target = root / "out" / "ci" / "regen.sarif"
    write_sarif(panel_report(), artifact, root, target)
    assert target.read_bytes() == sarif(panel_report(), artifact, root).encode()
    assert [p.name for p in target.parent.iterdir()] == ["regen.sarif"]


def test_annotations_escape_what_github_would_misread(layout):
    artifact, root = layout
    lines = github_annotations(panel_report(), artifact, root)
    assert len(lines) == 6 and all("\n" not in line and "\r" not in line for line in lines)
    base = "ecosystems/madgroup/1.2.0"
    # the outcome first, then the most severe findings, each a workflow command GitHub shows on its line
    assert lines[0] == ("::error title=regen gate::madgroup 1.2.0: reject: veto by security: "
                        "src/madgroup/mads/turing.py:12 secret-in-log: the API key is logged")
    lines = lines[1:]
    assert lines[0] == (f"::error file={base}/src/madgroup/mads/turing.py,line=12,title=security/secret-in-log (critical)"
                        "::the API key is logged Fix: log a hash instead")
    assert lines[1] == f"::error file={base}/src/madgroup/run.py,line=3,title=static/no-shell (major)::shell=True"
    assert f"::warning file={base}/src/madgroup/__init__.py,title=static/docs (minor)::no module docstring" in lines
    odd = next(line for line in lines if "security/odd" in line)
    assert odd == (f"::warning file={base}/src/a%2Cb%3Ac.py,line=7,title=security/odd (minor)"
                   "::100%25 sure: a, b%0Asecond line%0D Fix: rename it: a_b.py")
    assert f"::notice file={base}/manifest.json,title=security/overall (info)::fine on the whole" in lines


@pytest.mark.parametrize(("outcome", "command"), [("approve", "notice"), ("undecided", "warning"), ("reject", "error")])
def test_the_first_annotation_says_how_the_gate_ended(layout, outcome, command):
    assert github_annotations(panel_report(outcome), *layout)[0].startswith(f"::{command} title=regen gate::")


def test_escaping_follows_githubs_rules():
    assert escape_data("50%\r\nx: a, b") == "50%25%0D%0Ax: a, b"
    assert escape_property("50%\r\nx: a, b") == "50%25%0D%0Ax%3A a%2C b"
    assert escape_data("%0A") == "%250A"  # a literal escape stays literal


# --- the CLI: `regen gate --sarif` on archived builds with the offline panel (no sandbox: --trust-tests) ------


def gate(tmp_path: Path, *args: str) -> int:
    return main(["gate", "--trust-tests", "--no-cache", "--report", str(tmp_path / "report"), *args])


def test_the_cli_writes_sarif_and_annotations_for_the_newest_build(tmp_path, monkeypatch, capsys):
    # The default offline panel's outcome follows the spec and the archive; whatever it is, the SARIF,
    # the annotations and the exit code agree with it.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    target = tmp_path / "ci" / "out" / "regen.sarif"
    code = gate(tmp_path, "--sarif", str(target))
    out = capsys.readouterr().out
    log = json.loads(target.read_text())
    assert_sarif_shape(log)
    outcome = log["runs"][0]["properties"]["outcome"]
    assert code == EXIT_CODES[outcome], out
    assert log["runs"][0]["properties"]["version"] == NEWEST
    assert all(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].startswith(f"ecosystems/madgroup/{NEWEST}/")
               for r in log["runs"][0]["results"])
    annotations = [line for line in out.splitlines() if line.startswith("::")]
    command = {"approve": "notice", "reject": "error", "undecided": "warning"}[outcome]
    assert annotations[0].startswith(f"::{command} title=regen gate::madgroup {NEWEST}: {outcome}:")
    assert len(annotations) == len(log["runs"][0]["results"]) + 1
    assert f"sarif: {target}" in out and f"gate: {outcome}" in out


def test_without_github_actions_no_annotations_are_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("GITHUB_ACTIONS", "false")
    assert gate(tmp_path) in (0, 1)
    out = capsys.readouterr().out
    assert "gate: " in out and "::" not in out


def test_a_rejected_build_still_gets_its_sarif_with_paths_from_the_root(tmp_path, monkeypatch, capsys):
    # A static reviewer that forbids an import the newest build makes (archives are signed: none is edited here).
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    panel = write_panel(tmp_path, {"strict": {"kind": "static", "focus": "principles",
                                              "options": {"forbid_imports": ["time"]}}})
    importer = f"ecosystems/madgroup/{NEWEST}/src/madgroup/mads/fiedler.py"
    line = (REPO / importer).read_text().splitlines().index("import time") + 1
    code = gate(tmp_path, "--panel", str(panel), "--sarif", str(tmp_path / "regen.sarif"))
    out = capsys.readouterr().out
    assert code == 1, out
    log = json.loads((tmp_path / "regen.sarif").read_text())
    assert_sarif_shape(log)
    assert log["runs"][0]["properties"]["outcome"] == "reject"
    assert {"id": "strict/forbidden-import", "properties": {"focus": "principles"},
            "shortDescription": {"text": "forbidden-import, found by the strict reviewer"}} in log["runs"][0]["tool"]["driver"]["rules"]
    forbidden = [r for r in log["runs"][0]["results"] if r["ruleId"] == "strict/forbidden-import"]
    assert {"level": "error", "uri": importer, "region": {"startLine": line}} in [
        {"level": r["level"], "uri": r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
         "region": r["locations"][0]["physicalLocation"].get("region")} for r in forbidden]
    assert f"::error file={importer},line={line},title=strict/forbidden-import (major)::" in out
    assert out.splitlines()[0].startswith("::")  # annotations first, then the human lines
    assert [x for x in out.splitlines() if x.startswith("::")][0].startswith("::error title=regen gate::")
    assert "gate: reject" in out


def test_an_undecided_gate_writes_its_sarif_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SCRIPTED_API_KEY", raising=False)  # the reviewer has no key: it abstains, no request made
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    panel = write_panel(tmp_path, {"alpha": scripted_reviewer("http://127.0.0.1:9/v1")})
    assert gate(tmp_path, "--panel", str(panel), "--sarif", str(tmp_path / "regen.sarif")) == 2
    out = capsys.readouterr().out
    log = json.loads((tmp_path / "regen.sarif").read_text())
    assert log["runs"][0]["properties"]["outcome"] == "undecided" and log["runs"][0]["results"] == []
    assert "::warning title=regen gate::" in out and "gate: undecided" in out


def test_a_sarif_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    (tmp_path / "file").write_text("")
    assert gate(tmp_path, "--sarif", str(tmp_path / "file" / "regen.sarif")) == 2
    err = capsys.readouterr().err
    assert "cannot write the SARIF" in err and "internal error" not in err


# --- nox -s gate: 2 stays 2 -----------------------------------------------------------------------------------


def test_only_an_undecided_gate_keeps_its_exit_code_through_nox(noxfile):
    assert noxfile.gate_exit(CommandFailed("Returned code 2", return_code=2)) == 2
    assert noxfile.gate_exit(CommandFailed("Returned code 1", return_code=1)) is None  # nox says 1 itself
    assert noxfile.gate_exit(CommandFailed("Returned code 130", return_code=130)) is None
    assert noxfile.gate_exit(CommandFailed("Returned code 2")) == 2  # an older nox: only the reason says it
    assert noxfile.gate_exit(CommandFailed("External program disallowed.")) is None


class FakeSession:
    """What the gate session uses of a nox session; `run` fails with `code` (0: succeeds)."""

    posargs = ["--sarif", "regen.sarif"]

    def __init__(self, code: int):
        self.code, self.ran, self.logged = code, [], []
        self.virtualenv = type("Venv", (), {"location": "/nowhere"})()

    def run_install(self, *args, **kwargs):
        pass

    def run(self, *args, **kwargs):
        self.ran.append(args)
        if self.code:
            raise CommandFailed(f"Returned code {self.code}", return_code=self.code)
        return True

    def log(self, message):
        self.logged.append(message)


def test_the_gate_session_exits_2_when_undecided_and_fails_as_usual_otherwise(noxfile):
    session = FakeSession(0)
    noxfile.gate(session)
    assert session.ran == [("regen", "gate", "--sarif", "regen.sarif")]
    with pytest.raises(SystemExit) as exited:
        noxfile.gate(FakeSession(2))
    assert exited.value.code == 2
    with pytest.raises(CommandFailed):
        noxfile.gate(FakeSession(1))


@pytest.mark.parametrize(("written", "shown"), [
    ("src/madgroup/mads/rogers.py (part 2 of 3)", "src/madgroup/mads/rogers.py"),
    ("b/src/madgroup/mads/rogers.py", "src/madgroup/mads/rogers.py"),
    ("./src/madgroup/mads/rogers.py", "src/madgroup/mads/rogers.py"),
    ("madgroup/mads/rogers.py", "src/madgroup/mads/rogers.py"),
    ("../../../.github/workflows/regen.yml", None),
    ("/etc/passwd", None),
])
def test_finding_paths_are_read_as_paths_inside_the_artifact(written, shown):
    from generator.review.models import artifact_path

    artifact = ARCHIVE / NEWEST
    assert artifact_path(artifact, written) == shown


def test_a_finding_outside_the_artifact_points_at_the_whole_build_and_says_where(layout):
    artifact, root = layout
    report = panel_report()
    escaping = Finding(file="../../.github/workflows/regen.yml", line=3, severity="major", rule="odd", message="edit me")
    final = report.final.model_copy(update={"verdicts": (report.final.verdicts[0].model_copy(
        update={"findings": (escaping,)}),)})
    log = json.loads(sarif(report.model_copy(update={"rounds": (final,)}), artifact, root))
    result = log["runs"][0]["results"][0]
    location = result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"].endswith("/manifest.json") and "region" not in location
    assert result["message"]["text"].startswith("../../.github/workflows/regen.yml: edit me")
