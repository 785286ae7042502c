"""Storage migrations: numbered, each applied at start-up in one transaction, some of them undone on demand.

The compiler writes a package's migrations to `<package>/migrations.json` (an ordered list;
every version carries its parent's list forward and may append to it). At start-up the
runtime applies the ones the state database has not seen, in order, each inside
BEGIN IMMEDIATE ... COMMIT together with its record in `schema_migrations` (number, name,
checksum, and its kind and down statements), so a migration is either wholly applied and recorded or not at all.

Blue/green upgrades (a new version started beside the old one on the same state) rest on each migration's kind:
- "expand" only adds (a table, a nullable column): the previous version keeps working on the migrated state, so
  a version finding migrations of a newer one beyond its own history starts anyway when they are all expand
  ones (a warning says so), and ignores the columns they added;
- "contract" is anything else (a table dropped or rebuilt): a state with one beyond this version's history is
  refused, and this version applies a pending one only when no replica of an older version is live on the state
  (replicas.py), so it never pulls the storage from under a version still serving.
`migrate_down` runs the recorded down statements of the migrations above a number (`migrate down`, the storage
pack's cli.py), newest first and in one transaction; an expand migration has them, a contract one has none.

It refuses to start when the state's history is not a prefix of the package's (once the newer expand migrations
are set aside): a recorded migration whose checksum differs (another history), or one it skipped.

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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ... import logs
from ...bus import now_iso
from ...db import Database
from ...errors import KernelError
from .replicas import live_replicas

log = logs.get("storage")

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
# Added to schema_migrations by the first version that records them (ALTER TABLE, on both backends), so that any
# version, even one that does not know a migration, can tell whether it may run on it and how to undo it. A row
# without them (recorded by an older version) counts as a contract migration with no down statements.
_RECORDED_SINCE = {"kind": "TEXT", "down_sql": "TEXT"}


class MigrationError(KernelError):
    """The state database cannot be brought to this version's storage: the ecosystem does not start."""

    code = "migration_failed"


class ReplicasLive(MigrationError):
    """Refused for now: live replicas still need what would change (it may pass once they stop)."""


