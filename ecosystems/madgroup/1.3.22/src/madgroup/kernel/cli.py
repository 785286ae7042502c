"""The ecosystem's command line: `python -m <pkg> serve|token|clients|audit|secrets ...`, and what the packs this
build carries add to it (each in its `packs/<name>/cli.py`, see PACK_PARTS)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import closing
from functools import partial
from pathlib import Path

from . import capabilities, logs, packs
from .audit import ANCHOR_FILE, AuditLog, verify_chain, verify_file
from .clients import AUDIT_PERMISSION, ClientRegistry, calls_today_by_client
from .config import EcosystemConfig
from .db import Database, open_database
from .errors import InvalidArgument, KernelError
from .supervisor import SupervisionPolicy

# The parts of the command line a pack adds, by its `cli.py`'s `add_commands(parsers, config)`: "<command>",
# "<command> <subcommand>" or "<command> --option". A build without the pack has no code for them, so asking for
# one there is refused here with the pack's line to add, not with argparse's "invalid choice".
PACK_PARTS = {
    "redis": (("bus", "serve --mads", "serve --claim-idle", "serve --drill-hold"), packs.NO_REDIS),
    "console": (("clients unlock",), "this ecosystem has no web console, so no sign-in lock to lift: add `console: {}` "
                                     "under `packs:` in spec/ecosystem.yaml and rebuild (nox -s regenerate)"),
    "tracing": (("serve --otlp-endpoint",), packs.NO_TRACING),
    "postgres": (("serve --db",), packs.NO_POSTGRES),
    "storage": (("migrate",), "this ecosystem's MADs have no tables and it has no storage history: no migration to "
                              "show or undo (its build has no storage pack)"),
}


def _days(text: str) -> int:
    if not text.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days (0 or more)")
    return int(text)


def _parser(config: EcosystemConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=config.name, description=config.description or f"The {config.name} ecosystem.")
    sub = parser.add_subparsers(dest="command", required=True)
    state = argparse.ArgumentParser(add_help=False)  # the option of every command that works on a state directory
    state.add_argument("--state", required=True, type=Path, help="the ecosystem's state directory")

    serve = sub.add_parser("serve", parents=[state], help="run the ecosystem: MCP at /mcp, /healthz; the web console at / (console pack)")
    # `make_runtime(make, args)`: the Runtime serve runs, `make(**options)` given those of a pack's serve options;
    # without the tracing pack's --otlp-endpoint, only the OTEL_ variables can ask for traces (a clear error then)
    serve.set_defaults(run=_serve, make_runtime=lambda make, args: make(), otlp_endpoint=None,
                       db=db_url(config))  # a build without the postgres pack refuses one
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--drain-timeout", type=float, default=20.0, metavar="SECONDS",
                       help="on SIGTERM, how long calls in flight get to finish before the MADs stop (default 20)")
    serve.add_argument("--sessions-per-client", type=int, default=16, metavar="N",
                       help="open MCP sessions a client may hold at once (default 16); all clients together: 1000")
    serve.add_argument("--session-idle", type=float, default=1800.0, metavar="SECONDS",
                       help="an MCP session idle this long is closed (default 1800)")
    serve.add_argument("--call-retention-days", type=_days, default=90, metavar="DAYS",
                       help="keep the per-call log (gateway_calls) this many UTC days, pruned at start and hourly; "
                            "0 keeps it for ever (default 90)")
    bus_option(serve, config)

    token = sub.add_parser("token", parents=[state],
                           help="create (once) a client bearer token and print the file that holds it")
    token.add_argument("--name", default="default")
    token.add_argument("--allow", action="append", default=None,
                       help="tool pattern this token may call (fnmatch over <mad>.<tool>; repeatable; default '*')")
    token.set_defaults(run=_token)

    clients_sub = _group(sub, "clients", "MCP clients: add (prints the token once), list, revoke", _clients)
    add = clients_sub.add_parser("add", parents=[state], help="add a client and print its bearer token, once")
    add.add_argument("name")
    add.add_argument("--allow", action="append", required=True, metavar="PATTERN",
                     help="tool pattern the client may call (fnmatch over <mad>.<tool>, e.g. 'rogers.*'); repeatable; '*' for all")
    add.add_argument("--rate", metavar="N/UNIT", help="rate limit, e.g. 10/s, 600/min or 5000/h (bursts of up to N)")
    add.add_argument("--quota", metavar="N/day", help="calls per UTC day, e.g. 1000/day (counted in the database)")
    add.add_argument("--secret", action="append", metavar="PATTERN", dest="secret_patterns",
                     help="secret names its calls may read or write, e.g. 'db.*' (repeatable; default: every secret "
                          "the tools it may call reach)")
    listing = clients_sub.add_parser("list", parents=[state],
                                     help="clients with their patterns, limits and calls today (never a token)")
    listing.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    revoke = clients_sub.add_parser("revoke", parents=[state],
                                    help="revoke a client: running servers refuse its token from the next request")
    revoke.add_argument("name")

    verify = _group(sub, "audit", "the hash-chained audit log", _audit_verify).add_parser(
        "verify", parents=[state], help="walk the chain: exit 0 when intact, 1 naming the first broken entry")
    verify.add_argument("--anchor", type=Path, metavar="FILE",
                        help="a copy of audit-anchor.json kept elsewhere: its entry must still be in the chain, unchanged "
                             "(detects deleted newest entries, which leave a valid chain); default: the state's own")

    _group(sub, "secrets", "the secrets store", _rotate_key).add_parser(
        "rotate-key", parents=[state], help="re-encrypt every secret under a new key; with the key in the environment, "
        "the new key is written to <state>/keys/secrets.key.new (0600) for you to put there (stop the ecosystem first)")

    for name in PACK_PARTS:
        if name in capabilities.PACKS:  # the catalogue of each pack this build carries; its cli.py is as light
            importlib.import_module(f"{packs.__name__}.{name}.cli").add_commands(
                {"commands": sub, "serve": serve, "clients": clients_sub, "state": state}, config)
    return parser


def _group(sub: argparse._SubParsersAction, name: str, help: str, run: Callable[..., int]) -> argparse._SubParsersAction:
    """A command with subcommands of its own (`<name> <subcommand>`, read back as args.<name>_command), run by `run`
    unless a subcommand sets its own."""
    group = sub.add_parser(name, help=help)
    group.set_defaults(run=run)
    return group.add_subparsers(dest=f"{name}_command", required=True)


def _asks(argv: list[str], part: str) -> bool:
    """Whether the command line `argv` asks for a PACK_PARTS `part`."""
    command, _, then = part.partition(" ")
    words = [arg.partition("=")[0] for arg in argv[1:]] if then.startswith("-") else argv[1:2]
    return argv[:1] == [command] and (not then or then in words)


def bus_option(parser: argparse.ArgumentParser, config: EcosystemConfig, required: bool = False) -> None:
    """`--bus URL`, default $<PREFIX>_BUS_URL: serve's, and the redis pack's `bus` commands' (required there)."""
    env = f"{config.env_prefix}_BUS_URL"
    default = os.environ.get(env, "")
    parser.add_argument("--bus", default=default, required=required and not default, metavar="URL",
                        help=f"the bus: 'local' (one process, the default) or a Redis URL shared by several processes, "
                             f"e.g. redis://127.0.0.1:6379/0 (default: ${env})")


