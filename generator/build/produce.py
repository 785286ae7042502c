"""Stages 3 to 5: synthesise every unit not reused, write src/, run its tests in the sandbox, repair.

    synthesise (units concurrently) → write src/ + uv lock → sandbox tests
        → failed? each failure goes back to the unit that wrote the test (and the MADs its traceback
          names), at most `repair_rounds` times; the same failures twice in a row stop early.

`write` and `synthesis_run` are shared with `regen verify`, which rebuilds src/ the same way.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..artifact.migrate import migration_files
from ..artifact.overrides import apply_overrides
from ..artifact.store import write_tree
from ..errors import BuildFailed
from ..frozen import Frozen
from ..kernel_contract import kernel_files
from ..sandbox.run import SandboxResult, run_uv
from ..senior import context
from ..senior.cache import ResponseCache
from ..senior.client import price_per_token
from ..senior.models import ModelClient
from ..senior.spend import Spend
from ..senior.synthesise import Synthesis, SynthesisRun
from ..spec.plan import Plan
from .context import BuildContext
from .prepare import Given, Planned, Prepared

EXECUTABLE = frozenset({"deploy/run.sh", "deploy/failover.sh", "deploy/upgrade.sh"})


@dataclass(frozen=True)
class Produced:
    """A src/ that passed its own tests, and the answers it was written from."""

    run: SynthesisRun
    synthesis: Synthesis
    tests: SandboxResult


def synthesis_run(given: Given, plan: Plan, senior: ModelClient, cache: ResponseCache | None = None) -> SynthesisRun:
    pipeline = given.pipeline
    return SynthesisRun(
        given.spec, plan, pipeline, senior, Spend(pipeline.budgets), context.count_tokens, cache,
        price=lambda model: price_per_token(model, pipeline.prices), window=context.window_of(pipeline.senior),
    )


def produce(ctx: BuildContext, prepared: Prepared, src: Path) -> Produced:
    pipeline, plan = prepared.pipeline, prepared.plan
    run = synthesis_run(prepared.given, plan, prepared.senior, prepared.cache)
    with ctx.report.stage("synthesise", f"{len(plan.units)} units with {pipeline.senior.model}") as info:
        synthesis = run.synthesise(
            on_unit=lambda unit: ctx.report.progress("synthesise", f"unit {unit.name} with {pipeline.senior.model}"),
            reuse=prepared.reuse,
        )
        info["note"] = f"{len(synthesis.files)} files checked; {spent(synthesis)}{answered(synthesis, pipeline.senior.model)}"
    previous_failures = None
    for test_round in range(pipeline.repair_rounds + 1):
        write(ctx, prepared, synthesis, src)
        tests = sandbox(ctx, prepared, src)
        if tests.ok:
            return Produced(run=run, synthesis=synthesis, tests=tests)
        failures = failures_by_unit(plan, tests)
        summary = (f"the ecosystem's own tests failed in the sandbox ({tests.passed} passed, "
                   f"{tests.failed} failed, {tests.errors} errors)")
        if test_round == pipeline.repair_rounds:
            raise BuildFailed(f"{summary} after {test_round} repair round(s); nothing archived.\n{tests.output_tail}")
        if failures == previous_failures:
            raise BuildFailed(f"{summary}, the same as before the last repair; stopped early, nothing archived.\n"
                              f"{tests.output_tail}")
        previous_failures = failures
        with ctx.report.stage("repair", f"units {', '.join(sorted(failures))} from their test failures") as info:
            synthesis = run.repair_units(synthesis, failures, test_round + 1)
            info["note"] = spent(synthesis) + answered(synthesis, pipeline.senior.model, set(failures))
    raise AssertionError("unreachable")


def write(ctx: BuildContext, prepared: Prepared, synthesis: Synthesis, src: Path) -> None:
    with ctx.report.stage("write", "src/ and uv.lock") as info:
        stamp = BuildStamp(ecosystem=prepared.spec.ecosystem.name, version=prepared.version,
                           inputs_hash=prepared.given.fingerprint.hash)
        write_src(src, synthesis, prepared.planned, prepared.preferred_lock, stamp)
        info["note"] = f"{sum(1 for p in src.rglob('*') if p.is_file())} files"


class BuildStamp(Frozen):
    """What a running ecosystem says it is: its name, version and the hash of the inputs it was built from.

    Written at write time, not by any unit (a unit's answer would change with every version and never be
    reused): `<package>/build.json`, and the version in pyproject.toml's [project] table."""

    ecosystem: str
    version: str
    inputs_hash: str


