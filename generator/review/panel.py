"""Reviewer and panel definitions from `reviews/`, and the consensus rules that decide.

    reviews/panels/<panel>.toml       which reviewers sit, the consensus rule, rounds
    reviews/reviewers/<name>.toml     one reviewer: an LLM (model + rubric) or a deterministic check
    reviews/rubrics/<focus>.md        what an LLM reviewer looks for, in prose

A panel names its reviewers; each name is a file in the `reviewers/` folder beside the
panel's folder. Rubric paths are relative to the reviewer's file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import Pipeline, SeniorModel, load_toml
from ..errors import UserError
from ..frozen import Frozen
from .models import BLOCKING, Consensus, Verdict

Focus = Literal["security", "correctness", "principles", "operability", "tests", "dependencies"]


class ReviewerDefinition(Frozen):
    kind: Literal["llm", "tests", "static", "dependencies"]
    focus: Focus
    weight: float = Field(default=1.0, gt=0, description="its vote under the weighted rule")
    rubric: str | None = Field(default=None, description="LLM reviewers: the rubric file, relative to this file")
    model: SeniorModel | None = Field(default=None, description="LLM reviewers: the model and its parameters")
    options: dict = Field(default_factory=dict, description="deterministic reviewers: the check's options")

    @model_validator(mode="after")
    def _kind_needs(self) -> ReviewerDefinition:
        if self.kind == "llm" and (self.model is None or self.rubric is None):
            raise ValueError("an llm reviewer needs a [model] table and a rubric file")
        if self.kind != "llm" and (self.model is not None or self.rubric is not None):
            raise ValueError(f"a {self.kind} reviewer is deterministic: it takes [options], not a model or a rubric")
        if self.kind == "llm" and self.options:
            raise ValueError("an llm reviewer takes no [options]; its behaviour is its rubric")
        return self


class ConsensusRule(Frozen):
    rule: Literal["unanimous", "k_of_n", "weighted"] = "unanimous"
    k: int | None = Field(default=None, ge=1, description="k_of_n: approvals needed")
    threshold: float | None = Field(default=None, gt=0, le=1, description="weighted: share of the voting weight")
    veto_on_critical: bool = Field(default=True, description="any critical finding rejects, whatever the votes")
    quorum: int | None = Field(default=None, ge=1, description="verdicts needed to decide; default: every reviewer")

    @model_validator(mode="after")
    def _rule_needs(self) -> ConsensusRule:
        if self.rule == "k_of_n" and self.k is None:
            raise ValueError("rule 'k_of_n' needs k, the number of approvals required")
        if self.rule == "weighted" and self.threshold is None:
            raise ValueError("rule 'weighted' needs threshold, the share of voting weight that must approve (0-1]")
        return self


class PanelDefinition(Frozen):
    description: str = ""
    reviewers: list[str] = Field(min_length=1)
    consensus: ConsensusRule = ConsensusRule()
    second_round: bool = Field(default=False, description="each reviewer sees round 1's verdicts and may revise")
    repair_rounds: int = Field(default=1, ge=0, description="senior repairs from blocking findings, then review again")
    budget_tokens: int | None = Field(default=None, gt=0, description="all reviewers together, per review")
    budget_usd: float | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class Reviewer:
    name: str
    definition: ReviewerDefinition
    rubric: str  # the rubric's text; empty for deterministic reviewers
    file: Path

    @property
    def kind(self) -> str:
        return self.definition.kind


@dataclass(frozen=True)
class Panel:
    name: str
    file: Path
    definition: PanelDefinition
    reviewers: tuple[Reviewer, ...]
    files: dict[str, bytes] = field(default_factory=dict, compare=False)
    """Every file the panel is made of, read once when loaded (the build's inputs and the artifact's copy are
    these bytes), by path relative to the reviews/ folder: panels/x.toml, reviewers/y.toml, rubrics/z.md."""

    def describe(self) -> dict:
        """The panel as loaded, for review.json: definitions and rubric hashes."""
        return {
            "name": self.name,
            **self.definition.model_dump(mode="json"),
            "reviewers": {
                r.name: {**r.definition.model_dump(mode="json", exclude_defaults=True),
                         **({"rubric_sha256": hashlib.sha256(r.rubric.encode()).hexdigest()} if r.rubric else {})}
                for r in self.reviewers
            },
        }


# The deterministic checks (review/deterministic.py) and the options each accepts in a reviewer file.
CHECK_OPTIONS: dict[str, frozenset[str]] = {
    "tests": frozenset({"require_level"}),
    "static": frozenset({"forbid_imports", "forbid_calls", "exclude"}),
    "dependencies": frozenset(),
}
DETERMINISTIC_KINDS = tuple(CHECK_OPTIONS)


def check_options(kind: str, options: dict) -> None:
    """A UserError for an unknown check or option: panels are checked when loaded, before any spend."""
    if kind not in CHECK_OPTIONS:
        raise UserError(f"unknown deterministic check {kind!r}; expected one of {', '.join(DETERMINISTIC_KINDS)}")
    for key in sorted(options):
        if key not in CHECK_OPTIONS[kind]:
            expected = ", ".join(sorted(CHECK_OPTIONS[kind])) or "none"
            raise UserError(f"unknown option {key!r} for the {kind} check; accepted options: {expected}")


def load_panel(path: Path) -> Panel:
    """The panel file and every reviewer and rubric it names, validated; errors name the file."""
    definition = load_toml(path, PanelDefinition, "panel file", "reviews/panels/offline.toml", "--panel ")
    if len(set(definition.reviewers)) != len(definition.reviewers):
        raise UserError(f"{path}: 'reviewers' names a reviewer twice; each sits on the panel once")
    folder = path.parent.parent / "reviewers"
    reviewers = []
    for name in definition.reviewers:
        file = folder / f"{name}.toml"
        if not file.is_file():
            known = sorted(p.stem for p in folder.glob("*.toml"))
            raise UserError(f"{path}: reviewer {name!r} has no file {file}; known reviewers: {', '.join(known) or 'none'}")
        reviewer = load_toml(file, ReviewerDefinition, "reviewer file", "reviews/reviewers/tests.toml")
        rubric = ""
        if reviewer.rubric:
            rubric_file = file.parent / reviewer.rubric
            try:
                rubric = rubric_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"{file}: rubric {reviewer.rubric!r} cannot be read ({exc}); "
                                "give a UTF-8 markdown file relative to the reviewer file") from None
        if reviewer.kind != "llm":
            try:
                check_options(reviewer.kind, reviewer.options)
            except UserError as exc:
                raise UserError(f"{file}: {exc}") from None
        reviewers.append(Reviewer(name=name, definition=reviewer, rubric=rubric, file=file))
    rule = definition.consensus
    n = len(reviewers)
    for label, value in (("k", rule.k), ("quorum", rule.quorum)):
        if value is not None and value > n:
            raise UserError(f"{path}: consensus.{label} = {value} but the panel has only {n} reviewers")
    return Panel(name=path.stem, file=path, definition=definition, reviewers=tuple(reviewers),
                 files=_files(path, reviewers))


def _files(path: Path, reviewers: list[Reviewer]) -> dict[str, bytes]:
    """The panel's files by path under its reviews/ folder; one outside it could not be kept with an artifact."""
    root = path.parent.parent.resolve()
    found = {path: path.read_bytes()}
    for reviewer in reviewers:
        found[reviewer.file] = reviewer.file.read_bytes()
        if reviewer.definition.rubric:
            rubric = (reviewer.file.parent / reviewer.definition.rubric).resolve()
            found[rubric] = rubric.read_bytes()
    files = {}
    for file, data in sorted(found.items()):
        try:
            files[file.resolve().relative_to(root).as_posix()] = data
        except ValueError:
            raise UserError(f"{file} lies outside {root}, the folder of the panel's panels/, reviewers/ and rubrics/: "
                            "an artifact keeps a copy of its panel to replay its review, so keep every file in it") from None
    return files