def _audit_verify(config: EcosystemConfig, args: argparse.Namespace) -> int:
    anchor = args.anchor or (args.state / ANCHOR_FILE)
    anchor = anchor if anchor.exists() or args.anchor else None
    if not db_url(config):
        count, head, problems = verify_file(args.state / "ecosystem.db", anchor)
    else:  # the chain every replica appends to, in their PostgreSQL database
        with closing(state_db(config, args.state)) as db:
            count, head, problems = verify_chain(db.query, anchor)
    if problems:
        more = f" ({len(problems) - 1} more problems follow it)" if len(problems) > 1 else ""
        print(f"audit log broken: {problems[0]}{more}", file=sys.stderr)
        return 1
    print(f"{count} entries, chain intact, head {head}")
    return 0


def _rotate_key(config: EcosystemConfig, args: argparse.Namespace) -> int:
    from .secrets import KeySource, SecretsManager  # cryptography: loaded only by the commands that need it

    if not (args.state / "ecosystem.db").is_file() and not db_url(config):
        raise KernelError(f"no database at {args.state / 'ecosystem.db'}: pass the ecosystem's state directory "
                          "as --state")
    with closing(state_db(config, args.state)) as db:
        keys = KeySource(args.state, f"{config.env_prefix}_SECRETS_KEY", config.name)
        manager = SecretsManager(db, keys, lambda caller: (False, set()), AuditLog(db))
        done = manager.rotate_key("operator", operator=True)
    print(f"re-encrypted {done['versions']} versions of {done['secrets']} secrets under key {done['key_id']}")
    if keys.from_env:
        print(f"the new key is in {done['key_file']} (mode 0600). Set {keys.env_var} to its contents and restart the "
              "ecosystem, then delete the file: until then the ecosystem cannot read its secrets.")
    else:
        print(f"{keys.keys_dir / 'secrets.key'} now holds it; a running ecosystem picks it up at its next secrets access.")
    return 0


