"""The data pack: Dewey's data lake, one embedded DuckDB database per ecosystem.

The lake is `<folder>/lake.duckdb` (the folder is mode 0700). Tables come in only through the ingest
capabilities (CSV, TSV, JSON, Parquet; inline or from the files pack's root) and go only through
`data.drop`; everything else is SQL that only reads. Three layers stand between a caller's SQL and
anything it should not touch, each enough on its own for the cases it covers:

1. The query is checked before it runs, against allow-lists rather than deny-lists (a deny-list misses
   the next function DuckDB adds that reads a file; an allow-list refuses it until someone looks):
   - DuckDB's own parser splits it: exactly one statement, and of type SELECT (this refuses DDL, DML,
     PRAGMA, ATTACH/DETACH, COPY, EXPORT/IMPORT, INSTALL/LOAD, SET/RESET, CALL, CHECKPOINT and
     transactions, whatever comments or quoting hide them).
   - sqlglot (duckdb dialect) reads it again: one statement whose root is a query (SELECT, WITH, VALUES,
     UNION/INTERSECT/EXCEPT), with no writing or command node anywhere inside (a data-modifying CTE,
     SELECT ... INTO, DESCRIBE/SHOW), and every table and function it names allowed (below).
   - DuckDB's own parse tree (`json_serialize_sql`, the very tree the engine will bind) is walked node by
     node: every expression class and table-reference kind must be one the pack knows, every function
     name an allowed one, every table a lake table or a CTE of the query. Checking the engine's own tree
     means no difference between what the checker saw and what runs (sqlglot alone could be fooled by a
     construct it reads differently from DuckDB).
   Allowed functions are DuckDB's built-in scalar, aggregate, window and macro functions, less those that
   change state, sleep, or reveal the engine's configuration (nextval, setseed, sleep_ms, current_setting,
   json_serialize_sql, write_log, ...). The only table functions allowed are pure generators
   (range, generate_series, unnest, json_each, json_tree); read_csv, read_parquet, read_json*, read_text,
   read_blob, glob, parquet_scan, sniff_csv, query, query_table, duckdb_* and every other table function
   are refused, as is a table named by a string (`FROM '/etc/passwd'`, DuckDB's replacement scan), a
   system catalog or schema, and a prepared-statement parameter. Table names are compared with the lake's
   tables case-insensitively, as DuckDB resolves them; a CTE must have a plain name (letters, digits, _)
   that is not reserved (duckdb_, pg_, sqlite_, information_schema, _) nor the name of any view or table
   of the engine's catalogs, and a table reference matches a CTE only inside the query that defines it
   (the CTE's scope), never elsewhere in the statement.
2. The engine itself is configured, before anything else runs, with `enable_external_access=false`
   (no file or network access from SQL), `allowed_directories` = the pack's private staging folder only
   (see ingest; the engine adds its own files: the lake, its WAL and its temp folder), no extension
   auto-install or auto-load, no Python replacement scans (`FROM some_var` reading a Python object), a
   `memory_limit`, a thread count and a cap on temp-file spill; then `lock_configuration=true`, so no
   statement can turn any of it back.
3. Every query runs on a cursor of its own inside a transaction that is always rolled back, with a
   timer that interrupts it after `query_timeout_seconds`. At most `limit` rows (itself at most
   `max_rows`) are fetched from the streaming result: a query is never fully materialised for the caller.
   DuckDB's `memory_limit` bounds its buffers (sorts, hash tables, intermediate chunks) but not the
   strings and list children a single value holds (those are allocated outside the buffer manager), so
   a result's size is bounded by the pack: the query runs wrapped as a subquery that measures every row
   (the length of each value as text) and hands over a row's values only when the row fits
   `max_result_bytes`; rows are fetched one at a time against a running total of that many bytes, and a
   result over it is refused. The value is still built once inside the engine (the query's own cost),
   but never copied into Python or the answer.
4. Nesting is bounded before anything runs: DuckDB's parser refuses expressions nested more than
   MAX_EXPRESSION_DEPTH deep; both checkers refuse an expression (or type) nested more than MAX_NESTING
   deep and a string constant whose brackets nest more than MAX_NESTING deep (the deep JSON or type
   strings json_transform and friends spend super-linear, uninterruptible time on), and the structure
   argument of json_transform/from_json must be such a plain string constant. A value nested deeper than
   MAX_NESTING that still comes back is refused rather than converted.

Ingest: DuckDB reads CSV/JSON/Parquet only from files, and with external access off only from allowed
directories. The pack writes the content (inline, or read through the files pack as the caller, so that
pack's own guards and limits apply) to a new file with a random name in `<folder>/staging/` (0700,
O_EXCL|O_NOFOLLOW, 0600), loads it with an explicit reader (CSV: a header line, ',' or tab, strict mode,
types sniffed over the whole file; JSON: records, as an array or one object per line; Parquet) inside a
transaction, and removes the file whatever happens. (The CSV dialect is fixed rather than sniffed: left to
guess, DuckDB's sniffer silently skips leading rows narrower than the rest and drops lines starting '#'.)
A malformed file is an InvalidArgument naming the line or byte where it goes wrong (the engine's word, or
for CSV the sniffer refused, the pack's own check of field counts and quotes; the staging path never
shows); the transaction is rolled back, so a failed create, replace or append leaves the lake exactly as
it was. Ingests and drops are serialised by a lock; queries
run concurrently with them and with each other (DuckDB's MVCC gives each its own snapshot).

Table names are validated (ASCII letters, digits and _, not starting with a digit, at most 63
characters), must not be a reserved SQL keyword or start with `duckdb_`, `pg_`, `sqlite_`,
`information_schema` or `_` (internal or reserved), and are only ever interpolated double-quoted after
that check.

Limits come from the pack's settings: `max_rows` (a `limit` above it is lowered to it rather than refused,
so the catalogue's default limit works whatever the setting; `truncated` tells the caller rows were left
out), `query_timeout_seconds`,
`ingest_timeout_seconds`, `max_ingest_bytes` (one ingest's decoded bytes), `max_tables`, `max_sql_chars`,
`memory_limit`, `max_temp_directory_size` and `threads`. Refusals of a guard (SQL that could write or
escape, a reserved or malformed table name, a limit) go through `context.denied`, which audits them;
bad input (a parse error, an unknown table, malformed data) is InvalidArgument or NotFound. Successful
ingests and drops are audited. Results are JSON values: DECIMAL becomes a float, dates and times ISO-8601
text, BLOB base64 text, UUID and INTERVAL text, NaN and infinities the strings "NaN", "Infinity",
"-Infinity".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import datetime
import decimal
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

# duckdb is imported with the pack: the pack opens the lake when it is made, so that a lake it cannot open stops
# the start-up. sqlglot (about 60 ms) is imported on the first query (_sqlglot).
import duckdb

from ...errors import InvalidArgument, KernelError, NotFound
from .. import Pack, PackContext, implements

DEFAULTS: dict[str, Any] = {
    "max_rows": 10_000,
    "query_timeout_seconds": 10,
    "ingest_timeout_seconds": 60,
    "max_ingest_bytes": 64 << 20,  # 64 MiB
    "max_tables": 100,
    "max_sql_chars": 100_000,
    "threads": 2,
    "memory_limit": "512MB",
    "max_temp_directory_size": "1GB",
    "max_result_bytes": 16 << 20,  # what one query may hand back, its values measured as text
}
_COUNTS = ("max_rows", "max_ingest_bytes", "max_tables", "max_sql_chars", "threads", "max_result_bytes")
_SECONDS = ("query_timeout_seconds", "ingest_timeout_seconds")
_SIZES = ("memory_limit", "max_temp_directory_size")
_SIZE_RE = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)

LAKE_FILE = "lake.duckdb"
STAGING = "staging"
FORMATS = ("csv", "tsv", "json", "parquet")
MODES = ("create", "replace", "append")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "json", ".ndjson": "json",
              ".parquet": "parquet", ".pq": "parquet"}
MAX_NAME = 63
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_PREFIXES = ("duckdb_", "pg_", "sqlite_", "information_schema", "_")
MAX_NESTING = 32  # expressions, types, bracketed string constants, values
MAX_EXPRESSION_DEPTH = 128  # DuckDB's parser (max_expression_depth; a chain `a + b + c ...` counts each link)
MAX_TREE_DEPTH = 2000  # the engine's serialised parse tree, as JSON
CLOSE_GRACE_SECONDS = 5.0  # close() waits this long for interrupted queries, then leaves them to end
# Functions whose second argument is a structure (a type as JSON text): it must be a plain string constant.
_STRUCTURE_FUNCTIONS = frozenset({"json_transform", "json_transform_strict", "from_json", "from_json_strict"})
_FIXED_SIZE_TYPE = re.compile(r"(BOOLEAN|TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT|"
                              r"UHUGEINT|FLOAT|DOUBLE|DATE|TIME|TIME WITH TIME ZONE|TIMESTAMP|TIMESTAMP WITH TIME ZONE|"
                              r"TIMESTAMP_S|TIMESTAMP_MS|TIMESTAMP_NS|INTERVAL|UUID|DECIMAL\(\d+,\s*\d+\))")
# Scalar functions that make a value as large as a number they are given (DuckDB builds such a value outside
# its memory_limit, in one step it cannot interrupt): that number must be a constant of at most MAX_AMPLIFY,
# and no such function may sit inside another's arguments. Position of the count argument, or None: all.
_AMPLIFIERS: dict[str, int | None] = {"repeat": 1, "lpad": 1, "rpad": 1, "list_resize": 1, "array_resize": 1,
                                      "range": None, "generate_series": None, "bar": 3}
MAX_AMPLIFY = 100_000
_FIXED_SIZE = 48  # bytes a fixed-size value counts for (its JSON text is never longer)
_LIST_SUFFIX = re.compile(r"(\[\d*\])+$")  # INTEGER[], VARCHAR[][], DOUBLE[3]: how many list levels
_log = logging.getLogger("kernel.packs.data")

# Built-in functions that are scalar or aggregate but must not run in a read-only query: they change
# state (sequences, the random seed, the log), sleep, or reveal the engine's configuration or the query.
DENIED_FUNCTIONS = frozenset({
    "nextval", "currval", "setval", "setseed", "sleep_ms", "pg_sleep", "write_log", "current_setting",
    "getvariable", "current_query", "json_serialize_sql", "json_deserialize_sql", "json_execute_serialized_sql",
    "parse_duckdb_log_message", "in_search_path", "current_schemas", "pg_conf_load_time",
    "pg_postmaster_start_time",
})
# The only table functions a query may use: pure generators over their arguments.
TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "json_each", "json_tree"})
# UNNEST in a select list is a scalar use of what duckdb_functions() lists as a table function.
_SCALAR_SYNTAX = frozenset({"unnest", "unlist"})
# Spellings sqlglot reads as functions that DuckDB treats as syntax (COLUMNS(...), UNPACK(...)).
_SQLGLOT_SYNTAX = frozenset({"columns", "unpack"})

# DuckDB parse tree: the expression classes and the non-expression nodes (query nodes, table references,
# result modifiers, orderings) a read-only query is made of. Anything else is refused.
_EXPRESSION_CLASSES = frozenset({
    "BETWEEN", "CASE", "CAST", "COLLATE", "COLUMN_REF", "COMPARISON", "CONJUNCTION", "CONSTANT", "FUNCTION",
    "LAMBDA", "LAMBDA_REF", "OPERATOR", "POSITIONAL_REFERENCE", "STAR", "SUBQUERY", "TYPE", "WINDOW",
})
_NODE_TYPES = frozenset({
    "SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE",
    "BASE_TABLE", "EMPTY", "EMPTY_FROM", "EXPRESSION_LIST", "JOIN", "PIVOT", "SUBQUERY", "TABLE_FUNCTION",
    "DISTINCT_MODIFIER", "LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER", "ORDER_MODIFIER",
    "ORDER_DEFAULT", "ASCENDING", "DESCENDING", "INVALID",
})

# sqlglot nodes that never belong in a read-only query, wherever they sit in the tree (those this sqlglot has).
_FORBIDDEN_NODE_NAMES = (
    "Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "TruncateTable", "Command", "Copy", "Pragma",
    "Set", "Attach", "Detach", "Transaction", "Commit", "Rollback", "Use", "Install", "Describe", "Summarize",
    "Show", "LoadData", "Into", "Export", "Analyze", "Refresh", "Cache", "Uncache", "Kill",
)

if TYPE_CHECKING:
    from sqlglot import exp


@functools.cache
def _sqlglot() -> tuple[Any, Any, tuple[type, ...]]:
    """sqlglot, its expressions module, and the node classes that never belong in a read-only query: imported
    and built once, on the first query rather than when the runtime starts."""
    import sqlglot
    from sqlglot import exp

    return sqlglot, exp, tuple(getattr(exp, n) for n in _FORBIDDEN_NODE_NAMES if hasattr(exp, n))


class _Refusal(Exception):
    """A guard said no; turned into `context.denied(...)` at the capability's edge (which audits it)."""

    def __init__(self, subject: Any, why: str):
        super().__init__(why)
        self.subject = subject
        self.why = why


