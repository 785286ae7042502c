"""`regen verify` for the review: review.json belongs to its artifact, and the review replays byte for byte.

An artifact keeps what its review needs: the panel's files (`reviews/`, as the manifest's inputs
record them), the reviewers' exchanges (in the transcript, after the senior's), the tests' results
(tests.json) and the spec. Replaying runs the same panel on the artifact again, the deterministic
checks for real and each LLM reviewer answered from the transcript by the exact request it sent,
and compares the review.json that comes out with the archived one, byte for byte.

What it needs beside the artifact: the version the reviewers' diff was against (the scope's baseline)
and the parent (the dependencies check and "changes since"), both in the archive folder. When one is
missing, or the artifact predates bound reviews, it says exactly that and replays nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from ..artifact.history import changes
from ..artifact.manifest import Manifest
from ..errors import BuildFailed, RegenError
from ..hashing import json_hash
from ..senior.models import ModelReply, ModelRequest
from ..senior.transcript import TRANSCRIPT, TranscriptModel
from ..spec.load import load_spec
from .llm import ROUND_TWO_FAILED
from .material import material
from .models import PanelReport, ReviewBinding, Subject
from .panel import load_panel
from .report import review_json
from .run import PanelRun, panel_report
from .scope import panel_hash, reviewed_hash

REVIEWS = "reviews"  # the panel's files inside an artifact, by their paths under the reviews/ folder
REVIEW = "review.json"


def binding_problems(artifact: Path, manifest: Manifest) -> list[str]:
    """Does review.json belong to this artifact? Each mismatch names what differs."""
    try:
        review = PanelReport.model_validate_json((artifact / REVIEW).read_bytes())
    except (OSError, ValidationError):
        return []  # the file hashes vouch for its bytes; `replay` says why it cannot be read as a review
    return review_problems(review, manifest)


def review_problems(review: PanelReport, manifest: Manifest) -> list[str]:
    """What does not tie `review` (an artifact's review.json, read) to the artifact of `manifest`."""
    bound = review.bound
    if bound is None:
        return []  # a review from before bound reviews: nothing to check it against (said by `replay`)
    problems = []
    if bound.artifact != f"{manifest.ecosystem}@{manifest.version}":
        problems.append(f"{REVIEW}: is the review of {bound.artifact}, not of {manifest.ecosystem}@{manifest.version}")
    if bound.reviewed_hash != reviewed_hash(manifest.outputs):
        problems.append(f"{REVIEW}: judged other code: its reviewed hash is not that of this artifact's src/ and tests.json")
    recorded = {k.removeprefix(f"{REVIEWS}/"): v for k, v in manifest.inputs.items() if k.startswith(f"{REVIEWS}/")}
    copied = {k.removeprefix(f"{REVIEWS}/"): v for k, v in manifest.outputs.items() if k.startswith(f"{REVIEWS}/")}
    if not copied:
        problems.append(f"{REVIEW}: is bound to a panel, but the artifact keeps no copy of it under {REVIEWS}/")
    elif copied != recorded:
        problems.append(f"{REVIEWS}/: the panel's files differ from those the build recorded as its inputs")
    if copied and json_hash(copied) != bound.panel_hash:
        problems.append(f"{REVIEW}: was given by another panel: its panel hash is not that of {REVIEWS}/")
    return problems


def replay(artifact: Path, manifest: Manifest) -> tuple[bool, str]:
    """(True, what was replayed) when the review reproduces byte for byte; (False, why not) when it differs;
    raises `CannotReplay` with the reason when it cannot be replayed at all."""
    try:
        recorded = PanelReport.model_validate_json((artifact / REVIEW).read_bytes())
    except (OSError, ValidationError) as exc:
        raise CannotReplay(f"{REVIEW} cannot be read as a review ({str(exc).splitlines()[0]})") from None
    if recorded.bound is None:
        raise CannotReplay(f"{REVIEW} is not bound to what it judged (a review from before regen 0.12)")
    panel_file = next((k for k in manifest.outputs if k.startswith(f"{REVIEWS}/") and k.endswith(".toml")
                       and Path(k).stem == recorded.panel and Path(k).parent.name != "reviewers"), None)
    if panel_file is None:
        raise CannotReplay(f"the artifact keeps no copy of the panel {recorded.panel} under {REVIEWS}/")
    folder = artifact.parent
    baseline = recorded.bound.scope.baseline
    for needed, why in ((baseline, "the reviewers' diff was against it"), (manifest.parent, "it is the parent")):
        if needed and not (folder / needed / "src").is_dir():
            raise CannotReplay(f"{folder / needed} is not beside this artifact ({why})")
    expected = recorded.bound.scope.baseline_root_hash
    if baseline and expected:
        try:
            found = Manifest.read(folder / baseline).root_hash
        except RegenError:
            found = None
        if found != expected:
            raise CannotReplay(f"{folder / baseline} beside it is not the build the reviewers' diff was against "
                               "(its root hash differs)")
    try:
        panel = load_panel(artifact / panel_file)
        spec = load_spec(artifact / "spec")
        tests = json.loads((artifact / "tests.json").read_text(encoding="utf-8"))
    except (RegenError, OSError, ValueError) as exc:
        raise CannotReplay(f"its panel, spec or tests.json cannot be read: {str(exc).splitlines()[0]}") from None
    parent = folder / manifest.parent if manifest.parent else None
    subject = Subject(artifact=artifact, parent=parent, spec=spec,
                      material=material(spec, artifact, folder / baseline if baseline else None, manifest.data(), tests,
                                        recorded.bound.scope))
    answers = RecordedReviewers(TranscriptModel(artifact / TRANSCRIPT), recorded)
    clients = {r.name: answers for r in panel.reviewers if r.kind == "llm"}
    run = PanelRun(panel, clients, manifest.pipeline.prices)
    last = recorded.rounds[-1].review
    earlier = [r for r in recorded.rounds if r.review < last]
    rounds = earlier + run.review(subject, first_round=len(earlier) + 1, review=last)
    report = panel_report(subject, panel, rounds, recorded.repairs)
    if parent is not None:
        try:
            report = report.model_copy(update={"changes": changes(parent, artifact).summary()})
        except RegenError as exc:
            raise CannotReplay(f"what changed since the parent cannot be read: {str(exc).splitlines()[0]}") from None
    report = report.model_copy(update={"bound": ReviewBinding(
        artifact=f"{manifest.ecosystem}@{manifest.version}", reviewed_hash=reviewed_hash(manifest.outputs),
        panel_hash=panel_hash(panel), scope=recorded.bound.scope)})
    replayed = review_json(report.archived()).encode("utf-8")
    what = "the review" + (f" (its last review; {recorded.repairs} earlier one(s) judged code the repairs replaced)"
                           if earlier else "")
    if replayed == (artifact / REVIEW).read_bytes():
        return True, f"{what} replayed byte for byte: {report.outcome}, {len(panel.reviewers)} reviewers"
    return False, f"{REVIEW}: {what} replayed to a different review.json ({report.outcome}: {report.reason})"


class CannotReplay(Exception):
    """The review cannot be replayed here; the message says exactly why."""


class RecordedReviewers:
    """The LLM reviewers of a recorded review: each request is answered from the transcript; a request the build
    got no answer to (a timeout, a refused key, the budget) fails as it failed then, with the recorded reason."""

    def __init__(self, transcript: TranscriptModel, recorded: PanelReport):
        self.transcript = transcript
        self.failures: dict[tuple[str, int], str] = {}  # (reviewer, round of its review) -> why it got no verdict
        for rnd in recorded.rounds:
            for v in rnd.verdicts:
                reason = v.error or ""
                if rnd.phase == "revision" and reason.startswith(ROUND_TWO_FAILED):
                    self.failures[(v.reviewer, 2)] = reason.removeprefix(ROUND_TWO_FAILED)
                elif v.decision == "abstain" and reason:
                    self.failures[(v.reviewer, 1 if rnd.phase == "independent" else 2)] = reason

    def complete(self, request: ModelRequest) -> ModelReply:
        try:
            return self.transcript.complete(request)
        except BuildFailed:
            _, reviewer, number, _ = request.unit.split(":", 3)  # review:<reviewer>:<review>.<round>:chunk<n>
            reason = self.failures.get((reviewer, int(number.rsplit(".", 1)[1])))
            if reason is None:
                raise
            raise BuildFailed(reason) from None

