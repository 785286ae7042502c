"""The data pack as a rogue MAD would try it: every SQL form that could write, escape the lake or read a
file is refused (and audited), the lake and everything outside it stay exactly as they were, and the
pack keeps working; plus round-trips of CSV, TSV, JSON and Parquet, the limits, concurrency, and the
pack in a Runtime.

The pack is built directly on a PackContext under tmp_path: <tmp>/state/data is its folder (the lake),
<tmp>/state/files the files pack's root (its peer), <tmp>/outside holds what must never be read or changed.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pytest
from pack_helpers import CALLER, SECRET_TEXT, Recorder, outside, owner, refused, run, running, snapshot

from generator.kernel.capabilities import CAPABILITIES, PACKS, packs_of
from generator.kernel.errors import AccessDenied, InvalidArgument, KernelError, NotFound
from generator.kernel.packs import IMPL_ATTR, PackContext, load
from generator.kernel.packs.data.pack import STAGING, DataPack
from generator.kernel.packs.files.pack import FilesPack

CSV = "id,name,born,score\n1,ann,2001-02-03,1.5\n2,bob,1999-12-31,2.25\n3,cy,2010-06-07,\n"


@dataclass
class Env(Recorder):
    tmp: Path
    folder: Path
    files_root: Path
    outside: Path
    packs: list[Any] = field(default_factory=list)

    def files(self, **settings: Any) -> FilesPack:
        pack = FilesPack(self.context(self.files_root, settings))
        self.packs.append(pack)
        return pack

    def pack(self, files: FilesPack | None = None, **settings: Any) -> DataPack:
        def peer(name: str) -> Any:
            if name == "files" and files is not None:
                return files
            raise KernelError(f"the 'data' pack does not require the {name!r} pack")

        pack = DataPack(self.context(self.folder, settings, peer))
        self.packs.append(pack)
        return pack


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp=tmp_path, folder=tmp_path / "state" / "data", files_root=tmp_path / "state" / "files",
            outside=outside(tmp_path, {"secret.csv": f"secret\n{SECRET_TEXT}\n".encode()}))
    yield e
    for pack in e.packs:
        asyncio.run(pack.close())


def lake(pack: DataPack) -> dict[str, tuple[Any, ...]]:
    """Every table of the lake with its columns and all its rows, read around the pack's guards."""
    cursor = pack._con.cursor()
    try:
        names = [r[0] for r in cursor.execute("SELECT table_name FROM duckdb_tables() ORDER BY table_name").fetchall()]
        return {n: (cursor.execute(f'DESCRIBE "{n}"').fetchall(), sorted(map(repr, cursor.execute(f'SELECT * FROM "{n}"').fetchall())))
                for n in names}
    finally:
        cursor.close()


def loaded(pack: DataPack, table: str = "people", content: str = CSV, **kw: Any) -> dict[str, Any]:
    return run(pack.ingest(CALLER, table, content, **kw))


def parquet_b64(tmp: Path, select: str) -> str:
    """A Parquet file written by a separate duckdb, as base64."""
    target = tmp / "made.parquet"
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"COPY ({select}) TO '{target}' (FORMAT parquet)")
    finally:
        con.close()
    data = target.read_bytes()
    target.unlink()
    return base64.b64encode(data).decode()


# ---- the ordinary path ---------------------------------------------------------------------------------


def test_capabilities_are_marked_loadable_and_match_the_catalogue():
    marked = {getattr(v, IMPL_ATTR): v for v in vars(DataPack).values() if hasattr(v, IMPL_ATTR)}
    assert set(marked) == {n for n, c in CAPABILITIES.items() if c.pack == "data"} == {
        f"data.{op}" for op in ("ingest", "ingest_file", "query", "tables", "describe", "drop")}
    assert load("data") is DataPack
    for name, fn in marked.items():
        cap = CAPABILITIES[name]
        params = list(inspect.signature(fn).parameters.values())[1:]
        assert params[0].name == "caller"
        assert [(p.name, p.annotation) for p in params[1:]] == [(p.name, p.type) for p in cap.params], name
        assert [p.default for p in params[1:] if p.default is not inspect.Parameter.empty] == [
            p.default for p in cap.params if not p.required], name
        assert inspect.signature(fn).return_annotation == cap.returns
    assert PACKS["data"].requires == ("files",) and packs_of(["data.query"]) == {"data", "files"}
    assert set(PACKS["data"].dependencies) == {"duckdb==2.0.1", "sqlglot==30.31.0"}


