"""A panel's findings as CI reads them: SARIF 2.1.0 for code scanning, and GitHub workflow commands.

Only the final round counts (report.final): earlier rounds' findings were revised or repaired.
A finding's `file` is relative to the artifact folder; CI wants it relative to the repository
root, so every location is the artifact's path joined with the file, made relative to `root`
(an artifact outside `root` is located by its absolute path). A finding about the whole build
(no file) is located at the artifact's manifest.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from .. import __version__
from .models import SEVERITIES, Finding, PanelReport, Severity, artifact_path

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVELS: dict[Severity, str] = {"critical": "error", "major": "error", "minor": "warning", "info": "note"}
COMMANDS: dict[Severity, str] = {"critical": "error", "major": "error", "minor": "warning", "info": "notice"}
OUTCOME_COMMANDS: dict[str, str] = {"approve": "notice", "reject": "error", "undecided": "warning"}
WHOLE_BUILD = "manifest.json"  # where a finding with no file is located


def rule_id(reviewer: str, finding: Finding) -> str:
    """'static/no-shell': the reviewer that found it and its rule, stable from run to run."""
    return f"{reviewer}/{finding.rule}"


def text(finding: Finding) -> str:
    """The message, and how to fix it when the reviewer said."""
    return f"{finding.message} Fix: {finding.suggestion}" if finding.suggestion else finding.message


class _Located:
    """A finding of the final round with where CI shows it."""

    def __init__(self, reviewer: str, finding: Finding, artifact: Path, root: Path):
        self.reviewer = reviewer
        self.finding = finding
        self.rule = rule_id(reviewer, finding)
        file = artifact_path(artifact, finding.file)
        if file is None and finding.file is not None:  # a path CI cannot show: the whole build, the path in words
            finding = finding.model_copy(update={"message": f"{finding.file}: {finding.message}"})
            self.finding = finding
        target = Path(os.path.normpath(artifact / (file or WHOLE_BUILD)))
        try:
            relative = PurePosixPath(*target.relative_to(root).parts)
        except ValueError:  # outside the repository: the absolute path
            self.path = target.as_posix()
            self.uri = target.as_uri()
        else:
            self.path = relative.as_posix()
            self.uri = quote(self.path)
        self.line = finding.line if file is not None else None

    @property
    def key(self) -> tuple:
        return self.uri, self.line or 0, self.rule, text(self.finding), self.finding.severity


def _located(report: PanelReport, artifact: Path, root: Path) -> list[_Located]:
    artifact, root = Path(artifact).resolve(), Path(root).resolve()
    verdicts = report.final.verdicts if report.rounds else ()
    found = [_Located(v.reviewer, f, artifact, root) for v in verdicts for f in v.findings]
    return sorted(found, key=lambda item: item.key)


def _focus(report: PanelReport, reviewer: str) -> str | None:
    definition = (report.panel_definition.get("reviewers") or {}).get(reviewer)
    return definition.get("focus") if isinstance(definition, dict) else None


def _rules(report: PanelReport, located: list[_Located]) -> Iterator[dict]:
    seen: dict[str, _Located] = {}
    for item in located:
        seen.setdefault(item.rule, item)
    for rule in sorted(seen):
        item = seen[rule]
        focus = _focus(report, item.reviewer)
        entry = {"id": rule, "shortDescription": {"text": f"{item.finding.rule}, found by the {item.reviewer} reviewer"}}
        if focus:
            entry["properties"] = {"focus": focus}
        yield entry


def _result(item: _Located, round_: int) -> dict:
    physical: dict = {"artifactLocation": {"uri": item.uri}}
    if item.line:
        physical["region"] = {"startLine": item.line}
    return {
        "ruleId": item.rule,
        "level": LEVELS[item.finding.severity],
        "message": {"text": text(item.finding)},
        "locations": [{"physicalLocation": physical}],
        "properties": {"reviewer": item.reviewer, "severity": item.finding.severity, "round": round_},
    }


def sarif_log(report: PanelReport, artifact: Path, root: Path) -> dict:
    """The SARIF 2.1.0 log of `report`'s final round, as a dict."""
    located = _located(report, artifact, root)
    run = {
        "tool": {"driver": {"name": "regen", "version": __version__, "rules": list(_rules(report, located))}},
        "invocations": [{"executionSuccessful": True}],
        "results": [_result(item, report.final.number) for item in located],  # none when there is no round
        "properties": {"outcome": report.outcome, "reason": report.reason, "ecosystem": report.ecosystem,
                       "version": report.version, "panel": report.panel},
    }
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}


def sarif(report: PanelReport, artifact: Path, root: Path) -> str:
    """SARIF 2.1.0 JSON of `report`'s final round: the same report, artifact and root give the same bytes."""
    return json.dumps(sarif_log(report, artifact, root), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_sarif(report: PanelReport, artifact: Path, root: Path, path: Path) -> None:
    """`sarif(...)` to `path`, parent folders made, replaced whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        temporary.write_bytes(sarif(report, artifact, root).encode("utf-8"))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --- GitHub Actions workflow commands -------------------------------------------------------


def escape_data(value: str) -> str:
    """A workflow command's message: %, CR and LF escaped, as GitHub's runner unescapes them."""
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(value: str) -> str:
    """A workflow command's property (file=, title=): the message's escapes, and ':' and ','."""
    return escape_data(value).replace(":", "%3A").replace(",", "%2C")


def command(name: str, message: str, **properties: str | int | None) -> str:
    """`::name key=value,...::message`, properties in the order given, None left out."""
    given = ",".join(f"{key}={escape_property(str(value))}" for key, value in properties.items() if value is not None)
    return f"::{name}{' ' + given if given else ''}::{escape_data(message)}"


def outcome_annotation(outcome: str, message: str) -> str:
    """The one line that says how the gate ended: an error for reject, a warning for undecided, else a notice."""
    return command(OUTCOME_COMMANDS.get(outcome, "warning"), message, title="regen gate")


def github_annotations(report: PanelReport, artifact: Path, root: Path) -> list[str]:
    """One workflow command for the outcome, then one per finding of the final round.

    The outcome and the most severe findings come first (then as in the SARIF): GitHub shows only
    so many annotations of a kind per step, and drops the rest from the summary (never from the log).
    """
    located = sorted(_located(report, artifact, root), key=lambda item: SEVERITIES.index(item.finding.severity))
    reason = " ".join(report.reason.split())
    lines = [outcome_annotation(report.outcome, f"{report.ecosystem} {report.version}: {report.outcome}: {reason}")]
    return lines + [command(COMMANDS[item.finding.severity], text(item.finding), file=item.path, line=item.line,
                            title=f"{item.rule} ({item.finding.severity})")
                    for item in located]
