"""Stage 7, archive: the upgrade test, then the artifact, written so that it is complete or absent.

Everything is written into the staging folder first: the transcript, the spec, tests.json, the
review, the SBOM, report.html (build/report.py); then the files are hashed (once) into the `Manifest`, which is signed, and
provenance is derived from it; then `publish` fsyncs and renames the folder into place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..artifact.history import Side
from ..artifact.lock import unit_locks
from ..artifact.manifest import (
    GeneratorInfo,
    Manifest,
    MigrationRecord,
    ReviewRecord,
    SandboxRecord,
    SigningRecord,
    Tokens,
    ToolSurface,
    UnitRecord,
    UpgradeRecord,
    root_hash,
)
from ..artifact.migrate import schema_of
from ..artifact.overrides import override_hashes
from ..artifact.sbom import sbom
from ..artifact.sign import sign_artifact, signing_record, write_provenance
from ..artifact.store import publish, write_tree
from ..artifact.surface import tool_surface
from ..config import Pipeline, SeniorModel
from ..errors import BuildFailed
from ..hashing import canonical_json, sha256_bytes, tree_hashes
from ..review.gate import write_report
from ..review.replay import REVIEWS
from ..sandbox.run import SandboxResult
from ..sandbox.upgrade import run_upgrade_test
from ..senior.synthesise import Synthesis
from ..senior.transcript import TRANSCRIPT, write_transcript
from .context import BuildContext, BuildResult
from .prepare import Prepared
from .report import REPORT, render, report_data

if TYPE_CHECKING:
    from .judge import Judged


@dataclass(frozen=True)
class Archived:
    result: BuildResult
    outputs: int
    """How many files the manifest lists."""


def archive(ctx: BuildContext, prepared: Prepared, judged: Judged, stage: Path) -> Archived:
    upgrade = upgrade_test(ctx, prepared, judged.tests, stage / "src")
    # The senior's exchanges, then the reviewers': the build and its review replay from this alone.
    write_transcript(stage / TRANSCRIPT, [*judged.synthesis.exchanges, *judged.review_exchanges])
    # The spec it was built from, so `regen diff` can show what changed in it; the panel that judged it,
    # so `regen verify` can replay the review.
    write_tree(stage / "spec", spec_files(ctx, prepared))
    write_tree(stage / REVIEWS, prepared.given.panel.files)
    (stage / "tests.json").write_text(canonical_json(judged.tests.record()), encoding="utf-8")
    write_report(judged.review.archived(), stage)
    (stage / "sbom.cdx.json").write_text(sbom(stage / "src"), encoding="utf-8")
    review = judged.review
    record = ReviewRecord(panel=prepared.given.panel.name, outcome=review.outcome, reason=review.reason,
                          repairs=review.repairs, dissent=tuple(review.dissent), cost_usd=review.cost_usd)
    # report.html is among the outputs the signature covers, so it is made before them, from the staged files and
    # the manifest-to-be (its outputs and root hash, which the report does not read, still empty): `regen report`
    # and `regen verify` make the same bytes from the archived folder and its manifest.
    to_be = build_manifest(ctx, prepared, judged.synthesis, judged.tests, {}, upgrade, record)
    parent = prepared.ecosystem_dir / prepared.parent.version if prepared.parent else None
    (stage / REPORT).write_text(render(report_data(stage, to_be, parent)), encoding="utf-8")
    outputs = tree_hashes(stage)  # once: every file the manifest vouches for
    manifest = build_manifest(ctx, prepared, judged.synthesis, judged.tests, outputs, upgrade, record)
    manifest.write(stage)
    sign_artifact(stage, prepared.signing_key)  # manifest.sig and manifest.pub.pem, over the manifest's bytes
    write_provenance(stage)  # derived from the manifest, so its signature covers this too
    with ctx.report.stage("emit", f"{prepared.ecosystem_dir / prepared.version}"):
        final = publish(stage, prepared.ecosystem_dir, prepared.version)
    result = BuildResult(ecosystem=prepared.spec.ecosystem.name, version=prepared.version, path=final,
                         up_to_date=False, manifest=manifest)
    return Archived(result=result, outputs=len(outputs))


def spec_files(ctx: BuildContext, prepared: Prepared) -> dict[str, bytes]:
    """The spec's files as they were when the build was fingerprinted; an edit made since stops the build."""
    files = {}
    for f in prepared.spec.files:
        path = ctx.options.spec_dir / f.path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BuildFailed(f"{path} cannot be read any more ({exc.strerror}): the spec changed during the build; "
                              "nothing archived, build again") from None
        if sha256_bytes(data) != f.sha256:
            raise BuildFailed(f"{path} changed during the build; nothing archived, build again")
        files[f.path] = data
    return files


