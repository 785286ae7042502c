"""Stage 6, review: the panel judges the build; findings that block consensus go back to their units.

    review (round 1, optional round 2) → consensus
        → reject with findings a unit can fix? a repair round for those units, tests again, review again
    approve: on to the archive; reject (exit 1) or undecided (exit 2): nothing archived, the review
    goes to `.regen/reports/<name>/<version>/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifact.history import changes
from ..errors import BuildFailed, RepairFromReviewFailed, ReviewUndecided
from ..hashing import canonical_json, sha256_text, tree_hashes
from ..review.gate import write_report
from ..review.material import material
from ..review.models import BLOCKING, Finding, PanelReport, ReviewBinding, Subject, Verdict, artifact_path
from ..review.run import PanelRun, panel_report
from ..review.scope import choose, panel_hash, reviewed_hash
from ..sandbox.run import SandboxResult
from ..senior.models import Exchange
from ..senior.synthesise import Synthesis
from ..spec.model import Spec
from ..spec.plan import Plan
from .archive import draft, side
from .context import BuildContext
from .prepare import Prepared
from .produce import Produced, sandbox, spent, write


@dataclass(frozen=True)
class Judged:
    """The panel's report on the build, and the build it approved (after any repairs it asked for)."""

    review: PanelReport
    synthesis: Synthesis
    tests: SandboxResult
    review_exchanges: tuple[Exchange, ...] = ()
    """The LLM reviewers' requests and answers, for the transcript (the review replays from it)."""


def judge(ctx: BuildContext, prepared: Prepared, produced: Produced, stage: Path) -> Judged:
    panel = prepared.given.panel
    run = PanelRun(panel, ctx.reviewers, prepared.pipeline.prices, prepared.cache,
                   on_verdict=lambda v: ctx.report.progress("review", v.line), on_event=prepared.run_log.record)
    parent = prepared.ecosystem_dir / prepared.parent.version if prepared.parent else None
    baseline, scope = choose(prepared.pipeline.review.scope, panel, prepared.ecosystem_dir,
                             prepared.parent.version if prepared.parent else None)
    synthesis, tests = produced.synthesis, produced.tests
    rounds: list = []
    repairs, previous = 0, None
    while True:
        subject = Subject(artifact=stage, parent=parent, spec=prepared.spec,
                          material=material(prepared.spec, stage, baseline, draft(prepared, synthesis, tests),
                                            tests.record(), scope))
        with ctx.report.stage("review", f"panel {panel.name}: {', '.join(r.name for r in panel.reviewers)}") as info:
            rounds += run.review(subject, first_round=len(rounds) + 1, review=repairs + 1)
            info["note"] = f"{rounds[-1].consensus.outcome}: {rounds[-1].consensus.arithmetic}"
        blocking = findings_by_unit(prepared.plan, rounds[-1].verdicts, stage, prepared.spec)
        if rounds[-1].consensus.outcome != "reject" or repairs == panel.definition.repair_rounds:
            break
        if not blocking or blocking == previous:  # nothing a unit can fix, or the repair changed nothing
            break
        previous, repairs = blocking, repairs + 1
        try:
            synthesis, tests = _repair(ctx, prepared, produced, synthesis, blocking, repairs, stage / "src")
        except BuildFailed as exc:
            _refuse(ctx, prepared, RepairFromReviewFailed(f"the repair the review asked for failed: {exc}",
                                                          panel_report(subject, panel, rounds, repairs)))
        if not tests.ok:
            _refuse(ctx, prepared, RepairFromReviewFailed(
                f"after repairing from the review, the ecosystem's own tests failed in the sandbox "
                f"({tests.failed} failed, {tests.errors} errors)\n{tests.output_tail}",
                panel_report(subject, panel, rounds, repairs)))
    review = panel_report(subject, panel, rounds, repairs)
    if parent is not None:  # what changed goes into the report people read instead of the tree
        review = review.model_copy(update={"changes": changes(parent, stage, side(prepared)).summary()})
    read = {f"src/{path}": digest for path, digest in tree_hashes(stage / "src").items()}
    read["tests.json"] = sha256_text(canonical_json(tests.record()))  # as archive() will write it
    review = review.model_copy(update={"bound": ReviewBinding(
        artifact=f"{prepared.spec.ecosystem.name}@{prepared.version}", reviewed_hash=reviewed_hash(read),
        panel_hash=panel_hash(panel), scope=scope)})
    for line in review.uncertainties:
        ctx.report.warn(line)
    if review.outcome != "approve":  # kept outside the archive, where the user can read why
        folder = _report_folder(ctx, prepared)
        write_report(review, folder)
        where = f"nothing archived; the review is in {folder}/review.md"
        if review.outcome == "undecided":
            raise ReviewUndecided(f"the {panel.name} panel could not decide: {review.reason}; {where}")
        raise BuildFailed(f"the {panel.name} panel rejected the build: {review.reason}; {where}")
    if prepared.replay is not None and (left := [u.name for u in prepared.plan.units if prepared.replay.unanswered(u.name)]):
        ctx.report.warn(f"the replay needed fewer repairs than the recorded build (units {', '.join(left)}): "
                        "its tests passed earlier, so this artifact may differ from the one replayed")
    return Judged(review=review, synthesis=synthesis, tests=tests, review_exchanges=tuple(run.exchanges))


