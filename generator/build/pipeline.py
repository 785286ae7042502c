"""The runner: the stages of a build, in order, on one screen.

load → plan → preflight (keys, offline reach, context windows) → fingerprint (up to
date?) → synthesise (+ repair) → write + lock → sandbox test (+ repair) → emit.
Each stage is a function of its own module; this file only chains them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..artifact.history import changes
from ..artifact.lock import reuse_from_parent, to_regenerate, unit_inputs, unit_locks
from ..artifact.migrate import existing_migrations, migration_files, plan_migrations, schema_of
from ..artifact.overrides import apply_overrides, load_overrides, override_hashes
from ..artifact.sbom import check_sbom, sbom
from ..artifact.sign import (
    SigningKey,
    development_warning,
    load_signing_key,
    sign_artifact,
    signing_record,
    verify_artifact,
    write_provenance,
)
from ..artifact.store import latest_manifest, publish, remove_stale_staging, staging, versions, write_tree
from ..artifact.surface import bump_for, bumped, surface_changes, tables, tool_surface
from ..config import Pipeline, RunOptions, load_pipeline
from ..errors import BuildFailed, RepairFromReviewFailed, ReviewUndecided, UserError
from ..hashing import canonical_json, sha256_file, tree_hashes
from ..progress import Reporter
from ..review.gate import panel_of, write_report
from ..review.material import material
from ..review.models import BLOCKING, PanelReport, Subject, Verdict
from ..review.panel import Panel
from ..review.run import PanelRun, panel_report
from ..sandbox.run import SandboxResult, run_tests, run_uv
from ..sandbox.upgrade import run_upgrade_test
from ..senior import context
from ..senior.cache import ResponseCache
from ..senior.client import LiteLLMClient, missing_key, price_per_token
from ..senior.models import ModelClient, ModelRequest
from ..senior.recorded import OfflineWithRecorded, RecordedAnswers
from ..senior.synthesise import Spend, Synthesis, SynthesisRun, UnitOutcome, first_request
from ..senior.transcript import TranscriptModel, write_transcript
from ..spec.load import load_spec
from ..spec.model import Spec
from ..spec.plan import Plan, make_plan

GENERATOR = Path(__file__).parents[1]


class Fingerprint(BaseModel):
    """Everything a build's output depends on, hashed; equal fingerprints, equal builds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: dict[str, str]
    requests: dict[str, str]
    generator_version: str

    @property
    def hash(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump()).encode()).hexdigest()


class BuildResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ecosystem: str
    version: str
    path: Path
    up_to_date: bool
    manifest: dict


def _package_files(folder: Path) -> dict[str, Path]:
    return {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }


def fingerprint(spec: Spec, pipeline: Pipeline, panel: Panel, requests: dict[str, ModelRequest]) -> Fingerprint:
    inputs = {f"spec/{f.path}": f.sha256 for f in spec.files}
    # The panel judges the build and its report is part of the artifact.
    inputs |= {f"reviews/{rel}": hashlib.sha256(data).hexdigest() for rel, data in panel.files.items()}
    # The validated pipeline, not the file's bytes: comments change nothing, and a replay
    # (whose pipeline comes from a manifest) fingerprints like the original build.
    inputs["pipeline"] = hashlib.sha256(canonical_json(pipeline.model_dump(mode="json")).encode()).hexdigest()
    # The whole compiler is an input: a change to any of it (a template, a check, the
    # kernel) may change what is built, so it makes the last build out of date.
    for rel, path in _package_files(GENERATOR).items():
        inputs[f"generator/{rel}"] = sha256_file(path)
    return Fingerprint(
        inputs=dict(sorted(inputs.items())),
        requests={name: r.hash for name, r in requests.items()},
        generator_version=__version__,
    )


def kernel_files(package: str) -> dict[str, bytes]:
    return {f"{package}/kernel/{rel}": p.read_bytes() for rel, p in _package_files(GENERATOR / "kernel").items()}


def lock_dependencies(src: Path, preferred_lock: Path | None) -> None:
    """`uv lock` the generated project; an earlier lock, when there is one, acts as preferences."""
    if preferred_lock is not None and preferred_lock.is_file():
        shutil.copyfile(preferred_lock, src / "uv.lock")
    run_uv(["lock", "--project", str(src), "--python", sys.executable, "--quiet"], "locking the generated project", 600)


def write_src(src: Path, synthesis: Synthesis, plan: Plan, preferred_lock: Path | None,
              overrides: Mapping[str, bytes] = MappingProxyType({}), migrations: Mapping[str, str] = MappingProxyType({})) -> None:
    """The ecosystem's files: synthesised, the kernel, the migrations, then the spec's pinned overrides; then `uv lock`."""
    if src.exists():
        shutil.rmtree(src)
    files, _ = apply_overrides({**synthesis.files, **kernel_files(plan.package), **migrations}, overrides, plan.package)
    write_tree(src, files, executable=frozenset({"deploy/run.sh", "deploy/failover.sh"}))
    lock_dependencies(src, preferred_lock)