# The `version = "…"` line of the [project] table, never one of a later table.
PROJECT_VERSION = re.compile(r'(?ms)(^\[project\][ \t]*$(?:(?!^\[).)*?^version[ \t]*=[ \t]*)"[^"\n]*"')


def stamped(files: dict[str, str], package: str, stamp: BuildStamp) -> dict[str, str]:
    """`files` with build.json added and the project's version set (when pyproject.toml states one)."""
    out = dict(files)
    out[f"{package}/build.json"] = json.dumps(stamp.model_dump(), indent=1, sort_keys=True) + "\n"
    if "pyproject.toml" in out:
        out["pyproject.toml"] = PROJECT_VERSION.sub(lambda m: f'{m.group(1)}"{stamp.version}"', out["pyproject.toml"],
                                                    count=1)
    return out


def write_src(src: Path, synthesis: Synthesis, planned: Planned, preferred_lock: Path | None,
              stamp: BuildStamp) -> None:
    """The ecosystem's files: synthesised, the kernel, the migrations, the build stamp, then the spec's pinned
    overrides; then `uv lock`, keeping the pins of `preferred_lock` (the parent's, or the replayed artifact's)
    where it can."""
    if src.exists():
        shutil.rmtree(src)
    package = planned.plan.package
    built = stamped({**synthesis.files, **kernel_files(package, planned.packs), **migration_files(package, planned.migrations)},
                    package, stamp)
    files, _ = apply_overrides(built, planned.overrides, package)
    write_tree(src, files, executable=EXECUTABLE)
    if preferred_lock is not None and preferred_lock.is_file():
        shutil.copyfile(preferred_lock, src / "uv.lock")
    run_uv(["lock", "--project", str(src), "--python", sys.executable, "--quiet"], "locking the generated project", 600)


def sandbox(ctx: BuildContext, prepared: Prepared, src: Path) -> SandboxResult:
    # Inside the staging folder: a build killed mid-test leaves it to the next run's sweep.
    work = src.parent / ".sandbox"
    work.mkdir()
    try:
        with ctx.report.stage("test", "the ecosystem's own tests in the sandbox") as info:
            tests = ctx.sandbox(src, prepared.pipeline.sandbox, work, ctx.sandbox_level, ctx.report.warn,
                                reuse=not ctx.options.fresh)
            info["note"] = f"{tests.passed} passed, {tests.failed + tests.errors} failed ({tests.level})" + (
                f"; this exact tree passed at {tests.reused_from}, not run again" if tests.reused_from else "")
        return tests
    finally:
        shutil.rmtree(work, ignore_errors=True)


def failures_by_unit(plan: Plan, tests: SandboxResult) -> dict[str, list[str]]:
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


def counted(n: int, one: str, many: str = "") -> str:
    """`n` things, in words: 1 retry, 2 retries."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def answered(synthesis: Synthesis, senior: str, only: set[str] | None = None) -> str:
    """Who answered the units asked in this run (or `only` these), when it was not the senior alone, and how often
    it took retries and fallbacks."""
    asked = {u.unit for u in synthesis.units if not u.cached and (only is None or u.unit in only)}
    by_model: dict[str, int] = {}
    for outcome in synthesis.outcomes:
        if outcome.result.unit in asked:
            for model in dict.fromkeys(e.reply.model for e in outcome.exchanges if not e.reply.cached and e.reply.model):
                by_model[model] = by_model.get(model, 0) + 1
    retries = sum(u.retries for u in synthesis.units if u.unit in asked)
    fallbacks = sum(u.fallbacks for u in synthesis.units if u.unit in asked)
    note = ""
    if set(by_model) - {senior}:
        note += "; answered by " + ", ".join(
            f"{model} ({counted(count, 'unit')}{'' if model == senior else ', fallback'})"
            for model, count in by_model.items())
    if retries or fallbacks:
        note += f"; {counted(retries, 'retry', 'retries')}, {counted(fallbacks, 'fallback')}"
    return note


def spent(synthesis: Synthesis) -> str:
    """What this run spent (a reuse, a cache hit or a replay is free), in one phrase."""
    cached = sum(1 for u in synthesis.units if u.cached)
    tokens = sum(u.prompt_tokens + u.completion_tokens for u in synthesis.units)
    cost = sum(u.cost_usd for u in synthesis.units)
    return f"{tokens:,} tokens, ${cost:.4f}" + (f", {cached} without a model call" if cached else "")
