"""`regen`: the command line. Imports stay inside the commands so `regen --help` is instant
(litellm alone takes seconds to import and is loaded only when a model is called).

Exit codes: 0 ok, 1 the build failed (or the panel rejected it), 2 a usage or input error
or a panel that could not decide, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _common(parser: argparse.ArgumentParser, pipeline: bool = False) -> None:
    parser.add_argument("--spec", type=Path, default=Path("spec"), help="spec folder (default: spec)")
    if pipeline:
        parser.add_argument(
            "--pipeline", type=Path, default=Path("pipelines/offline.toml"),
            help="pipeline file (default: pipelines/offline.toml, offline, no keys)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regen",
        description="Compile a spec of MADs into a tested, archived, runnable ecosystem.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    regenerate = commands.add_parser("regenerate", help="build the spec into ecosystems/<name>/<version>/")
    _common(regenerate, pipeline=True)
    regenerate.add_argument("--out", type=Path, default=Path("ecosystems"), help="archive folder (default: ecosystems)")
    regenerate.add_argument(
        "--replay", type=Path, metavar="ARTIFACT",
        help="answer every model request from ARTIFACT's transcript (no keys, no network)",
    )
    regenerate.add_argument("--no-cache", action="store_true", help="ignore the response cache in .regen/cache")
    regenerate.add_argument("--quiet", action="store_true", help="print only warnings, errors and the result")

    plan = commands.add_parser("plan", help="show the MAD graph, start-up order, units and their token counts")
    _common(plan, pipeline=True)

    verify = commands.add_parser("verify", help="rebuild an artifact from its transcript and compare every byte")
    verify.add_argument("artifact", type=Path, help="e.g. ecosystems/madgroup/1.0.0")
    _common(verify)

    gate = commands.add_parser(
        "gate", help="judge an archived build with a review panel: exit 0 approve, 1 reject, 2 undecided",
        description="Judge an archived build with a review panel (the pipeline's, or --panel), against its "
                    "parent version, and say by exit code whether it may ship.",
        epilog="exit codes: 0 the panel approves; 1 it rejects; 2 it could not decide (reviewers errored, timed "
               "out, ran out of budget or had no key, below the quorum; or the tests could not run). The reason "
               "is printed on one line; review.json, review.md and review.html go to --report.",
    )
    gate.add_argument("artifact", type=Path, nargs="?", help="default: the newest build of the spec's ecosystem")
    _common(gate, pipeline=True)
    gate.add_argument("--panel", type=Path, help="panel file (default: the pipeline's [review] panel)")
    gate.add_argument("--report", type=Path, metavar="DIR",
                      help="where review.json, review.md and review.html go (default: .regen/gate/<name>/<version>)")
    gate.add_argument("--out", type=Path, default=Path("ecosystems"), help="archive folder (default: ecosystems)")
    gate.add_argument("--trust-tests", action="store_true",
                      help="read the artifact's tests.json instead of running its tests in the sandbox again")
    gate.add_argument("--no-cache", action="store_true", help="ignore the response cache in .regen/cache")
    gate.add_argument("--quiet", action="store_true", help="print only warnings, errors and the result")

    check = commands.add_parser("check", help="validate a spec only")
    _common(check)
    return parser


def _regenerate(args: argparse.Namespace) -> int:
    from .config import RunOptions
    from .pipeline import regenerate
    from .progress import Reporter

    options = RunOptions(
        spec_dir=args.spec, pipeline_file=args.pipeline, out_dir=args.out, replay=args.replay,
        cache_dir=None if args.no_cache else Path(".regen/cache"),
    )
    result = regenerate(options, report=Reporter(quiet=args.quiet))
    if args.quiet:
        state = "up to date" if result.up_to_date else "built"
        print(f"{result.ecosystem} {result.version} {state}: {result.path}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from . import context
    from .config import load_pipeline
    from .load import load_spec
    from .plan import make_plan
    from .synthesise import first_request

    spec = load_spec(args.spec)
    pipeline = load_pipeline(args.pipeline)
    plan = make_plan(spec)
    print(f"ecosystem {plan.ecosystem}: {len(spec.mads)} MADs")
    print("start-up order: " + " -> ".join(plan.startup_order))
    print("dependencies:")
    for name in plan.startup_order:
        talks = spec.mad(name).talks_to
        print(f"  {name} -> {', '.join(talks) if talks else '(none)'}")
    fits = context.fit([first_request(spec, plan, u, pipeline) for u in plan.units], pipeline.senior)
    window = fits[0].window if fits else None
    if pipeline.senior.is_offline:
        window_text = "no window: it is not a language model"
    else:
        window_text = f"{window:,} tokens" if window else "unknown: set [senior] context_window"
    print(f"synthesis units (senior {pipeline.senior.model}, window {window_text}):")
    for unit, fit in zip(plan.units, fits):
        verdict = f"OVER by {fit.over:,}" if fit.over else "fits"
        print(f"  {unit.name:<14} {fit.prompt_tokens:>7,} prompt + {fit.max_tokens:,} answer tokens: {verdict}")
        print(f"  {'':<14} owns {', '.join(unit.owns)}")
    context.require_fit(fits, pipeline.senior)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .pipeline import verify

    result = verify(args.artifact, args.spec)
    if result.first_difference is None:
        print(f"{args.artifact}: verified: all {result.files} files of src/ reproduced byte for byte from its transcript")
        return 0
    print(
        f"{args.artifact}: NOT reproduced: {len(result.differences)} file(s) differ, first {result.first_difference}",
        file=sys.stderr,
    )
    return 1


def _gate(args: argparse.Namespace) -> int:
    from .errors import BuildFailed
    from .progress import Reporter
    from .review.gate import gate
    from .review.report import one_line

    try:
        result, folder = gate(
            args.artifact, args.spec, args.pipeline, panel_file=args.panel, report_dir=args.report, out_dir=args.out,
            trust_tests=args.trust_tests, cache_dir=None if args.no_cache else Path(".regen/cache"),
            report=Reporter(quiet=args.quiet),
        )
    except BuildFailed as exc:  # the tests could not run: no verdict either way
        print(f"gate: undecided: {str(exc).splitlines()[0]}")
        return 2
    print(f"gate: {one_line(result)}")
    print(f"report: {folder}/review.md (review.json, review.html)")
    return result.exit_code


def _check(args: argparse.Namespace) -> int:
    from .load import load_spec

    spec = load_spec(args.spec)
    tools = sum(len(m.tools) for m in spec.mads)
    print(f"{args.spec}: ok — ecosystem {spec.ecosystem.name}, {len(spec.mads)} MADs, {tools} tools")
    return 0


COMMANDS = {"regenerate": _regenerate, "plan": _plan, "check": _check, "verify": _verify, "gate": _gate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import BuildFailed, ReviewUndecided, UserError

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("regen: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        if args.debug:
            raise
        print(f"{exc}", file=sys.stderr)
        return 2
    except BuildFailed as exc:
        if args.debug:
            raise
        print(f"regen: build failed: {exc}", file=sys.stderr)
        return 1
    except ReviewUndecided as exc:
        if args.debug:
            raise
        print(f"regen: undecided: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug of ours: say so in one line; the traceback is one flag away
        if args.debug:
            raise
        print(f"regen: internal error: {type(exc).__name__}: {exc}\n"
              "Rerun with --debug for the traceback, and please report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
