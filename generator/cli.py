"""`regen`: the command line. Imports stay inside the commands so `regen --help` is instant
(litellm alone takes seconds to import and is loaded only when a model is called).

Exit codes: 0 ok, 1 the build failed, 2 a usage or input error, 130 interrupted.
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
    regenerate.add_argument("--quiet", action="store_true", help="print only warnings, errors and the result")

    plan = commands.add_parser("plan", help="show the MAD graph, start-up order and synthesis units")
    _common(plan)

    check = commands.add_parser("check", help="validate a spec only")
    _common(check)
    return parser


def _regenerate(args: argparse.Namespace) -> int:
    from .config import RunOptions
    from .pipeline import regenerate
    from .progress import Reporter

    options = RunOptions(spec_dir=args.spec, pipeline_file=args.pipeline, out_dir=args.out)
    result = regenerate(options, report=Reporter(quiet=args.quiet))
    if args.quiet:
        state = "up to date" if result.up_to_date else "built"
        print(f"{result.ecosystem} {result.version} {state}: {result.path}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .load import load_spec
    from .plan import make_plan

    spec = load_spec(args.spec)
    plan = make_plan(spec)
    print(f"ecosystem {plan.ecosystem}: {len(spec.mads)} MADs")
    print("start-up order: " + " -> ".join(plan.startup_order))
    print("dependencies:")
    for name in plan.startup_order:
        talks = spec.mad(name).talks_to
        print(f"  {name} -> {', '.join(talks) if talks else '(none)'}")
    print("synthesis units:")
    for unit in plan.units:
        print(f"  {unit.name:<14} owns {', '.join(unit.owns)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .load import load_spec

    spec = load_spec(args.spec)
    tools = sum(len(m.tools) for m in spec.mads)
    print(f"{args.spec}: ok — ecosystem {spec.ecosystem.name}, {len(spec.mads)} MADs, {tools} tools")
    return 0


COMMANDS = {"regenerate": _regenerate, "plan": _plan, "check": _check}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import BuildFailed, UserError

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


if __name__ == "__main__":
    raise SystemExit(main())
