"""The files pack's catalogue: what it is for, its pinned dependencies,
its capabilities, the shapes of their results and their MCP hints.

Light on purpose (pydantic and the core's catalogue types only): the compiler and `capabilities.py` read it;
the implementation, with its libraries, is `pack.py`, imported only when the pack is loaded.
"""

from __future__ import annotations

from ...capabilities import Capability, CapabilityParam, PackInfo, Shape
from ...capabilities import param as _p

PACK = PackInfo("files", "One file root per ecosystem: read, write, list, stat, move, delete; no way out of the root "
                         "(.., absolute paths, symlinks, hard links), size quotas, content hashes")


class FileWritten(Shape):
    """A file as written: its path inside the ecosystem's file root, its size and its content's SHA-256."""

    path: str
    size: int
    sha256: str


class FileContent(FileWritten):
    """A file's content (UTF-8 text, or base64 when asked for) with its size and SHA-256."""

    content: str


class FileInfo(Shape):
    """An entry of the file root: its kind ("file", "dir"; "link" or "other" for what the pack shows but never
    follows or opens), its size and when it last changed; a file's SHA-256 from `files.stat`."""

    path: str
    kind: str
    size: int
    modified_at: str
    sha256: str | None = None


class FileDeleted(Shape):
    """What was deleted."""

    path: str
    deleted: bool


def _files(op: str, summary: str, params: tuple[CapabilityParam, ...], returns: str, shape: type[Shape]) -> Capability:
    return Capability(f"files.{op}", summary, params, returns, shape=shape, pack="files")


CAPABILITIES: tuple[Capability, ...] = (
    _files("write", "Write a file under the ecosystem's file root (utf-8 text, or base64 bytes), atomically; "
                    "returns {path, size, sha256}.",
           (_p("path", "str"), _p("content", "str"), _p("encoding", "str", "utf-8")), "dict", FileWritten),
    _files("read", "Read a file under the ecosystem's file root; returns {path, size, sha256, content}.",
           (_p("path", "str"), _p("encoding", "str", "utf-8")), "dict", FileContent),
    _files("list", "The entries of a folder of the file root (not recursive), by path.",
           (_p("path", "str", ""), _p("limit", "int", 1000)), "list[dict]", FileInfo),
    _files("stat", "A file's or folder's kind, size, time of change and (for a file) SHA-256.",
           (_p("path", "str"),), "dict", FileInfo),
    _files("move", "Move a file or folder inside the file root (never onto something that exists).",
           (_p("source", "str"), _p("destination", "str")), "dict", FileInfo),
    _files("delete", "Delete a file, or an empty folder, of the file root.", (_p("path", "str"),), "dict",
           FileDeleted),
)

READ_ONLY: frozenset[str] = frozenset({"files.read", "files.list", "files.stat"})
IDEMPOTENT_WRITES: frozenset[str] = frozenset({"files.write"})
DESTRUCTIVE: frozenset[str] = frozenset({"files.write", "files.delete"})