def offline_needs(spec: Spec, plan: Plan) -> dict[str, list[str]]:
    """The units the offline senior cannot write (tools with no capability), with those tools."""
    needs = {}
    for unit in plan.units:
        if unit.mad:
            unbound = [f"{unit.mad}.{t.name}" for t in spec.mad(unit.mad).tools if not t.builtin]
            if unbound:
                needs[unit.name] = unbound
    return needs


def recorded_answers(ecosystem_dir: Path, needs: dict[str, list[str]], requests: dict[str, ModelRequest]) -> RecordedAnswers:
    """Archived answers for the units the offline senior cannot write, or a UserError naming them."""
    transcripts = [(v, ecosystem_dir / v / "transcript.jsonl") for v in reversed(versions(ecosystem_dir))]
    recorded = RecordedAnswers([(v, path) for v, path in transcripts if path.is_file()])
    missing = {unit: tools for unit, tools in needs.items() if recorded.source_of(requests[unit]) is None}
    if missing:
        raise UserError(
            "the offline senior (offline/reference) can only write tools bound to a kernel capability "
            "(`builtin:`), and no archived build answered the current prompts of these units, which need a model:\n"
            + "\n".join(f"  {unit}: {', '.join(tools)}" for unit, tools in missing.items()) + "\n"
            "Build with an LLM pipeline (--pipeline pipelines/frontier.toml), or rebuild a recorded build "
            "without keys (--replay ecosystems/<name>/<version>)."
        )
    return recorded


def _failures_by_unit(plan: Plan, tests: SandboxResult) -> dict[str, list[str]]:
    """Each failed test goes to the unit that wrote its file, and to the MADs its traceback names."""
    failures: dict[str, list[str]] = {}
    module_pattern = re.compile(rf"{re.escape(plan.package)}/mads/(\w+)\.py")
    for test in tests.tests:
        if test.outcome not in ("failed", "error"):
            continue
        path = test.id.split("::")[0].replace(".", "/") + ".py"
        owners = {u.name for u in plan.units if u.may_write(path)} or {"frame"}
        owners |= {f"mad:{m}" for m in module_pattern.findall(test.message)}
        for owner in owners & {u.name for u in plan.units}:
            failures.setdefault(owner, []).append(f"{test.id}: {test.outcome}: {test.message}")
    if not failures:  # failed without a test to blame (collection, crash): everyone sees the output
        failures = {u.name: [tests.output_tail[-4000:]] for u in plan.units}
    return failures


def _resolve_pipeline(options: RunOptions) -> tuple[Pipeline, ModelClient | None]:
    """The pipeline file, or, when replaying, the pipeline recorded in the artifact and its transcript."""
    if options.replay is None:
        return load_pipeline(options.pipeline_file), None
    manifest_path = options.replay / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        pipeline = Pipeline.model_validate(manifest["pipeline"])
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{manifest_path}: not an artifact to replay: {exc}")
    return pipeline, TranscriptModel(options.replay / "transcript.jsonl")


