"""The storage pack: the MADs' own tables (`storage:` in a MAD spec) and their migrations.

A build has it when a MAD of its spec declares tables, or when its storage history (migrations.py) is not empty;
then the runtime brings the state to that history at start-up, creates the tables no migration made, checks
every one has the shape its MAD declares, and gives each MAD CRUD over its own tables (`self.store`, an
`OwnTables` over a `TableStore`). The compiler uses `table_ddl` and `declared_shape` to plan migrations, so a
table created either way is the same table.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from typing import Any

from ...db import Database, ident, stored_shape
from ...errors import InvalidArgument
from .migrations import Migration, MigrationError, apply_migrations, load_migrations, recorded
from .replicas import Replica

# A spec'd column type -> the SQL type it is stored as.
_COLUMN_TYPES = {
    name: sql
    for sql, names in {"INTEGER": "integer int bool boolean", "TEXT": "text str string json timestamp datetime",
                       "REAL": "real float", "BLOB": "blob bytes"}.items()
    for name in names.split()
}


def table_ddl(table: str, columns: Sequence[dict[str, Any]], *, if_not_exists: bool = True) -> str:
    """CREATE TABLE from a spec'd column list ({name, type, primary_key, nullable}).

    Shared by the runtime (tables of packages without migrations) and the compiler (migrations).
    """
    ident(table)
    if not columns:
        raise InvalidArgument(f"table {table!r} has no columns")
    pks = [c for c in columns if c.get("primary_key")]
    parts = []
    for col in columns:
        col_type = _COLUMN_TYPES.get(str(col.get("type", "text")).lower())
        if col_type is None:
            raise InvalidArgument(f"table {table!r}: unknown column type {col.get('type', 'text')!r}")
        single_pk = len(pks) == 1 and col.get("primary_key")
        part = f"{ident(col['name'])} {col_type}{' PRIMARY KEY' if single_pk else ''}"
        # An INTEGER PRIMARY KEY is the rowid: never NULL, SQLite assigns it.
        if not col.get("nullable", True) and not (single_pk and col_type == "INTEGER"):
            part += " NOT NULL"
        parts.append(part)
    if len(pks) > 1:
        parts.append(f"PRIMARY KEY ({', '.join(ident(c['name']) for c in pks)})")
    return f"CREATE TABLE {'IF NOT EXISTS ' if if_not_exists else ''}{table} ({', '.join(parts)})"


def declared_shape(table: str, columns: Sequence[dict[str, Any]]) -> dict[str, tuple[str, bool, int]]:
    """The shape `table_ddl` gives these columns, read back from a scratch in-memory table."""
    with closing(sqlite3.connect(":memory:")) as scratch:
        scratch.execute(table_ddl(table, columns))
        return stored_shape(scratch, table)


class TableStore:
    """A MAD's view of its own tables (`<mad>_<table>`): simple CRUD with validated identifiers."""

    def __init__(self, db: Database, mad: str, tables: dict[str, list[str]]):
        self._db = db
        self._mad = mad
        self._tables = tables  # short name -> column names

    def table_name(self, table: str) -> str:
        if table not in self._tables:
            raise InvalidArgument(f"MAD {self._mad!r} has no table {table!r}; it has {sorted(self._tables)}")
        return f"{self._mad}_{table}"

    def _checked(self, table: str, names: Iterable[str]) -> str:
        """The table's full name, once every one of `names` is known to be one of its columns."""
        full = self.table_name(table)
        if unknown := [name for name in names if name not in self._tables[table]]:
            raise InvalidArgument(f"table {table!r} has no column {unknown[0]!r}")
        return full

    def _where(self, table: str, where: dict[str, Any]) -> tuple[str, str, list[Any]]:
        """The table's full name, `col = ? AND ...` over checked columns (`1=1` for none), and its parameters."""
        return self._checked(table, where), " AND ".join(f"{c} = ?" for c in where) or "1=1", list(where.values())

    def insert(self, table: str, **values: Any) -> int:
        full = self._checked(table, values)
        into = f"({', '.join(values)}) VALUES ({', '.join('?' * len(values))})" if values else "DEFAULT VALUES"
        row = self._db.execute(f"INSERT INTO {full} {into} RETURNING rowid", list(values.values())).fetchone()
        return int(row[0] or 0)

    def select(self, table: str, *, limit: int = 100, order_by: str = "rowid", **where: Any) -> list[dict[str, Any]]:
        full, clause, params = self._where(table, where)
        order_col = order_by.lstrip("-")
        if order_col != "rowid":
            self._checked(table, [order_col])
        direction = "DESC" if order_by.startswith("-") else "ASC"
        columns = ", ".join(self._tables[table])  # not *: a PostgreSQL table has its rowid as a column
        return self._db.query(f"SELECT {columns} FROM {full} WHERE {clause} ORDER BY {order_col} {direction} LIMIT ?",
                              [*params, max(0, int(limit))])

    def update(self, table: str, where: dict[str, Any], **values: Any) -> int:
        full, clause, params = self._where(table, where)
        self._checked(table, values)
        if not values:
            return 0
        sets = ", ".join(f"{c} = ?" for c in values)
        return self._db.execute(f"UPDATE {full} SET {sets} WHERE {clause}", [*values.values(), *params]).rowcount

    def delete(self, table: str, **where: Any) -> int:
        full, clause, params = self._where(table, where)
        return self._db.execute(f"DELETE FROM {full} WHERE {clause}", params).rowcount