def _shown(value: Any, limit: int = 200) -> str:
    """A caller's value for the audit log: verbatim when printable and short, else its repr, cut."""
    if isinstance(value, str) and value.isprintable() and len(value) <= limit:
        return value
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(name: str) -> str:
    """A validated identifier, double-quoted (validation already excluded quotes; this is belt and braces)."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _bracket_depth(text: str) -> int:
    """How deep the brackets of `text` nest ([, { and ( alike; a closing one never takes it below 0)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{(":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]})" and depth:
            depth -= 1
    return deepest


def _jsonable(value: Any, depth: int = 0) -> Any:
    """A DuckDB value as a JSON value (see the module docstring for the conversions); a value nested more
    than MAX_NESTING deep is refused (InvalidArgument), never a RecursionError."""
    if depth > MAX_NESTING:
        raise InvalidArgument(f"a value of the result is nested more than {MAX_NESTING} deep; data.query returns "
                              "values nested at most that deep")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, decimal.Decimal):
        return _jsonable(float(value), depth)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (uuid.UUID, datetime.timedelta)):
        return str(value)
    return str(value)


class DataPack(Pack):
    """The `data.*` capabilities over one DuckDB lake per ecosystem."""

    name = "data"
    libraries = ("sqlglot",)  # imported on first use; duckdb is imported with the module

    def __init__(self, context: PackContext):
        super().__init__(context)
        self._limits = {key: self._setting(key) for key in DEFAULTS}
        folder = Path(context.folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.is_symlink() or not folder.is_dir():
            raise KernelError(f"the data pack's folder {str(folder)!r} is not a directory; remove what is there and restart")
        os.chmod(folder, 0o700)
        self._staging = folder / STAGING
        self._staging.mkdir(mode=0o700, exist_ok=True)
        if self._staging.is_symlink() or not self._staging.is_dir():
            raise KernelError(f"{str(self._staging)!r} must be a directory of the data pack's own; remove it and restart")
        os.chmod(self._staging, 0o700)
        for leftover in os.listdir(self._staging):  # a crash's staging files: never loaded, never readable
            os.unlink(self._staging / leftover)
        lake = folder / LAKE_FILE
        if lake.is_symlink() or (lake.exists() and not lake.is_file()):
            raise KernelError(f"the lake {str(lake)!r} is not a regular file; remove what is there and restart")
        self._lock = threading.Lock()  # ingest and drop: one writer at a time (and max_tables stays true)
        self._cursor_lock = threading.Lock()  # the root connection: cursors are made and closed one at a time
        self._idle = threading.Condition(self._cursor_lock)  # close() waits on it for the cursors in use to end
        self._active: set[Any] = set()
        self._closed = False
        self._close_when_idle = False  # close() returned with queries still running: the last one closes
        engine = {
            "threads": self._limits["threads"], "memory_limit": self._limits["memory_limit"],
            "max_temp_directory_size": self._limits["max_temp_directory_size"],
            "autoinstall_known_extensions": False, "autoload_known_extensions": False,
            "allow_community_extensions": False, "python_enable_replacements": False,
            "max_expression_depth": MAX_EXPRESSION_DEPTH + 16,  # the pack's wrapper adds a few levels
        }
        try:
            self._con = duckdb.connect(str(lake), config=engine)
        except duckdb.Error as exc:
            raise KernelError(f"the data lake {str(lake)!r} cannot be opened ({_first_line(exc)}); another process may "
                              "hold it, or the file is not a DuckDB database") from None
        try:
            self._con.execute(f"SET allowed_directories = [{_literal(str(self._staging.resolve()) + os.sep)}]")
            self._con.execute("SET enable_external_access = false")
            self._con.execute("SET lock_configuration = true")
            self._parser = duckdb.connect(":memory:", config={**engine, "threads": 1, "enable_external_access": False,
                                                              "max_expression_depth": MAX_EXPRESSION_DEPTH})
            self._parser.execute("SET lock_configuration = true")
            self._parser_lock = threading.Lock()
            functions = self._parser.execute(
                "SELECT DISTINCT lower(function_name), function_type FROM duckdb_functions()").fetchall()
            self._reserved = {r[0].lower() for r in self._parser.execute(
                "SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category = 'reserved'").fetchall()}
            self._database = self._con.execute("SELECT current_database()").fetchall()[0][0]
            # Every name a table reference could bind to in the engine's own catalogs: no CTE may take one.
            self._system_names = frozenset(r[0].lower() for r in self._parser.execute(
                "SELECT view_name FROM duckdb_views() UNION SELECT table_name FROM duckdb_tables() "
                "UNION SELECT schema_name FROM duckdb_schemas() UNION SELECT database_name FROM duckdb_databases()"
            ).fetchall()) | {"tables", "columns", "schemata", "views"}
        except BaseException:
            self._con.close()
            raise
        self._scalars = frozenset(n for n, kind in functions if kind in ("scalar", "aggregate", "window", "macro")
                                  and not n.startswith("__") and n not in DENIED_FUNCTIONS) | _SCALAR_SYNTAX
        self._table_only = frozenset(n for n, kind in functions if kind in ("table", "table_macro", "pragma")) - self._scalars

    def _setting(self, key: str) -> Any:
        value = self.context.settings.get(key, DEFAULTS[key])
        default = DEFAULTS[key]
        if key in _COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise KernelError(f"pack setting data.{key} must be a positive whole number, not {value!r} (default {default})")
            if key == "threads" and value > 256:
                raise KernelError(f"pack setting data.threads must be at most 256, not {value!r} (default {default})")
        elif key in _SECONDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86_400:
                raise KernelError(f"pack setting data.{key} must be a number of seconds above 0 and at most 86400, not "
                                  f"{value!r} (default {default})")
        elif key in _SIZES and (not isinstance(value, str) or not _SIZE_RE.fullmatch(value.strip())):
            raise KernelError(f"pack setting data.{key} must be a size such as '512MB' or '2GiB', not {value!r} "
                              f"(default {default!r})")
        return value.strip() if isinstance(value, str) else value

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        """Stop what runs (each caller gets a clear error), wait a little for it to let go, then close the
        database. A query that ignores its interrupt (DuckDB checks for it only between steps) is left to
        end: close() returns at once with a log line, and the last cursor to end closes the database."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
            for cursor in list(self._active):
                try:
                    cursor.interrupt()
                except duckdb.Error:
                    pass
            self._idle.wait_for(lambda: not self._active, timeout=CLOSE_GRACE_SECONDS)
            if self._active:
                self._close_when_idle = True
                _log.warning("data pack closing: %d running quer%s did not stop within %g s of their interrupt; the "
                             "lake is closed when %s", len(self._active), "y" if len(self._active) == 1 else "ies",
                             CLOSE_GRACE_SECONDS, "it ends" if len(self._active) == 1 else "they end")
                return
        with self._lock, self._idle:
            self._close_engine()

    def _close_engine(self) -> None:
        """Close both connections, each whatever the other did (called with the cursor lock held)."""
        for what, connection in (("parser", self._parser), ("lake", self._con)):
            try:
                connection.close()
            except duckdb.Error as exc:
                _log.warning("data pack: closing its %s connection failed: %s", what, _first_line(exc))

    # ---- cursors -------------------------------------------------------------------------------------

    @contextmanager
    def _cursor(self, timeout: float) -> Iterator[tuple[Any, threading.Event]]:
        """A connection of its own to the lake, interrupted after `timeout` seconds (the event says so)."""
        with self._cursor_lock:
            if self._closed:
                raise KernelError("the data pack is closed (the ecosystem is shutting down)")
            cursor = self._con.cursor()
            self._active.add(cursor)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            cursor.interrupt()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            yield cursor, expired
        finally:
            timer.cancel()
            with self._idle:
                self._active.discard(cursor)
                try:
                    cursor.close()
                except duckdb.Error:
                    pass
                self._idle.notify_all()
                if self._close_when_idle and not self._active:
                    self._close_when_idle = False
                    self._close_engine()

    # ---- names ---------------------------------------------------------------------------------------

    def _table_name(self, given: Any) -> str:
        """A caller's table name, or a refusal when it could be anything but a plain name of a lake table."""
        if not isinstance(given, str):
            raise InvalidArgument(f"a table name must be a string, not {type(given).__name__}")
        if not given:
            raise InvalidArgument("a table name must not be empty; use letters, digits and _, e.g. 'sales_2024'")
        if len(given) > MAX_NAME:
            raise InvalidArgument(f"a table name is at most {MAX_NAME} characters; this one has {len(given)}")
        if not _NAME_RE.fullmatch(given):
            raise _Refusal(given, f"table name {_shown(given)!r} may hold only ASCII letters, digits and _ and must not "
                                  "start with a digit, e.g. 'sales_2024'")
        lower = given.lower()
        if lower.startswith(RESERVED_PREFIXES):
            raise _Refusal(given, f"table name {given!r} is reserved (names starting with "
                                  f"{', '.join(repr(p) for p in RESERVED_PREFIXES)} belong to the engine or the pack); "
                                  "choose another name")
        if lower in self._reserved:
            raise _Refusal(given, f"table name {given!r} is a reserved SQL keyword; choose another name, e.g. "
                                  f"'{lower}_data'")
        return given

    def _lake_tables(self, cursor: Any) -> dict[str, str]:
        """The lake's tables: lower-cased name -> name as created."""
        rows = cursor.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' "
                              "AND NOT temporary", [self._database]).fetchall()
        return {name.lower(): name for (name,) in rows}

    def _describe(self, cursor: Any, name: str) -> dict[str, Any]:
        columns = cursor.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = ? AND schema_name = 'main' "
            "AND table_name = ? ORDER BY column_index", [self._database, name]).fetchall()
        rows = cursor.execute(f"SELECT count(*) FROM {_quote(name)}").fetchall()[0][0]
        return {"table": name, "rows": rows, "columns": [{"name": c, "type": t} for c, t in columns]}

    # ---- the SQL guard -------------------------------------------------------------------------------

    def _vet(self, sql: str, tables: dict[str, str]) -> str:
        """Refuse `sql` unless it is exactly one read-only query over lake tables and allowed functions; the
        text of that one statement."""
        with self._parser_lock:
            try:
                statements = self._parser.extract_statements(sql)
            except duckdb.Error as exc:
                if "expression depth" in str(exc):
                    raise _Refusal(sql, f"the query nests expressions more than {MAX_EXPRESSION_DEPTH} deep; flatten "
                                        "it") from None
                raise InvalidArgument(f"the query is not valid SQL: {_engine_message(exc)}") from None
            if not statements:
                raise InvalidArgument("the query is empty; write one SELECT statement, e.g. 'SELECT * FROM sales'")
            if len(statements) > 1:
                raise _Refusal(sql, f"the query holds {len(statements)} statements; data.query runs exactly one "
                                    "read-only statement (remove the ';' and what follows it)")
            kind = statements[0].type.name
            if kind != "SELECT":
                raise _Refusal(sql, f"a {kind} statement is not a query: data.query only reads (SELECT, WITH, VALUES, "
                                    "UNION...); load data with data.ingest and remove a table with data.drop")
            raw = self._parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
            text = statements[0].query
        self._vet_sqlglot(sql, tables)
        try:
            tree = json.loads(raw)
        except (RecursionError, ValueError):
            raise _Refusal(sql, "the query is too deeply nested for the pack's checker; flatten it") from None
        self._vet_tree(sql, tree, tables)
        return text

    def _vet_sqlglot(self, sql: str, tables: dict[str, str]) -> None:
        sqlglot, exp, forbidden_nodes = _sqlglot()
        try:
            parsed = [s for s in sqlglot.parse(sql, read="duckdb") if s is not None and not isinstance(s, exp.Semicolon)]
        except sqlglot.errors.ParseError as exc:
            detail = exc.errors[0]["description"] if exc.errors else str(exc).splitlines()[0]
            raise InvalidArgument(f"the pack's SQL checker cannot read this query ({detail}); rewrite it in plainer "
                                  "SQL") from None
        except (sqlglot.errors.SqlglotError, RecursionError):
            raise InvalidArgument("the pack's SQL checker cannot read this query (too deeply nested or unsupported "
                                  "syntax); rewrite it in plainer SQL") from None
        if len(parsed) != 1:
            raise _Refusal(sql, f"the query holds {len(parsed)} statements; data.query runs exactly one")
        root = parsed[0]
        if not isinstance(root, (exp.Query, exp.Values)):
            raise _Refusal(sql, f"a {root.key.upper()} statement is not a query: data.query only reads (SELECT, WITH, "
                                "VALUES, UNION...)")
        for cte in root.find_all(exp.CTE):
            self._check_cte_name(sql, cte.alias_or_name)
        depths: dict[int, int] = {id(root): 0}
        for node in root.walk():
            parent = node.parent
            nested = depths.get(id(parent), 0) + 1 if parent is not None else 0
            if isinstance(node, exp.Binary) and type(node) is type(parent):
                nested -= 1  # a chain of one operator (a AND b AND c, a + b + c) is long, not deep
            if isinstance(node, exp.Query):
                nested = 0  # a (sub)query starts its own expressions
            depths[id(node)] = nested
            if nested > MAX_NESTING:
                raise _Refusal(sql, f"the query nests expressions or types more than {MAX_NESTING} deep; flatten it")
            if isinstance(node, exp.Literal) and node.is_string and _bracket_depth(node.this) > MAX_NESTING:
                raise _Refusal(sql, f"a string constant of the query nests brackets more than {MAX_NESTING} deep")
            if isinstance(node, forbidden_nodes):
                raise _Refusal(sql, f"the query contains a {node.key.upper()} clause, which writes or runs a command; "
                                    "data.query only reads")
            if isinstance(node, (exp.Placeholder, exp.Parameter)):
                raise InvalidArgument("data.query takes no parameters ($1, ?, $name); write the values into the query")
            if isinstance(node, exp.Func):
                fname = node.name if isinstance(node, exp.Anonymous) else (type(node).sql_names() or [node.key])[0]
                fname = fname.lower()
                if fname in _STRUCTURE_FUNCTIONS or fname in ("json_transform", "from_json"):
                    args = [a for a in (node.args.get("expression"), *node.expressions) if a is not None]
                    if isinstance(node, exp.Anonymous):
                        args = list(node.expressions)[1:]
                    if not args or not (isinstance(args[0], exp.Literal) and args[0].is_string):
                        raise _Refusal(sql, f"{fname}() takes its structure as a plain string constant")
                if isinstance(node.parent, exp.Table) and node.arg_key == "this":
                    self._check_table_function(sql, fname)
                elif not fname.isascii() or fname in DENIED_FUNCTIONS or fname in self._table_only or (
                        isinstance(node, exp.Anonymous) and fname not in self._scalars | _SQLGLOT_SYNTAX):
                    raise self._function_refusal(sql, fname)
            elif isinstance(node, exp.Table) and not isinstance(node.this, exp.Func):
                if not isinstance(node.this, exp.Identifier):
                    raise _Refusal(sql, "the query reads from something that is not a table name; it may read only "
                                        "the lake's tables")
                self._check_table(sql, node.name, node.db, node.catalog, _ctes_in_scope(node), tables)

    def _check_cte_name(self, sql: str, name: Any) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise _Refusal(sql, f"CTE name {_shown(name)!r} must be a plain name (ASCII letters, digits and _)")
        lower = name.lower()
        if lower.startswith(RESERVED_PREFIXES) or lower in self._system_names:
            raise _Refusal(sql, f"CTE name {name!r} is reserved: it names a system table or view of the engine (or "
                                f"starts with {', '.join(repr(p) for p in RESERVED_PREFIXES)}); choose another name")

    def _vet_tree(self, sql: str, tree: dict[str, Any], tables: dict[str, str]) -> None:
        """Walk DuckDB's own parse tree: the allow-lists, on exactly what the engine will bind."""
        if tree.get("error"):
            raise _Refusal(sql, f"the engine's parser refuses it as a query ({tree.get('error_message', 'unknown error')})")
        if len(tree.get("statements", ())) != 1:
            raise _Refusal(sql, "the query must be exactly one statement")
        # (node, CTE names in scope, JSON depth, expression depth): a CTE is visible only below the query
        # node that defines it; an expression's depth restarts at each query node.
        stack: list[tuple[Any, frozenset[str], int, int, str]] = [(tree["statements"], frozenset(), 0, 0, "")]
        bases: list[tuple[dict[str, Any], frozenset[str]]] = []
        functions: list[dict[str, Any]] = []
        table_functions: set[int] = set()
        while stack:
            node, scope, depth, nested, chain = stack.pop()
            if depth > MAX_TREE_DEPTH:
                raise _Refusal(sql, "the query is too deeply nested for the pack's checker; flatten it")
            if isinstance(node, list):
                stack.extend((item, scope, depth + 1, nested, chain) for item in node)
                continue
            if not isinstance(node, dict):
                continue
            if "cte_map" in node and isinstance(node["cte_map"], dict):
                names = set()
                for entry in node["cte_map"].get("map", ()):
                    key = entry.get("key") if isinstance(entry, dict) else None
                    self._check_cte_name(sql, key)
                    names.add(key.lower())
                scope = scope | names
            kind = node.get("type")
            link = chain  # a wrapper (an argument's {"name", "expression"}) passes its parent's chain through
            if "class" in node:
                link = ""
                if node.get("is_operator") and isinstance(node.get("function_name"), str):
                    link = "op:" + node["function_name"]
                elif node["class"] in ("CONJUNCTION", "COMPARISON"):
                    link = f"{node['class']}:{kind}"
                if not link or link != chain:  # a chain of one operator (a + b + c) is long, not deep
                    nested += 1
                if nested > MAX_NESTING:
                    raise _Refusal(sql, f"the query nests expressions or types more than {MAX_NESTING} deep; flatten it")
                literal = node.get("literal")
                if (node["class"] == "CONSTANT" and isinstance(literal, dict) and isinstance(literal.get("text"), str)
                        and _bracket_depth(literal["text"]) > MAX_NESTING):
                    raise _Refusal(sql, f"a string constant of the query nests brackets more than {MAX_NESTING} deep")
            elif isinstance(kind, str) and kind.endswith("_NODE"):
                nested = 0
            stack.extend((value, scope, depth + 1, nested, link) for value in node.values())
            if "class" in node:
                if node["class"] == "PARAMETER":
                    raise InvalidArgument("data.query takes no parameters ($1, ?, $name); write the values into the query")
                if node["class"] not in _EXPRESSION_CLASSES:
                    raise _Refusal(sql, f"the query uses a {node['class']} expression, which data.query does not allow")
            elif isinstance(kind, str):  # a query node, a table reference, a modifier or an ordering
                if kind not in _NODE_TYPES:
                    what = "DESCRIBE, SHOW or SUMMARIZE" if kind == "SHOW_REF" else kind
                    raise _Refusal(sql, f"the query uses {what}, which data.query does not allow; data.describe and "
                                        "data.tables tell what the lake holds")
                if kind == "BASE_TABLE":
                    bases.append((node, scope))
                elif kind == "TABLE_FUNCTION" and isinstance(node.get("function"), dict):
                    table_functions.add(id(node["function"]))
            if "function_name" in node:
                functions.append(node)
        for base, scope in bases:
            self._check_table(sql, base.get("table_name"), base.get("schema_name", ""), base.get("catalog_name", ""),
                              scope, tables)
        for fn in functions:
            fname = fn.get("function_name")
            if not isinstance(fname, str) or not fname.isascii():
                raise self._function_refusal(sql, str(fname))
            if fname.lower() in _STRUCTURE_FUNCTIONS:
                args = _arguments(fn)
                second = args[1] if len(args) > 1 else None
                literal = second.get("literal") if isinstance(second, dict) else None
                if not (isinstance(second, dict) and second.get("class") == "CONSTANT" and isinstance(literal, dict)
                        and literal.get("kind") == "STRING"):
                    raise _Refusal(sql, f"{fname.lower()}() takes its structure as a plain string constant")
            if fn.get("schema") or fn.get("catalog"):
                raise _Refusal(sql, f"function {fname!r} is named with a schema or catalog; call built-in functions by "
                                    "their plain name")
            if id(fn) in table_functions:
                self._check_table_function(sql, fname.lower())
            elif fname.lower() in _AMPLIFIERS:
                self._check_amplifier(sql, fname.lower(), _arguments(fn))
            elif fname.lower() not in self._scalars:
                raise self._function_refusal(sql, fname.lower())

    def _check_amplifier(self, sql: str, fname: str, args: list[Any]) -> None:
        where = _AMPLIFIERS[fname]
        counts = args if where is None else args[where:where + 1]
        for arg in counts:
            value = _constant_number(arg)
            if value is None or abs(value) > MAX_AMPLIFY:
                raise _Refusal(sql, f"{fname}() makes a value as large as its count: the count must be a number "
                                    f"written in the query, at most {MAX_AMPLIFY}")
        stack = list(args)
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, dict):
                if str(node.get("function_name", "")).lower() in _AMPLIFIERS:
                    raise _Refusal(sql, f"{fname}() may not take the result of {node['function_name']}() (the sizes "
                                        "multiply)")
                stack.extend(node.values())

    def _check_table_function(self, sql: str, fname: str) -> None:
        if fname not in TABLE_FUNCTIONS:
            raise _Refusal(sql, f"table function {fname}() is not allowed: a query reads only the lake's tables and the "
                                f"generators {', '.join(sorted(TABLE_FUNCTIONS))}; load files with data.ingest_file")

    def _function_refusal(self, sql: str, fname: str) -> _Refusal:
        if fname in self._table_only:
            return _Refusal(sql, f"{fname}() is a table function that data.query does not allow (it reads files, the "
                                 "network or the engine's state); load files with data.ingest_file")
        if fname in DENIED_FUNCTIONS:
            return _Refusal(sql, f"function {fname}() is not allowed in a read-only query (it changes state, sleeps or "
                                 "reveals the engine's configuration)")
        return _Refusal(sql, f"function {_shown(fname)}() is not one of DuckDB's built-in functions that data.query allows")

    def _check_table(self, sql: str, name: Any, schema: Any, catalog: Any, ctes: frozenset[str] | set[str],
                     tables: dict[str, str]) -> None:
        if not isinstance(name, str):
            raise _Refusal(sql, "the query names a table the checker cannot read")
        if not _NAME_RE.fullmatch(name):
            raise _Refusal(sql, f"the query reads {_shown(name)!r}, which is a file, a URL or not a plain table name: "
                                "a query reads only the lake's tables (load a file with data.ingest_file)")
        if (schema or "").lower() not in ("", "main") or (catalog or "").lower() not in ("", self._database.lower()):
            raise _Refusal(sql, f"the query reads {'.'.join(p for p in (catalog, schema, name) if p)!r}: a query reads "
                                "only the lake's own tables, named without a schema (e.g. 'sales')")
        lower = name.lower()
        if not schema and not catalog and lower in ctes:
            return
        if lower in tables:
            return
        if lower.startswith(RESERVED_PREFIXES) or lower in self._system_names:
            raise _Refusal(sql, f"the query reads {name!r}, a system table or view of the engine; data.tables and "
                                "data.describe tell what the lake holds")
        raise NotFound(f"the lake has no table {name!r}; data.tables lists those it has")

    # ---- running a query -----------------------------------------------------------------------------

    def _query(self, sql: str, limit: int) -> dict[str, Any]:
        timeout = self._limits["query_timeout_seconds"]
        budget = self._limits["max_result_bytes"]
        over = False
        with self._cursor(timeout) as (cursor, expired):
            try:
                statement = self._vet(sql, self._lake_tables(cursor))
                cursor.execute("BEGIN TRANSACTION")
                try:
                    # The statement's columns (names as written, duplicates kept), bound but not run.
                    shape = cursor.execute(f"DESCRIBE (\n{_statement_body(statement)}\n)").fetchall()
                    cursor.execute(_measured(statement, [(c[0], c[1]) for c in shape], limit + 1, budget))
                    description = (cursor.description or [])[:-1]
                    rows: list[tuple[Any, ...]] = []
                    used = 0
                    while len(rows) <= limit:
                        got = cursor.fetchmany(1)  # one row at a time: never more than the budget and one row
                        if not got:
                            break
                        *values, size = got[0]
                        used += size
                        if used > budget:
                            over = True
                            break
                        rows.append(tuple(values))
                finally:
                    try:
                        cursor.execute("ROLLBACK")
                    except duckdb.Error:
                        pass  # interrupted or already aborted: nothing was kept either way
            except duckdb.InterruptException:
                if expired.is_set():
                    raise _Refusal(sql, f"the query ran longer than {timeout} seconds (setting "
                                        "data.query_timeout_seconds) and was stopped; narrow it or raise the setting"
                                   ) from None
                raise KernelError("the query was stopped: the data pack is closing") from None
            except duckdb.OutOfMemoryException:
                raise _Refusal(sql, f"the query needs more memory than the lake may use ({self._limits['memory_limit']}, "
                                    "setting data.memory_limit); narrow it or raise the setting") from None
            except RecursionError:
                raise InvalidArgument(f"a value of the result is nested too deeply to return (at most {MAX_NESTING} "
                                      "levels)") from None
            except duckdb.Error as exc:
                raise InvalidArgument(f"the query failed: {_engine_message(exc)}") from None
        if over:
            raise _Refusal(sql, f"the result is larger than data.query returns ({budget} bytes of values, setting "
                                "data.max_result_bytes); select fewer rows or columns, or shorter values")
        columns = [{"name": c[0], "type": str(d[1])} for c, d in zip(shape, description)]
        kept = rows[:limit]
        return {"columns": columns, "rows": [[_jsonable(v) for v in row] for row in kept], "row_count": len(kept),
                "truncated": len(rows) > limit}

    # ---- ingest ---------------------------------------------------------------------------------------

    @staticmethod
    def _format(value: Any) -> str:
        if value not in FORMATS:
            raise InvalidArgument(f"format must be one of {', '.join(repr(f) for f in FORMATS)}, not {_shown(value)!r}")
        return value

    @staticmethod
    def _mode(value: Any) -> str:
        if value not in MODES:
            raise InvalidArgument(f"mode must be 'create' (a new table), 'replace' (a new or existing table, replaced) "
                                  f"or 'append' (add rows to an existing table), not {_shown(value)!r}")
        return value

    def _check_size(self, subject: str, size: int) -> None:
        limit = self._limits["max_ingest_bytes"]
        if size > limit:
            raise _Refusal(subject, f"{size} bytes is more than one ingest may load ({limit} bytes, setting "
                                    "data.max_ingest_bytes); split the data or raise the setting")
        if size == 0:
            raise InvalidArgument("the content is empty; there is nothing to load")

    def _reader(self, fmt: str, path: str) -> str:
        source = _literal(path)
        if fmt in ("csv", "tsv"):
            delim = _literal("," if fmt == "csv" else "\t")
            # Everything but the column types is fixed: left to guess, the sniffer would skip leading rows that
            # do not fit the widest shape and take '#' lines for comments, dropping data without a word.
            return (f"read_csv({source}, header = true, skip = 0, delim = {delim}, quote = '\"', escape = '\"', "
                    "comment = '', strict_mode = true, sample_size = -1)")
        if fmt == "json":
            return f"read_json({source}, format = 'auto', records = 'true', sample_size = -1)"
        return f"read_parquet({source})"

    def _stage(self, data: bytes, fmt: str) -> Path:
        path = self._staging / f"{secrets.token_hex(16)}.{fmt}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return path

    def _load(self, table: str, fmt: str, mode: str, data: bytes, label: str) -> dict[str, Any]:
        """Load `data` into `table` in one transaction (all or nothing); the table as it then is."""
        timeout = self._limits["ingest_timeout_seconds"]
        with self._lock, self._cursor(timeout) as (cursor, expired):
            existing = self._lake_tables(cursor)
            name = existing.get(table.lower(), table)
            exists = table.lower() in existing
            if mode == "create" and exists:
                raise InvalidArgument(f"table {name!r} already exists; use mode='replace' to replace it or mode='append' "
                                      "to add rows to it")
            if mode == "append" and not exists:
                raise NotFound(f"the lake has no table {table!r} to append to; create it with mode='create'")
            if not exists and len(existing) >= self._limits["max_tables"]:
                raise _Refusal(table, f"the lake already holds {len(existing)} tables, its limit (setting "
                                      "data.max_tables); drop one or raise the setting")
            staged = self._stage(data, fmt)
            try:
                before = self._describe(cursor, name)["rows"] if mode == "append" else 0
                source = self._reader(fmt, str(staged.resolve()))
                cursor.execute("BEGIN TRANSACTION")
                try:
                    if mode == "append":
                        cursor.execute(f"INSERT INTO {_quote(name)} BY NAME SELECT * FROM {source}")
                    else:
                        verb = "CREATE OR REPLACE TABLE" if mode == "replace" else "CREATE TABLE"
                        cursor.execute(f"{verb} {_quote(name)} AS SELECT * FROM {source}")
                    result = self._describe(cursor, name)
                    cursor.execute("COMMIT")
                except BaseException:
                    try:
                        cursor.execute("ROLLBACK")
                    except duckdb.Error:
                        pass  # the failed statement already aborted it: nothing was kept
                    raise
            except duckdb.InterruptException:
                if expired.is_set():
                    raise _Refusal(table, f"loading {label} took longer than {timeout} seconds (setting "
                                          "data.ingest_timeout_seconds) and was stopped; nothing was changed") from None
                raise KernelError("the ingest was stopped: the data pack is closing; nothing was changed") from None
            except duckdb.OutOfMemoryException:
                raise _Refusal(table, f"loading {label} needs more memory than the lake may use "
                                      f"({self._limits['memory_limit']}, setting data.memory_limit); nothing was changed"
                               ) from None
            except duckdb.Error as exc:
                message = _engine_message(exc, {str(staged.resolve()): label, str(staged): label})
                if fmt in ("csv", "tsv") and "sniffing" in message:
                    found = _csv_diagnosis(data, "," if fmt == "csv" else "\t")
                    message = f"it is not well-formed {fmt.upper()}" + (f" ({found})" if found else "")
                raise InvalidArgument(f"{label} could not be loaded as {fmt.upper()} into {name!r}: {message}; nothing "
                                      "was changed") from None
            finally:
                staged.unlink(missing_ok=True)
        result.update(ingested=result["rows"] - before, mode=mode)
        return result

    def _content_bytes(self, content: Any, fmt: str) -> bytes:
        if not isinstance(content, str):
            raise InvalidArgument(f"content must be a string (text, or base64 for Parquet), not {type(content).__name__}")
        if fmt == "parquet":
            try:
                return base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument("Parquet content must be base64 (standard alphabet, padded); encode the file's "
                                      "bytes with base64") from None
        try:
            return content.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument("content has characters UTF-8 cannot encode (lone surrogates)") from None

    # ---- edges ----------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self, caller: str, op: str) -> Iterator[None]:
        """Turn a guard's refusal into the audited AccessDenied, and an engine or OS error into a KernelError."""
        try:
            yield
        except _Refusal as refusal:
            raise self.context.denied(caller, op, _shown(refusal.subject), refusal.why) from None
        except KernelError:
            raise
        except duckdb.Error as exc:
            raise KernelError(f"{op} failed: {_engine_message(exc)}") from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise KernelError(f"{op} failed: {reason}") from None

    def _check_open(self) -> None:
        if self._closed:
            raise KernelError("the data pack is closed (the ecosystem is shutting down)")

    # ---- capabilities ---------------------------------------------------------------------------------

    @implements("data.ingest")
    async def ingest(self, caller: str, table: str, content: str, format: str = "csv", mode: str = "create") -> dict:
        """Load inline CSV/TSV text, JSON text or base64 Parquet into a lake table."""
        op = "data.ingest"
        with self._guard(caller, op):
            self._check_open()
            name = self._table_name(table)
            fmt, how = self._format(format), self._mode(mode)
            data = self._content_bytes(content, fmt)
            self._check_size(name, len(data))
            result = await asyncio.to_thread(self._load, name, fmt, how, data, "the content")
            self.context.audit(caller, op, result["table"], True,
                               f"{how}: {result['ingested']} rows of {fmt} ({len(data)} bytes, sha256 "
                               f"{hashlib.sha256(data).hexdigest()}); {result['rows']} rows now")
            return result

    @implements("data.ingest_file")
    async def ingest_file(self, caller: str, table: str, path: str, format: str = "", mode: str = "create") -> dict:
        """Load a file of the files pack's root into a lake table, read through that pack's guards."""
        op = "data.ingest_file"
        with self._guard(caller, op):
            self._check_open()
            name = self._table_name(table)
            how = self._mode(mode)
            if format == "":
                suffix = os.path.splitext(path)[1].lower() if isinstance(path, str) else ""
                if suffix not in EXTENSIONS:
                    raise InvalidArgument(f"cannot tell the format of {_shown(path)!r} from its extension; name it with "
                                          f"format= one of {', '.join(repr(f) for f in FORMATS)}")
                fmt = EXTENSIONS[suffix]
            else:
                fmt = self._format(format)
            got = await self.context.peer("files").read(caller, path, "base64")  # the files pack's guards and limits
            data = base64.b64decode(got["content"])
            self._check_size(name, len(data))
            where = got["path"]
            result = await asyncio.to_thread(self._load, name, fmt, how, data, f"file {where!r}")
            self.context.audit(caller, op, result["table"], True,
                               f"{how}: {result['ingested']} rows of {fmt} from {where} ({len(data)} bytes, sha256 "
                               f"{got['sha256']}); {result['rows']} rows now")
            return result

    @implements("data.query")
    async def query(self, caller: str, sql: str, limit: int = 1000) -> dict:
        """Run one read-only query; at most `limit` rows of it."""
        op = "data.query"
        with self._guard(caller, op):
            self._check_open()
            if not isinstance(sql, str):
                raise InvalidArgument(f"sql must be a string, not {type(sql).__name__}")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise InvalidArgument(f"limit must be a whole number of rows, at least 1, not {limit!r}")
            limit = min(limit, self._limits["max_rows"])  # lowered, never refused: `truncated` says rows were left
            chars = self._limits["max_sql_chars"]
            if len(sql) > chars:
                raise _Refusal(sql, f"the query has {len(sql)} characters, more than data.query takes ({chars}, setting "
                                    "data.max_sql_chars); shorten it")
            if "\x00" in sql:
                raise InvalidArgument("the query contains a NUL character; remove it")
            return await asyncio.to_thread(self._query, sql, limit)

    @implements("data.tables")
    async def tables(self, caller: str) -> list[dict]:
        """Every lake table with its row count and columns, by name."""
        with self._guard(caller, "data.tables"):
            self._check_open()
            return await asyncio.to_thread(self._tables)

    def _tables(self) -> list[dict[str, Any]]:
        with self._cursor(self._limits["query_timeout_seconds"]) as (cursor, _):
            names = sorted(self._lake_tables(cursor).values(), key=lambda n: (n.lower(), n))
            return [self._describe(cursor, n) for n in names]

    @implements("data.describe")
    async def describe(self, caller: str, table: str) -> dict:
        """One lake table: its row count and its columns with their types."""
        with self._guard(caller, "data.describe"):
            self._check_open()
            name = self._table_name(table)
            return await asyncio.to_thread(self._describe_one, name)

    def _describe_one(self, table: str) -> dict[str, Any]:
        with self._cursor(self._limits["query_timeout_seconds"]) as (cursor, _):
            existing = self._lake_tables(cursor)
            if table.lower() not in existing:
                raise NotFound(f"the lake has no table {table!r}; data.tables lists those it has")
            return self._describe(cursor, existing[table.lower()])

    @implements("data.drop")
    async def drop(self, caller: str, table: str) -> dict:
        """Delete a lake table and its rows."""
        op = "data.drop"
        with self._guard(caller, op):
            self._check_open()
            name = self._table_name(table)
            gone = await asyncio.to_thread(self._drop, name)
            self.context.audit(caller, op, gone["table"], True,
                               f"{gone['rows']} rows, {len(gone['columns'])} columns")
            return {"table": gone["table"], "dropped": True}

    def _drop(self, table: str) -> dict[str, Any]:
        with self._lock, self._cursor(self._limits["ingest_timeout_seconds"]) as (cursor, _):
            existing = self._lake_tables(cursor)
            if table.lower() not in existing:
                raise NotFound(f"the lake has no table {table!r}; data.tables lists those it has")
            gone = self._describe(cursor, existing[table.lower()])
            cursor.execute(f"DROP TABLE {_quote(gone['table'])}")
            return gone


def _arguments(fn: dict[str, Any]) -> list[Any]:
    """A FUNCTION node's argument expressions (DuckDB's tree names them `children` or `arguments`)."""
    args = fn.get("arguments")
    if isinstance(args, list):
        return [a.get("expression", a) if isinstance(a, dict) else a for a in args]
    children = fn.get("children")
    return list(children) if isinstance(children, list) else []


def _constant_number(node: Any) -> float | None:
    """The number a CONSTANT node (or minus one) of DuckDB's tree holds, or None."""
    if not isinstance(node, dict):
        return None
    if node.get("class") == "FUNCTION" and node.get("function_name") == "-":
        inner = _arguments(node)
        value = _constant_number(inner[0]) if len(inner) == 1 else None
        return None if value is None else -value
    literal = node.get("literal")
    if node.get("class") != "CONSTANT" or not isinstance(literal, dict) or literal.get("kind") == "STRING":
        return None
    try:
        return float(str(literal.get("text", "")))
    except ValueError:
        return None


def _statement_body(text: str) -> str:
    """One statement's text without the semicolons and comments that trail it (found by DuckDB's own
    tokenizer, so a ';' inside a string, a quoted name or a comment is never taken for one), ready to be a
    subquery."""
    cut = len(text)
    for offset, kind in reversed(duckdb.tokenize(text)):
        if kind == duckdb.token_type.comment or (kind == duckdb.token_type.operator and text[offset] == ";"):
            cut = offset
            continue
        break
    return text[:cut].rstrip()


def _measured(statement: str, shape: list[tuple[str, str]], rows: int, budget: int) -> str:
    """The statement wrapped so that each row comes with its size (every value's length as text; a fixed-
    size type counts _FIXED_SIZE) and hands its values over only when that size is within `budget`: a huge
    value stays in the engine, never copied into Python. The columns keep their names; the size is last."""
    sizes = []
    for i, (_, kind) in enumerate(shape, 1):
        if _FIXED_SIZE_TYPE.fullmatch(kind):
            sizes.append(str(_FIXED_SIZE))
            continue
        text = f"coalesce(strlen(CAST(#{i} AS VARCHAR)), 0) + {_FIXED_SIZE}"
        levels = len(_LIST_SUFFIX.search(kind).group(0)) // 2 if _LIST_SUFFIX.search(kind) else 0
        if kind.upper().startswith("MAP(") and not levels:
            levels, flat = 1, f"map_keys(#{i})"
        else:
            flat = f"#{i}"
            for _ in range(max(levels - 1, 0)):
                flat = f"flatten({flat})"
        if levels:  # a list's element count first (cheap): a huge list is never turned into text to be measured
            count = f"coalesce(len({flat}), 0)"
            text = f"CASE WHEN {count} * 2 > {budget} THEN {count} * 2 ELSE {text} END"
        sizes.append(text)
    inner = ", ".join(f"#{i} AS __regen_c{i}" for i in range(1, len(shape) + 1))
    outer = ", ".join(f"CASE WHEN __regen_size <= {budget} THEN __regen_c{i} END AS {_quote(name)}"
                      for i, (name, _) in enumerate(shape, 1))
    return (f"SELECT {outer}, __regen_size FROM (SELECT {inner}, {' + '.join(sizes)} AS __regen_size "
            f"FROM (\n{_statement_body(statement)}\n) AS __regen_q LIMIT {rows}) AS __regen_r")


def _ctes_in_scope(node: exp.Expression) -> set[str]:
    """The CTE names a table reference can see: those of the WITH of every query it sits in."""
    _, exp, _ = _sqlglot()
    names: set[str] = set()
    current = node.parent
    while current is not None:
        for with_ in (current.args.get("with_"), current.args.get("with")):  # sqlglot's key, newer and older
            if isinstance(with_, exp.With):
                names.update(cte.alias_or_name.lower() for cte in with_.expressions)
        current = current.parent
    return names


def _csv_diagnosis(data: bytes, delimiter: str) -> str:
    """Where CSV the engine's sniffer gave up on first goes wrong (it says only that it could not): the first
    line whose field count differs from the header's, or the line of a broken quote; "" when none is found."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace"), newline=""), delimiter=delimiter,
                        quotechar='"', doublequote=True, strict=True)
    try:
        header = next(reader, [])
        for row in reader:
            if row and len(row) != len(header):
                return f"line {reader.line_num} has {len(row)} fields where the header line has {len(header)}"
    except csv.Error as exc:
        return f"line {reader.line_num}: {exc}"
    return ""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _engine_message(exc: BaseException, replace: dict[str, str] | None = None) -> str:
    """The useful part of a DuckDB error: its first paragraph (the line or byte it names, the value it
    could not read), without the engine's SQL echo, its advice on options the pack sets, or file paths."""
    text = str(exc).strip()
    for marker in ("\n\nLINE ", "\nLINE ", "\nPossible solutions", "\nPossible fixes", "\nThe search space", "\n\n"):
        cut = text.find(marker)
        if cut > 0:
            text = text[:cut]
    for path, label in sorted((replace or {}).items(), key=lambda item: -len(item[0])):
        text = text.replace(f'"{path}"', label).replace(f"'{path}'", label).replace(path, label)
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:597] + "..."