def regenerate(
    options: RunOptions,
    client: ModelClient | None = None,
    report: Reporter | None = None,
    sandbox_level: str | None = None,
    reviewers: Mapping[str, ModelClient] | None = None,
    signing_key: SigningKey | None = None,
) -> BuildResult:
    """Build the spec into a new archived version, or say it is up to date.

    `client` stands in for the senior and `reviewers` for LLM reviewers by name (tests)."""
    report = report or Reporter()
    with report.stage("load", f"{options.spec_dir}/") as info:
        spec = load_spec(options.spec_dir)
        pipeline, replay_client = _resolve_pipeline(options)
        panel = panel_of(pipeline, options.pipeline_file)
        info["note"] = (f"{len(spec.mads)} MADs, {sum(len(m.tools) for m in spec.mads)} tools; "
                        f"panel {panel.name} of {len(panel.reviewers)}")
    with report.stage("plan", "start-up order, units and context windows") as info:
        plan = make_plan(spec)
        overrides = load_overrides(options.spec_dir, plan.package)
        needs = offline_needs(spec, plan) if pipeline.senior.is_offline and replay_client is None else {}
        if client is None and replay_client is None and not pipeline.senior.is_offline:
            if (variable := missing_key(pipeline.senior)) is not None:
                raise UserError(
                    f"{pipeline.senior.model} needs the environment variable {variable}, which is not set: "
                    f"export {variable}=... (keys never go in files of the repo), or replay a recorded build "
                    "with --replay ecosystems/<name>/<version>"
                )
        requests = {u.name: first_request(spec, plan, u, pipeline) for u in plan.units}
        ecosystem_dir = options.out_dir / spec.ecosystem.name
        latest = latest_manifest(ecosystem_dir)
        inputs = {u.name: unit_inputs(spec, plan, pipeline, u, requests[u.name]) for u in plan.units}
        reuse, why = _reuse(options, spec, plan, inputs, requests, latest, ecosystem_dir)
        needs = {unit: tools for unit, tools in needs.items() if unit in why}
        recorded = recorded_answers(ecosystem_dir, needs, requests) if needs else None
        fits = context.fit(list(requests.values()), pipeline.senior)
        context.require_fit(fits, pipeline.senior)
        biggest = max(fits, key=lambda f: f.needed)
        window = f" of {biggest.window:,}" if biggest.window else ""
        info["note"] = (" → ".join(plan.startup_order) + f"; {len(plan.units)} units ({len(reuse)} reused); "
                        f"largest request {biggest.needed:,} tokens{window}")
    remove_stale_staging(ecosystem_dir)
    prints = fingerprint(spec, pipeline, panel, requests)
    if latest is not None and latest.get("inputs_hash") == prints.hash:
        path = ecosystem_dir / latest["version"]
        report.say(f"\n[bold green]Up to date:[/] {spec.ecosystem.name} {latest['version']} was built "
                   f"from exactly these inputs ({path}); nothing written, 0 tokens spent.")
        return BuildResult(ecosystem=spec.ecosystem.name, version=latest["version"], path=path,
                           up_to_date=True, manifest=latest)
    parent = latest["version"] if latest else None
    bump = version_bump(spec, latest)
    version = bumped(parent, bump.kind) if parent else "1.0.0"
    # Storage changes since the parent become a migration; one needing consent stops here, at no cost.
    parent_src = ecosystem_dir / parent / "src" if parent else None
    migrations = plan_migrations(latest.get("storage") if latest else None, schema_of(spec), spec,
                                 existing_migrations(parent_src, plan.package) if parent_src else [])
    migrated = migration_files(plan.package, migrations)
    signing_key = signing_key or load_signing_key()  # before any model is called: a bad key costs nothing
    if (warning := development_warning(signing_key)) is not None:
        report.warn(warning)
    if replay_client is not None:
        client = replay_client
        report.say(f"  [dim]replay: every answer comes from {options.replay / 'transcript.jsonl'}; no model is called[/]")
    else:
        client = client or LiteLLMClient(pipeline.senior, pipeline.prices)
        if recorded is not None:
            client = OfflineWithRecorded(client, recorded, set(needs))
            sources = sorted({recorded.source_of(requests[u]) for u in needs})
            report.say(f"  [dim]units {', '.join(needs)} need a model: answered as recorded by "
                       f"{spec.ecosystem.name} {', '.join(sources)}[/]")
    if pipeline.senior.is_offline:
        report.say("  [dim]offline build: the senior is offline/reference (templates, no network, no keys)[/]")
    # The offline senior's answers follow its templates, which its requests do not carry: no cache.
    cache = None if options.cache_dir is None or pipeline.senior.is_offline else ResponseCache(options.cache_dir)
    run = SynthesisRun(
        spec, plan, pipeline, client, Spend(pipeline.budgets), context.count_tokens, cache,
        price=lambda model: price_per_token(model, pipeline.prices),
        window=fits[0].window if fits else None,
    )
    preferred_lock = options.replay / "src" / "uv.lock" if options.replay else (
        ecosystem_dir / parent / "src" / "uv.lock" if parent else None
    )

    with staging(ecosystem_dir) as stage:
        with report.stage("synthesise", f"{len(plan.units)} units with {pipeline.senior.model}") as info:
            synthesis = run.synthesise(
                on_unit=lambda unit: report.progress("synthesise", f"unit {unit.name} with {pipeline.senior.model}"),
                reuse=reuse,
            )
            info["note"] = f"{len(synthesis.files)} files checked; {_spent(synthesis)}"
        src = stage / "src"
        tests, previous_failures = None, None
        for test_round in range(pipeline.repair_rounds + 1):
            with report.stage("write", "src/ and uv.lock") as info:
                write_src(src, synthesis, plan, preferred_lock, overrides, migrated)
                info["note"] = f"{sum(1 for p in src.rglob('*') if p.is_file())} files"
            tests = _sandbox(src, pipeline, sandbox_level, report)
            if tests.ok:
                break
            failures = _failures_by_unit(plan, tests)
            summary = (f"the ecosystem's own tests failed in the sandbox ({tests.passed} passed, "
                       f"{tests.failed} failed, {tests.errors} errors)")
            if test_round == pipeline.repair_rounds:
                raise BuildFailed(f"{summary} after {test_round} repair round(s); nothing archived.\n{tests.output_tail}")
            if failures == previous_failures:
                raise BuildFailed(f"{summary}, the same as before the last repair; stopped early, nothing archived.\n"
                                  f"{tests.output_tail}")
            previous_failures = failures
            with report.stage("repair", f"units {', '.join(sorted(failures))} from their test failures") as info:
                synthesis = run.repair_units(synthesis, failures, test_round + 1)
                info["note"] = _spent(synthesis)
        def draft(synthesis: Synthesis, tests: SandboxResult) -> dict:
            """The manifest as it stands before review: what reviewers see of it."""
            return manifest(spec, pipeline, plan, prints, synthesis, tests, {}, version, parent, options)

        panel_run = PanelRun(panel, reviewers, pipeline.prices, cache,
                             on_verdict=lambda v: report.progress("review", v.line))
        builder = Rebuild(run, plan, pipeline, preferred_lock, sandbox_level, report, overrides, migrated)
        try:
            reviewed, synthesis, tests = review_and_repair(
                spec, panel, panel_run, builder, stage, ecosystem_dir / parent if parent else None, synthesis, tests, draft,
            )
        except RepairFromReviewFailed as exc:
            folder = options.reports_dir / spec.ecosystem.name / version
            write_report(exc.review, folder)
            raise BuildFailed(f"{exc}\nNothing archived; the review that asked for the repair is in {folder}/review.md") from exc
        if parent is not None:  # what changed goes into the report people read instead of the tree
            staged = draft(synthesis, tests)
            reviewed = reviewed.model_copy(update={"changes": changes(
                ecosystem_dir / parent, stage, staged | {"ecosystem": spec.ecosystem.name, "version": version}).summary()})
        if reviewed.outcome != "approve":  # kept outside the archive, where the user can read why
            folder = options.reports_dir / spec.ecosystem.name / version
            write_report(reviewed, folder)
            where = f"nothing archived; the review is in {folder}/review.md"
            if reviewed.outcome == "undecided":
                raise ReviewUndecided(f"the {panel.name} panel could not decide: {reviewed.reason}; {where}")
            raise BuildFailed(f"the {panel.name} panel rejected the build: {reviewed.reason}; {where}")
        if replay_client is not None and (left := [u.name for u in plan.units if replay_client.unanswered(u.name)]):
            report.warn(f"the replay needed fewer repairs than the recorded build (units {', '.join(left)}): "
                        "its tests passed earlier, so this artifact may differ from the one replayed")
        upgrade = _upgrade_test(spec, pipeline, stage / "src", ecosystem_dir, parent, version, tests, report)
        write_transcript(stage / "transcript.jsonl", list(synthesis.exchanges))
        # The spec it was built from, so `regen diff` can show what changed in it.
        write_tree(stage / "spec", {f.path: (options.spec_dir / f.path).read_bytes() for f in spec.files})
        (stage / "tests.json").write_text(canonical_json(tests.record()))
        write_report(reviewed, stage)
        (stage / "sbom.cdx.json").write_text(sbom(stage / "src"), encoding="utf-8")
        outputs = {path: digest for path, digest in tree_hashes(stage).items() if path != "manifest.json"}
        data = manifest(spec, pipeline, plan, prints, synthesis, tests, outputs, version, parent, options)
        data["bump"] = bump.model_dump(mode="json")
        data["overrides"] = override_hashes(overrides)
        data["migrations"] = [m.model_dump(mode="json", include={"number", "name", "destructive"}) for m in migrations]
        data["upgrade"] = upgrade
        data["lock"] = unit_locks({o.result.unit: o.files for o in synthesis.outcomes}, inputs, why,
                                  {u: o.result.reused_from for u, o in reuse.items()})
        data["review"] = {"panel": panel.name, "outcome": reviewed.outcome, "reason": reviewed.reason,
                          "repairs": reviewed.repairs, "dissent": list(reviewed.dissent),
                          "cost_usd": reviewed.cost_usd}
        if recorded is not None:
            data["recorded_answers"] = {u: recorded.source_of(requests[u]) for u in needs}
        data["signing"] = signing_record(signing_key)
        (stage / "manifest.json").write_text(canonical_json(data))
        sign_artifact(stage, signing_key)  # manifest.sig and manifest.pub.pem, over the manifest's bytes
        write_provenance(stage)  # derived from the manifest, so its signature covers this too
        with report.stage("emit", f"{ecosystem_dir / version}"):
            final = publish(stage, ecosystem_dir, version)
    _summary(report, spec, pipeline, final, parent, version, synthesis, outputs, data, tests, reviewed)
    return BuildResult(ecosystem=spec.ecosystem.name, version=version, path=final, up_to_date=False, manifest=data)


