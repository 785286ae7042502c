"""The review stage's typed boundaries: findings, verdicts, and the material reviewers see."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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


_PART = re.compile(r" \(part \d+ of \d+\)$")


def artifact_path(artifact: Path, file: str | None) -> str | None:
    """A finding's file as a path inside the artifact, however a reviewer wrote it (`b/src/x.py`, `./src/x.py`,
    `src/x.py (part 2 of 3)`, `madgroup/x.py` for `src/madgroup/x.py`); None when it is no path inside it."""
    if not file:
        return None
    path = _PART.sub("", file.strip()).removeprefix("./")
    if path.startswith(("a/", "b/")) and not (artifact / path).exists():
        path = path[2:]
    if not (artifact / path).exists() and (artifact / "src" / path).exists():
        path = f"src/{path}"
    normal = os.path.normpath(path)
    if os.path.isabs(normal) or normal == ".." or normal.startswith("../"):
        return None
    return PurePosixPath(*Path(normal).parts).as_posix()


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
    correction: str | None = Field(default=None, description="why the decision differs from what the reviewer said: "
                                                             "an approval with a blocking finding requests changes")
    cached: int = Field(default=0, description="answers taken from the response cache (they cost nothing this time)")
    price_known: bool = Field(default=True, description="False when a model's price is unknown: cost_usd is then a floor")
    notes: tuple[str, ...] = Field(default=(), description="what is uncertain about this verdict: an unknown window, ...")

    @property
    def critical(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "critical")

    @property
    def line(self) -> str:
        """One line of progress: reviewer, decision, how many findings, why it abstained."""
        found = f", {len(self.findings)} findings" if self.findings else ""
        return f"{self.reviewer}: {self.decision}{found}" + (f" ({self.error})" if self.error else "")


ScopeMode = Literal["parent", "approved", "full"]


class ReviewScope(Frozen):
    """What LLM reviewers were shown of `src/`, and why (review/scope.py)."""

    mode: ScopeMode = Field(description="parent: the diff against the parent; approved: against the last version a "
                                        "panel at least this strict approved; full: every file")
    baseline: str | None = Field(description="the version the diff is against; None: the whole tree was shown")
    baseline_root_hash: str | None = Field(default=None, description="that version's manifest root_hash, so the "
                                                                     "diff can be checked against the very same code")
    reason: str = Field(description="in words: why this baseline (or none)")


class Material(Frozen):
    """Everything reviewers see about one build: what it must do, what changed, how it tested."""

    ecosystem: str
    version: str
    parent: str | None
    requirements: str
    principles: str
    manifest: dict
    tests: dict = Field(description="tests.json: the sandbox results")
    changed: tuple[ChangedFile, ...] = Field(description="src/ against the scope's baseline; every file without one")
    unchanged: int = Field(default=0, description="files identical to the baseline's, not shown")
    scope: ReviewScope


class TestProof(Frozen):
    __test__ = False  # not a pytest class

    id: str = Field(description="the test, as tests.json names it")
    outcome: str = Field(description="passed, failed, error or skipped")


class RequirementCoverage(Frozen):
    """One requirement of spec/requirements.md and the sandbox tests that name it."""

    id: str
    text: str = Field(description="the requirement's Markdown, as written")
    line: int = Field(description="its line in spec/requirements.md")
    tests: tuple[TestProof, ...] = ()
    covered: bool = Field(description="at least one test that names it passed")


class ReviewBinding(Frozen):
    """What a review judged, so that it cannot be passed off as the review of anything else."""

    artifact: str = Field(description="<ecosystem>@<version>")
    reviewed_hash: str = Field(description="root hash over what the panel read: every file of src/ and tests.json, "
                                           "by artifact path (the manifest's outputs restricted to those)")
    artifact_root_hash: str | None = Field(default=None, description="the judged artifact's manifest root_hash: set "
                                           "when an archived artifact was judged (`regen gate`); a build's own review "
                                           "is inside the artifact, and the signature covers it")
    panel_hash: str = Field(description="hash of the panel's files: the panel, its reviewer files and rubrics")
    scope: ReviewScope


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
    bound: ReviewBinding | None = Field(default=None, description="what was judged; None in reviews before regen 0.12")
    requirements: tuple[RequirementCoverage, ...] = Field(
        default=(), description="every requirement with an id, the tests that name it, and whether one passed")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    def archived(self) -> PanelReport:
        """The report as an artifact keeps it: cache hits vary run to run (they are shown on screen), the verdicts
        do not, so the same answers give the same review.json."""
        return self.model_copy(update={"rounds": tuple(
            r.model_copy(update={"verdicts": tuple(v.model_copy(update={"cached": 0}) for v in r.verdicts)})
            for r in self.rounds)})

    @property
    def price_known(self) -> bool:
        return all(v.price_known for r in self.rounds for v in r.verdicts)

    @property
    def uncertainties(self) -> list[str]:
        """What the report cannot vouch for, a line each: verdicts reused from the cache, costs of models whose
        price is unknown, requests sent without knowing the window. Shown on screen and in review.md/html."""
        lines: list[str] = []
        verdicts = [v for r in self.rounds for v in r.verdicts]
        cached = sorted({v.reviewer for v in verdicts if v.cached})
        if cached:
            lines.append(f"verdicts of {', '.join(cached)} were reused from the response cache (.regen/cache), not asked "
                         "again; run with --no-cache to ask every reviewer afresh")
        unpriced = sorted({f"{v.reviewer} ({v.model})" for v in verdicts if not v.price_known})
        if unpriced:
            lines.append(f"price unknown for {', '.join(unpriced)}: their cost is not counted, so the total is a floor; "
                         "add the models to [prices] in the pipeline file")
        lines += sorted({f"{v.reviewer}: {note}" for v in verdicts for note in v.notes})
        return lines


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
