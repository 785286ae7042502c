"""Storage migrations: numbered, forward-only, each applied at start-up in one transaction.

The compiler writes a package's migrations to `<package>/migrations.json` (an ordered list;
every version carries its parent's list forward and may append to it). At start-up the
runtime applies the ones the state database has not seen, in order, each inside
BEGIN IMMEDIATE ... COMMIT together with its record in `schema_migrations` (number, name,
checksum), so a migration is either wholly applied and recorded or not at all.

It refuses to start when the state's history is not a prefix of the package's: a recorded
migration whose checksum differs (another history), or one the package does not have (the
state was migrated by a newer version: there are no down-migrations).

A state database made before migrations existed has no `schema_migrations`: every migration
is pending, and the first one creates its tables only where they do not exist yet, so the
tables already there are the baseline. Then every MAD table is checked against the shape its
MAD declares (pack.py), which catches a baseline that was not what the history assumed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ...bus import now_iso
from ...db import Database
from ...errors import KernelError

# The kernel is copied into every ecosystem as `<package>/kernel/`; its migrations are beside it.
PACKAGE_MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    number INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TEXT NOT NULL
)
"""


class MigrationError(KernelError):
    """The state database cannot be brought to this version's storage: the ecosystem does not start."""

    code = "migration_failed"


class Migration(BaseModel):
    """One step of a package's storage history: SQL statements applied together, once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    number: int = Field(ge=1)
    name: str = Field(min_length=1)
    statements: list[str]
    destructive: bool = False

    @property
    def checksum(self) -> str:
        """What the migration does, hashed: the same number must mean the same change everywhere."""
        body = {"number": self.number, "name": self.name, "statements": self.statements}
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_migrations(path: Path = PACKAGE_MIGRATIONS) -> list[Migration]:
    """The migrations in `path` ([] when the package has none, as packages built before migrations)."""
    if not path.is_file():
        return []
    try:
        return [Migration.model_validate(item) for item in json.loads(path.read_text(encoding="utf-8"))]
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise MigrationError(f"{path} is not a list of migrations: {exc}") from None


def apply_migrations(db: Database, migrations: Sequence[Migration]) -> list[Migration]:
    """Apply the pending `migrations` in order, each in one transaction; return those applied now."""
    numbers = [m.number for m in migrations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise MigrationError(f"this version's migrations are numbered {numbers}; expected 1, 2, 3... in order")
    db.script(_SCHEMA, part="schema_migrations")
    applied = {row["number"]: row for row in db.query("SELECT number, name, checksum FROM schema_migrations")}
    known = {m.number: m for m in migrations}
    if newer := sorted(n for n in applied if n not in known):
        raise MigrationError(
            f"the state in {db.path} was migrated by a newer version of this ecosystem (migration {newer[-1]} "
            f"'{applied[newer[-1]]['name']}'; this version knows {len(migrations)}). Migrations are forward-only: "
            "run that newer version, or restore the state from a backup taken before the upgrade"
        )
    for number, row in sorted(applied.items()):
        if row["checksum"] != known[number].checksum:
            raise MigrationError(
                f"migration {number} recorded in {db.path} ('{row['name']}') is not this version's migration "
                f"{number} ('{known[number].name}'): the state comes from a different history of this ecosystem"
            )
    pending = [m for m in migrations if m.number not in applied]
    if applied and pending and pending[0].number < max(applied):
        raise MigrationError(f"the state in {db.path} skipped migration {pending[0].number} '{pending[0].name}' "
                             f"but has {max(applied)}: it comes from a different history of this ecosystem")
    for migration in pending:
        try:
            with db.transaction() as conn:
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (number, name, checksum, applied_at) VALUES (?, ?, ?, ?)",
                    (migration.number, migration.name, migration.checksum, now_iso()),
                )
        except sqlite3.Error as exc:
            raise MigrationError(
                f"migration {migration.number} '{migration.name}' failed and was rolled back, so the state is "
                f"as it was before it: {exc}"
            ) from None
    return pending