def build_manifest(ctx: BuildContext, prepared: Prepared, synthesis: Synthesis, tests: SandboxResult,
                   outputs: dict[str, str], upgrade: UpgradeRecord | None, review: ReviewRecord) -> Manifest:
    """What the artifact records: the one place a manifest is made."""
    spec, pipeline, given = prepared.spec, prepared.pipeline, prepared.given
    reused = {unit: outcome.result.reused_from for unit, outcome in prepared.reuse.items()}
    return Manifest(
        schema_version=2,
        ecosystem=spec.ecosystem.name,
        version=prepared.version,
        parent=prepared.parent.version if prepared.parent else None,
        generator=GeneratorInfo(name="regen", version=__version__),
        offline=pipeline.senior.is_offline,
        replayed_from=given.replayed.name if given.replayed else None,
        pipeline=Pipeline.model_validate(pipeline.model_dump(mode="json")),  # every field, defaults included
        inputs=given.fingerprint.inputs,
        inputs_hash=given.fingerprint.hash,
        startup_order=prepared.plan.startup_order,
        surface={name: ToolSurface.model_validate(tool) for name, tool in tool_surface(spec).items()},
        storage=schema_of(spec),
        units=unit_records(synthesis),
        tokens=Tokens(prompt=sum(e.reply.prompt_tokens for e in synthesis.exchanges),
                      completion=sum(e.reply.completion_tokens for e in synthesis.exchanges)),
        cost_usd=round(sum(e.reply.cost_usd for e in synthesis.exchanges), 6),
        sandbox=SandboxRecord(level=tests.level, passed=tests.passed, failed=tests.failed, errors=tests.errors,
                              skipped=tests.skipped),
        outputs=outputs,
        root_hash=root_hash(outputs),
        bump=prepared.bump,
        overrides=override_hashes(prepared.planned.overrides),
        migrations=tuple(MigrationRecord(number=m.number, name=m.name, destructive=m.destructive)
                         for m in prepared.planned.migrations),
        upgrade=upgrade,
        lock=unit_locks({o.result.unit: o.files for o in synthesis.outcomes}, prepared.planned.inputs, prepared.why, reused),
        review=review,
        signing=SigningRecord.model_validate(signing_record(prepared.signing_key)),
        fresh=ctx.options.fresh,
        carried=carried_records(prepared),
        migration_base=prepared.planned.migration_base,
        parameters_left_out=parameters_left_out(
            [pipeline.senior] + [r.definition.model for r in (given.panel.reviewers if given.panel else ())
                                 if r.kind == "llm" and r.definition.model is not None]),
    )


