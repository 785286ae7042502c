"""The redis pack's part of the command line (the core's cli.py adds it when the build carries the pack): the
`bus status|forget|send` commands, and serve's `--mads`, `--claim-idle` and `--drill-hold`, which only a Redis bus has.

Light on purpose (argparse and the core only): every command's parser is built from it; `pack.py`, which
runs the `bus` commands, is imported only by them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...cli import bus_option
from ...errors import InvalidArgument
from ...transport import is_local


def add_commands(parsers: dict[str, Any], config: Any) -> None:
    """Serve's Redis options, and the `bus` commands (see cli.py's PACK_PARTS)."""
    serve = parsers["serve"]
    serve.add_argument("--mads", type=_names, default=None, metavar="MAD,MAD",
                       help="run only these MADs; the others run in processes sharing the --bus (default: all)")
    serve.add_argument("--claim-idle", type=float, default=30.0, metavar="SECONDS",
                       help="Redis bus: a delivery whose process has been silent this long (dead, frozen) is "
                            "taken over by a live one (default 30; live processes renew their claims)")
    serve.add_argument("--drill-hold", type=float, default=0.0, metavar="SECONDS",
                       help="failover drills only (deploy/failover.sh drill), never in production: hold each Redis "
                            "bus delivery this long before running it, so the replica is killed while it holds some")
    serve.set_defaults(make_runtime=_runtime)

    bus = parsers["commands"].add_parser("bus", help="the bus shared by several processes (Redis): status, forget, send")
    bus.set_defaults(run=_bus)
    bus_sub = bus.add_subparsers(dest="bus_command", required=True)
    status = bus_sub.add_parser("status", help="per MAD: entries queued and pending, requests added and deliveries "
                                               "taken over, and each consumer (process) with its pending entries, "
                                               "idle time and whether it is alive; JSON on stdout")
    bus_option(status, config, required=True)
    forget = bus_sub.add_parser("forget", help="remove a dead process's consumer (see status) once it holds no delivery "
                                               "(live replicas remove those of the MADs they run themselves)")
    bus_option(forget, config, required=True)
    forget.add_argument("consumer", nargs="+", help="the consumer name, host:pid:tag, as status shows it (several: each)")
    forget.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="a process killed moments ago counts as alive until its heartbeat lapses (its "
                             "--claim-idle): wait up to this long for that (default 0: refuse at once)")
    send = bus_sub.add_parser("send", help="send requests as one MAD to another over the bus and wait for the "
                                           "replies (a drill, a smoke test): one JSON line per reply")
    bus_option(send, config, required=True)
    send.add_argument("--state", required=True, type=Path, help="a state directory for this sender (its history)")
    send.add_argument("--from", dest="sender", required=True, help="the sending MAD (the target must be in its talks_to)")
    send.add_argument("--to", dest="target", required=True)
    send.add_argument("--tool", default="", help="the target's tool to call (else --prose goes to its Thought Engine)")
    send.add_argument("--args", type=json.loads, default={}, help="the tool's arguments, a JSON object")
    send.add_argument("--prose", default="")
    send.add_argument("--count", type=int, default=1, help="how many requests, sent at once (default 1)")
    send.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="how long to wait for each reply")


def _bus(config: Any, args: argparse.Namespace) -> int:
    from .pack import bus_command

    return bus_command(config, args)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _runtime(make: Callable[..., Any], args: argparse.Namespace) -> Any:
    """Serve's Runtime, with the MADs to run and the Redis transport's options; a drill hold needs a Redis bus
    (refused before the state is opened: the SQLite bus is "" or "local", any other URL is Redis or refused)."""
    if args.drill_hold < 0 or args.drill_hold and is_local(args.bus):
        raise InvalidArgument("--drill-hold takes a number of seconds and needs a Redis bus (--bus redis://...)")
    runtime = make(serve_mads=args.mads, claim_idle_s=args.claim_idle)
    if args.drill_hold:
        runtime.transport.hold_s = args.drill_hold
    return runtime
