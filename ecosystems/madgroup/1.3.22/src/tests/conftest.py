"""Fixtures for madgroup's own end-to-end tests: a real server process on a free
127.0.0.1 port, reached with a real MCP client and a bearer token; the operator's command line
(`python -m madgroup ...`); the state database, read as it is on disk."""

import runpy
import sqlite3
import sys
from pathlib import Path

import pytest

from harness import running_ecosystem

PACKAGE = 'madgroup'
SRC = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# The MCP name of the tool bound to each kernel capability, from the spec.
TOOL_FOR = {
    'data.ingest': "dewey.ingest",
    'data.ingest_file': "dewey.ingest_file",
    'data.query': "dewey.query",
    'data.tables': "dewey.tables",
    'data.describe': "dewey.describe",
    'data.drop': "dewey.drop",
    'documents.write_docx': "gates.write_docx",
    'documents.write_xlsx': "gates.write_xlsx",
    'documents.write_pptx': "gates.write_pptx",
    'documents.read': "gates.read_document",
    'files.write': "horace.write_file",
    'files.read': "horace.read_file",
    'files.list': "horace.list_files",
    'files.stat': "horace.stat_file",
    'files.move': "horace.move_file",
    'files.delete': "horace.delete_file",
    'web.fetch': "marco.fetch",
    'web.robots': "marco.robots",
    'security.scan': "mcnamara.scan",
    'security.findings': "mcnamara.findings",
    'security.report': "mcnamara.report",
    'charts.render': "playfair.chart",
    'documents.write_odt': "stallman.write_odt",
    'documents.write_ods': "stallman.write_ods",
    'documents.read': "stallman.read_document",
    'secrets.set': "turing.set_secret",
    'secrets.get': "turing.get_secret",
    'secrets.list': "turing.list_secrets",
    'secrets.rotate': "turing.rotate_secret",
    'secrets.rotate_key': "turing.rotate",
    'secrets.audit': "turing.audit",
    'conversations.create': "rogers.create_conversation",
    'conversations.post': "rogers.post",
    'conversations.history': "rogers.history",
    'conversations.search': "rogers.search",
    'conversations.list': "rogers.list_conversations",
    'models.list': "fiedler.list_models",
    'models.send': "fiedler.send",
    'models.budget': "fiedler.budget",
    'ecosystem.status': "grace.status",
    'ecosystem.mads': "grace.list_mads",
}

# Every tool the spec declares, as MCP clients see it.
ALL_TOOLS = sorted([
    "dewey.ingest",
    "dewey.ingest_file",
    "dewey.query",
    "dewey.tables",
    "dewey.describe",
    "dewey.drop",
    "gates.write_docx",
    "gates.write_xlsx",
    "gates.write_pptx",
    "gates.read_document",
    "hopper.run_task",
    "horace.write_file",
    "horace.read_file",
    "horace.list_files",
    "horace.stat_file",
    "horace.move_file",
    "horace.delete_file",
    "marco.fetch",
    "marco.robots",
    "mcnamara.scan",
    "mcnamara.findings",
    "mcnamara.report",
    "playfair.chart",
    "stallman.write_odt",
    "stallman.write_ods",
    "stallman.read_document",
    "turing.set_secret",
    "turing.get_secret",
    "turing.list_secrets",
    "turing.rotate_secret",
    "turing.rotate",
    "turing.audit",
    "rogers.create_conversation",
    "rogers.post",
    "rogers.history",
    "rogers.search",
    "rogers.list_conversations",
    "rogers.summarise",
    "fiedler.list_models",
    "fiedler.send",
    "fiedler.budget",
    "fiedler.compare_models",
    "grace.status",
    "grace.list_mads",
])


def tool_for(capability: str) -> str:
    """The tool bound to `capability`; a test that needs one the spec lacks is skipped."""
    if capability not in TOOL_FOR:
        pytest.skip(f"no tool of this ecosystem is bound to {capability}")
    return TOOL_FOR[capability]


def query(state: Path, sql: str, params: tuple = ()) -> list[dict]:
    """Rows of the state's database, opened read-only (a running server may be writing it)."""
    conn = sqlite3.connect((Path(state) / "ecosystem.db").resolve().as_uri() + "?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


@pytest.fixture(scope="session")
def eco(tmp_path_factory):
    """One running ecosystem shared by the tests of a session (start-up costs a second)."""
    with running_ecosystem(PACKAGE, tmp_path_factory.mktemp("state"), cwd=SRC) as running:
        yield running


@pytest.fixture
def conversation(eco):
    return eco.call(tool_for("conversations.create"), title="test conversation")


@pytest.fixture
def cli(capsys, monkeypatch):
    """`cli(*args)` runs `python -m madgroup *args` as `python -m` does (its `__main__`), in this
    process: (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", [PACKAGE, *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            runpy.run_module(PACKAGE, run_name="__main__")
        out, err = capsys.readouterr()
        return exited.value.code, out, err

    return run