def _src_path(file: str | None) -> str:
    """A finding's file as a path inside src/, however the reviewer wrote it (b/src/x.py, ./src/x.py, x (part 2 of 3))."""
    path = re.sub(r" \(part \d+ of \d+\)$", "", (file or "").strip())
    return path.split("src/", 1)[1] if "src/" in path else path.removeprefix("./")


def findings_by_unit(plan: Plan, verdicts: tuple[Verdict, ...]) -> dict[str, list[str]]:
    """Blocking findings of the reviewers that did not approve (critical ones of any reviewer), by the unit
    that wrote the file. A finding in a file no unit writes (the kernel, the lock) is for people, not the senior."""
    blocking: dict[str, list[str]] = {}
    for verdict in verdicts:
        for f in verdict.findings:
            if f.severity not in BLOCKING or (verdict.decision == "approve" and f.severity != "critical"):
                continue
            rel = _src_path(f.file)
            owner = next((u.name for u in plan.units if u.may_write(rel)), None)
            if owner is None:
                continue
            fix = f" Fix: {f.suggestion}" if f.suggestion else ""
            blocking.setdefault(owner, []).append(f"{f.where} [{f.severity}] {f.rule}: {f.message}{fix} ({verdict.reviewer})")
    return {unit: sorted(problems) for unit, problems in sorted(blocking.items())}


