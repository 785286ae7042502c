"""The data pack's catalogue: what it is for, its pinned dependencies,
its capabilities, the shapes of their results and their MCP hints.

Light on purpose (pydantic and the core's catalogue types only): the compiler and `capabilities.py` read it;
the implementation, with its libraries, is `pack.py`, imported only when the pack is loaded.
"""

from __future__ import annotations

from typing import Any

from ...capabilities import Capability, PackInfo, Shape
from ...capabilities import param as _p

PACK = PackInfo("data", "One embedded DuckDB data lake per ecosystem: tables loaded from CSV, TSV, JSON and Parquet "
                        "(inline or from the file root), read-only SQL checked against an allow-list, row, time and "
                        "memory limits", dependencies=("duckdb==2.0.1", "sqlglot==30.31.0"), requires=("files",))


class DataColumn(Shape):
    """A column of a lake table or of a query's result: its name and its DuckDB type (e.g. BIGINT, VARCHAR, DATE)."""

    name: str
    type: str


class DataTable(Shape):
    """A table of the ecosystem's data lake: its name, how many rows it holds and its columns, in order."""

    table: str
    rows: int
    columns: list[DataColumn]


class DataIngested(DataTable):
    """A table as an ingest left it (`rows` in all), with how many rows this ingest loaded and in which mode."""

    ingested: int
    mode: str


class DataQueryResult(Shape):
    """What a read-only query returned: its columns, at most `limit` rows (each a list of JSON values, in column
    order), how many rows that is, and whether the query had more rows than were returned."""

    columns: list[DataColumn]
    rows: list[list[Any]]
    row_count: int
    truncated: bool


class DataTableDropped(Shape):
    """The lake table that was dropped."""

    table: str
    dropped: bool


CAPABILITIES: tuple[Capability, ...] = (
    Capability("data.ingest", "Load CSV or TSV text (a header line first), JSON (an array of objects, or one object "
                              "per line) or Parquet (base64) into a table of the data lake; mode 'create', 'replace' "
                              "or 'append'. Returns {table, rows, columns, ingested, mode}.",
               (_p("table", "str"), _p("content", "str"), _p("format", "str", "csv"), _p("mode", "str", "create")),
               "dict", shape=DataIngested, pack="data"),
    Capability("data.ingest_file", "Load a CSV, TSV, JSON or Parquet file of the ecosystem's file root into a table "
                                   "of the data lake (format from the extension when ''); mode 'create', 'replace' "
                                   "or 'append'. Returns {table, rows, columns, ingested, mode}.",
               (_p("table", "str"), _p("path", "str"), _p("format", "str", ""), _p("mode", "str", "create")),
               "dict", shape=DataIngested, pack="data"),
    Capability("data.query", "Run one read-only SQL query (SELECT, WITH, VALUES, UNION...) over the lake's tables; "
                             "returns {columns, rows, row_count, truncated}, at most `limit` rows.",
               (_p("sql", "str"), _p("limit", "int", 1000)), "dict", shape=DataQueryResult, pack="data"),
    Capability("data.tables", "The tables of the data lake, by name, each with its row count and columns.", (),
               "list[dict]", shape=DataTable, pack="data"),
    Capability("data.describe", "One table of the data lake: its row count and its columns with their types.",
               (_p("table", "str"),), "dict", shape=DataTable, pack="data"),
    Capability("data.drop", "Delete a table of the data lake and everything in it.", (_p("table", "str"),), "dict",
               shape=DataTableDropped, pack="data"),
)

READ_ONLY: frozenset[str] = frozenset({"data.query", "data.tables", "data.describe"})
DESTRUCTIVE: frozenset[str] = frozenset({"data.ingest", "data.ingest_file", "data.drop"})