class Migration(BaseModel):
    """One step of a package's storage history: SQL statements applied together, once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    number: int = Field(ge=1)
    name: str = Field(min_length=1)
    statements: list[str]
    destructive: bool = False
    # Files written before migrations had a kind say nothing of it: "contract" (no version is assumed to work
    # on the state before or after it) and no down statements (it cannot be undone) are the safe reading.
    kind: Literal["expand", "contract"] = "contract"
    down: list[str] = []

    @property
    def checksum(self) -> str:
        """What the migration does, hashed: the same number must mean the same change everywhere. Its kind and
        down statements are left out, so a migration recorded before they existed keeps its checksum."""
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
    """Apply the pending `migrations` in order, each in one transaction; return those applied now. Expand
    migrations of a newer version beyond them are accepted (with a warning), any other is refused."""
    numbers = [m.number for m in migrations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise MigrationError(f"this version's migrations are numbered {numbers}; expected 1, 2, 3... in order")
    db.script(_SCHEMA, part="schema_migrations")
    applied = {row["number"]: row for row in recorded(db)}
    known = {m.number: m for m in migrations}
    newer = [applied[n] for n in sorted(applied) if n not in known]
    if contracts := [row for row in newer if row["kind"] != "expand"]:
        raise MigrationError(
            f"the state in {db.path} was migrated by a newer version of this ecosystem (migration "
            f"{contracts[-1]['number']} '{contracts[-1]['name']}'; this version knows {len(migrations)}), whose "
            "storage this version cannot work with (a contract migration). A contract migration is forward-only: "
            "run that newer version, or restore the state from a backup taken before the upgrade"
        )
    if newer:  # a blue/green upgrade under way, or rolled forward: this version still works on what they added
        log.warning("the state is ahead of this version by expand migrations of a newer one; running on it",
                    extra={"migrations": [f"{row['number']} {row['name']}" for row in newer], "knows": len(migrations)})
    for number, row in sorted(applied.items()):
        if number in known and row["checksum"] != known[number].checksum:
            raise MigrationError(
                f"migration {number} recorded in {db.path} ('{row['name']}') is not this version's migration "
                f"{number} ('{known[number].name}'): the state comes from a different history of this ecosystem"
            )
    pending = [m for m in migrations if m.number not in applied]
    if applied and pending and pending[0].number < max(applied):
        raise MigrationError(f"the state in {db.path} skipped migration {pending[0].number} '{pending[0].name}' "
                             f"but has {max(applied)}: it comes from a different history of this ecosystem")
    if contract := next((m for m in pending if m.kind != "expand"), None):
        _refuse_contract_under_older_replicas(db, contract)
    applied_now = []
    for migration in pending:
        try:
            with db.transaction() as conn:
                # Replicas starting at once: the first to take the writers' turn applies it, the others find it done.
                done = conn.execute("SELECT checksum FROM schema_migrations WHERE number = ?", (migration.number,)).fetchone()
                if done is not None:
                    if done["checksum"] != migration.checksum:
                        raise MigrationError(f"migration {migration.number} recorded in {db.path} is not this version's "
                                             f"migration '{migration.name}': the state comes from a different history")
                    continue
                _record_kinds(db, conn)
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (number, name, checksum, applied_at, kind, down_sql)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (migration.number, migration.name, migration.checksum, now_iso(), migration.kind,
                     json.dumps(migration.down)),
                )
            applied_now.append(migration)
        except sqlite3.Error as exc:
            raise MigrationError(
                f"migration {migration.number} '{migration.name}' failed and was rolled back, so the state is "
                f"as it was before it: {exc}"
            ) from None
    return applied_now


def recorded(db: Database) -> list[dict[str, Any]]:
    """The migrations recorded in the state, oldest first, each with its kind and down statements (a contract
    migration with none, for one recorded by a version from before they were)."""
    if not db.has_table("schema_migrations"):
        return []
    has_kinds = "kind" in db.table_shape("schema_migrations")
    rows = db.query(f"SELECT number, name, checksum{', kind, down_sql' if has_kinds else ''} FROM schema_migrations"
                    " ORDER BY number")
    return [{**row, "kind": row.get("kind") or "contract", "down": json.loads(row.get("down_sql") or "[]")}
            for row in rows]


def _record_kinds(db: Database, conn: Any) -> None:
    """Give schema_migrations its kind and down_sql columns, inside the caller's write transaction (so two
    replicas starting at once add them once)."""
    shape = db.table_shape("schema_migrations")
    for column, sql_type in _RECORDED_SINCE.items():
        if column not in shape:
            conn.execute(f"ALTER TABLE schema_migrations ADD COLUMN {column} {sql_type}")


def _refuse_contract_under_older_replicas(db: Database, contract: Migration) -> None:
    """A contract migration changes what older versions read: refused (before anything is written) while a
    replica that does not know it still serves on this state."""
    older = [r for r in live_replicas(db) if r["level"] < contract.number]
    if older:
        who = "; ".join(f"version {r['version']} (storage level {r['level']}, pid {r['pid']} on {r['host']}, "
                        f"last seen {r['last_seen']})" for r in older)
        raise MigrationError(
            f"migration {contract.number} '{contract.name}' is a contract migration (it drops or rebuilds what "
            f"older versions read), and replicas of an older version still serve on the state in {db.path}: "
            f"{who}. Nothing was changed. Stop them first (a contract migration cannot be blue/green: expand in "
            "one release, contract in a later one once no older replica runs), then start this version"
        )


def migrate_down(db: Database, to: int, migrations: Sequence[Migration]) -> list[dict[str, Any]]:
    """Undo the recorded migrations numbered above `to`, newest first, in one transaction, and remove their rows
    from schema_migrations (the state is then at `to`, as the versions that know no more expect it). Refused,
    with nothing changed, when one of them cannot be undone or a live replica still needs it. Returns the rows
    undone. `migrations` (this version's) supply the down statements of rows recorded without them."""
    if to < 0:
        raise MigrationError(f"--to {to}: expected a migration number, 0 or more")
    known = {m.number: m for m in migrations}
    above = [row for row in reversed(recorded(db)) if row["number"] > to]
    for row in above:
        mine = known.get(row["number"])
        if not row["down"] and mine is not None and mine.checksum == row["checksum"]:
            row["down"] = list(mine.down)
    if stuck := [row for row in above if not row["down"]]:
        row = stuck[0]
        why = ("a contract migration (a table dropped or rebuilt, or one recorded before migrations had a kind) has "
               "no way back: restore the state from a backup taken before it" if row["kind"] != "expand" else
               "it was recorded without down statements (by a version from before they existed, or it is the "
               "first migration, which adopts tables that may predate migrations)")
        raise MigrationError(f"migration {row['number']} '{row['name']}' cannot be undone: {why}. Nothing was changed")
    if needing := [r for r in live_replicas(db) if r["level"] > to] if above else []:
        who = "; ".join(f"version {r['version']} (storage level {r['level']}, pid {r['pid']} on {r['host']})"
                        for r in needing)
        raise ReplicasLive(f"replicas that need migrations above {to} still serve on the state in {db.path}: {who}. "
                             "Nothing was changed. Stop them first, then undo the migrations")
    try:
        with db.transaction() as conn:
            for row in above:
                for statement in row["down"]:
                    conn.execute(statement)
                conn.execute("DELETE FROM schema_migrations WHERE number = ?", (row["number"],))
    except sqlite3.Error as exc:
        raise MigrationError(f"undoing migrations above {to} failed and was rolled back, so the state is as it "
                             f"was: {exc}") from None
    return above