def _serve(config: EcosystemConfig, args: argparse.Namespace) -> int:
    import uvicorn

    from . import tracing
    from .gateway import build_app
    from .runtime import Runtime

    logs.configure(args.log_level)
    runtime = args.make_runtime(partial(Runtime, config, args.state, bus_url=args.bus, db_url=args.db,
                                        supervision=SupervisionPolicy(drain_timeout_s=args.drain_timeout)), args)
    try:
        clients = ClientRegistry(runtime.state_dir, runtime.db.document("tokens.json"))  # replicas share PostgreSQL's
        app = build_app(runtime, clients, host=args.host, session_idle_s=args.session_idle,
                        call_retention_days=args.call_retention_days, sessions_per_client=args.sessions_per_client)
        # off unless an OTLP endpoint is configured (kernel/tracing.py)
        tracing.configure(config.name, runtime.version, otlp_endpoint=args.otlp_endpoint)
    except KernelError:
        runtime.db.close()
        raise

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT, new requests get 503 with Retry-After (and /healthz says 503 "draining") while
        the tool calls and every other response in flight finish, up to --drain-timeout; only then does
        uvicorn stop listening and close connections, and the lifespan stop the MADs."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            app.state.gate.begin()
            await runtime.drain()
            if not await app.state.gate.wait_idle(runtime.supervisor.drain_deadline):
                logs.get("cli").warning("shutdown: responses still in flight at the drain deadline",
                                        extra={"in_flight": app.state.gate.in_flight})
            await super().shutdown(sockets)

    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                                           lifespan="on", timeout_graceful_shutdown=5))
    # uvicorn captures SIGINT/SIGTERM and shuts down gracefully (drain, then the lifespan stops the
    # MADs and closes the database), then re-raises the signal to the handlers it found: these, which
    # turn a completed graceful shutdown into exit code 0. A signal that comes before uvicorn captures
    # them (while it starts) asks it to stop as soon as it has started, rather than being lost.
    received: list[int] = []

    def stop_when_started(sig: int, _frame: object) -> None:
        received.append(sig)
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop_when_started) for sig in (signal.SIGINT, signal.SIGTERM)}
    # The banner only once a signal is handled: from here on, a stop is a graceful one.
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    web = f"Grace's web console at {base}/" if app.state.grace else "no web console (the console pack)"
    print(f"{config.name} serving MCP at {base}/mcp; {web}", flush=True)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        tracing.shutdown()  # the spans still batched go out before the process ends
    if received:
        logs.get("cli").info("stopped by signal", extra={"signal": signal.Signals(received[0]).name})
    return 0 if server.started else 1


