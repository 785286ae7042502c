"""The one screen a build ends with: what was reused, carried and synthesised, what it cost, how it was judged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..artifact.manifest import Manifest
from ..kernel_contract import packs_in
from .context import BuildContext, BuildResult
from .prepare import Given

if TYPE_CHECKING:
    from .archive import Archived
    from .judge import Judged
    from .prepare import Prepared


def up_to_date(ctx: BuildContext, given: Given, latest: Manifest) -> BuildResult:
    path = given.ecosystem_dir / latest.version
    ctx.report.say(f"\n[bold green]Up to date:[/] {latest.ecosystem} {latest.version} was built from exactly these "
                   f"inputs ({path}); nothing written, 0 tokens spent.")
    return BuildResult(ecosystem=latest.ecosystem, version=latest.version, path=path, up_to_date=True, manifest=latest)


def built(ctx: BuildContext, prepared: Prepared, judged: Judged, archived: Archived) -> None:
    from .produce import spent

    manifest, final = archived.result.manifest, archived.result.path
    synthesis, tests, review = judged.synthesis, judged.tests, judged.review
    reused = [f"{u.unit} (from {u.reused_from})" for u in synthesis.units if u.reused_from]
    cached = [u.unit for u in synthesis.units if u.cached and not u.reused_from]
    repaired = [f"{u.unit} ({u.rounds} rounds)" for u in synthesis.units if u.rounds > 1]
    answered_by = {u.unit: u.answered_by for u in manifest.units}
    per_unit = ", ".join(f"{u.unit} {u.prompt_tokens + u.completion_tokens:,} tok/{u.latency_ms / 1000:.1f}s"
                         + _trouble(u, answered_by.get(u.unit, ()), prepared.pipeline.senior.model)
                         for u in synthesis.units if not u.reused_from)
    by_reason: dict[str, list[str]] = {}
    for unit, entry in manifest.lock.items():
        if entry.regenerated_because:
            by_reason.setdefault(entry.regenerated_because, []).append(unit)
    rows = [
        ("artifact", str(final)),
        ("parent", manifest.parent or "none (first build)"),
        ("version", f"{manifest.bump.kind} bump: {manifest.bump.reason}"),
        ("units", f"{len(synthesis.units) - len(reused)} synthesised"
         + (f", {len(cached)} answered from cache or a recorded build" if cached else "")
         + f"; {len(reused)} reused" + (f" at 0 tokens: {', '.join(reused)}" if reused else "")
         + (" (--fresh: nothing taken from the parent)" if manifest.fresh else "")
         + (f"; repaired: {', '.join(repaired)}" if repaired else "")),
        *carried_rows(manifest),
        ("packs", packs_line(manifest, prepared.given.latest)),
        ("why", "; ".join(f"{', '.join(units)}: {reason}" for reason, units in by_reason.items()) or "—"),
        ("per unit", per_unit or "—"),
        ("files", f"{archived.outputs} ({len(synthesis.files)} synthesised, kernel copied)"),
        ("tokens", f"spent now: {spent(synthesis)}; the answers it is built from took {manifest.tokens.prompt:,} in, "
                   f"{manifest.tokens.completion:,} out, ${manifest.cost_usd:.4f}"),
        ("tests", f"{tests.passed} passed, {tests.failed} failed, {tests.skipped} skipped"
                  + (f" (this exact tree passed at {tests.reused_from}; not run again)" if tests.reused_from else "")),
        ("sandbox", tests.level + ("" if tests.level == "bubblewrap" else "  [yellow](weaker than bubblewrap)[/]")),
        ("review", f"{review.outcome} by panel {review.panel}: {review.final.consensus.arithmetic}"
         + (f"; {review.repairs} repair round(s)" if review.repairs else "")
         + (f"; dissent: {', '.join(review.dissent)}" if review.dissent else "")),
        *([("run log", str(prepared.run_log.path))] if prepared.run_log.written else []),
        ("run it", f"cd {final}/src && ./deploy/run.sh"),
    ]
    title = f"{manifest.ecosystem} {manifest.version}" + (" (offline build)" if manifest.offline else "")
    ctx.report.summary(title, rows)


def _trouble(unit, answered_by: tuple[str, ...], senior: str) -> str:
    """What it took to get a unit's answer, when it was not one clean call to the senior."""
    from .produce import counted

    parts = []
    if unit.retries:
        parts.append(counted(unit.retries, "retry", "retries"))
    if unit.fallbacks:
        parts.append(counted(unit.fallbacks, "fallback"))
    if set(answered_by) - {senior}:
        parts.append("by " + ", ".join(answered_by))
    return f" ({'; '.join(parts)})" if parts else ""


def packs_line(manifest: Manifest, parent: Manifest | None) -> str:
    """The packs this build carries, and those its parent had that it does not: an upgrade of regen or a spec
    edit that drops one (the web console, the Redis bus) is said, with the line that keeps it."""
    mine = packs_in(manifest.src_outputs)
    line = ", ".join(sorted(mine)) or "none"
    dropped = sorted(packs_in(parent.src_outputs) - mine) if parent else []
    if dropped:
        line += (f"; [yellow]dropped since {parent.version}: {', '.join(dropped)}[/] (to keep one, name it under "
                 "`packs:` in ecosystem.yaml, e.g. `console: {}` for Grace's web console, or bind a tool to it)")
    return line


def carried_rows(manifest: Manifest) -> list[tuple[str, str]]:
    """A row per carried tool: where it came from, who wrote it, what changed since."""
    return [("carried" if i == 0 else "", c.line(tool)) for i, (tool, c) in enumerate(sorted(manifest.carried.items()))]
