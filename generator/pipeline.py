"""The runner: the stages of a build, in order, on one screen.

load → plan → fingerprint (up to date?) → synthesise → write + lock → sandbox test → emit.
Each stage is a function of its own module; this file only chains them.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from . import __version__
from .config import Pipeline, RunOptions, load_pipeline
from .emit import (
    canonical_json,
    latest_manifest,
    next_version,
    publish,
    remove_stale_staging,
    sha256_file,
    staging,
    tree_hashes,
    write_tree,
)
from .errors import BuildFailed
from .llm import LiteLLMClient, ModelClient, ModelRequest, Transcript
from .load import load_spec
from .plan import Plan, Unit, make_plan
from .progress import Reporter
from .sandbox import SandboxResult, run_tests, run_uv
from .spec import Spec
from .synthesise import Synthesis, prompt_messages, synthesise

GENERATOR = Path(__file__).parent


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


def fingerprint(spec: Spec, pipeline: Pipeline, pipeline_file: Path, plan: Plan) -> Fingerprint:
    inputs = {f"spec/{f.path}": f.sha256 for f in spec.files}
    inputs[f"pipelines/{pipeline_file.name}"] = sha256_file(pipeline_file)
    folders = ["prompts", "kernel"] + (["offline"] if pipeline.senior.is_offline else [])
    for folder in folders:
        for rel, path in _package_files(GENERATOR / folder).items():
            inputs[f"generator/{folder}/{rel}"] = sha256_file(path)
    requests = {
        unit.name: ModelRequest.for_unit(unit.name, pipeline.senior, prompt_messages(spec, plan, unit)).hash
        for unit in plan.units
    }
    return Fingerprint(inputs=dict(sorted(inputs.items())), requests=requests, generator_version=__version__)


def kernel_files(package: str) -> dict[str, bytes]:
    return {f"{package}/kernel/{rel}": p.read_bytes() for rel, p in _package_files(GENERATOR / "kernel").items()}


def lock_dependencies(src: Path, parent_lock: Path | None) -> None:
    """`uv lock` the generated project; the parent's lock, when there is one, acts as preferences."""
    if parent_lock is not None and parent_lock.is_file():
        shutil.copyfile(parent_lock, src / "uv.lock")
    run_uv(["lock", "--project", str(src), "--python", sys.executable, "--quiet"], "locking the generated project", 600)


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
) -> dict:
    root_hash = hashlib.sha256(canonical_json(outputs).encode()).hexdigest()
    return {
        "schema": 1,
        "ecosystem": spec.ecosystem.name,
        "version": version,
        "parent": parent,
        "bump": {
            "kind": "initial" if parent is None else "patch",
            "reason": "first build" if parent is None else f"inputs changed since {parent}",
        },
        "generator": {"name": "regen", "version": __version__},
        "offline": pipeline.senior.is_offline,
        "pipeline": pipeline.model_dump(mode="json"),
        "inputs": prints.inputs,
        "inputs_hash": prints.hash,
        "startup_order": list(plan.startup_order),
        "units": [u.model_dump(mode="json") for u in synthesis.units],
        "tokens": {
            "prompt": sum(u.prompt_tokens for u in synthesis.units),
            "completion": sum(u.completion_tokens for u in synthesis.units),
        },
        "cost_usd": round(sum(u.cost_usd for u in synthesis.units), 6),
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


def regenerate(
    options: RunOptions,
    client: ModelClient | None = None,
    report: Reporter | None = None,
    sandbox_level: str | None = None,
) -> BuildResult:
    """Build the spec into a new archived version, or say it is up to date."""
    report = report or Reporter()
    with report.stage("load", f"{options.spec_dir}/") as info:
        spec = load_spec(options.spec_dir)
        pipeline = load_pipeline(options.pipeline_file)
        info["note"] = f"{len(spec.mads)} MADs, {sum(len(m.tools) for m in spec.mads)} tools"
    with report.stage("plan", "start-up order and units") as info:
        plan = make_plan(spec)
        info["note"] = " → ".join(plan.startup_order) + f"; {len(plan.units)} units"
    ecosystem_dir = options.out_dir / spec.ecosystem.name
    remove_stale_staging(ecosystem_dir)
    prints = fingerprint(spec, pipeline, options.pipeline_file, plan)
    latest = latest_manifest(ecosystem_dir)
    if latest is not None and latest.get("inputs_hash") == prints.hash:
        path = ecosystem_dir / latest["version"]
        report.say(f"\n[bold green]Up to date:[/] {spec.ecosystem.name} {latest['version']} was built "
                   f"from exactly these inputs ({path}); nothing written.")
        return BuildResult(ecosystem=spec.ecosystem.name, version=latest["version"], path=path,
                           up_to_date=True, manifest=latest)
    parent = latest["version"] if latest else None
    version = next_version(parent)
    client = client or LiteLLMClient()
    if pipeline.senior.is_offline:
        report.say("  [dim]offline build: the senior is offline/reference (templates, no network, no keys)[/]")

    with staging(ecosystem_dir) as stage:
        transcript = Transcript(stage / "transcript.jsonl")
        with report.stage("synthesise", f"{len(plan.units)} units with {pipeline.senior.model}") as info:

            def doing(index: int, unit: Unit) -> None:
                total = len(plan.units)
                report.progress("synthesise", f"unit {unit.name} ({index + 1}/{total}) with {pipeline.senior.model}")

            synthesis = synthesise(spec, plan, pipeline.senior, client, transcript, on_unit=doing)
            info["note"] = f"{len(synthesis.files)} files checked"
        src = stage / "src"
        with report.stage("write", "src/ and uv.lock") as info:
            write_tree(src, {**synthesis.files, **kernel_files(plan.package)}, executable=frozenset({"deploy/run.sh"}))
            parent_lock = ecosystem_dir / parent / "src" / "uv.lock" if parent else None
            lock_dependencies(src, parent_lock)
            info["note"] = f"{sum(1 for p in src.rglob('*') if p.is_file())} files"
        work = Path(tempfile.mkdtemp(prefix="regen-sandbox-"))
        keep_work = False  # kept only when the tests fail, for the user to look into
        try:
            with report.stage("test", "the ecosystem's own tests in the sandbox") as info:
                tests = run_tests(src, pipeline.sandbox, work, level=sandbox_level, warn=report.warn)
                info["note"] = f"{tests.passed} passed, {tests.failed + tests.errors} failed ({tests.level})"
            if not tests.ok:
                keep_work = True
                raise BuildFailed(
                    f"the ecosystem's own tests failed in the sandbox ({tests.passed} passed, "
                    f"{tests.failed} failed, {tests.errors} errors); nothing archived. "
                    f"The sandbox is kept at {work}\n{tests.output_tail}"
                )
        finally:
            if not keep_work:
                shutil.rmtree(work, ignore_errors=True)
        (stage / "tests.json").write_text(canonical_json(tests.model_dump(mode="json", exclude={"output_tail"})))
        outputs = {
            path: digest
            for path, digest in tree_hashes(stage).items()
            if path != "manifest.json"
        }
        data = manifest(spec, pipeline, plan, prints, synthesis, tests, outputs, version, parent)
        (stage / "manifest.json").write_text(canonical_json(data))
        with report.stage("emit", f"{ecosystem_dir / version}") as info:
            final = publish(stage, ecosystem_dir, version)
    report.summary(
        f"{spec.ecosystem.name} {version}" + (" (offline build)" if pipeline.senior.is_offline else ""),
        [
            ("artifact", str(final)),
            ("parent", parent or "none (first build)"),
            ("units", f"{len(synthesis.units)} synthesised, 0 reused"),
            ("files", f"{len(outputs)} ({len(synthesis.files)} synthesised, kernel copied)"),
            ("tokens", f"{data['tokens']['prompt']} in, {data['tokens']['completion']} out; ${data['cost_usd']:.4f}"),
            ("tests", f"{tests.passed} passed, {tests.failed} failed, {tests.skipped} skipped"),
            ("sandbox", tests.level + ("" if tests.level == "bubblewrap" else "  [yellow](weaker than bubblewrap)[/]")),
            ("run it", f"cd {final}/src && ./deploy/run.sh"),
        ],
    )
    return BuildResult(ecosystem=spec.ecosystem.name, version=version, path=final, up_to_date=False, manifest=data)