@dataclass(frozen=True)
class Rebuild:
    """What a repair round needs to turn new answers into a tested src/ again."""

    run: SynthesisRun
    plan: Plan
    pipeline: Pipeline
    preferred_lock: Path | None
    sandbox_level: str | None
    report: Reporter
    overrides: Mapping[str, bytes]
    migrations: Mapping[str, str]

    def repair(self, synthesis: Synthesis, failures: dict[str, list[str]], round_: int, src: Path) -> tuple[Synthesis, SandboxResult]:
        with self.report.stage("repair", f"units {', '.join(failures)} from the review's findings") as info:
            synthesis = self.run.repair_units(synthesis, failures, round_, "review")
            info["note"] = _spent(synthesis)
        with self.report.stage("write", "src/ and uv.lock"):
            write_src(src, synthesis, self.plan, self.preferred_lock, self.overrides, self.migrations)
        return synthesis, _sandbox(src, self.pipeline, self.sandbox_level, self.report)


def review_and_repair(
    spec: Spec,
    panel: Panel,
    panel_run: PanelRun,
    builder: Rebuild,
    stage: Path,
    parent: Path | None,
    synthesis: Synthesis,
    tests: SandboxResult,
    draft: Callable[[Synthesis, SandboxResult], dict],
) -> tuple[PanelReport, Synthesis, SandboxResult]:
    """Review; findings that block consensus go back to their units, then the panel reviews again."""
    rounds, repairs, previous = [], 0, None
    while True:
        subject = Subject(artifact=stage, parent=parent, spec=spec,
                          material=material(spec, stage, parent, draft(synthesis, tests), tests.record()))
        names = ", ".join(r.name for r in panel.reviewers)
        with builder.report.stage("review", f"panel {panel.name}: {names}") as info:
            rounds += panel_run.review(subject, first_round=len(rounds) + 1, review=repairs + 1)
            info["note"] = f"{rounds[-1].consensus.outcome}: {rounds[-1].consensus.arithmetic}"
        blocking = findings_by_unit(builder.plan, rounds[-1].verdicts)
        if rounds[-1].consensus.outcome != "reject" or repairs == panel.definition.repair_rounds:
            break
        if not blocking or blocking == previous:  # nothing a unit can fix, or the repair changed nothing
            break
        previous, repairs = blocking, repairs + 1
        try:
            synthesis, tests = builder.repair(synthesis, blocking, builder.pipeline.repair_rounds + repairs, stage / "src")
        except BuildFailed as exc:
            raise RepairFromReviewFailed(f"the repair the review asked for failed: {exc}",
                                         panel_report(subject, panel, rounds, repairs)) from exc
        if not tests.ok:
            raise RepairFromReviewFailed(
                f"after repairing from the review, the ecosystem's own tests failed in the sandbox "
                f"({tests.failed} failed, {tests.errors} errors)\n{tests.output_tail}", panel_report(subject, panel, rounds, repairs))
    return panel_report(subject, panel, rounds, repairs), synthesis, tests


def _upgrade_test(spec: Spec, pipeline: Pipeline, src: Path, ecosystem_dir: Path, parent: str | None, version: str,
                  tests: SandboxResult, report: Reporter) -> dict | None:
    """The parent writes conversations, secrets and rows; this version must read them all back from the same state.
    A failure is not sent to the senior: a migration comes from the spec, not from its answers."""
    if parent is None:
        return None
    work = src.parent / ".upgrade"  # inside the staging folder: a killed build leaves it to the sweep
    work.mkdir()
    try:
        with report.stage("upgrade", f"{parent}'s state, read by {version}") as info:
            result = run_upgrade_test(ecosystem_dir / parent / "src", src, spec, pipeline.sandbox, work, tests.level)
            info["note"] = f"{sum(c.ok and not c.skipped for c in result.checks)} checks hold" if result.ok else "failed"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not result.ok:
        raise BuildFailed(f"the upgrade test failed: {version} does not read the state {parent} wrote; nothing archived.\n"
                          f"{result.failures()}\n{result.output_tail}")
    return result.record()