def check_table(db: Database, mad: str, table: str, columns: Sequence[dict], *, added_columns_ok: bool = False) -> None:
    """Refuse a MAD table whose stored shape is not the declared one (a missing or wrong migration).

    `added_columns_ok`: the state is ahead of this version by expand migrations, so a stored column this version
    does not declare is fine if it is nullable and outside the primary key (this version never names it)."""
    stored, declared = db.table_shape(table), declared_shape(table, columns)
    if added_columns_ok:
        stored = {name: shape for name, shape in stored.items() if name in declared or shape[1] or shape[2]}
    if db.dialect != "sqlite":  # elsewhere a key column is NOT NULL whatever the spec says (SQLite alone allows NULL)
        stored, declared = _key_not_null(stored), _key_not_null(declared)
    if stored == declared:
        return
    differences = [
        f"{name}: stored {_describe(stored.get(name))}, declared {_describe(declared.get(name))}"
        for name in sorted(set(stored) | set(declared))
        if stored.get(name) != declared.get(name)
    ]
    raise MigrationError(
        f"table {table} in {db.path} does not have the columns MAD {mad!r} declares ({'; '.join(differences)}): "
        "the state was not migrated to this version's storage"
    )


def _key_not_null(shape: dict[str, tuple[str, bool, int]]) -> dict[str, tuple[str, bool, int]]:
    return {name: (sql_type, not_null or pk > 0, pk) for name, (sql_type, not_null, pk) in shape.items()}


def _describe(shape: tuple[str, bool, int] | None) -> str:
    if shape is None:
        return "absent"
    sql_type, not_null, pk = shape
    return sql_type + (" NOT NULL" if not_null else "") + (" PRIMARY KEY" if pk else "")


def open_storage(db: Database, mads: Sequence[Any], migrations: Sequence[Migration] | None
                 ) -> tuple[list[Migration], dict[str, dict[str, list[str]]], Replica]:
    """Bring the state to `migrations` (None: the package's migrations.json), create the MAD tables no migration
    made (packages without migrations), and check every one has its declared shape. Returns the migrations
    applied now, MAD -> table -> column names, and this process's heartbeat (started once it serves)."""
    history = load_migrations() if migrations is None else list(migrations)
    migrated = apply_migrations(db, history)
    ahead = any(row["number"] > len(history) for row in recorded(db))  # by expand migrations: refused otherwise
    for cls in mads:
        for table in cls.storage:
            name = f"{cls.name}_{ident(table['name'])}"
            db.execute(table_ddl(name, table["columns"]))
            check_table(db, cls.name, name, table["columns"], added_columns_ok=ahead)
    return migrated, {cls.name: {ident(t["name"]): [ident(c["name"]) for c in t["columns"]] for t in cls.storage}
                      for cls in mads}, Replica(db, len(history))