def test_the_engine_is_locked_down(env: Env):
    pack = env.pack(memory_limit="256MB", threads=1)
    assert stat.S_IMODE(env.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((env.folder / STAGING).stat().st_mode) == 0o700
    assert (env.folder / "lake.duckdb").is_file()
    cursor = pack._con.cursor()
    try:
        settings = dict(cursor.execute("SELECT name, value FROM duckdb_settings() WHERE name IN "
                                       "('enable_external_access', 'lock_configuration', 'threads', 'memory_limit', "
                                       "'python_enable_replacements', 'autoload_known_extensions')").fetchall())
        assert settings["enable_external_access"] == "false" and settings["lock_configuration"] == "true"
        assert settings["threads"] == "1" and settings["memory_limit"].startswith("244")  # 256MB, shown in MiB
        assert settings["python_enable_replacements"] == "false" and settings["autoload_known_extensions"] == "false"
        # even SQL that got past the pack's checks could not turn them back or read a file outside the staging folder
        for sql in ("SET enable_external_access = true", "SET lock_configuration = false", "RESET lock_configuration",
                    "SET allowed_directories = ['/']", "SET memory_limit = '64GB'"):
            with pytest.raises(duckdb.Error, match="locked"):
                cursor.execute(sql)
        for sql in (f"SELECT * FROM read_csv('{env.outside / 'secret.csv'}')",
                    f"SELECT * FROM read_text('{env.folder / STAGING}/../../../outside/secret.txt')",
                    f"SELECT * FROM '{env.outside / 'secret.csv'}'",
                    f"COPY (SELECT 1) TO '{env.outside / 'x.csv'}'", f"ATTACH '{env.outside / 'x.db'}'"):
            with pytest.raises(duckdb.Error, match="disabled by configuration"):
                cursor.execute(sql)
    finally:
        cursor.close()
    assert sorted(os.listdir(env.outside)) == ["secret.csv", "secret.txt"]


@pytest.mark.parametrize("key,value", [("max_rows", 0), ("max_tables", "many"), ("threads", True), ("threads", 1000),
                                       ("query_timeout_seconds", 0), ("ingest_timeout_seconds", -1),
                                       ("memory_limit", "lots"), ("memory_limit", 512), ("max_ingest_bytes", 1.5),
                                       ("max_temp_directory_size", "1 parsec"), ("max_sql_chars", None),
                                       ("max_result_bytes", 0), ("max_result_bytes", "16MB")])
def test_bad_settings_are_refused_naming_the_setting(env: Env, key: str, value: Any):
    with pytest.raises(KernelError, match=f"data.{key}"):
        env.pack(**{key: value})


def test_csv_round_trip_with_types_and_json_values(env: Env):
    pack = env.pack()
    done = loaded(pack)
    assert done == {"table": "people", "rows": 3, "ingested": 3, "mode": "create",
                    "columns": [{"name": "id", "type": "BIGINT"}, {"name": "name", "type": "VARCHAR"},
                                {"name": "born", "type": "DATE"}, {"name": "score", "type": "DOUBLE"}]}
    got = run(pack.query(CALLER, "SELECT id, name, born, score, score * 2 AS twice FROM people ORDER BY id"))
    assert got["columns"][-1] == {"name": "twice", "type": "DOUBLE"}
    assert got["rows"] == [[1, "ann", "2001-02-03", 1.5, 3.0], [2, "bob", "1999-12-31", 2.25, 4.5],
                           [3, "cy", "2010-06-07", None, None]]
    assert (got["row_count"], got["truncated"]) == (3, False)
    assert run(pack.describe(CALLER, "PEOPLE")) == {k: done[k] for k in ("table", "rows", "columns")}
    assert run(pack.tables(CALLER)) == [{k: done[k] for k in ("table", "rows", "columns")}]
    odd = run(pack.query(CALLER, "SELECT 1.25::DECIMAL(5,2) AS d, 'nan'::DOUBLE AS n, '\\x01\\xff'::BLOB AS b, "
                                 "TIMESTAMP '2024-01-02 03:04:05' AS ts, INTERVAL 2 DAY AS i, [1, 2] AS l, "
                                 "{'k': DATE '2024-01-01'} AS s, MAP {1: 'a'} AS m, 'e0a3f3c4-3b1c-4f6e-8a57-4c5ad9a0a0a0'::UUID AS u"))
    assert odd["rows"] == [[1.25, "NaN", base64.b64encode(b"\x01\xff").decode(), "2024-01-02T03:04:05", "2 days, 0:00:00",
                            [1, 2], {"k": "2024-01-01"}, {"1": "a"}, "e0a3f3c4-3b1c-4f6e-8a57-4c5ad9a0a0a0"]]
    assert not os.listdir(env.folder / STAGING)


def test_csv_rows_are_never_silently_dropped(env: Env):
    pack = env.pack()
    assert loaded(pack, "hashes", "tag,n\n#one,1\ntwo,2\n")["rows"] == 2  # '#' is data, not a comment
    assert run(pack.query(CALLER, "SELECT tag FROM hashes ORDER BY n"))["rows"] == [["#one"], ["two"]]
    with pytest.raises(InvalidArgument, match="line 3 has 3 fields"):  # not: skip the first rows, header '3,4,5'
        loaded(pack, "ragged", "a,b\n1,2\n3,4,5\n")
    assert "ragged" not in lake(pack)


def test_tsv_json_array_and_ndjson_round_trips(env: Env):
    pack = env.pack()
    assert loaded(pack, "tabbed", "a\tb\n1\tx y\n", format="tsv")["rows"] == 1
    assert run(pack.query(CALLER, "SELECT * FROM tabbed"))["rows"] == [[1, "x y"]]
    array = '[{"k": 1, "v": "one", "tags": ["a"]}, {"k": 2, "v": "two", "tags": []}]'
    assert loaded(pack, "arr", array, format="json")["columns"] == [
        {"name": "k", "type": "BIGINT"}, {"name": "v", "type": "VARCHAR"}, {"name": "tags", "type": "VARCHAR[]"}]
    ndjson = '{"k": 3, "v": "three"}\n{"k": 4, "v": "four"}\n'
    assert loaded(pack, "lines", ndjson, format="json")["rows"] == 2
    got = run(pack.query(CALLER, "SELECT k, v FROM arr UNION ALL SELECT k, v FROM lines ORDER BY k"))
    assert got["rows"] == [[1, "one"], [2, "two"], [3, "three"], [4, "four"]]


def test_parquet_round_trip(env: Env):
    pack = env.pack()
    content = parquet_b64(env.tmp, "SELECT range AS i, 'v' || range AS s, range / 4 AS f FROM range(5)")
    done = loaded(pack, "pq", content, format="parquet")
    assert (done["rows"], [c["name"] for c in done["columns"]]) == (5, ["i", "s", "f"])
    assert run(pack.query(CALLER, "SELECT * FROM pq ORDER BY i"))["rows"] == [[i, f"v{i}", i / 4] for i in range(5)]


def test_modes_create_replace_append(env: Env):
    pack = env.pack()
    loaded(pack)
    with pytest.raises(InvalidArgument, match="already exists.*mode='replace'"):
        loaded(pack)
    more = "id,name,born,score\n4,dee,2000-01-01,9\n"
    appended = loaded(pack, content=more, mode="append")
    assert (appended["rows"], appended["ingested"], appended["mode"]) == (4, 1, "append")
    by_name = loaded(pack, content="name,id\neve,5\n", mode="append")  # columns matched by name, missing ones NULL
    assert (by_name["rows"], by_name["ingested"]) == (5, 1)
    assert run(pack.query(CALLER, "SELECT born, score FROM people WHERE id = 5"))["rows"] == [[None, None]]
    replaced = loaded(pack, content="x\n7\n", mode="replace")
    assert replaced == {"table": "people", "rows": 1, "ingested": 1, "mode": "replace",
                        "columns": [{"name": "x", "type": "BIGINT"}]}
    assert loaded(pack, "fresh", "x\n1\n", mode="replace")["rows"] == 1  # replace also creates
    with pytest.raises(NotFound, match="no table 'nosuch' to append to"):
        loaded(pack, "nosuch", "x\n1\n", mode="append")
    assert "nosuch" not in lake(pack)


@pytest.mark.parametrize("content,fmt,match", [
    ("id,name\n1,ann\n2,bob,extra\n3,cy\n", "csv", r"not well-formed CSV \(line 3 has 3 fields where the header line has 2"),
    ('id,name\n1,"unterminated\n', "csv", r"not well-formed CSV \(line 2: unexpected end of data"),
    ("id,name\n1,ann\nx\n", "csv", r"line 3 has 1 fields"),
    ('[{"a": 1}, {"a": }]', "json", r"(?i)malformed JSON.*byte"),
    ('{"a": 1}\n{"a": 2\n{"a": 3}\n', "json", r"(?i)malformed JSON.*line 3"),
    ("[1, 2, 3]", "json", r"(?i)object|record|struct"),
    (base64.b64encode(b"PAR1 not really parquet").decode(), "parquet", r"(?i)magic|parquet"),
])
def test_malformed_data_is_a_clear_error_and_changes_nothing(env: Env, content: str, fmt: str, match: str):
    pack = env.pack()
    loaded(pack)
    before = lake(pack)
    for mode, table in (("create", "fresh"), ("replace", "people"), ("append", "people")):
        with pytest.raises(InvalidArgument, match=match) as caught:
            loaded(pack, table, content, format=fmt, mode=mode)
        message = str(caught.value)
        assert "nothing was changed" in message and "the content" in message
        assert str(env.folder) not in message and STAGING not in message  # the staging path never shows
    assert lake(pack) == before
    assert not os.listdir(env.folder / STAGING)
    assert env.denials == []
    assert run(pack.query(CALLER, "SELECT count(*) FROM people"))["rows"] == [[3]]  # still working


def test_a_failed_append_of_wrong_types_leaves_the_rows(env: Env):
    pack = env.pack()
    loaded(pack)
    before = lake(pack)
    with pytest.raises(InvalidArgument, match="(?i)convert|cast"):
        loaded(pack, content="id,name,born,score\nnot-a-number,x,2000-01-01,1\n", mode="append")
    with pytest.raises(InvalidArgument, match="(?i)column"):
        loaded(pack, content="nope\n1\n", mode="append")
    assert lake(pack) == before


@pytest.mark.parametrize("kw,match", [
    ({"content": ""}, "empty"), ({"content": 42}, "must be a string"), ({"format": "xlsx"}, "format must be"),
    ({"mode": "upsert"}, "mode must be"), ({"format": "parquet", "content": "not base64!"}, "base64"),
    ({"content": "a\n\ud800\n"}, "UTF-8"),
])
def test_bad_ingest_input(env: Env, kw: dict[str, Any], match: str):
    pack = env.pack()
    args = {"content": CSV, "format": "csv", "mode": "create"} | kw
    with pytest.raises(InvalidArgument, match=match):
        run(pack.ingest(CALLER, "t", args["content"], format=args["format"], mode=args["mode"]))
    assert lake(pack) == {} and env.denials == []


# ---- the rogue caller's SQL ------------------------------------------------------------------------------


ROGUE_SQL = [
    "DROP TABLE people",
    "DELETE FROM people",
    "UPDATE people SET name = 'x'",
    "INSERT INTO people VALUES (9, 'x', NULL, NULL)",
    "INSERT INTO people SELECT * FROM people",
    "CREATE TABLE stolen AS SELECT * FROM people",
    "CREATE VIEW v AS SELECT 1",
    "CREATE MACRO m() AS 1",
    "ALTER TABLE people RENAME TO p2",
    "WITH x AS (INSERT INTO people VALUES (9, 'x', NULL, NULL) RETURNING *) SELECT * FROM x",
    "WITH x AS (DELETE FROM people RETURNING *) SELECT * FROM x",
    "COPY people TO '{outside}/copied.csv'",
    "COPY (SELECT * FROM people) TO '{outside}/copied.csv' (FORMAT csv)",
    "COPY people FROM '{outside}/secret.csv'",
    "EXPORT DATABASE '{outside}/exported'",
    "IMPORT DATABASE '{outside}'",
    "ATTACH ':memory:' AS m",
    "ATTACH '{outside}/attached.db' AS a",
    "DETACH lake",
    "USE memory",
    "SELECT * FROM read_csv('{outside}/secret.csv')",
    "SELECT * FROM read_csv_auto('/etc/passwd')",
    "SELECT * FROM \"read_csv\"('{outside}/secret.csv')",
    "SELECT * FROM READ_CSV(['{outside}/secret.csv'])",
    "FROM read_csv('/etc/passwd')",
    "SELECT * FROM people, read_text('{outside}/secret.txt')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM read_json_auto('{outside}/secret.txt')",
    "SELECT * FROM read_parquet('{outside}/x.parquet')",
    "SELECT * FROM parquet_scan('{outside}/x.parquet')",
    "SELECT * FROM glob('{outside}/*')",
    "SELECT * FROM sniff_csv('{outside}/secret.csv')",
    "SELECT * FROM '{outside}/secret.csv'",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM 'https://example.com/data.csv'",
    "SELECT * FROM \"{outside}/secret.csv\"",
    "SELECT * FROM query('DROP TABLE people')",
    "SELECT * FROM query_table('people')",
    "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
    "SELECT json_serialize_sql('SELECT 1')",
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM duckdb_secrets()",
    "SELECT * FROM duckdb_tables",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM system.main.duckdb_settings",
    "SELECT * FROM pg_catalog.pg_tables",
    "SELECT * FROM memory.main.people",
    "SELECT current_setting('allowed_directories')",
    "SELECT nextval('seq')",
    "SELECT setseed(0.5)",
    "SELECT sleep_ms(60000)",
    "SELECT write_log('pwned')",
    "SELECT getenv('HOME')",
    "SELECT main.lower('x')",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET lock_configuration",
    "SET memory_limit = '64GB'",
    "PRAGMA table_info('people')",
    "PRAGMA enable_profiling",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CALL checkpoint()",
    "CHECKPOINT",
    "BEGIN TRANSACTION",
    "COMMIT",
    "ROLLBACK",
    "VACUUM",
    "EXPLAIN SELECT 1",
    "DESCRIBE people",
    "SUMMARIZE people",
    "SHOW TABLES",
    "PIVOT people ON name",
    "SELECT 1; DROP TABLE people",
    "SELECT 1 -- hidden\n; DROP TABLE people",
    "SELECT 1 /* ; */ ; DROP TABLE people",
    "SELECT '; DROP TABLE people'; DROP TABLE people",
    "SELECT 1;\nCOPY people TO '{outside}/copied.csv'",
    "WITH \"x.csv\" AS (SELECT 1) SELECT * FROM \"x.csv\"",
    "SELECT * FROM histogram(people, id)",
    "SELECT * FROM test_all_types()",
]


def test_rogue_sql_is_refused_audited_and_changes_nothing(env: Env):
    pack = env.pack()
    loaded(pack)
    before_lake, before_disk = lake(pack), snapshot(env.tmp, skip=("lake.duckdb",))
    for template in ROGUE_SQL:
        sql = template.replace("{outside}", str(env.outside))
        try:
            why = refused(env, "data.query", None, pack.query(CALLER, sql))
        except BaseException as exc:
            raise AssertionError(f"not refused as it should be: {sql!r}") from exc
        assert why.strip() and env.denials[-1][2] == (sql if sql.isprintable() else env.denials[-1][2])
        assert lake(pack) == before_lake, sql
        assert snapshot(env.tmp, skip=("lake.duckdb",)) == before_disk, sql  # nothing written anywhere, staging included
        assert run(pack.query(CALLER, "SELECT count(*) AS n FROM people"))["rows"] == [[3]], sql  # still working
    assert len(env.denials) == len(ROGUE_SQL)


def test_each_checker_alone_refuses_every_rogue_query_the_engine_parses_as_a_select(env: Env):
    """Defence in depth: sqlglot's reading and the walk of DuckDB's own tree each refuse these on their own."""
    import json

    from generator.kernel.packs.data.pack import _Refusal

    pack = env.pack()
    checked = 0
    for template in ROGUE_SQL:
        sql = template.replace("{outside}", str(env.outside))
        statements = pack._parser.extract_statements(sql)
        if len(statements) != 1 or statements[0].type.name != "SELECT":
            continue  # refused by the statement check before either checker
        checked += 1
        tree_ = json.loads(pack._parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
        with pytest.raises(_Refusal):
            pack._vet_tree(sql, tree_, {"people": "people"})
        if "main.lower" not in sql:  # a schema-qualified built-in: harmless, and only the engine's tree shows it
            with pytest.raises(_Refusal):
                pack._vet_sqlglot(sql, {"people": "people"})
    assert checked >= 40


def test_refusals_say_what_is_wrong(env: Env):
    pack = env.pack()
    loaded(pack)
    cases = {
        "DROP TABLE people": "DROP statement is not a query",
        "SELECT 1; SELECT 2": "2 statements",
        f"SELECT * FROM read_csv('{env.outside}/secret.csv')": "read_csv() is not allowed",
        "SELECT * FROM '/etc/passwd'": "a file, a URL",
        "SELECT nextval('s')": "changes state",
        "SELECT * FROM information_schema.tables": "only the lake's own tables",
        "SET enable_external_access = true": "SET statement",
    }
    for sql, message in cases.items():
        assert message in refused(env, "data.query", sql, pack.query(CALLER, sql))


@pytest.mark.parametrize("sql,error,match", [
    ("", InvalidArgument, "empty"),
    ("  -- only a comment\n", InvalidArgument, "empty"),
    ("SELEC 1", InvalidArgument, "not valid SQL"),
    ("SELECT * FROM nosuch", NotFound, "no table 'nosuch'"),
    ("SELECT * FROM people WHERE id = $1", InvalidArgument, "no parameters"),
    ("SELECT * FROM people WHERE id = ?", InvalidArgument, "no parameters"),
    ("SELECT nosuchcolumn FROM people", InvalidArgument, "(?i)nosuchcolumn"),
    ("SELECT 1/0::INTEGER, error('boom')", InvalidArgument, "boom"),
    ("SELECT 'a\x00b'", InvalidArgument, "NUL"),
])
def test_bad_queries_are_clear_errors_not_refusals(env: Env, sql: str, error: type, match: str):
    pack = env.pack()
    loaded(pack)
    with pytest.raises(error, match=match):
        run(pack.query(CALLER, sql))
    assert env.denials == []


def test_ordinary_read_only_sql_is_allowed(env: Env):
    pack = env.pack()
    loaded(pack)
    loaded(pack, "scores", "id,points\n1,10\n2,20\n2,5\n")
    queries = [
        "SELECT p.name, sum(s.points) AS total FROM people p JOIN scores s USING (id) GROUP BY ALL ORDER BY total DESC",
        "WITH t AS (SELECT id FROM scores), u AS MATERIALIZED (SELECT * FROM t) SELECT count(*) FROM u",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
        "SELECT id FROM people UNION SELECT id FROM scores EXCEPT SELECT 3 INTERSECT SELECT 1",
        "VALUES (1, 'a'), (2, 'b')",
        "FROM people SELECT name WHERE id > 1",
        "SELECT * FROM range(3) r, unnest([1, 2]) u(x), generate_series(1, 2) g",
        "SELECT unnest([1, 2]) AS x, [x * 2 FOR x IN [1, 2]] AS doubled, {'k': 1} AS s, list_transform([1], lambda v: v + 1)",
        "SELECT name, row_number() OVER (ORDER BY id) AS rn, lag(id) OVER w FROM people WINDOW w AS (ORDER BY id) "
        "QUALIFY rn < 3",
        "SELECT * EXCLUDE (born) FROM people WHERE name ILIKE 'a%' OR name IN (SELECT 'bob')",
        "SELECT COLUMNS('.*') FROM people LIMIT 1 OFFSET 1",
        "SELECT strftime(born, '%Y'), date_trunc('month', born), extract(year FROM born), born + INTERVAL 1 DAY FROM people",
        "SELECT regexp_replace(name, 'a', 'b'), upper(name), length(name), name || '!' FROM people",
        "SELECT * FROM people PIVOT (sum(score) FOR name IN ('ann', 'bob'))",
        "SELECT * FROM main.people, lake.main.scores LIMIT 1",
        "SELECT * FROM (SELECT * FROM people) sub, LATERAL (SELECT sub.id * 2 AS d) l",
        "SELECT '/etc/passwd' AS path, 'read_csv(x)' AS text",
        "SELECT json_extract('{\"a\": 1}', '$.a'), to_json([1, 2]), * FROM json_each('{\"a\": 1}')",
        "/* a comment */ SELECT 1 AS one; -- and a trailing one",
        "select * from PEOPLE where ID = 1",
    ]
    for sql in queries:
        got = run(pack.query(CALLER, sql))
        assert got["row_count"] >= 1, sql
    assert env.denials == []


def test_very_long_and_deeply_nested_queries(env: Env):
    pack = env.pack(max_sql_chars=1000)
    loaded(pack)
    long_sql = "SELECT " + " + ".join(["1"] * 600)
    why = refused(env, "data.query", None, pack.query(CALLER, long_sql))
    assert "max_sql_chars" in why and "1000" in why and len(env.denials[-1][2]) <= 200
    pack2 = DataPack(PackContext(ecosystem="eco", folder=env.tmp / "deep", denied=env.denied))
    env.packs.append(pack2)
    nested = "SELECT " + "(" * 3000 + "1" + ")" * 3000
    with pytest.raises((InvalidArgument, AccessDenied)):
        run(pack2.query(CALLER, nested))
    assert run(pack.query(CALLER, "SELECT 1"))["rows"] == [[1]]


# ---- table names -----------------------------------------------------------------------------------------


BAD_NAMES = ["people; DROP TABLE people", 'x" AS SELECT 1; --', "../x", "a.b", "a-b", "a b", "1abc", "tablé",
             "duckdb_settings", "pg_tables", "sqlite_master", "information_schema", "_hidden", "select", "from", "TABLE"]


def test_bad_table_names_are_refused_everywhere(env: Env):
    files = env.files()
    pack = env.pack(files)
    loaded(pack)
    run(files.write(CALLER, "people.csv", CSV))
    before = lake(pack)
    for bad in BAD_NAMES:
        refused(env, "data.ingest", bad, pack.ingest(CALLER, bad, CSV))
        refused(env, "data.ingest_file", bad, pack.ingest_file(CALLER, bad, "people.csv"))
        refused(env, "data.describe", bad, pack.describe(CALLER, bad))
        refused(env, "data.drop", bad, pack.drop(CALLER, bad))
        assert lake(pack) == before, bad
    assert loaded(pack, "people_2")["rows"] == 3  # still working


@pytest.mark.parametrize("bad,match", [("", "empty"), ("x" * 64, "at most 63"), (None, "must be a string")])
def test_table_names_that_are_plain_bad_input(env: Env, bad: Any, match: str):
    pack = env.pack()
    with pytest.raises(InvalidArgument, match=match):
        run(pack.ingest(CALLER, bad, CSV))
    assert lake(pack) == {} and env.denials == []


def test_describe_and_drop(env: Env):
    pack = env.pack()
    loaded(pack)
    loaded(pack, "other", "x\n1\n")
    with pytest.raises(NotFound):
        run(pack.describe(CALLER, "missing"))
    assert run(pack.drop(CALLER, "People")) == {"table": "people", "dropped": True}
    assert [t["table"] for t in run(pack.tables(CALLER))] == ["other"]
    with pytest.raises(NotFound):
        run(pack.drop(CALLER, "people"))
    with pytest.raises(NotFound):
        run(pack.query(CALLER, "SELECT * FROM people"))


# ---- limits ----------------------------------------------------------------------------------------------


def test_row_limits(env: Env):
    pack = env.pack(max_rows=5)
    got = run(pack.query(CALLER, "SELECT range AS n FROM range(100)", limit=5))
    assert (got["rows"], got["row_count"], got["truncated"]) == ([[0], [1], [2], [3], [4]], 5, True)
    exact = run(pack.query(CALLER, "SELECT range FROM range(5)", limit=5))
    assert (exact["row_count"], exact["truncated"]) == (5, False)
    assert run(pack.query(CALLER, "SELECT range FROM range(5)", limit=2))["rows"] == [[0], [1]]
    lowered = run(pack.query(CALLER, "SELECT range FROM range(100)", limit=50))  # above max_rows: lowered to it
    assert (lowered["row_count"], lowered["truncated"]) == (5, True)
    assert run(pack.query(CALLER, "SELECT 1", limit=6))["truncated"] is False
    for bad in (0, -1, True, "5", 2.0):
        with pytest.raises(InvalidArgument, match="limit"):
            run(pack.query(CALLER, "SELECT 1", limit=bad))
    # a huge result is streamed, never materialised: asking 5 rows of ten billion answers at once
    started = time.monotonic()
    assert run(pack.query(CALLER, "SELECT range FROM range(10000000000)", limit=5))["truncated"] is True
    assert time.monotonic() - started < 5


def test_query_timeout_interrupts_and_the_pack_keeps_working(env: Env):
    pack = env.pack(query_timeout_seconds=0.5)
    started = time.monotonic()
    why = refused(env, "data.query", None, pack.query(
        CALLER, "SELECT count(*) FROM range(100000000) a, range(100000000) b WHERE a.range + b.range = 7"))
    assert time.monotonic() - started < 5
    assert "query_timeout_seconds" in why and "0.5" in why
    assert run(pack.query(CALLER, "SELECT 42"))["rows"] == [[42]]


def test_max_ingest_bytes_and_max_tables(env: Env):
    pack = env.pack(max_ingest_bytes=30, max_tables=2)
    why = refused(env, "data.ingest", "big", pack.ingest(CALLER, "big", "a\n" + "1\n" * 15))
    assert "max_ingest_bytes" in why and "30" in why
    loaded(pack, "one", "a\n1\n")
    loaded(pack, "two", "a\n1\n")
    before = lake(pack)
    why = refused(env, "data.ingest", "three", pack.ingest(CALLER, "three", "a\n1\n"))
    assert "max_tables" in why and "2" in why
    assert lake(pack) == before
    assert loaded(pack, "two", "b\n2\n", mode="replace")["columns"] == [{"name": "b", "type": "BIGINT"}]  # not a new table
    assert loaded(pack, "one", "a\n3\n", mode="append")["rows"] == 2
    run(pack.drop(CALLER, "one"))
    assert loaded(pack, "three", "a\n1\n")["rows"] == 1


def test_memory_limit_is_a_refusal(env: Env):
    pack = env.pack(memory_limit="64MB", max_temp_directory_size="1MB")
    why = refused(env, "data.query", None, pack.query(
        CALLER, "SELECT list(repeat('x', 100) || range) FROM range(5000000)", limit=1))
    assert "memory_limit" in why
    assert run(pack.query(CALLER, "SELECT 1"))["rows"] == [[1]]


# ---- concurrency -----------------------------------------------------------------------------------------


def test_concurrent_queries_and_an_ingest_while_querying(env: Env):
    pack = env.pack(threads=1)
    loaded(pack, "nums", "n\n" + "".join(f"{i}\n" for i in range(1000)))
    slow = "SELECT count(*) FROM range(3000) a, range(3000) b WHERE (a.range * b.range) % 7 = 1"
    expected = run(pack.query(CALLER, slow))["rows"]

    async def together() -> list[Any]:
        return await asyncio.gather(
            pack.query(CALLER, slow), pack.query(CALLER, slow),
            pack.query(CALLER, "SELECT sum(n) FROM nums"),
            pack.ingest(CALLER, "more", "m\n1\n2\n"), pack.ingest(CALLER, "nums", "n\n1000\n", mode="append"),
            pack.tables(CALLER))

    first, second, total, more, appended, _ = run(together())
    assert first["rows"] == second["rows"] == expected
    assert total["rows"] in ([[499500]], [[500500]])  # before or after the append: a snapshot, never half of it
    assert more["rows"] == 2 and appended["rows"] == 1001
    assert run(pack.query(CALLER, "SELECT sum(n) FROM nums"))["rows"] == [[500500]]


def test_close_closes_the_lake_and_it_reopens_with_its_tables(env: Env):
    pack = env.pack()
    loaded(pack)
    run(pack.close())
    with pytest.raises(KernelError, match="closed"):
        run(pack.query(CALLER, "SELECT 1"))
    with pytest.raises(KernelError, match="closed"):
        loaded(pack, "t2")
    run(pack.close())  # twice is fine
    again = env.pack()
    assert run(again.query(CALLER, "SELECT count(*) FROM people"))["rows"] == [[3]]


def test_close_stops_a_running_query_with_a_clear_error(env: Env):
    pack = env.pack(query_timeout_seconds=60)

    async def scenario() -> tuple[BaseException | None, float]:
        slow = asyncio.create_task(pack.query(
            CALLER, "SELECT count(*) FROM range(100000000) a, range(100000000) b WHERE a.range + b.range = 7"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await pack.close()
        took = time.monotonic() - started
        try:
            await slow
        except KernelError as exc:
            return exc, took
        return None, took

    error, took = run(scenario())
    assert isinstance(error, KernelError) and not isinstance(error, AccessDenied) and "closing" in str(error)
    assert took < 5 and env.denials == []


# ---- ingest_file, through the files pack ---------------------------------------------------------------


def test_ingest_file_through_the_files_pack(env: Env):
    files = env.files()
    pack = env.pack(files)
    run(files.write(CALLER, "in/people.csv", CSV))
    done = run(pack.ingest_file(CALLER, "people", "in/people.csv"))
    assert (done["rows"], done["mode"]) == (3, "create")
    run(files.write(CALLER, "in/lines.ndjson", '{"a": 1}\n{"a": 2}\n'))
    assert run(pack.ingest_file(CALLER, "lines", "in/lines.ndjson"))["rows"] == 2
    pq = parquet_b64(env.tmp, "SELECT 1 AS one")
    run(files.write(CALLER, "in/p.parquet", pq, encoding="base64"))
    assert run(pack.ingest_file(CALLER, "pq", "in/p.parquet"))["columns"] == [{"name": "one", "type": "INTEGER"}]
    run(files.write(CALLER, "in/data.txt", "a\tb\n1\t2\n"))
    with pytest.raises(InvalidArgument, match="cannot tell the format"):
        run(pack.ingest_file(CALLER, "t", "in/data.txt"))
    assert run(pack.ingest_file(CALLER, "t", "in/data.txt", format="tsv"))["rows"] == 1
    run(files.write(CALLER, "in/bad.csv", "a,b\n1,2,3\n"))
    with pytest.raises(InvalidArgument, match="file 'in/bad.csv'.*nothing was changed"):
        run(pack.ingest_file(CALLER, "bad", "in/bad.csv"))
    with pytest.raises(NotFound):
        run(pack.ingest_file(CALLER, "x", "in/missing.csv"))
    assert [a[1:3] for a in env.audits if a[1] == "data.ingest_file"] == [
        ("data.ingest_file", "people"), ("data.ingest_file", "lines"), ("data.ingest_file", "pq"), ("data.ingest_file", "t")]
    assert "from in/people.csv" in env.audits[1][4] or any("from in/people.csv" in a[4] for a in env.audits)


def test_ingest_file_cannot_leave_the_files_root(env: Env):
    files = env.files(max_read_bytes=100)
    pack = env.pack(files)
    (env.files_root / "link.csv").symlink_to(env.outside / "secret.csv")
    run(files.write(CALLER, "big.csv", "a\n" + "1\n" * 60))
    before_lake, before_disk = lake(pack), snapshot(env.tmp, skip=("lake.duckdb",))
    for path in ("../outside/secret.csv", str(env.outside / "secret.csv"), "/etc/passwd", "link.csv", "big.csv"):
        why = refused(env, "files.read", None, pack.ingest_file(CALLER, "stolen", path, format="csv"))  # the files pack's guard
        assert SECRET_TEXT not in why
    assert "max_read_bytes" in env.denials[-1][3]
    assert lake(pack) == before_lake and snapshot(env.tmp, skip=("lake.duckdb",)) == before_disk
    refused(env, "data.ingest_file", None, pack.ingest_file(CALLER, "bad name", "big.csv"))
    assert lake(pack) == before_lake


def test_ingest_file_limits_and_a_missing_peer(env: Env):
    files = env.files()
    pack = env.pack(files, max_ingest_bytes=10)
    run(files.write(CALLER, "f.csv", "a\n" + "1\n" * 10))
    why = refused(env, "data.ingest_file", "f", pack.ingest_file(CALLER, "f", "f.csv"))
    assert "max_ingest_bytes" in why
    alone = DataPack(PackContext(ecosystem="eco", folder=env.tmp / "alone"))
    env.packs.append(alone)
    with pytest.raises(KernelError, match="files"):
        run(alone.ingest_file(CALLER, "f", "f.csv"))


# ---- what the operator is told ---------------------------------------------------------------------------


def test_audit_and_denied_records(env: Env):
    pack = env.pack()
    loaded(pack)
    run(pack.query(CALLER, "SELECT * FROM people"))
    run(pack.tables(CALLER))
    run(pack.describe(CALLER, "people"))
    run(pack.drop(CALLER, "people"))
    assert [a[:4] for a in env.audits] == [(CALLER, "data.ingest", "people", True), (CALLER, "data.drop", "people", True)]
    assert env.audits[0][4].startswith("create: 3 rows of csv (") and "sha256" in env.audits[0][4]
    assert env.audits[1][4] == "3 rows, 4 columns"
    assert "ann" not in env.audits[0][4]  # the data itself is never in the log
    with pytest.raises(AccessDenied) as caught:
        run(pack.query("other-mad", "DROP TABLE x"))
    assert env.denials == [("other-mad", "data.query", "DROP TABLE x", env.denials[0][3])]
    assert caught.value is env.raised[0] and len(env.audits) == 2


# ---- the pack in a runtime: loaded with its files peer for the MAD that owns the family ----------------


def test_a_mad_owning_data_uses_the_pack_through_the_runtime_and_others_are_refused(tmp_path, eco_modules):
    kernel = eco_modules[1]
    Dewey = owner(kernel, "dewey", "keeps the data lake", "data")
    Horace = owner(kernel, "horace", "keeps the files", "files")

    async def main():
        async with running(eco_modules, tmp_path / "state", Dewey, Horace,
                           pack_settings={"data": {"max_rows": 2}}) as runtime:
            assert set(runtime.packs) == {"data", "files"}
            dewey = runtime.mad("dewey")
            made = await dewey.use("data.ingest", table="sales", content="region,amount\nnorth,10\nsouth,20\nnorth,5\n")
            assert made["rows"] == 3
            got = await runtime.use("data.query", caller="dewey", sql="SELECT region, sum(amount) AS total FROM sales "
                                                                       "GROUP BY region ORDER BY region")
            assert got["rows"] == [["north", 15], ["south", 20]] and got["truncated"] is False
            capped = await dewey.use("data.query", sql="SELECT * FROM sales")  # the config's max_rows, not the default
            assert (capped["row_count"], capped["truncated"]) == (2, True)
            with pytest.raises(kernel.AccessDenied, match="COPY"):
                await dewey.use("data.query", sql=f"COPY sales TO '{tmp_path}/out.csv'")
            await runtime.mad("horace").use("files.write", path="more.csv", content="region,amount\neast,1\n")
            assert (await dewey.use("data.ingest_file", table="sales", path="more.csv", mode="append"))["rows"] == 4
            with pytest.raises(kernel.AccessDenied, match="may not use data.query"):
                await runtime.mad("rogers").use("data.query", sql="SELECT * FROM sales")
            with pytest.raises(kernel.AccessDenied, match="may not use data.drop"):
                await runtime.use("data.drop", caller="horace", table="sales")
            assert [t["table"] for t in await dewey.use("data.tables")] == ["sales"]
            return runtime.db.query("SELECT actor, action, subject, ok FROM audit_log WHERE action LIKE 'data.%' "
                                    "OR subject LIKE 'data.%' ORDER BY id")

    rows = asyncio.run(main())
    assert (tmp_path / "state" / "data" / "lake.duckdb").is_file()
    assert not (tmp_path / "out.csv").exists()
    assert {"actor": "dewey", "action": "data.ingest", "subject": "sales", "ok": 1} in rows
    assert {"actor": "dewey", "action": "data.ingest_file", "subject": "sales", "ok": 1} in rows
    assert [r["action"] for r in rows if r["ok"] == 0 and r["actor"] == "dewey"] == ["data.query"]
    assert {"actor": "rogers", "action": "kernel.use", "subject": "data.query", "ok": 0} in rows
    assert {"actor": "horace", "action": "kernel.use", "subject": "data.drop", "ok": 0} in rows


# ---- review findings: result bombs, deep nesting, CTE scope, close while busy -----------------------------------


def test_a_result_is_bounded_in_bytes_and_a_huge_value_never_reaches_python(env: Env):
    pack = env.pack(max_result_bytes=10_000)
    loaded(pack)
    for sql in ("SELECT repeat('a', 50000) AS s", "SELECT range(0, 20000) AS l", "SELECT [range(0, 3000)] AS ll",
                "SELECT repeat('a', 1000) AS s FROM range(100)", "SELECT map([1], [repeat('b', 20000)]) AS m"):
        why = refused(env, "data.query", None, pack.query(CALLER, sql, limit=1000))
        assert "data.max_result_bytes" in why and "10000" in why, sql
    got = run(pack.query(CALLER, "SELECT repeat('a', 100) AS s, 1 AS s, [1, 2] AS l FROM range(3) -- done\n;"))
    assert [c["name"] for c in got["columns"]] == ["s", "s", "l"]
    assert [c["type"] for c in got["columns"]] == ["VARCHAR", "INTEGER", "INTEGER[]"]
    assert got["rows"] == [["a" * 100, 1, [1, 2]]] * 3
    assert run(pack.query(CALLER, "SELECT * FROM people ORDER BY id DESC", limit=2))["rows"][0][0] == 3
    ok = run(pack.query(CALLER, "SELECT repeat('a', 500) AS s FROM range(100)", limit=5))
    assert ok["row_count"] == 5 and ok["truncated"] is True  # rows past the limit are never measured nor fetched


@pytest.mark.parametrize("sql", [
    "SELECT repeat('a', 400000000) AS s", "SELECT range(0, 40000000) AS l", "SELECT generate_series(1, 1e9)",
    "SELECT repeat(repeat('a', 1000), 1000)", "SELECT repeat(name, id) FROM people", "SELECT lpad('x', 100000000, 'y')",
    "SELECT list_resize([1], 100000000)",
])
def test_functions_that_make_a_value_as_large_as_a_number_need_a_small_constant(env: Env, sql: str):
    pack = env.pack(memory_limit="64MB", threads=1)
    loaded(pack)
    started = time.monotonic()
    why = refused(env, "data.query", None, pack.query(CALLER, sql, limit=1))
    assert "makes a value as large" in why or "sizes multiply" in why
    assert time.monotonic() - started < 2


def _deep(d: int) -> tuple[str, str]:
    return "'" + "[" * d + "1" + "]" * d + "'", "'" + "[" * d + '"INTEGER"' + "]" * d + "'"


def test_deep_nesting_is_refused_before_anything_runs_by_each_checker(env: Env):
    import json

    from generator.kernel.packs.data.pack import _Refusal

    pack = env.pack(query_timeout_seconds=2, threads=1)
    value, structure = _deep(1000)
    deep = [
        f"SELECT json_transform({value}, {structure}) AS v",
        f"SELECT from_json('[1]', {_deep(40)[1]})",
        "SELECT CAST(NULL AS INTEGER" + "[]" * 40 + ")",
        "SELECT " + "list_value(" * 40 + "1" + ")" * 40,
    ]
    for sql in deep:
        started = time.monotonic()
        with pytest.raises((AccessDenied, InvalidArgument), match="deep"):  # refused, or too deep for sqlglot to read
            run(pack.query(CALLER, sql, limit=1))
        assert time.monotonic() - started < 2, sql
        tree_ = json.loads(pack._parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
        with pytest.raises(_Refusal):
            pack._vet_tree(sql, tree_, {})
        with pytest.raises((_Refusal, InvalidArgument)):  # sqlglot may give up reading it first: refused too
            pack._vet_sqlglot(sql, {})
    computed = "SELECT json_transform('[1]', repeat('[', 3) || '\"INTEGER\"' || repeat(']', 3))"
    assert "plain string constant" in refused(env, "data.query", None, pack.query(CALLER, computed))
    why = refused(env, "data.query", None, pack.query(CALLER, "SELECT " + "(" * 200 + "1" + ")" * 200))
    assert "deep" in why
    # long is not deep: chains of one operator, and ordinary nesting, still run
    assert run(pack.query(CALLER, "SELECT " + " + ".join(["1"] * 60)))["rows"] == [[60]]
    assert run(pack.query(CALLER, "SELECT 1 WHERE " + " AND ".join(["true"] * 100)))["rows"] == [[1]]
    assert run(pack.query(CALLER, f"SELECT json_transform({_deep(5)[0]}, {_deep(5)[1]}) AS v"))["rows"] == \
        [[[[[[[1]]]]]]]


def test_a_value_nested_too_deep_is_an_invalid_argument_not_a_recursion_error():
    from generator.kernel.packs.data.pack import MAX_NESTING, _jsonable

    ok: Any = 1
    for _ in range(MAX_NESTING):
        ok = [ok]
    assert _jsonable(ok) == ok
    deep: Any = 1
    for _ in range(5000):
        deep = {"k": [deep]}
    with pytest.raises(InvalidArgument, match="nested more than"):
        _jsonable(deep)


@pytest.mark.parametrize("view", ["duckdb_databases", "duckdb_settings", "sqlite_master", "pg_settings", "tables",
                                  "information_schema", "pg_catalog", "duckdb_views", "_x"])
def test_a_cte_may_not_take_a_system_name(env: Env, view: str):
    pack = env.pack()
    sql = f"SELECT * FROM (WITH {view} AS (SELECT 1) SELECT 1) s, {view}"
    assert "reserved" in refused(env, "data.query", None, pack.query(CALLER, sql, limit=5))
    assert "reserved" in refused(env, "data.query", None, pack.query(CALLER, f"WITH {view} AS (SELECT 1) SELECT * FROM {view}"))


def test_a_cte_is_visible_only_inside_its_query_for_each_checker(env: Env):
    import json

    pack = env.pack()
    loaded(pack)
    outside = "SELECT * FROM (WITH t AS (SELECT 1) SELECT 1) s, t"
    with pytest.raises(NotFound, match="no table 't'"):
        run(pack.query(CALLER, outside))
    tree_ = json.loads(pack._parser.execute("SELECT json_serialize_sql(?)", [outside]).fetchall()[0][0])
    with pytest.raises(NotFound):
        pack._vet_tree(outside, tree_, {"people": "people"})
    with pytest.raises(NotFound):
        pack._vet_sqlglot(outside, {"people": "people"})
    for sql in ("SELECT * FROM (WITH t AS (SELECT 1 AS x) SELECT x FROM t) s",
                "WITH t AS (SELECT id FROM people) SELECT * FROM (SELECT * FROM t) s, (SELECT count(*) FROM t) c",
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r"):
        assert run(pack.query(CALLER, sql))["row_count"] >= 1, sql


def test_close_returns_promptly_when_a_query_ignores_its_interrupt(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture):
    from generator.kernel.packs.data import pack as data_module

    monkeypatch.setattr(data_module, "CLOSE_GRACE_SECONDS", 0.2)
    pack = env.pack()
    loaded(pack)
    with pack._cursor(60) as (cursor, _):  # a cursor whose work does not stop when interrupted (idle here)
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="kernel.packs.data"):
            run(pack.close())
        assert time.monotonic() - started < 2
        assert "did not stop" in caplog.text
        assert cursor.execute("SELECT 1").fetchall() == [(1,)]  # the lake stays open under the running query
        with pytest.raises(KernelError, match="closed"):
            run(pack.query(CALLER, "SELECT 1"))
    with pytest.raises(duckdb.Error):  # the last cursor to end closed the lake
        pack._con.execute("SELECT 1")
    run(pack.close())  # and a second close is a no-op
    assert run(env.pack().query(CALLER, "SELECT count(*) FROM people"))["rows"] == [[3]]