def _sandbox(src: Path, pipeline: Pipeline, level: str | None, report: Reporter) -> SandboxResult:
    # Inside the staging folder: a build killed mid-test leaves it to the next run's sweep.
    work = src.parent / ".sandbox"
    work.mkdir()
    try:
        with report.stage("test", "the ecosystem's own tests in the sandbox") as info:
            tests = run_tests(src, pipeline.sandbox, work, level=level, warn=report.warn)
            info["note"] = f"{tests.passed} passed, {tests.failed + tests.errors} failed ({tests.level})"
        return tests
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spent(synthesis: Synthesis) -> str:
    cached = sum(1 for u in synthesis.units if u.cached)
    tokens = sum(u.prompt_tokens + u.completion_tokens for u in synthesis.units)
    cost = sum(u.cost_usd for u in synthesis.units)
    return f"{tokens:,} tokens, ${cost:.4f}" + (f", {cached} without a model call" if cached else "")


def manifest(
    spec: Spec,
    pipeline: Pipeline,
    plan: Plan,
    prints: Fingerprint,
    synthesis: Synthesis,
    tests: SandboxResult,
    outputs: dict[str, str],
    version: str,
    parent: str | None,
    options: RunOptions,
) -> dict:
    root_hash = hashlib.sha256(canonical_json(outputs).encode()).hexdigest()
    return {
        "schema": 1,
        "ecosystem": spec.ecosystem.name,
        "version": version,
        "parent": parent,
        "generator": {"name": "regen", "version": __version__},
        "offline": pipeline.senior.is_offline,
        "replayed_from": _artifact_name(options.replay) if options.replay else None,
        "pipeline": pipeline.model_dump(mode="json"),
        "inputs": prints.inputs,
        "inputs_hash": prints.hash,
        "startup_order": list(plan.startup_order),
        "surface": tool_surface(spec),
        "storage": schema_of(spec),
        # What each unit's answers cost when they were made (a cache hit or a replay costs that
        # again on paper): the same inputs give the same manifest, however the run went.
        "units": [u.model_dump(mode="json", exclude={"latency_ms", "cached", "prompt_tokens", "completion_tokens",
                                                     "cost_usd"}) | _answered(synthesis, u.unit)
                  for u in synthesis.units],
        "tokens": {
            "prompt": sum(e.reply.prompt_tokens for e in synthesis.exchanges),
            "completion": sum(e.reply.completion_tokens for e in synthesis.exchanges),
        },
        "cost_usd": round(sum(e.reply.cost_usd for e in synthesis.exchanges), 6),
        "sandbox": {
            "level": tests.level,
            "passed": tests.passed,
            "failed": tests.failed,
            "errors": tests.errors,
            "skipped": tests.skipped,
        },
        "outputs": outputs,
        "root_hash": root_hash,
    }