def rule_text(rule: ConsensusRule, n: int, veto: bool = True) -> str:
    if rule.rule == "k_of_n":
        text = f"{rule.k} of {n}"
    elif rule.rule == "weighted":
        text = f"weighted >= {rule.threshold:g}"
    else:
        text = "unanimous"
    return text + (", veto on critical" if veto and rule.veto_on_critical else "")


EPSILON = 1e-9  # weights are floats: 2/3 of the weight meets a threshold of 0.666666667


def decide(rule: ConsensusRule, verdicts: list[Verdict]) -> Consensus:
    """Apply the rule to one round. Abstentions never count as approval: where the abstainers
    could have swung the outcome, or fewer than `quorum` voted, the panel is undecided."""
    n = len(verdicts)
    voting = [v for v in verdicts if v.decision != "abstain"]
    approving = [v for v in voting if v.decision == "approve"]
    abstaining = [v for v in verdicts if v.decision == "abstain"]
    quorum = rule.quorum or n
    # A critical finding vetoes even from a reviewer that abstained after finding it (a later chunk failed).
    vetoes = [v for v in verdicts if v.critical] if rule.veto_on_critical else []
    approve_weight = sum(v.weight for v in approving)
    abstain_weight = sum(v.weight for v in abstaining)
    total_weight = sum(v.weight for v in verdicts)
    arithmetic = (f"{len(approving)} approve, {len(voting) - len(approving)} request changes, {len(abstaining)} abstain "
                  f"of {n}; quorum {len(voting)}/{quorum}"
                  + (f"; approving weight {approve_weight:g} of {total_weight:g}" if rule.rule == "weighted" else ""))

    def outcome(result: str, reason: str) -> Consensus:
        return Consensus(
            rule=rule_text(rule, n), outcome=result, reason=reason, arithmetic=arithmetic,
            approvals=len(approving), rejections=len(voting) - len(approving), abstentions=len(abstaining),
            quorum=quorum, vetoed_by=tuple(v.reviewer for v in vetoes),
        )

    abstained = "; ".join(f"{v.reviewer}: {v.error}" for v in abstaining)
    if vetoes:  # rejecting on partial information is safe; approving is not
        first = vetoes[0].critical[0]
        return outcome("reject", f"veto by {vetoes[0].reviewer}: {first.where} {first.rule}: {first.message}")
    if len(voting) < quorum:
        return outcome("undecided", f"only {len(voting)} of {n} reviewers gave a verdict, quorum is {quorum} ({abstained})")
    # Approve only if the rule holds with every abstainer against; reject only if it fails with every abstainer for.
    if rule.rule == "unanimous":  # over the reviewers that voted, the quorum having been met
        approved, possible = len(approving) == len(voting), len(approving) == len(voting)
    elif rule.rule == "k_of_n":
        k = rule.k or n
        approved, possible = len(approving) >= k, len(approving) + len(abstaining) >= k
    else:
        needed = (rule.threshold or 1.0) * total_weight - EPSILON
        approved, possible = approve_weight >= needed, approve_weight + abstain_weight >= needed
    if approved:
        also = f"; abstained: {', '.join(v.reviewer for v in abstaining)}" if abstaining else ""
        return outcome("approve", f"{len(approving)} of {n} reviewers approve ({rule_text(rule, n)}){also}")
    if possible:
        return outcome("undecided", f"{rule_text(rule, n, veto=False)} is neither met nor ruled out: "
                                    f"{len(approving)} approve, and the abstentions could decide it ({abstained})")
    against = [v for v in voting if v.decision == "request_changes"]
    blocking = [f for v in against for f in v.findings if f.severity in BLOCKING]
    detail = f": {blocking[0].where} {blocking[0].rule}: {blocking[0].message}" if blocking else ""
    return outcome("reject", f"changes requested by {', '.join(v.reviewer for v in against)}"
                   f" ({rule_text(rule, n, veto=False)} not met){detail}")


# The deterministic panel, beside the compiler in a checkout: what a pipeline gets unless it names one.
DEFAULT_PANEL = Path(__file__).resolve().parents[2] / "reviews" / "panels" / "offline.toml"


def panel_of(pipeline: Pipeline, pipeline_file: Path) -> Panel:
    """The panel a pipeline names (relative to the pipeline file), else the deterministic one."""
    return load_panel(pipeline_file.parent / pipeline.review.panel if pipeline.review.panel else DEFAULT_PANEL)
