"""`regen verify`: an artifact checked whole, and rebuilt from its own transcript on the build's own stages.

    check   the signature (by a trusted key, when given), provenance, every file's hash, the root
            hash, the SBOM against the lock: each problem names the file; report.html, when the
            manifest lists it, rendered again from the artifact (and its parent beside it) to the same bytes
    replay  load → plan the units (build/prepare.py) → synthesise from the transcript, repairs replayed
            in order (build/produce.py) → write src/ → compare every file byte for byte

An artifact needs nothing beside it: its transcript holds every exchange its files came from
(reused units' too), and its manifest what its migrations were planned from. A problem is a
finding, named; only a compiler that cannot reproduce the build (its inputs differ) is a usage error.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pydantic import Field

from ..artifact.archived import transcript_problem
from ..artifact.manifest import Manifest
from ..config import RunOptions
from ..errors import BuildFailed, RegenError, UserError
from ..frozen import Frozen
from ..hashing import tree_hashes
from ..progress import Reporter
from ..review.replay import CannotReplay, binding_problems
from ..review.replay import replay as replay_review
from .context import BuildContext
from .prepare import load_inputs, plan_units

SBOM = "sbom.cdx.json"


class Verification(Frozen):
    artifact: Path
    files: int
    signed_by: str = Field(description="the key, trusted or not, development or not")
    problems: tuple[str, ...] = Field(description="signature, provenance, file hashes, root hash, SBOM, transcript, "
                                                  "a review that does not belong to the artifact or replays otherwise")
    review: str = Field(default="", description="what the review replay did, or exactly why it could not run")
    report: str = Field(default="", description="what became of report.html: rendered again and equal, or why not")
    first_difference: str | None
    differences: tuple[str, ...] = Field(description="files of src/ the replay did not reproduce")

    @property
    def ok(self) -> bool:
        return not self.problems and not self.differences


def verify(artifact: Path, spec_dir: Path | None = None, report: Reporter | None = None, trust: Path | None = None,
           keep: Path | None = None) -> Verification:
    """Check `artifact` and rebuild its src/ from its transcript. The spec is the artifact's own copy unless
    `spec_dir` is given; `keep` receives the rebuilt src/ (e.g. for diffoscope)."""
    from ..artifact.sign import verify_artifact

    report = report or Reporter()
    if keep is not None and (keep / "src").exists():  # found out now, not after the whole replay
        raise UserError(f"{keep / 'src'} exists: --keep needs a folder without a src/ in it, to copy the rebuild to")
    if not (artifact / "manifest.json").is_file():
        raise UserError(f"{artifact}: not an artifact: it has no manifest.json; pass a folder such as "
                        "ecosystems/madgroup/1.0.0")
    with report.stage("check", "signature, provenance, every file hash, the SBOM") as info:
        integrity = verify_artifact(artifact, trust)
        problems = integrity.problems + _sbom_problems(artifact)
        key = integrity.signature
        signed_by = (f"key {key.key_id}" + (" (trusted)" if key.trusted else "") + (" (DEVELOPMENT key)" if key.development
                                                                                     else "") if key.signed else "nobody")
        info["note"] = f"signed by {signed_by}; " + (f"{len(problems)} problem(s): {problems[0]}" if problems else "all hold")
        info["failed"] = bool(problems)
    try:
        manifest = Manifest.read(artifact)
    except UserError as exc:  # the check above has said why; there is nothing to replay from
        return Verification(artifact=artifact, files=0, signed_by=signed_by, problems=tuple([*problems, str(exc)]),
                            first_difference=None, differences=())
    unreadable = transcript_problem(artifact, manifest)
    if unreadable is not None:  # it cannot vouch for the build: nothing is replayed from it
        unreadable += ": it was changed, so it cannot vouch for the build, and nothing is replayed"
        return Verification(artifact=artifact, files=len(manifest.src_outputs), signed_by=signed_by,
                            problems=tuple(dict.fromkeys([*problems, unreadable])), first_difference=None, differences=())
    with tempfile.TemporaryDirectory(prefix="regen-verify-") as scratch:
        src = Path(scratch) / "src"
        try:
            _replay(artifact, spec_dir or artifact / "spec", report, src, scratch)
        except RegenError as exc:
            if not problems:  # an intact artifact this compiler cannot replay: the error says why
                raise
            # A damaged artifact (its spec, its lock) may not replay at all: that is one more finding.
            return Verification(artifact=artifact, files=len(manifest.src_outputs), signed_by=signed_by,
                                problems=tuple([*problems, f"the replay could not run: {str(exc).splitlines()[0]}"]),
                                first_difference=None, differences=())
        rebuilt = tree_hashes(src)
        if keep is not None:  # for a closer look, e.g. diffoscope archived/src kept/src
            shutil.copytree(src, keep / "src", symlinks=True)
    # The rebuild must match both what the manifest recorded and what is on disk now.
    recorded = manifest.src_outputs
    on_disk = tree_hashes(artifact / "src") if (artifact / "src").is_dir() else {}
    paths = set(rebuilt) | set(recorded) | set(on_disk)
    differences = tuple(sorted(p for p in paths if not rebuilt.get(p) == recorded.get(p) == on_disk.get(p)))
    problems += binding_problems(artifact, manifest)
    from .report import report_problem

    report_found, report_note = report_problem(artifact, manifest)  # listed in the manifest: rendered again, equal
    if report_found:
        problems.append(report_found)
    review = ""
    if not problems and not differences:  # a review is replayed only on the code it judged
        with report.stage("review", "the panel again, LLM reviewers answered from the transcript") as info:
            try:
                same, review = replay_review(artifact, manifest)
            except CannotReplay as exc:
                review = f"the review was not replayed: {exc}"
            else:
                if not same:
                    problems.append(review)
                    info["failed"] = True
            info["note"] = review
    return Verification(artifact=artifact, files=len(recorded), signed_by=signed_by, problems=tuple(problems),
                        first_difference=differences[0] if differences else None, differences=differences,
                        review=review, report=report_note)


def _replay(artifact: Path, spec_dir: Path, report: Reporter, src: Path, scratch: str) -> None:
    """Rebuild src/ from the transcript on the build's own stages; nothing is written outside `scratch`."""
    from ..senior.transcript import TRANSCRIPT, TranscriptModel
    from .produce import BuildStamp, synthesis_run, write_src

    ctx = BuildContext(options=RunOptions(spec_dir=spec_dir, pipeline_file=Path("pipelines/replayed.toml"),
                                          out_dir=Path(scratch) / "out", replay=artifact), report=report)
    given = load_inputs(ctx, judged=False)
    recorded = {k: v for k, v in given.replayed.inputs.items() if not k.startswith("reviews/")}
    changed = sorted(k for k in set(given.fingerprint.inputs) | set(recorded)
                     if given.fingerprint.inputs.get(k) != recorded.get(k))
    if changed:
        raise UserError(
            f"the inputs differ from those {artifact} was built from, so it cannot be reproduced here: "
            + ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
            + ". Verify it with the compiler that built it (`nox -s verify` checks out the commit that archived it).")
    planned = plan_units(ctx, given)
    replay = TranscriptModel(artifact / TRANSCRIPT)
    with report.stage("synthesise", f"{len(planned.plan.units)} units from the transcript"):
        run = synthesis_run(given, planned.plan, replay)
        try:
            synthesis = run.synthesise()
            # Repairs that failed tests or the review asked for are replayed in order, without the
            # sandbox or the panel; each round consumes recorded answers, so this ends.
            repair_round = 0
            while pending := {u.name: ["(replayed)"] for u in planned.plan.units if replay.unanswered(u.name)}:
                repair_round += 1
                synthesis = run.repair_units(synthesis, pending, repair_round)
        except BuildFailed as exc:
            raise BuildFailed(f"the recorded answers do not rebuild {artifact}: {exc}") from exc
    with report.stage("write", "src/ and uv.lock"):
        recorded_build = given.replayed
        stamp = BuildStamp(ecosystem=recorded_build.ecosystem, version=recorded_build.version,
                           inputs_hash=recorded_build.inputs_hash)
        write_src(src, synthesis, planned, artifact / "src" / "uv.lock", stamp)


def _sbom_problems(artifact: Path) -> list[str]:
    from ..artifact.sbom import check_sbom

    if not (artifact / SBOM).is_file():
        return [f"{SBOM}: missing: the artifact records no SBOM"]
    try:
        return [f"{SBOM}: {p}" for p in check_sbom((artifact / SBOM).read_text(encoding="utf-8"), artifact / "src")]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{SBOM}: cannot be checked: {exc}"]
