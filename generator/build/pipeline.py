"""The build, stage by stage, on one screen.

    load → up to date? → prepare (plan, requests, version, reuse, carried tools, senior)
         → produce (synthesise, write, sandbox test, repair) → judge (review, repair)
         → archive (upgrade test, artifact, manifest, signature, publish) → summary

Each stage is a function of its own module, with typed inputs and outputs; this file only
chains them. `verify.py` replays an artifact on the same stages.
"""

from __future__ import annotations

from ..artifact.store import build_lock, staging
from . import summary
from .context import BuildContext, BuildResult
from .prepare import load_inputs, up_to_date


def regenerate(ctx: BuildContext) -> BuildResult:
    """Build the spec into a new archived version, or say it is up to date."""
    given = load_inputs(ctx)  # spec, pipeline, panel, fingerprint: nothing slow imported yet
    with build_lock(given.ecosystem_dir):  # a second build of this ecosystem, from anywhere, is refused: BuildBusy
        if (latest := up_to_date(ctx, given)) is not None:
            return summary.up_to_date(ctx, given, latest)
        from .archive import archive
        from .judge import judge
        from .prepare import prepare
        from .produce import produce

        prepared = prepare(ctx, given)  # everything decided before the first model call
        try:
            with staging(prepared.ecosystem_dir) as stage:
                produced = produce(ctx, prepared, stage / "src")
                judged = judge(ctx, prepared, produced, stage)
                archived = archive(ctx, prepared, judged, stage)
        except BaseException:
            if prepared.run_log.written:  # every model attempt up to the failure, for the post-mortem
                ctx.report.say(f"  [dim]run log: {prepared.run_log.path}[/]")
            raise
    summary.built(ctx, prepared, judged, archived)
    return archived.result