def _repair(ctx: BuildContext, prepared: Prepared, produced: Produced, synthesis: Synthesis,
            findings: dict[str, list[str]], repairs: int, src: Path) -> tuple[Synthesis, SandboxResult]:
    with ctx.report.stage("repair", f"units {', '.join(findings)} from the review's findings") as info:
        synthesis = produced.run.repair_units(synthesis, findings, prepared.pipeline.repair_rounds + repairs, "review")
        info["note"] = spent(synthesis)
    write(ctx, prepared, synthesis, src)
    return synthesis, sandbox(ctx, prepared, src)


def _report_folder(ctx: BuildContext, prepared: Prepared) -> Path:
    return ctx.options.reports_dir / prepared.spec.ecosystem.name / prepared.version


def _refuse(ctx: BuildContext, prepared: Prepared, failed: RepairFromReviewFailed) -> None:
    folder = _report_folder(ctx, prepared)
    write_report(failed.review, folder)
    raise BuildFailed(f"{failed}\nNothing archived; the review that asked for the repair is in {folder}/review.md") from failed


def findings_by_unit(plan: Plan, verdicts: tuple[Verdict, ...], artifact: Path,
                     spec: Spec | None = None) -> dict[str, list[str]]:
    """Blocking findings of the reviewers that did not approve (critical ones of any reviewer), by the unit
    that wrote the file. A requirement no test covers goes to the units whose tests are to prove it (the MADs
    that name it, else the frame, whose end-to-end tests prove the acceptance areas). A finding in a file no
    unit writes (the kernel, the lock) is for people, not the senior."""
    blocking: dict[str, list[str]] = {}
    for verdict in verdicts:
        for f in verdict.findings:
            if f.severity not in BLOCKING or (verdict.decision == "approve" and f.severity != "critical"):
                continue
            fix = f" Fix: {f.suggestion}" if f.suggestion else ""
            for owner in _owners(plan, f, artifact, spec):
                blocking.setdefault(owner, []).append(
                    f"{f.where} [{f.severity}] {f.rule}: {f.message}{fix} ({verdict.reviewer})")
    return {unit: sorted(problems) for unit, problems in sorted(blocking.items())}


def _owners(plan: Plan, finding: Finding, artifact: Path, spec: Spec | None) -> list[str]:
    if finding.rule == "uncovered-requirement" and spec is not None:
        requirement = next((r for r in spec.requirement_items if r.line == finding.line), None)
        if requirement is not None:
            mads = {ref.split(":", 1)[1] for ref in spec.requirement_references().get(requirement.id, ())
                    if ref.startswith("mad:")}
            owners = [u.name for u in plan.units if u.mad in mads]
            return owners or [u.name for u in plan.units if u.kind == "frame"]
    path = artifact_path(artifact, finding.file)  # however the reviewer wrote it: b/src/x.py, x.py (part 2 of 3)
    if path is None or not path.startswith("src/"):
        return []
    return [u.name for u in plan.units if u.may_write(path.removeprefix("src/"))][:1]