def unit_records(synthesis: Synthesis) -> tuple[UnitRecord, ...]:
    """What each unit's answers cost when they were made (a cache hit, a reuse or a replay costs that again on paper),
    and which models answered: the same answers give the same manifest, however many retries the run took."""
    records = []
    for u in synthesis.units:
        exchanges = [e for e in synthesis.exchanges if e.request.unit == u.unit]
        timed = [e.reply.elapsed_s for e in exchanges if e.reply.elapsed_s is not None]
        # Set only when a model recorded its time: unset, the field stays out of the manifest (the offline reference).
        elapsed = {"elapsed_s": round(sum(timed), 2)} if timed else {}
        records.append(UnitRecord(
            unit=u.unit, request_hash=u.request_hash, files=u.files, rounds=u.rounds, reused_from=u.reused_from,
            prompt_tokens=sum(e.reply.prompt_tokens for e in exchanges),
            completion_tokens=sum(e.reply.completion_tokens for e in exchanges),
            cost_usd=round(sum(e.reply.cost_usd for e in exchanges), 6),
            answered_by=tuple(dict.fromkeys(e.reply.model for e in exchanges if e.reply.model)),
            **elapsed,
        ))
    return tuple(records)


def parameters_left_out(models: list[SeniorModel]) -> dict[str, tuple[str, ...]]:
    """For the senior, each LLM reviewer and their fallbacks: the parameters set for it that are not sent."""
    from ..senior.client import left_out

    found = {name: left_out(name, model.temperature, model.seed)
             for model in models for name in [model.model, *model.fallbacks]}
    return {name: names for name, names in sorted(found.items()) if names}


def carried_records(prepared: Prepared) -> dict:
    """Every carried tool in the build: carried now, or carried by the parent into a unit this build reuses."""
    records = {tool: c.record() for tool, c in prepared.carried.items()}
    if prepared.parent is not None:
        records |= {tool: c for tool, c in prepared.parent.carried.items() if c.unit in prepared.reuse}
    return dict(sorted(records.items()))


def draft(prepared: Prepared, synthesis: Synthesis, tests: SandboxResult) -> dict:
    """The manifest as it stands before the review, in the manifest's own keys: what reviewers are shown of it."""
    spec = prepared.spec
    return {
        "ecosystem": spec.ecosystem.name, "version": prepared.version,
        "parent": prepared.parent.version if prepared.parent else None,
        "bump": prepared.bump.model_dump(mode="json"), "offline": prepared.pipeline.senior.is_offline,
        "startup_order": list(prepared.plan.startup_order),
        "sandbox": {"level": tests.level, "passed": tests.passed, "failed": tests.failed, "errors": tests.errors,
                    "skipped": tests.skipped},
        "units": [u.model_dump(mode="json", exclude={"elapsed_s"}) for u in unit_records(synthesis)],
        "carried": {tool: c.model_dump(mode="json") for tool, c in carried_records(prepared).items()},
    }


def side(prepared: Prepared) -> Side:
    """What `regen diff` compares of this build, before it is archived."""
    spec = prepared.spec
    return Side(name=f"{spec.ecosystem.name}@{prepared.version}",
                spec_inputs={f"spec/{f.path}": f.sha256 for f in spec.files},
                surface=tool_surface(spec), storage=schema_of(spec))


def upgrade_test(ctx: BuildContext, prepared: Prepared, tests: SandboxResult, src: Path) -> UpgradeRecord | None:
    """The parent writes conversations, secrets and rows; this version must read them all back from the same state.
    A failure is not sent to the senior: a migration comes from the spec, not from its answers."""
    if prepared.parent is None:
        return None
    parent, version = prepared.parent.version, prepared.version
    work = src.parent / ".upgrade"  # inside the staging folder: a killed build leaves it to the sweep
    work.mkdir()
    try:
        with ctx.report.stage("upgrade", f"{parent}'s state, read by {version}") as info:
            result = run_upgrade_test(prepared.ecosystem_dir / parent / "src", src, prepared.spec,
                                      prepared.pipeline.sandbox, work, tests.level)
            info["note"] = f"{sum(c.ok and not c.skipped for c in result.checks)} checks hold" if result.ok else "failed"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not result.ok:
        raise BuildFailed(f"the upgrade test failed: {version} does not read the state {parent} wrote; nothing archived.\n"
                          f"{result.failures()}\n{result.output_tail}")
    return result.record()
