"""Stages 1 and 2, before anything is spent: what the build is given, whether it is up to date, and the plan.

`load_inputs` reads the spec, the pipeline and the panel and fingerprints them with the compiler
itself: a build whose fingerprint equals the newest version's is up to date, and that answer
takes no model, no template rendering and nothing slow to import. `prepare` decides everything
else before the first model call: the plan, each unit's request, the version and its bump, the
migration, which units are reused from the parent, which model-written tools the offline senior
carries (or a clear error, at no cost, when it cannot), the signing key and the senior itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..artifact.manifest import Manifest, MigrationBase
from ..artifact.store import remove_stale_staging, versions
from ..config import Pipeline, load_pipeline
from ..errors import UserError
from ..frozen import Frozen
from ..hashing import files_under, json_hash, sha256_bytes, sha256_file
from ..kernel_contract import kernel_test_file
from ..review.panel import Panel, panel_of
from ..spec.load import load_spec
from ..spec.model import Spec
from .context import BuildContext

if TYPE_CHECKING:  # the stages import these when they run: the up-to-date answer needs none of them
    from ..artifact.archived import Archive
    from ..artifact.manifest import BumpRecord
    from ..artifact.sign import SigningKey
    from ..kernel.packs.storage.migrations import Migration
    from ..senior.cache import ResponseCache
    from ..senior.carry import Carried
    from ..senior.models import ModelClient, ModelRequest
    from ..senior.runlog import RunLog
    from ..senior.synthesise import UnitOutcome
    from ..senior.transcript import TranscriptModel
    from ..spec.plan import Plan

GENERATOR = Path(__file__).resolve().parents[1]


class Fingerprint(Frozen):
    """Everything a build's output depends on, hashed: equal fingerprints, equal builds.

    The requests the senior is sent are not listed: they are made from these (the spec and the
    compiler's prompts), so the question "is it up to date?" needs no prompt rendered."""

    inputs: dict[str, str]
    generator_version: str

    @property
    def hash(self) -> str:
        return json_hash(self.model_dump())

    @property
    def compiler(self) -> dict[str, str]:
        """The compiler's own files, `generator/...`, each hashed once for the whole build."""
        return {k: v for k, v in self.inputs.items() if k.startswith("generator/")}


def fingerprint(spec: Spec, pipeline: Pipeline, panel: Panel | None) -> Fingerprint:
    """`panel` None leaves the review out: `regen verify` rebuilds src/, which no panel file decides."""
    inputs = {f"spec/{f.path}": f.sha256 for f in spec.files}
    # The panel judges the build and its report is part of the artifact.
    if panel is not None:
        inputs |= {f"reviews/{rel}": sha256_bytes(data) for rel, data in panel.files.items()}
    # The validated pipeline, not the file's bytes: comments change nothing, and a replay
    # (whose pipeline comes from a manifest) fingerprints like the original build.
    inputs["pipeline"] = json_hash(pipeline.model_dump(mode="json"))
    # The whole compiler is an input: a change to any of it (a template, a check, the
    # kernel) may change what is built, so it makes the last build out of date. The packs' tests are regen's, not
    # the kernel's: no artifact carries them, so changing one builds nothing new.
    for rel, path in files_under(GENERATOR, skip_bytecode=True).items():
        if not (rel.startswith("kernel/") and kernel_test_file(rel.removeprefix("kernel/"))):
            inputs[f"generator/{rel}"] = sha256_file(path)
    return Fingerprint(inputs=dict(sorted(inputs.items())), generator_version=__version__)


@dataclass(frozen=True)
class Given:
    """What the run is given, read and fingerprinted; nothing decided yet."""

    spec: Spec
    pipeline: Pipeline
    panel: Panel | None
    """None when nothing is to be judged (`regen verify`)."""
    replayed: Manifest | None
    """The artifact a `--replay` rebuilds, when there is one."""
    ecosystem_dir: Path
    latest: Manifest | None
    """The newest archived version: the parent of the next one."""
    fingerprint: Fingerprint


def load_inputs(ctx: BuildContext, judged: bool = True) -> Given:
    """The spec, the pipeline (a replay's is the one its manifest recorded), the panel when the build is to be judged."""
    options = ctx.options
    with ctx.report.stage("load", f"{options.spec_dir}/") as info:
        spec = load_spec(options.spec_dir)
        replayed = Manifest.read(options.replay) if options.replay is not None else None
        pipeline = replayed.pipeline if replayed is not None else load_pipeline(options.pipeline_file)
        panel = panel_of(pipeline, options.pipeline_file) if judged else None
        ecosystem_dir = options.out_dir / spec.ecosystem.name
        latest = _latest(ecosystem_dir)
        info["note"] = (f"{len(spec.mads)} MADs, {sum(len(m.tools) for m in spec.mads)} tools"
                        + (f"; panel {panel.name} of {len(panel.reviewers)}" if panel else ""))
    return Given(spec=spec, pipeline=pipeline, panel=panel, replayed=replayed, ecosystem_dir=ecosystem_dir,
                 latest=latest, fingerprint=fingerprint(spec, pipeline, panel))


def _latest(ecosystem_dir: Path) -> Manifest | None:
    found = versions(ecosystem_dir)
    return Manifest.read(ecosystem_dir / found[-1]) if found else None


def up_to_date(ctx: BuildContext, given: Given) -> Manifest | None:
    """The newest version, when it was built from exactly these inputs (and a fresh build was not asked for)."""
    latest = given.latest
    if latest is None or ctx.options.fresh or latest.inputs_hash != given.fingerprint.hash:
        return None
    return latest


@dataclass(frozen=True)
class Planned:
    """The units and what each is asked, the migrations: what a build and its replay have in common."""

    plan: Plan
    overrides: dict[str, bytes]
    requests: dict[str, ModelRequest]
    """Unit -> its first request."""
    inputs: dict[str, dict[str, str]]
    """Unit -> what its answer is made from (the build lock's inputs)."""
    migrations: list[Migration]
    migration_base: MigrationBase
    packs: frozenset[str] = frozenset()
    """The kernel's capability packs the ecosystem uses (and its artifact carries)."""


def plan_units(ctx: BuildContext, given: Given) -> Planned:
    from ..artifact.lock import unit_inputs
    from ..artifact.overrides import load_overrides
    from ..senior.synthesise import first_request
    from ..spec.plan import make_plan

    spec, pipeline = given.spec, given.pipeline
    plan = make_plan(spec)
    requests = {u.name: first_request(spec, plan, u, pipeline) for u in plan.units}
    migrations, base = _migrations(ctx, given, plan)
    return Planned(
        plan=plan, overrides=load_overrides(ctx.options.spec_dir, plan.package), requests=requests,
        inputs={u.name: unit_inputs(spec, plan, pipeline, u, requests[u.name], given.fingerprint.compiler)
                for u in plan.units},
        # A storage history outlives the last table it made: the pack that brings a state to it stays with it.
        migrations=migrations, migration_base=base, packs=spec.packs | ({"storage"} if migrations else set()),
    )


@dataclass(frozen=True)
class Prepared:
    """Everything decided before the first model call."""

    given: Given
    planned: Planned
    version: str
    bump: BumpRecord
    reuse: dict[str, UnitOutcome]
    """Unit -> its outcome, taken from the parent."""
    why: dict[str, str]
    """Unit -> why it is synthesised again."""
    carried: dict[str, Carried]
    """`<mad>.<tool>` -> the tool the offline senior carries in."""
    senior: ModelClient
    replay: TranscriptModel | None
    cache: ResponseCache | None
    signing_key: SigningKey
    preferred_lock: Path | None
    run_log: RunLog

    @property
    def spec(self) -> Spec:
        return self.given.spec

    @property
    def plan(self) -> Plan:
        return self.planned.plan

    @property
    def requests(self) -> dict[str, ModelRequest]:
        return self.planned.requests

    @property
    def pipeline(self) -> Pipeline:
        return self.given.pipeline

    @property
    def parent(self) -> Manifest | None:
        return self.given.latest

    @property
    def ecosystem_dir(self) -> Path:
        return self.given.ecosystem_dir


def prepare(ctx: BuildContext, given: Given) -> Prepared:
    from ..artifact.archived import Archive
    from ..artifact.migrate import schema_of
    from ..artifact.surface import bumped, version_bump
    from ..senior import context

    spec, pipeline = given.spec, given.pipeline
    archive = Archive(given.ecosystem_dir)
    try:
        with ctx.report.stage("plan", "start-up order, units and context windows") as info:
            _require_providers(ctx, given)
            _require_key(ctx, given)
            _require_prices(ctx, given)
            planned = plan_units(ctx, given)
            fits = context.fit(list(planned.requests.values()), pipeline.senior)
            context.require_fit(fits, pipeline.senior)
            reuse, why = _reuse(ctx, given, planned, archive)
            carried = _carried(given, planned, why, archive)
            biggest = max(fits, key=lambda f: f.needed)
            window = f" of {biggest.window:,}" if biggest.window else ""
            info["note"] = (" → ".join(planned.plan.startup_order) + f"; {len(planned.plan.units)} units "
                            f"({len(reuse)} reused" + (f", {len(carried)} tools carried" if carried else "")
                            + f"); largest request {biggest.needed:,} tokens{window}")
    finally:  # why an archived build was passed over, said even when that is why the plan failed
        for problem in archive.problems():
            ctx.report.warn(f"{problem}; not drawn on")
    remove_stale_staging(given.ecosystem_dir)
    parent = given.latest
    bump = version_bump(spec, parent, schema_of(spec))
    signing_key = _signing_key(ctx)
    from ..senior.runlog import RunLog, run_log_path

    version = bumped(parent.version, bump.kind) if parent else "1.0.0"
    run_log = RunLog(ctx.report)
    run_log.start(run_log_path(ctx.options.runs, spec.ecosystem.name, version))
    senior, replay = _senior(ctx, given, carried, run_log)
    return Prepared(
        given=given, planned=planned, version=version, bump=bump, run_log=run_log,
        reuse=reuse, why=why, carried=carried, senior=senior, replay=replay, cache=_cache(ctx, pipeline),
        signing_key=signing_key, preferred_lock=_preferred_lock(ctx, given),
    )


def _require_key(ctx: BuildContext, given: Given) -> None:
    """A real model needs its key: say which before anything is spent."""
    senior = given.pipeline.senior
    if ctx.senior is not None or given.replayed is not None or senior.is_offline:
        return
    from ..senior.client import missing_key

    if (problem := missing_key(senior)) is not None:
        variable = problem.split(",", 1)[0]
        raise UserError(
            f"{senior.model} needs the environment variable {problem}: "
            f"export {variable}=... (keys never go in files of the repo), or replay a recorded build "
            "with --replay ecosystems/<name>/<version>"
        )


def _require_providers(ctx: BuildContext, given: Given) -> None:
    """Every model that may be called must be one litellm can route: a misspelt provider is named before any call."""
    from ..senior.client import unknown_provider

    pipeline, panel = given.pipeline, given.panel
    named: list[tuple[str, Path]] = []
    if ctx.senior is None and given.replayed is None:
        named += [(m, ctx.options.pipeline_file) for m in [pipeline.senior.model, *pipeline.senior.fallbacks]]
    for reviewer in panel.reviewers if panel is not None else ():
        if reviewer.kind == "llm" and reviewer.name not in (ctx.reviewers or {}):
            named += [(m, reviewer.file) for m in [reviewer.definition.model.model, *reviewer.definition.model.fallbacks]]
    for model, where in named:
        if not model.startswith("offline/") and (problem := unknown_provider(model)) is not None:
            raise UserError(f"{where}: {problem}")


def _require_prices(ctx: BuildContext, given: Given) -> None:
    """A cost budget holds only if every model that may be called has a price: say which has none before any call."""
    from ..senior.client import price_per_token

    pipeline, panel = given.pipeline, given.panel
    budgets = [name for name, value in (("run_cost_usd", pipeline.budgets.run_cost_usd),
                                        ("unit_cost_usd", pipeline.budgets.unit_cost_usd)) if value is not None]
    if panel is not None and panel.definition.budget_usd is not None:
        budgets.append(f"the panel's budget_usd ({panel.name})")
    if not budgets or given.replayed is not None:
        return
    models: list[tuple[str, str]] = []
    if ctx.senior is None and not pipeline.senior.is_offline:
        models += [(pipeline.senior.model, "the senior")] + [(m, "a fallback") for m in pipeline.senior.fallbacks]
    for reviewer in panel.reviewers if panel is not None else ():
        if reviewer.kind == "llm" and reviewer.name not in (ctx.reviewers or {}):
            model = reviewer.definition.model
            models += [(m, f"reviewer {reviewer.name}") for m in [model.model, *model.fallbacks]]
    unpriced = [(m, who) for m, who in models if price_per_token(m, pipeline.prices) is None]
    if unpriced:
        listed = "; ".join(f"{who} {m}" for m, who in unpriced)
        first = unpriced[0][0]
        raise UserError(
            f"{ctx.options.pipeline_file}: the budgets ({', '.join(budgets)}) are in dollars, but no price is known "
            f"for {listed}, so they could not hold. Add [prices.\"{first}\"] with input_per_mtok and "
            "output_per_mtok (USD per million tokens) to the pipeline, or keep its budgets in tokens only."
        )


def _reuse(ctx: BuildContext, given: Given, planned: Planned, archive: Archive
           ) -> tuple[dict[str, UnitOutcome], dict[str, str]]:
    """Units taken from the parent whole, and why every other unit is synthesised."""
    from ..artifact.lock import to_regenerate

    plan = planned.plan
    if given.replayed is not None:  # every answer comes from the replayed transcript, reused units' too
        # Why each unit was made, as the replayed build recorded it (its report says the same), else "replayed".
        recorded = given.replayed.lock
        return {}, {u.name: (recorded[u.name].regenerated_because if u.name in recorded else None) or "replayed"
                    for u in plan.units}
    if ctx.options.fresh:
        return {}, {u.name: "--fresh: every unit is synthesised again" for u in plan.units}
    parent = given.latest
    why = to_regenerate(given.spec, plan, planned.inputs, parent.lock if parent else None)
    keep = [u.name for u in plan.units if u.name not in why]
    if not keep:
        return {}, why
    from .reuse import reuse_from_parent

    reused, instead = reuse_from_parent(archive.builds[0], keep, planned.requests)
    return reused, dict(sorted((why | instead).items()))


def _carried(given: Given, planned: Planned, why: dict[str, str], archive: Archive) -> dict[str, Carried]:
    """The model-written tools the offline senior carries into the units it synthesises."""
    if not given.pipeline.senior.is_offline or given.replayed is not None:
        return {}
    from ..senior.carry import find_carried, preflight

    needs = {}
    for unit in planned.plan.units:
        if unit.mad and unit.name in why:
            tools = [f"{unit.mad}.{t.name}" for t in given.spec.mad(unit.mad).tools if not t.builtin]
            if tools:
                needs[unit.name] = tools
    if not needs:
        return {}
    carried = find_carried(needs, planned.requests, planned.inputs, archive.sources)
    preflight(given.spec, planned.plan, planned.requests, carried)  # whole and checked, or stop before any work
    return carried


def _migrations(ctx: BuildContext, given: Given, plan: Plan) -> tuple[list[Migration], MigrationBase]:
    """The migrations of the new version, and what they were planned from. A change that needs consent stops here."""
    from ..artifact.migrate import existing_migrations, plan_migrations, schema_of

    replayed = given.replayed
    if replayed is not None:  # what the replayed build planned from, so its migrations come out the same
        if replayed.migration_base is None:
            raise UserError(f"{replayed.name} was built before versions recorded what their migrations were "
                            "planned from; replay it with the compiler that built it")
        base = replayed.migration_base
        existing = existing_migrations(ctx.options.replay / "src", plan.package)[: base.migrations]
    else:
        parent = given.latest
        existing = existing_migrations(given.ecosystem_dir / parent.version / "src", plan.package) if parent else []
        base = MigrationBase(storage=parent.storage if parent else None, migrations=len(existing))
    return plan_migrations(base.storage, schema_of(given.spec), given.spec, existing), base


def _signing_key(ctx: BuildContext):
    """Loaded before any model is called: a bad key costs nothing."""
    from ..artifact.sign import development_warning, load_signing_key

    key = ctx.signing_key or load_signing_key()
    if (warning := development_warning(key)) is not None:
        ctx.report.warn(warning)
    return key


def _senior(ctx: BuildContext, given: Given, carried: dict, run_log: RunLog):
    """Who answers: the replayed transcript, a stand-in, or the pipeline's senior (carrying tools, offline)."""
    pipeline = given.pipeline
    if given.replayed is not None:
        from ..senior.transcript import TRANSCRIPT, TranscriptModel

        replay = TranscriptModel(ctx.options.replay / TRANSCRIPT)
        ctx.report.say(f"  [dim]replay: every answer comes from {ctx.options.replay / TRANSCRIPT}; no model is called[/]")
        return replay, replay
    from ..senior.client import LiteLLMClient

    senior = ctx.senior or LiteLLMClient(pipeline.senior, pipeline.prices, on_event=run_log.record)
    if pipeline.senior.is_offline:
        ctx.report.say("  [dim]offline build: the senior is offline/reference (templates, no network, no keys)[/]")
    if carried:
        from ..senior.carry import CarryingSenior

        senior = CarryingSenior(senior, carried)
        for tool, c in sorted(carried.items()):
            ctx.report.say(f"  [dim]{c.record().line(tool)}[/]")
    return senior, None


def _cache(ctx: BuildContext, pipeline: Pipeline):
    # The offline senior's answers follow its templates (and carried tools), which its requests do not carry: no cache.
    if ctx.options.cache_dir is None or pipeline.senior.is_offline:
        return None
    from ..senior.cache import ResponseCache

    return ResponseCache(ctx.options.cache_dir)


def _preferred_lock(ctx: BuildContext, given: Given) -> Path | None:
    """The uv.lock whose pins `uv lock` keeps where it can: the replayed artifact's, else the parent's."""
    if ctx.options.replay is not None:
        return ctx.options.replay / "src" / "uv.lock"
    if given.latest is not None:
        return given.ecosystem_dir / given.latest.version / "src" / "uv.lock"
    return None
