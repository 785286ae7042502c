"""The storage pack's part of the command line (the core's cli.py adds it when the build carries the pack): the
`migrate status|down` commands, over the state's schema_migrations.

Light on purpose (argparse and the core only): every command's parser is built from it; the migrations module is
imported only when a `migrate` command runs.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import closing
from typing import Any

from ...audit import AuditLog
from ...cli import db_url
from ...db import open_database


def add_commands(parsers: dict[str, Any], config: Any) -> None:
    """The `migrate` commands (see cli.py's PACK_PARTS)."""
    migrate = parsers["commands"].add_parser("migrate", help="the state's storage migrations: status, down (undo)")
    migrate.set_defaults(run=_migrate)
    sub = migrate.add_subparsers(dest="migrate_command", required=True)
    status = sub.add_parser("status", parents=[parsers["state"]],
                            help="the migrations the state has (number, name, kind, whether it can be undone), how "
                                 "many this version knows, and the replicas live on the state; JSON on stdout")
    down = sub.add_parser("down", parents=[parsers["state"]],
                          help="undo the migrations above --to, newest first, in one transaction (their down "
                               "statements; their rows leave schema_migrations); refused, with nothing changed, when "
                               "one cannot be undone (a contract migration) or a live replica still needs it")
    down.add_argument("--to", type=int, required=True, metavar="N",
                      help="the migration to go back to: the state keeps 1..N (0: none)")
    down.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="a replica killed moments ago counts as live until its heartbeat lapses (30 s): wait up to "
                           "this long for the replicas that need these migrations to be gone (default 0: refuse at once)")
    for command in (status, down):
        command.add_argument("--db", default=db_url(config), metavar="URL",
                             help=f"the state's PostgreSQL database (default ${config.env_prefix}_DB_URL; else the --state "
                                  "directory's SQLite)")


def _migrate(config: Any, args: argparse.Namespace) -> int:
    from .migrations import ReplicasLive, load_migrations, migrate_down, recorded
    from .replicas import live_replicas

    mine = load_migrations()
    with closing(open_database(args.state, args.db)) as db:
        if args.migrate_command == "status":
            rows = recorded(db)
            print(json.dumps({
                "level": max((row["number"] for row in rows), default=0), "knows": len(mine),
                "migrations": [{"number": row["number"], "name": row["name"], "kind": row["kind"],
                                "reversible": bool(row["down"])} for row in rows],
                "replicas": live_replicas(db)}, indent=2))
            return 0
        deadline = time.monotonic() + args.wait
        while True:
            try:
                undone = migrate_down(db, args.to, mine)
                break
            except ReplicasLive:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
        if not undone:
            print(f"nothing to undo: the state has no migration above {args.to}")
            return 0
        names = ", ".join(f"{row['number']} '{row['name']}'" for row in undone)
        AuditLog(db).append("operator", "storage.migrate_down", f"to {args.to}", True, f"undid {names}", remote="cli")
    for row in undone:
        print(f"undid migration {row['number']} '{row['name']}'")
    return 0