def db_url(config: EcosystemConfig) -> str:
    """$<PREFIX>_DB_URL: the PostgreSQL database replicas share (the postgres pack); "": the state's SQLite."""
    return os.environ.get(f"{config.env_prefix}_DB_URL", "").strip()


def state_db(config: EcosystemConfig, state: Path) -> Database:
    return open_database(state, db_url(config))


def _shared(config: EcosystemConfig, args: argparse.Namespace) -> tuple[Database | None, ClientRegistry]:
    """The state's PostgreSQL database, if it has one, and its clients: there (every replica reads them) or in
    the state directory's tokens.json (made without opening the SQLite database)."""
    shared = state_db(config, args.state) if db_url(config) else None
    return shared, ClientRegistry(args.state, shared.document("tokens.json") if shared else None)


def _token(config: EcosystemConfig, args: argparse.Namespace) -> int:
    path, problem = _shared(config, args)[1].ensure(args.name, args.allow)
    print(path.resolve(), flush=True)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def operator_audit(config: EcosystemConfig, state: Path, action: str, subject: str, detail: str) -> None:
    """An operator's change to who may call in, in the state's hash-chained audit log (never a token)."""
    with closing(state_db(config, state)) as db:
        AuditLog(db).append("operator", action, subject, True, detail, remote="cli")


def _clients(config: EcosystemConfig, args: argparse.Namespace) -> int:
    shared, registry = _shared(config, args)
    if args.clients_command == "add":
        tools = [f"{m.name}.{t}" for m in config.persistent_mads for t in m.tool_methods()] + [AUDIT_PERMISSION]
        token = registry.add(args.name, args.allow, args.rate, args.quota, known_tools=tools, secrets=args.secret_patterns)
        limits = "".join(f"; {label} {value}" for label, value in (
            ("rate", args.rate), ("quota", args.quota), ("secrets", " ".join(args.secret_patterns or ()))) if value)
        operator_audit(config, args.state, "clients.add", args.name, f"allow {' '.join(args.allow)}{limits}")
        print(f"client {args.name!r} added (may call: {', '.join(args.allow)}{limits}). Its bearer token follows on "
              "stdout; it is not stored and will not be shown again.", file=sys.stderr)
        print(token, flush=True)
        return 0
    if args.clients_command == "revoke":
        client = registry.revoke(args.name)
        operator_audit(config, args.state, "clients.revoke", client.name, f"revoked at {client.revoked_at}")
        print(f"client {client.name!r} revoked at {client.revoked_at}; running servers refuse its token from the next request")
        return 0
    today = calls_today_by_client(args.state, shared)
    rows = [dict(c.describe(), calls_today=today.get(c.name, 0)) for c in registry.clients()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no clients in {registry.path}; add one with `clients add NAME --state DIR --allow PATTERN`")
        return 0
    table = [["NAME", "ALLOW", "RATE", "QUOTA", "CALLS TODAY", "CREATED", "REVOKED", "SECRETS"]]
    table += [[r["name"], " ".join(r["allow"]), r["rate"] or "-", r["quota"] or "-", str(r["calls_today"]),
               r["created_at"][:19], r["revoked_at"][:19] or "-", " ".join(r["secrets"]) or "*"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def main(config: EcosystemConfig, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        for name, (parts, missing) in PACK_PARTS.items():
            if name not in capabilities.PACKS and any(_asks(argv, part) for part in parts):
                raise InvalidArgument(missing)
        args = _parser(config).parse_args(argv)
        return args.run(config, args)
    except KernelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
