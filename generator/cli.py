"""`regen`: the command line. Imports stay inside the commands so `regen --help` is instant
(litellm alone takes seconds to import and is loaded only when a model is called).

Exit codes: 0 ok, 1 the build failed (or the panel rejected it), 2 a usage or input error
or a panel that could not decide, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

OFFLINE_PIPELINE = Path("pipelines/offline.toml")


def default_pipeline() -> Path:
    """The working folder's pipelines/offline.toml (a regen checkout, or a project with pipelines of its own), else
    regen's: a spec started with `regen init` in any folder builds offline without naming a pipeline."""
    return OFFLINE_PIPELINE if OFFLINE_PIPELINE.is_file() else Path(__file__).resolve().parents[1] / OFFLINE_PIPELINE


def _common(parser: argparse.ArgumentParser, pipeline: bool = False) -> None:
    parser.add_argument("--spec", type=Path, default=Path("spec"), help="spec folder (default: spec)")
    if pipeline:
        parser.add_argument(
            "--pipeline", type=Path, default=None,
            help="pipeline file (default: pipelines/offline.toml, offline, no keys: the working folder's, else regen's)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regen",
        description="Compile a spec of MADs into a tested, archived, runnable ecosystem.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    start = commands.add_parser("init", help="write a new spec to start an ecosystem of your own from",
                                description="Write a starter spec (two MADs bound to kernel capabilities) into DIR, "
                                            "ready for `regen regenerate --spec DIR` on the offline default.")
    start.add_argument("dir", type=Path, help="the folder for the new spec (must not exist, or be empty)")
    start.add_argument("--name", help="the ecosystem's name (default: made from DIR's name)")
    start.add_argument("--force", action="store_true", help="write the starter's files even into a folder that is not empty")

    regenerate = commands.add_parser("regenerate", help="build the spec into ecosystems/<name>/<version>/")
    _common(regenerate, pipeline=True)
    regenerate.add_argument("--out", type=Path, default=Path("ecosystems"), help="archive folder (default: ecosystems)")
    regenerate.add_argument(
        "--replay", type=Path, metavar="ARTIFACT",
        help="answer every model request from ARTIFACT's transcript (no keys, no network)",
    )
    regenerate.add_argument(
        "--fresh", action="store_true",
        help="synthesise every unit again, reusing nothing from the previous version (any pipeline), and run the "
             "sandbox tests even when this exact tree passed before",
    )
    regenerate.add_argument("--no-cache", action="store_true", help="ignore the response cache in .regen/cache")
    regenerate.add_argument("--quiet", action="store_true", help="print only warnings, errors and the result")

    plan = commands.add_parser("plan", help="show the MAD graph, start-up order, units and their token counts")
    _common(plan, pipeline=True)

    verify = commands.add_parser(
        "verify", help="check an artifact's signature, hashes and SBOM, and rebuild it from its transcript byte for byte",
    )
    verify.add_argument("artifact", type=Path, help="e.g. ecosystems/madgroup/1.0.0")
    verify.add_argument("--spec", type=Path, help="spec folder (default: the artifact's own copy in spec/)")
    verify.add_argument("--trust", type=Path, metavar="PUBKEY",
                        help="require the artifact be signed by this public key (a .pub.pem file)")
    verify.add_argument("--keep", type=Path, metavar="DIR", help="keep the rebuilt src/ in DIR/src (e.g. for diffoscope)")

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
    gate.add_argument("--no-cache", action="store_true",
                      help="ask every reviewer afresh: without it, a verdict already in .regen/cache is reused (and "
                           "the gate says so)")
    gate.add_argument("--scope", choices=("parent", "approved", "full"),
                      help="what LLM reviewers see of src/: the diff against the parent, against the newest ancestor "
                           "a panel at least this strict approved (the whole tree when none did), or every file "
                           "(default: the pipeline's [review] scope, approved)")
    gate.add_argument("--trust", type=Path, metavar="PUBKEY",
                      help="judge the artifact only if it is signed by this public key (a .pub.pem file)")
    gate.add_argument("--quiet", action="store_true", help="print only warnings, errors and the result")
    gate.add_argument("--sarif", type=Path, metavar="FILE",
                      help="also write the final round's findings as SARIF 2.1.0 to FILE (for code scanning), "
                           "whatever the outcome; with GITHUB_ACTIONS=true they are printed as annotations too")

    history = commands.add_parser("versions", help="list the archived versions of an ecosystem with their bumps")
    history.add_argument("name", help="the ecosystem, e.g. madgroup")
    history.add_argument("--out", type=Path, default=Path("ecosystems"), help="archive folder (default: ecosystems)")

    diff = commands.add_parser("diff", help="what changed between two archived builds: spec, tools, schema, deps, files")
    diff.add_argument("old", help="e.g. madgroup@1.0.1")
    diff.add_argument("new", help="e.g. madgroup@1.0.2 (or madgroup@latest)")
    diff.add_argument("--out", type=Path, default=Path("ecosystems"), help="archive folder (default: ecosystems)")
    diff.add_argument("--json", action="store_true", help="the whole diff as JSON")
    diff.add_argument("--patch", action="store_true", help="also print the unified diff of the spec and every file")

    report = commands.add_parser(
        "report", help="render an archived version's report.html (the MAD graph, units, tests, review, changes)",
        description="Render the report of an archived version from its own files (and its parent beside it). A version "
                    "archived with a report.html is compared with it: exit 0 when the bytes match, 1 when they differ. "
                    "Nothing is ever written into the artifact.",
    )
    report.add_argument("artifact", type=Path, help="e.g. ecosystems/madgroup/1.3.21")
    report.add_argument("--out", type=Path, metavar="FILE",
                        help="where the page goes (default: .regen/report/<name>/<version>/report.html for a version "
                             "archived without one; a version with one is only compared unless --out is given)")

    keys = commands.add_parser("keys", help="manage the key that signs artifacts")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init", help="make an Ed25519 signing key ($REGEN_SIGNING_KEY or ~/.config/regen/signing-key.pem)",
    )
    init.add_argument("--path", type=Path, help="where the private key goes; the public key is written beside it as .pub.pem")
    init.add_argument("--force", action="store_true",
                      help="replace an existing key (artifacts it signed will no longer verify against the new one)")

    export = commands.add_parser("export", help="copy an archived build into a working copy you can edit")
    export.add_argument("ref", help="NAME@VERSION, e.g. madgroup@1.0.2 (or NAME@latest)")
    export.add_argument("dir", type=Path, help="the working copy to create (must not exist, or be empty)")
    export.add_argument("--out", type=Path, default=Path("ecosystems"), help="archive folder (default: ecosystems)")

    update = commands.add_parser("update", help="move a working copy to another version, keeping your edits (3-way merge)")
    update.add_argument("dir", type=Path, help="a working copy made by `regen export`")
    update.add_argument("--to", default="latest", help="VERSION or latest (default)")
    update.add_argument("--out", type=Path, default=Path("ecosystems"), help="archive folder (default: ecosystems)")
    update.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")

    check = commands.add_parser("check", help="validate a spec only")
    _common(check)

    mcp = commands.add_parser(
        "mcp", help="serve regen's commands to a coding agent as an MCP server (stdio, or HTTP on 127.0.0.1)",
        description="An MCP server with the tools check, plan, regenerate, verify, gate, diff, versions and init, "
                    "working in --root. Over stdio by default; with --http, streamable HTTP on 127.0.0.1 where every "
                    "request must carry 'Authorization: Bearer <REGEN_MCP_TOKEN>'.")
    mcp.add_argument("--root", type=Path, default=Path("."),
                     help="the folder the tools work in; no tool reads or writes outside it (default: here)")
    mcp.add_argument("--http", action="store_true", help="serve streamable HTTP at http://127.0.0.1:PORT/mcp")
    mcp.add_argument("--port", type=int, default=8765, help="the HTTP port (default: 8765)")

    return parser


