"""The console pack's part of the command line (the core's cli.py adds it when the build carries the pack):
`clients unlock`, which lifts the web UI's sign-in lock of an address.

Light on purpose (argparse and the core only): every command's parser is built from it; `pack.py`, with the
web libraries, is imported only when `clients unlock` runs.
"""

from __future__ import annotations

import argparse
from contextlib import closing
from typing import Any

from ...cli import operator_audit, state_db
from ...errors import InvalidArgument


def add_commands(parsers: dict[str, Any], config: Any) -> None:
    """`clients unlock` (see cli.py's PACK_PARTS)."""
    unlock = parsers["clients"].add_parser("unlock", parents=[parsers["state"]],
                                           help="lift the web UI's sign-in lock of an address (after failed sign-ins)")
    unlock.add_argument("address", nargs="?", help="the address as the audit log names it (its remote, without the port)")
    unlock.add_argument("--all", action="store_true", help="every locked address")
    unlock.set_defaults(run=_unlock)


def _unlock(config: Any, args: argparse.Namespace) -> int:
    from .pack import unlock

    if bool(args.address) == bool(args.all):
        raise InvalidArgument("name one address to unlock, or pass --all")
    with closing(state_db(config, args.state)) as db:
        forgotten = unlock(db, None if args.all else args.address)
    operator_audit(config, args.state, "clients.unlock", "*" if args.all else args.address, f"{forgotten} failed sign-ins forgotten")
    print(f"unlocked {'every address' if args.all else args.address} ({forgotten} failed sign-ins forgotten); "
          "it may sign in again at once")
    return 0
