"""End-to-end tests of Horace: every tool, called over MCP on a running ecosystem."""

import base64

import hashlib

import pytest

from harness import ToolCallError

from conftest import tool_for

pytestmark = pytest.mark.requirement('R12')


def test_write_file(eco):
    """horace.write_file: Write a file (utf-8 text, or base64 bytes) atomically; returns its path, size and sha256."""
    written = eco.call("horace.write_file", path="notes/write-test.txt", content="first line")
    assert written == {"path": "notes/write-test.txt", "size": 10, "sha256": hashlib.sha256(b"first line").hexdigest()}
    again = eco.call("horace.write_file", path="notes/write-test.txt", content="replaced")
    assert again["size"] == 8
    for escape in ("../outside.txt", "/etc/passwd", "notes/../../outside.txt"):
        with pytest.raises(ToolCallError):
            eco.call("horace.write_file", path=escape, content="x")


def test_read_file(eco):
    """horace.read_file: Read a file; returns its path, size, sha256 and content."""
    eco.call(tool_for("files.write"), path="read-test.txt", content="read me")
    got = eco.call("horace.read_file", path="read-test.txt")
    assert got["content"] == "read me" and got["sha256"] == hashlib.sha256(b"read me").hexdigest()
    raw = bytes(range(256))
    eco.call(tool_for("files.write"), path="bytes.bin", content=base64.b64encode(raw).decode(), encoding="base64")
    assert base64.b64decode(eco.call("horace.read_file", path="bytes.bin", encoding="base64")["content"]) == raw
    with pytest.raises(ToolCallError):
        eco.call("horace.read_file", path="../ecosystem.db")
    with pytest.raises(ToolCallError):
        eco.call("horace.read_file", path="never-written.txt")


def test_list_files(eco):
    """horace.list_files: The entries of a folder (not recursive), by path."""
    for name in ("b.txt", "a.txt"):
        eco.call(tool_for("files.write"), path=f"listed/{name}", content=name)
    entries = eco.call("horace.list_files", path="listed")
    assert [(e["path"], e["kind"], e["size"]) for e in entries] == [("listed/a.txt", "file", 5), ("listed/b.txt", "file", 5)]
    assert "listed" in [e["path"] for e in eco.call("horace.list_files")]


def test_stat_file(eco):
    """horace.stat_file: A file's or folder's kind, size, time of change and (for a file) sha256."""
    eco.call(tool_for("files.write"), path="stat/one.txt", content="12345")
    info = eco.call("horace.stat_file", path="stat/one.txt")
    assert info["kind"] == "file" and info["size"] == 5 and info["sha256"] == hashlib.sha256(b"12345").hexdigest()
    assert eco.call("horace.stat_file", path="stat")["kind"] == "dir"
    with pytest.raises(ToolCallError):
        eco.call("horace.stat_file", path="/")


def test_move_file(eco):
    """horace.move_file: Move a file or folder inside the file root, never onto something that exists."""
    eco.call(tool_for("files.write"), path="move/from.txt", content="moving")
    eco.call(tool_for("files.write"), path="move/taken.txt", content="stays")
    moved = eco.call("horace.move_file", source="move/from.txt", destination="move/to.txt")
    assert moved["path"] == "move/to.txt" and moved["size"] == 6
    with pytest.raises(ToolCallError):
        eco.call("horace.move_file", source="move/to.txt", destination="move/taken.txt")  # never over what exists
    with pytest.raises(ToolCallError):
        eco.call("horace.move_file", source="move/to.txt", destination="../escaped.txt")
    assert eco.call(tool_for("files.read"), path="move/taken.txt")["content"] == "stays"


def test_delete_file(eco):
    """horace.delete_file: Delete a file, or an empty folder."""
    eco.call(tool_for("files.write"), path="delete/gone.txt", content="bye")
    assert eco.call("horace.delete_file", path="delete/gone.txt") == {"path": "delete/gone.txt", "deleted": True}
    with pytest.raises(ToolCallError):
        eco.call(tool_for("files.stat"), path="delete/gone.txt")
    with pytest.raises(ToolCallError):
        eco.call("horace.delete_file", path="")  # never the root
