"""Migrations: what changed in the MADs' storage since the parent version, as SQL the kernel applies.

A build records its storage schema (`schema_of`, in the manifest) and its migrations (the
parent's, carried forward unchanged, plus at most one new one for the changes since the
parent), rendered into the package as `<package>/migrations.json`. The kernel applies the
pending ones at start-up (see kernel/packs/storage/migrations.py).

- a table added: CREATE TABLE IF NOT EXISTS;
- a column added: ALTER TABLE ADD COLUMN; it must be nullable and outside the primary key,
  since the rows already stored have no value for it (anything else is a spec error);
- anything else (a column dropped, a type changed, NOT NULL added or removed, the primary
  key changed): the table is rebuilt, its rows copied over with their rowids;
- a table dropped: DROP TABLE.

A change that loses data (a drop, a type narrowed, NOT NULL required, a primary key that can
repeat) needs the author's consent, spelled out in `allow_destructive` of the table (of the
MAD for a dropped table); without it the build stops with a spec error saying what to add.

Each new migration has a kind, for blue/green upgrades (the kernel's migrations.py): "expand" when
it only adds (tables created, nullable columns added: the previous version keeps working on the
migrated state), else "contract"; and, for an expand one, `down` statements that undo it, losing
only what was written into what it added (DROP TABLE for a table created, ALTER TABLE ... DROP
COLUMN for a column added); none for a contract migration, nor for a history's first migration,
whose CREATE TABLE IF NOT EXISTS adopts tables that may predate migrations. Neither is part of a
migration's checksum, so the migrations recorded before they existed keep theirs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildFailed, SpecError, SpecProblem
from ..kernel.errors import KernelError
from ..kernel.packs.storage.migrations import Migration, load_migrations
from ..kernel.packs.storage.pack import declared_shape, table_ddl
from ..spec.load import problem_at
from ..spec.model import Spec

# MAD -> table -> columns ({name, type, primary_key, nullable}, in spec order).
Schema = dict[str, dict[str, list[dict[str, Any]]]]

# SQL type changes that keep every value (SQLite converts them exactly).
_WIDENINGS = {("INTEGER", "REAL"), ("INTEGER", "TEXT"), ("REAL", "TEXT")}

_LOSES = {
    "drop column": "its values are deleted",
    "narrow column": "values of another type are converted with SQLite's CAST (e.g. 'abc' to an integer is 0)",
    "require column": "rows where it is NULL are deleted",
    "change primary key": "rows whose new key repeats an earlier row's are deleted",
    "drop table": "its rows are deleted",
}


def schema_of(spec: Spec) -> Schema:
    """The storage of every MAD that has some: canonical and JSON-able (the manifest's "storage")."""
    return {
        mad.name: {table.name: [column.model_dump(mode="json") for column in table.columns] for table in mad.storage}
        for mad in spec.mads
        if mad.storage
    }


@dataclass(frozen=True)
class _Change:
    """One table's change: how it reads in the migration's name, its SQL, the consents it needs, and the SQL that
    undoes it when it only adds (an expand change; () for any other)."""

    mad: str
    table: str
    what: str
    statements: tuple[str, ...]
    consents: tuple[str, ...] = ()
    down: tuple[str, ...] = ()


def plan_migrations(previous: Schema | None, current: Schema, spec: Spec, existing: list[Migration]) -> list[Migration]:
    """The migrations of the new version: `existing` (the parent's) and, when storage changed, one more.

    `previous` is the parent's schema (None for a first build, or a parent built before
    migrations). Raises SpecError, located in the MAD's file, for a destructive change the
    spec does not accept, or a column that cannot be added to a table that holds rows.
    """
    # A history starts with a migration creating every table; without one, everything is new. Its
    # CREATE TABLE IF NOT EXISTS keeps the tables a state made before migrations as the baseline.
    before = (previous or {}) if existing else {}
    changes: list[_Change] = []
    problems: list[SpecProblem] = []
    for mad in sorted(set(before) | set(current)):
        old_tables, new_tables = before.get(mad, {}), current.get(mad, {})
        for table in sorted(set(old_tables) | set(new_tables)):
            name = f"{mad}_{table}"
            if table not in old_tables:
                changes.append(_Change(mad, table, f"create table {name}", (table_ddl(name, new_tables[table]),),
                                       down=(f"DROP TABLE {name}",)))
            elif table not in new_tables:
                changes.append(_Change(mad, table, f"drop table {name}", (f"DROP TABLE {name}",), (f"drop table {table}",)))
            else:
                change = _alter(spec, mad, table, old_tables[table], new_tables[table], problems)
                changes += [change] if change else []
    problems += _missing_consents(spec, [c for c in changes if c.consents])
    if problems:
        raise SpecError(problems)
    if not changes:
        return list(existing)
    expand = all(c.down for c in changes)
    return [*existing, Migration(
        number=len(existing) + 1,
        name="; ".join(c.what for c in changes),
        statements=[s for c in changes for s in c.statements],
        destructive=any(c.consents for c in changes),
        kind="expand" if expand else "contract",
        # Newest change undone first; the first migration adopts what a state from before migrations had.
        down=[s for c in reversed(changes) for s in c.down] if expand and existing else [],
    )]


def _alter(spec: Spec, mad: str, table: str, old: list[dict[str, Any]], new: list[dict[str, Any]],
           problems: list[SpecProblem]) -> _Change | None:
    """The change from `old` to `new` columns of an existing table (None when its SQL is the same)."""
    name = f"{mad}_{table}"
    # Compared as SQLite stores them: json and text are both TEXT, an INTEGER PRIMARY KEY is never NULL.
    before, after = declared_shape(name, old), declared_shape(name, new)
    spec_types = {c["name"]: c["type"] for c in new}
    added = [c for c in after if c not in before]
    for column in added:
        _, not_null, in_key = after[column]
        if not_null or in_key:
            index = next(i for i, t in enumerate(spec.mad(mad).storage) if t.name == table)
            number = next(i for i, c in enumerate(new) if c["name"] == column)
            problems.append(problem_at(
                spec.root, f"mads/{mad}.yaml", ("storage", index, "columns", number, "name"),
                f"column '{column}' is new in table '{table}' of MAD '{mad}', which already holds rows from the "
                f"previous version, and it is {'part of the primary key' if in_key else 'NOT NULL'}: those rows "
                "have no value for it; expected it nullable and outside the primary key (or in a new table)",
            ))
    kept = [c for c in before if c in after]
    consents = [f"drop column {c}" for c in before if c not in after]
    notes = []  # harmless changes that still need the table rebuilt
    for column in kept:
        (old_type, old_not_null, _), (new_type, new_not_null, _) = before[column], after[column]
        if old_type != new_type and (old_type, new_type) in _WIDENINGS:
            notes.append(f"widen column {column} to {spec_types[column]}")
        elif old_type != new_type:
            consents.append(f"narrow column {column} to {spec_types[column]}")
        if new_not_null and not old_not_null:
            consents.append(f"require column {column}")
        elif old_not_null and not new_not_null:
            notes.append(f"allow null in column {column}")
    old_key, new_key = _key(before), _key(after)
    if new_key != old_key and new_key and not (old_key and set(old_key) <= set(new_key)):
        consents.append(f"change primary key to {', '.join(new_key)}")
    elif new_key != old_key:
        notes.append(f"primary key {', '.join(new_key) or 'removed'}")
    if consents or notes:
        details = ", ".join([*consents, *notes, *(f"add column {c}" for c in added)])
        return _Change(mad, table, f"rebuild {name} ({details})", _rebuild(name, new, before, after, bool(consents)),
                       tuple(consents))
    if added:
        statements = tuple(f"ALTER TABLE {name} ADD COLUMN {c} {after[c][0]}" for c in added)
        return _Change(mad, table, f"add column{'s' if len(added) > 1 else ''} {', '.join(added)} to {name}", statements,
                       down=tuple(f"ALTER TABLE {name} DROP COLUMN {c}" for c in reversed(added)))
    return None


def _key(shape: dict[str, tuple[str, bool, int]]) -> tuple[str, ...]:
    return tuple(name for name, (_, _, position) in sorted(shape.items(), key=lambda item: item[1][2]) if position)


def _rebuild(name: str, columns: list[dict[str, Any]], before: dict, after: dict, lossy: bool) -> tuple[str, ...]:
    """Move the table aside, create it anew, copy the rows (rowids kept), drop the old one.

    Moving the old table aside (rather than renaming a new one into place) is safe here: no
    trigger, view or foreign key refers to a MAD table.
    """
    aside = f"_old_{name}"
    kept = [c for c in after if c in before]
    values = [c if before[c][0] == after[c][0] else f"CAST({c} AS {after[c][0]})" for c in kept]
    # A single INTEGER PRIMARY KEY is the rowid itself; any other table keeps its rowids explicitly.
    key = _key(after)
    if not (len(key) == 1 and after[key[0]][0] == "INTEGER"):
        kept, values = ["rowid", *kept], ["rowid", *values]
    # Consent given: rows the new constraints refuse (NULLs, repeated keys) are skipped, not fatal.
    insert = "INSERT OR IGNORE" if lossy else "INSERT"
    return (
        f"ALTER TABLE {name} RENAME TO {aside}",
        table_ddl(name, columns, if_not_exists=False),
        f"{insert} INTO {name} ({', '.join(kept)}) SELECT {', '.join(values)} FROM {aside} ORDER BY rowid",
        f"DROP TABLE {aside}",
    )


def _missing_consents(spec: Spec, changes: list[_Change]) -> list[SpecProblem]:
    """One problem per table (per MAD for dropped tables) whose destructive changes the spec does not accept."""
    problems = []
    names = {m.name for m in spec.mads}
    by_owner: dict[tuple[str, str | None], list[str]] = {}
    for change in changes:
        dropped = change.consents[0].startswith("drop table")
        by_owner.setdefault((change.mad, None if dropped else change.table), []).extend(change.consents)
    for (mad, table), consents in sorted(by_owner.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        rel = f"mads/{mad}.yaml"
        if mad not in names:
            problems.append(problem_at(spec.root, rel, (), (
                f"MAD '{mad}' is gone, and its tables held rows in the previous version ({', '.join(consents)}: "
                "their rows are deleted); to accept that, keep this file one more version, with `storage: []` and "
                f"`allow_destructive: {json.dumps(consents)}`, then remove it")))
            continue
        spec_mad = spec.mad(mad)
        if table is None:
            accepted, loc, owner = spec_mad.allow_destructive, ("storage",), "the MAD (top level)"
        else:
            index = next(i for i, t in enumerate(spec_mad.storage) if t.name == table)
            accepted, loc, owner = spec_mad.storage[index].allow_destructive, ("storage", index, "name"), "the table"
        missing = [c for c in consents if c not in accepted]
        if not missing:
            continue
        why = "; ".join(f"{c}: {_LOSES[next(k for k in _LOSES if c.startswith(k))]}" for c in missing)
        subject = f"MAD '{mad}'" if table is None else f"table '{table}' of MAD '{mad}'"
        problems.append(problem_at(spec.root, rel, loc, (
            f"{subject} changed since the previous version in ways that lose stored data ({why}); if that is "
            f"intended, add to {owner} in this file: allow_destructive: {json.dumps([*accepted, *missing])}")))
    return problems


def existing_migrations(src: Path, package: str) -> list[Migration]:
    """The migrations a built version carries ([] for one built before migrations)."""
    try:
        return load_migrations(src / package / "migrations.json")
    except KernelError as exc:
        raise BuildFailed(f"the parent version's migrations cannot be read: {exc}") from None


def migration_files(package: str, migrations: list[Migration]) -> dict[str, str]:
    """The package's migrations file, for src/: always written (`[]` when storage never changed)."""
    data = [m.model_dump(mode="json") for m in migrations]
    return {f"{package}/migrations.json": json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"}

