"""The review stage's typed boundaries: findings, verdicts, and the material reviewers see."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..artifact.history import ChangedFile
from ..frozen import Frozen
from ..spec.model import Spec

Severity = Literal["critical", "major", "minor", "info"]
Decision = Literal["approve", "request_changes"]
SEVERITIES: tuple[Severity, ...] = ("critical", "major", "minor", "info")
BLOCKING: frozenset[Severity] = frozenset({"critical", "major"})  # findings that make a reviewer request changes


class Finding(Frozen):
    """One problem a reviewer found, located as precisely as it can be."""

    file: str | None = Field(default=None, description="path inside the artifact, e.g. src/madgroup/mads/turing.py")
    line: int | None = Field(default=None, ge=1)
    severity: Severity
    rule: str = Field(min_length=1, description="a short stable name: secret-in-log, failing-test, ...")
    message: str = Field(min_length=1)
    suggestion: str = Field(default="", description="how to fix it")

    @property
    def where(self) -> str:
        if self.file is None:
            return "(artifact)"
        return f"{self.file}:{self.line}" if self.line else self.file


class VerdictAnswer(Frozen):
    """What a reviewer answers: the JSON shape an LLM reviewer must return, validated as is."""

    decision: Decision
    summary: str = Field(min_length=1, description="one or two sentences")
    findings: list[Finding] = Field(default_factory=list)


class Verdict(Frozen):
    """One reviewer's verdict in one round, with what it cost; an abstention records why."""

    reviewer: str
    kind: str = Field(description="llm, or the deterministic check: tests, static, dependencies")
    round: int = Field(ge=1)
    decision: Decision | Literal["abstain"]
    summary: str
    findings: tuple[Finding, ...] = ()
    error: str | None = Field(default=None, description="why the reviewer abstained")
    model: str | None = None
    weight: float = 1.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    chunks: int = Field(default=1, description="how many focused requests the material was split into")
    revised: bool = Field(default=False, description="round 2 changed this reviewer's round-1 decision")

    @property
    def critical(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "critical")

    @property
    def line(self) -> str:
        """One line of progress: reviewer, decision, how many findings, why it abstained."""
        found = f", {len(self.findings)} findings" if self.findings else ""
        return f"{self.reviewer}: {self.decision}{found}" + (f" ({self.error})" if self.error else "")


class Material(Frozen):
    """Everything reviewers see about one build: what it must do, what changed, how it tested."""

    ecosystem: str
    version: str
    parent: str | None
    requirements: str
    principles: str
    manifest: dict
    tests: dict = Field(description="tests.json: the sandbox results")
    changed: tuple[ChangedFile, ...] = Field(description="src/ against the parent; every file on a first build")
    unchanged: int = Field(default=0, description="files identical to the parent's, not shown")


Outcome = Literal["approve", "reject", "undecided"]
EXIT_CODES: dict[str, int] = {"approve": 0, "reject": 1, "undecided": 2}


class Consensus(Frozen):
    """The panel's rule applied to one round's verdicts, with the arithmetic shown."""

    rule: str = Field(description="as a person reads it: 'unanimous', '2 of 3', 'weighted >= 0.67', plus veto")
    outcome: Outcome
    reason: str = Field(description="one line: why this outcome")
    arithmetic: str = Field(description="the counts and weights the outcome follows from")
    approvals: int
    rejections: int
    abstentions: int
    quorum: int = Field(description="verdicts needed to decide")
    vetoed_by: tuple[str, ...] = ()

    @property
    def quorum_met(self) -> bool:
        return self.approvals + self.rejections >= self.quorum


class Round(Frozen):
    number: int = Field(ge=1, description="rounds in order across the whole review, repairs included")
    review: int = Field(default=1, ge=1, description="1 for the first review, 2 after the first repair, ...")
    phase: Literal["independent", "revision"] = Field(
        default="independent", description="round 1 of a review, or its round 2 where reviewers may revise")
    verdicts: tuple[Verdict, ...]
    consensus: Consensus


class PanelReport(Frozen):
    """review.json: every round's verdicts, the consensus, dissent, and what it cost."""

    ecosystem: str
    version: str
    parent: str | None
    panel: str
    panel_definition: dict = Field(description="the panel and its reviewers as loaded, rubric hashes included")
    rounds: tuple[Round, ...] = Field(description="review rounds in order; a repair starts a new review")
    outcome: Outcome
    reason: str
    repairs: int = Field(default=0, description="repair rounds the senior made from review findings")
    dissent: tuple[str, ...] = Field(default=(), description="reviewers whose final decision differs from the outcome")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    changes: dict | None = Field(default=None, description="what changed since the parent: spec, tools, schema, "
                                                           "dependencies, files (history.Changes.summary())")
    carried: tuple[str, ...] = Field(default=(), description="a line per model-written tool the offline senior "
                                                             "carried from an archived build: from where, by whom")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    @property
    def final(self) -> Round:
        return self.rounds[-1]


@dataclass(frozen=True)
class Subject:
    """A build under review: its folder (src/, manifest.json, tests.json), its parent's, its spec."""

    artifact: Path
    parent: Path | None
    spec: Spec
    material: Material