def _regenerate(args: argparse.Namespace) -> int:
    from .build.context import BuildContext
    from .build.pipeline import regenerate
    from .config import RunOptions
    from .progress import Reporter

    options = RunOptions(
        spec_dir=args.spec, pipeline_file=args.pipeline, out_dir=args.out, replay=args.replay, fresh=args.fresh,
        cache_dir=None if args.no_cache else Path(".regen/cache"),
    )
    result = regenerate(BuildContext(options=options, report=Reporter(quiet=args.quiet)))
    if args.quiet:
        state = "up to date" if result.up_to_date else "built"
        print(f"{result.ecosystem} {result.version} {state}: {result.path}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .config import load_pipeline
    from .senior import context
    from .senior.synthesise import first_request
    from .spec.load import load_spec
    from .spec.plan import make_plan

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
    from .build.verify import verify

    result = verify(args.artifact, args.spec, trust=args.trust, keep=args.keep)
    for problem in result.problems:
        print(f"{args.artifact}: {problem}", file=sys.stderr)
    if result.differences:
        print(f"{args.artifact}: NOT reproduced: {len(result.differences)} file(s) differ, first {result.first_difference}",
              file=sys.stderr)
    if not result.ok:
        return 1
    print(f"{args.artifact}: verified: signed by {result.signed_by}; every file matches its manifest; the SBOM matches "
          f"the lock; all {result.files} files of src/ reproduced byte for byte from its transcript; {result.review}"
          + (f"; {result.report}" if result.report else ""))
    return 0


def _gate(args: argparse.Namespace) -> int:
    from .errors import ArtifactRefused, BuildFailed, UserError
    from .progress import Reporter
    from .review.gate import gate
    from .review.report import one_line
    from .review.sarif import github_annotations, outcome_annotation, write_sarif

    annotate = os.environ.get("GITHUB_ACTIONS") == "true"  # GitHub reads workflow commands from stdout
    try:
        result, folder = gate(
            args.artifact, args.spec, args.pipeline, panel_file=args.panel, report_dir=args.report, out_dir=args.out,
            trust_tests=args.trust_tests, cache_dir=None if args.no_cache else Path(".regen/cache"),
            report=Reporter(quiet=args.quiet), scope=args.scope, trust=args.trust,
        )
    except ArtifactRefused as exc:  # tampered or unsigned: judged by nobody, exit 1
        if annotate:
            print(outcome_annotation("reject", f"gate: refused: {str(exc).splitlines()[0]}"))
        raise
    except BuildFailed as exc:  # the tests could not run: no verdict either way, no report, no SARIF
        line = f"gate: undecided: {str(exc).splitlines()[0]}"
        if annotate:
            print(outcome_annotation("undecided", line))
        print(line)
        return 2
    # The artifact the gate judged (the newest build when none was named): finding paths are relative to it.
    artifact = args.artifact or args.out / result.ecosystem / result.version
    if annotate:
        for annotation in github_annotations(result, artifact, Path.cwd()):
            print(annotation)
    print(f"gate: {one_line(result)}")
    if result.bound is not None:
        print(f"scope: {result.bound.scope.reason}")
    print(f"report: {folder}/review.md (review.json, review.html)")
    if args.sarif:
        try:
            write_sarif(result, artifact, Path.cwd(), args.sarif)
        except OSError as exc:
            raise UserError(f"{args.sarif}: cannot write the SARIF ({exc.strerror or exc})") from None
        print(f"sarif: {args.sarif}")
    return result.exit_code


def _versions(args: argparse.Namespace) -> int:
    from .artifact.history import version_lines

    for line in version_lines(args.out / args.name):
        units = f"{line.units_synthesised} synthesised, {line.units_reused} reused" + (
            f", {line.tools_carried} tools carried" if line.tools_carried else "")
        print(f"{args.name} {line.version:<9} {line.bump:<8} parent {line.parent or '-':<8} "
              f"{'offline ' if line.offline else ''}review {line.review}; {units}\n    {line.reason}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from .artifact.history import changes, render_text
    from .artifact.workcopy import resolve

    found = changes(resolve(args.out, args.old), resolve(args.out, args.new))
    print(found.model_dump_json(indent=2) if args.json else render_text(found, args.patch), end="\n" if args.json else "")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .build.report import write_report_of

    line, same = write_report_of(args.artifact, args.out)
    print(line)
    return 0 if same is not False else 1


def _keys(args: argparse.Namespace) -> int:
    from .artifact.sign import init_keys

    pair = init_keys(args.path, force=args.force)
    print(f"signing key {pair.key_id}: {pair.private_path} (mode 0600; keep it secret, outside the repo)")
    print(f"public key: {pair.public_path} (give it to verifiers: regen verify ARTIFACT --trust {pair.public_path})")
    for warning in pair.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .artifact.workcopy import export, resolve

    result = export(resolve(args.out, args.ref), args.dir)
    print(f"{result.target}: {result.ecosystem} {result.version}, {result.files} files; edit freely, then: "
          f"regen update {result.target} --to <version>")
    return 0


def _update(args: argparse.Namespace) -> int:
    from .artifact.workcopy import describe, update

    result = update(args.dir, args.out, args.to, dry_run=args.dry_run)
    print(describe(result))
    return 0 if result.ok or result.dry_run else 1  # like git merge: 1 when conflicts are left to resolve


def _init(args: argparse.Namespace) -> int:
    from .spec.starter import init

    started = init(args.dir, args.name, force=args.force)
    print(f"{started.folder}: a new spec of the ecosystem {started.name}: {', '.join(started.files)}")
    print("the desk keeps conversations and talks to the vault, which keeps secrets; every tool is bound to a kernel "
          "capability, so the offline default builds it as it is. Next:")
    print(f"  regen regenerate --spec {started.folder}        # build it into ecosystems/{started.name}/1.0.0")
    print(f"  (edit {started.folder}/requirements.md or a MAD, then regenerate again)")
    print(f"  regen diff {started.name}@1.0.0 {started.name}@latest   # what changed")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .spec.load import load_spec

    spec = load_spec(args.spec)
    tools = sum(len(m.tools) for m in spec.mads)
    items = spec.requirement_items
    named = f", {len(items)} requirements with ids" if items else ", requirements without ids (no coverage matrix)"
    print(f"{args.spec}: ok — ecosystem {spec.ecosystem.name}, {len(spec.mads)} MADs, {tools} tools{named}")
    for requirement in spec.unreferenced_requirements():
        print(f"  note: {args.spec / 'requirements.md'}:{requirement.line}: {requirement.id} is named by no MAD and no "
              "acceptance area: only a model-written test that names it can cover it")
    return 0


def _mcp(args: argparse.Namespace) -> int:
    from .mcp_server import serve

    serve(args.root, http=args.http, port=args.port)
    return 0


COMMANDS = {"regenerate": _regenerate, "plan": _plan, "check": _check, "verify": _verify, "gate": _gate,
            "versions": _versions, "diff": _diff, "report": _report, "keys": _keys, "export": _export, "update": _update,
            "init": _init, "mcp": _mcp}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "pipeline", OFFLINE_PIPELINE) is None:
        args.pipeline = default_pipeline()
    if args.command == "regenerate" and args.fresh and args.replay:
        parser.error("--fresh and --replay do not go together: a replay rebuilds exactly what was recorded, "
                     "reuse included")
    from .errors import RegenError

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("regen: interrupted", file=sys.stderr)
        return 130
    except RegenError as exc:
        if args.debug:
            raise
        print(f"{exc.prefix}{exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug of ours: say so in one line; the traceback is one flag away
        if args.debug:
            raise
        print(f"regen: internal error: {type(exc).__name__}: {exc}\n"
              "Rerun with --debug for the traceback, and please report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
