"""The postgres pack's part of the command line (the core's cli.py adds it when the build carries the pack):
serve's `--db`, the PostgreSQL database replicas share (default $<PREFIX>_DB_URL, which the core reads too).

Light on purpose (argparse only): the parser is built from it; psycopg is imported only when a URL is given.
"""

from __future__ import annotations

from typing import Any


def add_commands(parsers: dict[str, Any], config: Any) -> None:
    """Serve's `--db` (see cli.py's PACK_PARTS)."""
    serve = parsers["serve"]
    env = f"{config.env_prefix}_DB_URL"
    serve.add_argument("--db", default=serve.get_default("db"), metavar="URL",
                       help=f"the state in PostgreSQL (postgresql://user@host:5432/db; the password in PGPASSWORD or "
                            f"~/.pgpass), shared by every replica; default ${env}, else the --state directory's SQLite")