class VersionBump(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["initial", "major", "minor", "patch"]
    reason: str
    changes: tuple[str, ...] = ()


def version_bump(spec: Spec, parent: dict | None) -> VersionBump:
    """How far the version moves: by the tool surface and storage schema against the parent's."""
    if parent is None:
        return VersionBump(kind="initial", reason="first build")
    if "surface" not in parent:
        return VersionBump(kind="patch", reason=f"{parent['version']} records no tool surface to compare with")
    changes = surface_changes(parent["surface"], tool_surface(spec), tables(parent.get("storage", {})),
                              tables(schema_of(spec)))
    kind = bump_for(changes)
    if not changes:
        return VersionBump(kind="patch", reason=f"same tools and storage as {parent['version']}; code, prompts or docs changed")
    return VersionBump(kind=kind, reason="; ".join(c.what for c in changes if c.bump == kind),
                       changes=tuple(c.what for c in changes))


def _reuse(options: RunOptions, spec: Spec, plan: Plan, inputs: dict, requests: dict, latest: dict | None,
           ecosystem_dir: Path) -> tuple[dict[str, UnitOutcome], dict[str, str]]:
    """Units to copy from an earlier version, and why every other unit is synthesised."""
    if options.replay is not None:  # exactly the units the replayed build reused, from where it took them
        recorded = json.loads((options.replay / "manifest.json").read_text(encoding="utf-8")).get("lock", {})
        reused: dict[str, UnitOutcome] = {}
        for unit, entry in recorded.items():
            if entry.get("reused_from"):
                got, failed = reuse_from_parent(options.replay.parent / entry["reused_from"] / "src", entry["reused_from"],
                                                recorded, [unit], requests)
                if failed:
                    raise UserError(f"cannot replay {options.replay}: {failed[unit]}")
                reused |= got
        return reused, {u.name: "replayed" for u in plan.units if u.name not in reused}
    parent_lock = latest.get("lock") if latest else None
    why = to_regenerate(spec, plan, inputs, parent_lock)
    keep = [u.name for u in plan.units if u.name not in why]
    if not keep:
        return {}, why
    reused, instead = reuse_from_parent(ecosystem_dir / latest["version"] / "src", latest["version"], parent_lock, keep,
                                        requests)
    return reused, dict(sorted((why | instead).items()))


def _answered(synthesis: Synthesis, unit: str) -> dict:
    exchanges = [e for e in synthesis.exchanges if e.request.unit == unit]
    return {
        "prompt_tokens": sum(e.reply.prompt_tokens for e in exchanges),
        "completion_tokens": sum(e.reply.completion_tokens for e in exchanges),
        "cost_usd": round(sum(e.reply.cost_usd for e in exchanges), 6),
    }


def _artifact_name(artifact: Path) -> str:
    """`<name>@<version>` of an archived build: no absolute path goes into an artifact."""
    try:
        recorded = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
        return f"{recorded['ecosystem']}@{recorded['version']}"
    except (OSError, ValueError, KeyError):
        return artifact.name


def _summary(report, spec, pipeline, final, parent, version, synthesis, outputs, data, tests, reviewed) -> None:
    reused = [f"{u.unit} (from {u.reused_from})" for u in synthesis.units if u.reused_from]
    cached = [u.unit for u in synthesis.units if u.cached and not u.reused_from]
    repaired = [f"{u.unit} ({u.rounds} rounds)" for u in synthesis.units if u.rounds > 1]
    per_unit = ", ".join(
        f"{u.unit} {u.prompt_tokens + u.completion_tokens:,} tok/{u.latency_ms / 1000:.1f}s"
        for u in synthesis.units if not u.reused_from
    )
    by_reason: dict[str, list[str]] = {}
    for unit, entry in data["lock"].items():
        if entry["regenerated_because"]:
            by_reason.setdefault(entry["regenerated_because"], []).append(unit)
    why = [f"{', '.join(units)}: {reason}" for reason, units in by_reason.items()]
    report.summary(
        f"{spec.ecosystem.name} {version}" + (" (offline build)" if pipeline.senior.is_offline else ""),
        [
            ("artifact", str(final)),
            ("parent", parent or "none (first build)"),
            ("version", f"{data['bump']['kind']} bump: {data['bump']['reason']}"),
            ("units", f"{len(synthesis.units) - len(reused)} synthesised"
             + (f", {len(cached)} answered from cache or a recorded build" if cached else "")
             + (f"; reused at 0 tokens: {', '.join(reused)}" if reused else "")
             + (f"; repaired: {', '.join(repaired)}" if repaired else "")),
            ("why", "; ".join(why) or "—"),
            ("per unit", per_unit or "—"),
            ("files", f"{len(outputs)} ({len(synthesis.files)} synthesised, kernel copied)"),
            ("tokens", f"spent now: {_spent(synthesis)}; the answers it is built from took "
                       f"{data['tokens']['prompt']:,} in, {data['tokens']['completion']:,} out, ${data['cost_usd']:.4f}"),
            ("tests", f"{tests.passed} passed, {tests.failed} failed, {tests.skipped} skipped"),
            ("sandbox", tests.level + ("" if tests.level == "bubblewrap" else "  [yellow](weaker than bubblewrap)[/]")),
            ("review", f"{reviewed.outcome} by panel {reviewed.panel}: {reviewed.final.consensus.arithmetic}"
             + (f"; {reviewed.repairs} repair round(s)" if reviewed.repairs else "")
             + (f"; dissent: {', '.join(reviewed.dissent)}" if reviewed.dissent else "")),
            ("run it", f"cd {final}/src && ./deploy/run.sh"),
        ],
    )


class Verification(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact: Path
    files: int
    signed_by: str = Field(description="the key, trusted or not, development or not")
    problems: tuple[str, ...] = Field(description="signature, provenance, file hashes, root hash, SBOM")
    first_difference: str | None
    differences: tuple[str, ...] = Field(description="files of src/ the replay did not reproduce")

    @property
    def ok(self) -> bool:
        return not self.problems and not self.differences


def verify(artifact: Path, spec_dir: Path | None = None, report: Reporter | None = None,
           pipelines_dir: Path = Path("pipelines"), trust: Path | None = None, keep: Path | None = None) -> Verification:
    """Check an artifact whole: its signature (by `trust`, when given), provenance, every file's hash, the
    root hash and the SBOM against the lock; then rebuild it from its own transcript, offline, and compare
    every file of src/ byte for byte. The spec is the artifact's own copy unless `spec_dir` is given."""
    report = report or Reporter()
    manifest_path = artifact / "manifest.json"
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{manifest_path}: not an artifact: {exc}")
    with report.stage("check", "signature, provenance, every file hash, the SBOM") as info:
        integrity = verify_artifact(artifact, trust)
        problems = integrity.problems
        if "sbom.cdx.json" in recorded.get("outputs", {}):
            problems += [f"sbom.cdx.json: {p}" for p in check_sbom((artifact / "sbom.cdx.json").read_text(encoding="utf-8"),
                                                                     artifact / "src")]
        else:
            problems.append("no sbom.cdx.json: the artifact records no SBOM")
        key = integrity.signature
        signed_by = (f"key {key.key_id}" + (" (trusted)" if key.trusted else "") + (" (DEVELOPMENT key)" if key.development else "")
                     if key.signed else "nobody")
        info["note"] = f"signed by {signed_by}; " + (f"{len(problems)} problem(s)" if problems else "all hold")
    spec_dir = spec_dir or (artifact / "spec" if (artifact / "spec").is_dir() else Path("spec"))
    # The pipeline comes from the manifest; its panel is found as from the repo's pipelines/ folder.
    options = RunOptions(spec_dir=spec_dir, pipeline_file=pipelines_dir / "replayed.toml", out_dir=Path("-"), replay=artifact)
    with report.stage("load", f"{spec_dir}/ and {artifact}"):
        spec = load_spec(spec_dir)
        pipeline, client = _resolve_pipeline(options)
        panel = panel_of(pipeline, options.pipeline_file)
        plan = make_plan(spec)
    requests = {u.name: first_request(spec, plan, u, pipeline) for u in plan.units}
    prints = fingerprint(spec, pipeline, panel, requests)
    recorded_inputs = recorded.get("inputs", {})
    changed = sorted(k for k in set(prints.inputs) | set(recorded_inputs) if prints.inputs.get(k) != recorded_inputs.get(k))
    if changed:
        raise UserError(
            f"the inputs differ from those {artifact} was built from, so it cannot be reproduced here: "
            + ", ".join(changed[:10]) + ". Check out the commit that built it."
        )
    transcript_hash = recorded.get("outputs", {}).get("transcript.jsonl")
    if transcript_hash is None or sha256_file(artifact / "transcript.jsonl") != transcript_hash:
        raise UserError(f"{artifact}/transcript.jsonl does not match the hash its manifest recorded: "
                        "it was changed, so it cannot vouch for the build")
    with tempfile.TemporaryDirectory(prefix="regen-verify-") as scratch:
        src = Path(scratch) / "src"
        with report.stage("synthesise", f"{len(plan.units)} units from the transcript"):
            run = SynthesisRun(spec, plan, pipeline, client, Spend(pipeline.budgets), context.count_tokens)
            reuse, _ = _reuse(options, spec, plan, {}, requests, None, artifact.parent)
            try:
                synthesis = run.synthesise(reuse=reuse)
                # Repairs that failed tests or the review asked for are replayed in order, without the
                # sandbox or the panel; each round consumes recorded answers, so this ends.
                repair_round = 0
                while pending := {u.name: ["(replayed)"] for u in plan.units if client.unanswered(u.name)}:
                    repair_round += 1
                    synthesis = run.repair_units(synthesis, pending, repair_round)
            except BuildFailed as exc:
                raise BuildFailed(f"the recorded answers do not rebuild {artifact}: {exc}") from exc
        parent_dir = artifact.parent / recorded["parent"] if recorded.get("parent") else None
        parent_manifest = json.loads((parent_dir / "manifest.json").read_text(encoding="utf-8")) if parent_dir else {}
        migrations = plan_migrations(parent_manifest.get("storage") if parent_dir else None, schema_of(spec), spec,
                                     existing_migrations(parent_dir / "src", plan.package) if parent_dir else [])
        with report.stage("write", "src/ and uv.lock"):
            write_src(src, synthesis, plan, artifact / "src" / "uv.lock", load_overrides(spec_dir, plan.package),
                      migration_files(plan.package, migrations))
        rebuilt = tree_hashes(src)
        if keep is not None:  # for a closer look, e.g. diffoscope archived/src kept/src
            shutil.copytree(src, keep / "src", symlinks=True)
    # The rebuild must match both what the manifest recorded and what is on disk now.
    recorded_src = {k.removeprefix("src/"): v for k, v in recorded["outputs"].items() if k.startswith("src/")}
    on_disk = tree_hashes(artifact / "src")
    paths = set(rebuilt) | set(recorded_src) | set(on_disk)
    differences = tuple(sorted(p for p in paths if not rebuilt.get(p) == recorded_src.get(p) == on_disk.get(p)))
    return Verification(
        artifact=artifact, files=len(recorded_src), signed_by=signed_by, problems=tuple(problems),
        first_difference=differences[0] if differences else None, differences=differences,
    )
