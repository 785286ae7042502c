"""End-to-end tests of Dewey: every tool, called over MCP on a running ecosystem."""

import pytest

from harness import ToolCallError

from conftest import tool_for

pytestmark = pytest.mark.requirement('R13')


def test_ingest(eco):
    """dewey.ingest: Load CSV or TSV text, JSON, or base64 Parquet into a table (create, replace or append)."""
    import base64
    import json
    import os
    import tempfile

    import duckdb

    columns = [{"name": "id", "type": "BIGINT"}, {"name": "name", "type": "VARCHAR"},
               {"name": "score", "type": "DOUBLE"}]
    made = eco.call("dewey.ingest", table="ingest_people", content="id,name,score\n1,ada,9.5\n2,grace,8.25\n3,alan,7\n")
    assert made == {"table": "ingest_people", "rows": 3, "columns": columns, "ingested": 3, "mode": "create"}
    more = json.dumps([{"id": 4, "name": "edsger", "score": 6.5}])
    appended = eco.call("dewey.ingest", table="ingest_people", content=more, format="json", mode="append")
    assert appended == {"table": "ingest_people", "rows": 4, "columns": columns, "ingested": 1, "mode": "append"}
    expected = [[1, "ada", 9.5], [2, "grace", 8.25], [3, "alan", 7.0], [4, "edsger", 6.5]]

    def lake():
        return eco.call(tool_for("data.query"), sql="SELECT * FROM ingest_people ORDER BY id")["rows"]

    assert lake() == expected
    # Parquet, written here by duckdb itself, sent as base64.
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "made.parquet")
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"COPY (SELECT range AS n, 'v' || range AS label FROM range(3)) TO '{target}' (FORMAT parquet)")
        finally:
            con.close()
        with open(target, "rb") as f:
            parquet = base64.b64encode(f.read()).decode()
    loaded = eco.call("dewey.ingest", table="ingest_parquet", content=parquet, format="parquet")
    assert loaded["rows"] == 3
    assert loaded["columns"] == [{"name": "n", "type": "BIGINT"}, {"name": "label", "type": "VARCHAR"}]
    got = eco.call(tool_for("data.query"), sql="SELECT n, label FROM ingest_parquet ORDER BY n")
    assert got["rows"] == [[0, "v0"], [1, "v1"], [2, "v2"]]
    # Refused: a table that exists (create), a malformed CSV (the line named; nothing half-loaded), a name that
    # is not a plain identifier or is the engine's, content that is not base64 Parquet. The lake is unchanged.
    with pytest.raises(ToolCallError, match="already exists"):
        eco.call("dewey.ingest", table="ingest_people", content="id,name,score\n9,x,1\n")
    with pytest.raises(ToolCallError, match="line 3 has 2 fields where the header line has 3"):
        eco.call("dewey.ingest", table="ingest_people", content="id,name,score\n5,bob,1\n6,eve\n", mode="append")
    with pytest.raises(ToolCallError, match=r"invalid_argument: .*line 3"):
        eco.call("dewey.ingest", table="ingest_broken", content='id,name\n1,"unterminated\n2,b\n')
    for rogue in ("ingest_people; DROP TABLE ingest_people", "duckdb_settings", "select", "../ingest_people"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("dewey.ingest", table=rogue, content="id\n1\n", mode="replace")
    with pytest.raises(ToolCallError, match="base64"):
        eco.call("dewey.ingest", table="ingest_parquet", content="not base64 at all!", format="parquet", mode="replace")
    with pytest.raises(ToolCallError, match="invalid_argument"):
        eco.call("dewey.ingest", table="ingest_people", content="id\n1\n", format="xml", mode="replace")
    assert lake() == expected
    assert "ingest_broken" not in [t["table"] for t in eco.call(tool_for("data.tables"))]
    assert eco.call(tool_for("data.query"), sql="SELECT n, label FROM ingest_parquet ORDER BY n")["rows"] == got["rows"]
    # ... and it keeps working: a replace from NDJSON.
    replaced = eco.call("dewey.ingest", table="ingest_people", content='{"id": 7, "name": "kay", "score": 1.25}\n',
                        format="json", mode="replace")
    assert (replaced["rows"], replaced["ingested"], replaced["mode"]) == (1, 1, "replace")
    assert lake() == [[7, "kay", 1.25]]


def test_ingest_file(eco):
    """dewey.ingest_file: Load a CSV, TSV, JSON or Parquet file of the ecosystem's file root into a table."""
    write = tool_for("files.write")
    eco.call(write, path="lake/cities.csv", content="city,pop\nParis,2102650\nLyon,522250\n")
    got = eco.call("dewey.ingest_file", table="file_cities", path="lake/cities.csv")
    columns = [{"name": "city", "type": "VARCHAR"}, {"name": "pop", "type": "BIGINT"}]
    assert got == {"table": "file_cities", "rows": 2, "columns": columns, "ingested": 2, "mode": "create"}
    eco.call(write, path="lake/more.ndjson", content='{"city": "Nice", "pop": 348085}\n')
    appended = eco.call("dewey.ingest_file", table="file_cities", path="lake/more.ndjson", mode="append")
    assert (appended["rows"], appended["ingested"]) == (3, 1)
    eco.call(write, path="lake/tabbed", content="city\tpop\nLille\t236710\n")
    assert eco.call("dewey.ingest_file", table="file_tabbed", path="lake/tabbed", format="tsv")["rows"] == 1

    def lake():
        return (eco.call(tool_for("data.tables")),
                eco.call(tool_for("data.query"), sql="SELECT * FROM file_cities ORDER BY pop DESC")["rows"])

    before = lake()
    assert before[1] == [["Paris", 2102650], ["Lyon", 522250], ["Nice", 348085]]
    # Refused: paths out of the file root (the files pack's own guard), a file that is not there, a format the
    # extension does not tell, a malformed file (the line named). The lake is unchanged after each.
    for escape in ("../ecosystem.db", "/etc/passwd", "lake/../../ecosystem.db"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("dewey.ingest_file", table="file_escaped", path=escape, format="csv")
        assert lake() == before
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call("dewey.ingest_file", table="file_cities", path="lake/never-written.csv", mode="append")
    eco.call(write, path="lake/notes.txt", content="city,pop\nRome,1\n")
    with pytest.raises(ToolCallError, match="cannot tell the format"):
        eco.call("dewey.ingest_file", table="file_cities", path="lake/notes.txt", mode="append")
    eco.call(write, path="lake/broken.csv", content="city,pop\nBrest,139000\nnowhere\n")
    with pytest.raises(ToolCallError, match="line 3 has 1 fields"):
        eco.call("dewey.ingest_file", table="file_cities", path="lake/broken.csv", mode="append")
    assert lake() == before
    # ... and it keeps working.
    eco.call(write, path="lake/fixed.csv", content="city,pop\nBrest,139000\n")
    assert eco.call("dewey.ingest_file", table="file_cities", path="lake/fixed.csv", mode="append")["rows"] == 4


def test_query(eco):
    """dewey.query: Run one read-only SQL query over the lake's tables; returns columns and rows."""
    import asyncio

    from harness import result_value

    from conftest import query as read_state

    eco.call(tool_for("data.ingest"), table="query_sales",
             content="region,month,amount\nnorth,1,10\nsouth,1,7\nnorth,2,12\nsouth,2,3\n")
    got = eco.call("dewey.query", sql="SELECT region, CAST(sum(amount) AS BIGINT) AS total FROM query_sales "
                                   "GROUP BY region ORDER BY region")
    assert got == {"columns": [{"name": "region", "type": "VARCHAR"}, {"name": "total", "type": "BIGINT"}],
                   "rows": [["north", 22], ["south", 10]], "row_count": 2, "truncated": False}
    cte = eco.call("dewey.query", sql="WITH m AS (SELECT month, amount FROM query_sales WHERE region = 'north') "
                                   "SELECT month FROM m UNION ALL SELECT 99 ORDER BY month")
    assert cte["rows"] == [[1], [2], [99]]
    few = eco.call("dewey.query", sql="SELECT range AS n FROM range(5) ORDER BY n", limit=2)
    assert (few["rows"], few["row_count"], few["truncated"]) == ([[0], [1]], 2, True)
    # Every form that could write, attach, copy, read a file or run a second statement is refused (audited as a
    # denial), the lake is unchanged after each, and nothing appears outside it.
    tables = tool_for("data.tables")
    current = "SELECT * FROM query_sales ORDER BY region, month"
    before = (eco.call(tables), eco.call("dewey.query", sql=current)["rows"])
    outside = eco.state_dir
    rogue = [
        "DROP TABLE query_sales",
        "DELETE FROM query_sales",
        "UPDATE query_sales SET amount = 0",
        "INSERT INTO query_sales VALUES ('east', 3, 1)",
        "CREATE TABLE query_stolen AS SELECT * FROM query_sales",
        "WITH x AS (DELETE FROM query_sales RETURNING *) SELECT * FROM x",
        "WITH x AS (INSERT INTO query_sales VALUES ('east', 3, 1) RETURNING *) SELECT * FROM x",
        f"COPY query_sales TO '{outside}/escaped.csv'",
        f"COPY (SELECT * FROM query_sales) TO '{outside}/escaped.parquet' (FORMAT parquet)",
        f"EXPORT DATABASE '{outside}/exported'",
        "ATTACH ':memory:' AS m",
        f"ATTACH '{outside}/attached.duckdb' AS a",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_csv_auto('/etc/passwd')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM glob('/*')",
        "SELECT * FROM query('DROP TABLE query_sales')",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "PRAGMA table_info('query_sales')",
        "INSTALL httpfs",
        "SELECT 1; DROP TABLE query_sales",
        "SELECT 1 /* ; */ ; DROP TABLE query_sales",
        "SELECT 1 -- hidden\n; DROP TABLE query_sales",
        "SELECT '; DROP TABLE query_sales'; DROP TABLE query_sales",
    ]

    async def attempts():
        """Each rogue form, then the lake as it is after it, in one MCP session (a session per call is slow)."""
        seen = []
        async with eco.client() as client:
            for sql in rogue:
                refused = await client.call_tool("dewey.query", {"sql": sql})
                seen.append((sql, refused, await client.call_tool(tables, {}),
                             await client.call_tool("dewey.query", {"sql": current})))
        return seen

    for sql, refused, listed, rows in asyncio.run(attempts()):
        with pytest.raises(ToolCallError, match="access_denied") as caught:
            result_value(refused)
        assert "root:" not in str(caught.value), sql  # nothing of the file it named came back
        assert (result_value(listed), result_value(rows)["rows"]) == before, sql  # the lake is unchanged
    for made in ("escaped.csv", "escaped.parquet", "exported", "attached.duckdb"):
        assert not (outside / made).exists(), made  # nothing was written outside the lake
    denials = {e["subject"] for e in read_state(eco.state_dir, "SELECT subject FROM audit_log WHERE actor = ? AND "
                                                "action = 'data.query' AND ok = 0", ("dewey",))}
    # The audit log keeps a long query's first 200 characters (its repr, cut): each refusal is there by that.
    shown = [sql if sql.isprintable() and len(sql) <= 200 else repr(sql)[:197] for sql in rogue]
    assert [sql for sql in shown if not any(subject.startswith(sql) for subject in denials)] == [], "every refusal is audited"
    # Bad queries are clear errors, not refusals.
    with pytest.raises(ToolCallError, match="not_found: .*query_nosuch"):
        eco.call("dewey.query", sql="SELECT * FROM query_nosuch")
    with pytest.raises(ToolCallError, match="invalid_argument"):
        eco.call("dewey.query", sql="SELEC 1")
    with pytest.raises(ToolCallError, match="invalid_argument"):
        eco.call("dewey.query", sql="SELECT 1", limit=0)
    # ... and it keeps working.
    assert eco.call("dewey.query", sql="SELECT region, CAST(sum(amount) AS BIGINT) AS total FROM query_sales "
                                    "GROUP BY region ORDER BY region") == got


def test_tables(eco):
    """dewey.tables: The tables of the lake, each with its row count and columns."""
    ingest = tool_for("data.ingest")
    eco.call(ingest, table="tables_b", content="k,v\nx,1\ny,2\n")
    eco.call(ingest, table="tables_a", content='[{"k": "z"}]', format="json")
    listed = eco.call("dewey.tables")
    mine = [t for t in listed if t["table"] in ("tables_a", "tables_b")]
    assert mine == [
        {"table": "tables_a", "rows": 1, "columns": [{"name": "k", "type": "VARCHAR"}]},
        {"table": "tables_b", "rows": 2,
         "columns": [{"name": "k", "type": "VARCHAR"}, {"name": "v", "type": "BIGINT"}]},
    ]
    names = [t["table"] for t in listed]
    assert names == sorted(names, key=lambda n: (n.lower(), n))
    # A refused or failed ingest leaves no table behind; the listing is exactly what it was.
    with pytest.raises(ToolCallError, match="access_denied"):
        eco.call(ingest, table="tables c", content="k\nx\n")
    with pytest.raises(ToolCallError, match="invalid_argument"):
        eco.call(ingest, table="tables_broken", content='k,v\n1,"open\n')
    with pytest.raises(ToolCallError, match="access_denied"):
        eco.call(tool_for("data.query"), sql="CREATE TABLE tables_sneaky AS SELECT 1 AS one")
    assert eco.call("dewey.tables") == listed


def test_describe(eco):
    """dewey.describe: One table's row count and its columns with their types."""
    eco.call(tool_for("data.ingest"), table="describe_me",
             content="day,temp,ok\n2024-01-02,3.5,true\n2024-01-03,-1,false\n")
    described = eco.call("dewey.describe", table="describe_me")
    assert described == {"table": "describe_me", "rows": 2, "columns": [
        {"name": "day", "type": "DATE"}, {"name": "temp", "type": "DOUBLE"}, {"name": "ok", "type": "BOOLEAN"}]}
    assert eco.call("dewey.describe", table="DESCRIBE_ME") == described  # names resolve as DuckDB resolves them
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call("dewey.describe", table="describe_nosuch")
    for rogue in ("describe_me; DROP TABLE describe_me", "duckdb_settings", "information_schema", "select"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("dewey.describe", table=rogue)
    with pytest.raises(ToolCallError, match="invalid_argument"):
        eco.call("dewey.describe", table="")
    assert eco.call("dewey.describe", table="describe_me") == described


def test_drop(eco):
    """dewey.drop: Delete a table of the lake and everything in it."""
    ingest = tool_for("data.ingest")
    eco.call(ingest, table="drop_me", content="a\n1\n")
    eco.call(ingest, table="drop_kept", content="a\n2\n")
    assert eco.call("dewey.drop", table="drop_me") == {"table": "drop_me", "dropped": True}
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call(tool_for("data.describe"), table="drop_me")
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call("dewey.drop", table="drop_me")  # already gone
    for rogue in ("drop_kept; DROP TABLE drop_kept", "duckdb_tables", "../drop_kept", "main.drop_kept"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("dewey.drop", table=rogue)
    kept = eco.call(tool_for("data.query"), sql="SELECT a FROM drop_kept")
    assert kept["rows"] == [[2]]
    # ... and the name is free again.
    assert eco.call(ingest, table="drop_me", content="a\n3\n")["mode"] == "create"
