"""The postgres pack (the state in PostgreSQL)'s catalogue: what it is for, its pinned dependencies.

Light on purpose (the core's catalogue types only): the compiler and `capabilities.py` read it; the
implementation, with psycopg, is `pack.py`, imported only when a process is given a PostgreSQL URL.
"""

from __future__ import annotations

from ...capabilities import PackInfo

PACK = PackInfo("postgres", "The ecosystem's state in PostgreSQL (`serve --db postgresql://...`): conversations, secrets, "
                            "clients' calls, budgets, the audit chain and the MADs' tables, shared by every replica",
                dependencies=("psycopg==3.3.9", "psycopg-binary==3.3.9"), kind="deployment")
