"""The documents pack's catalogue: what it is for, its pinned dependencies,
its capabilities, the shapes of their results and their MCP hints.

Light on purpose (pydantic and the core's catalogue types only): the compiler and `capabilities.py` read it;
the implementation, with its libraries, is `pack.py`, imported only when the pack is loaded.
"""

from __future__ import annotations

from typing import Any

from ...capabilities import Capability, PackInfo, Shape
from ...capabilities import param as _p
from ..files import FileWritten

PACK = PackInfo("documents", "Word, Excel and PowerPoint (docx, xlsx, pptx) and OpenDocument (odt, ods) files written "
                             "from plain data through the files pack (byte-reproducible, text never a formula, size "
                             "limits) and read back as text and structure (zip-bomb, XXE/DTD and macro guards first)",
                dependencies=("python-docx==1.2.0", "openpyxl==3.1.5", "python-pptx==1.0.2", "odfpy==1.4.1",
                              "lxml==6.2.0", "defusedxml==0.7.1"), requires=("files",))


class DocumentWritten(FileWritten):
    """A document as the files pack wrote it into the file root (path, size, SHA-256) and its format ("docx",
    "xlsx", "pptx", "odt" or "ods")."""

    format: str


class DocumentContent(Shape):
    """A document of the file root as read: its path, size and SHA-256, its format (told by its content), its title
    ("" when none), its text (a line per paragraph, bullet, table row or sheet row, cells tab-separated) and whether
    that was cut at the pack's limits; then its structure: `blocks` (docx, odt: {"heading", "level"} with level 0 for
    the title, {"paragraph"}, {"bullets"}, {"table"}), `sheets` (xlsx, ods: sheet name to rows of cell values) or
    `slides` (pptx: {"title", "bullets"} and "tables" when a slide has any)."""

    path: str
    size: int
    sha256: str
    format: str
    title: str
    text: str
    truncated: bool
    blocks: list[dict[str, Any]] | None = None
    sheets: dict[str, list[list[Any]]] | None = None
    slides: list[dict[str, Any]] | None = None


CAPABILITIES: tuple[Capability, ...] = (
    Capability("documents.write_docx", "Write a Word document into the file root: a title and blocks, each "
                                       "{heading, level 1-3}, {paragraph}, {bullets: [text]} or {table: rows of "
                                       "cells}; the same input gives the same bytes. Returns {path, size, sha256, "
                                       "format}.",
               (_p("path", "str"), _p("title", "str"), _p("blocks", "list[dict]")), "dict",
               shape=DocumentWritten, pack="documents"),
    Capability("documents.write_odt", "Write an OpenDocument text into the file root, from the same title and "
                                      "blocks as documents.write_docx. Returns {path, size, sha256, format}.",
               (_p("path", "str"), _p("title", "str"), _p("blocks", "list[dict]")), "dict",
               shape=DocumentWritten, pack="documents"),
    Capability("documents.write_xlsx", "Write an Excel workbook into the file root: sheets maps each sheet name "
                                       "to its rows, lists of text, numbers, true/false or null; text is always "
                                       "stored as text, never as a formula. Returns {path, size, sha256, format}.",
               (_p("path", "str"), _p("sheets", "dict")), "dict", shape=DocumentWritten, pack="documents"),
    Capability("documents.write_ods", "Write an OpenDocument spreadsheet into the file root, from the same sheets "
                                      "as documents.write_xlsx. Returns {path, size, sha256, format}.",
               (_p("path", "str"), _p("sheets", "dict")), "dict", shape=DocumentWritten, pack="documents"),
    Capability("documents.write_pptx", "Write a PowerPoint deck into the file root: a title slide, then one slide "
                                       "per {title, bullets: [text]}. Returns {path, size, sha256, format}.",
               (_p("path", "str"), _p("title", "str"), _p("slides", "list[dict]")), "dict",
               shape=DocumentWritten, pack="documents"),
    Capability("documents.read", "Read a docx, xlsx, pptx, odt or ods file of the file root (the format told by "
                                 "its content; macro-enabled files refused): returns {path, size, sha256, format, "
                                 "title, text, truncated} and its blocks, sheets or slides.",
               (_p("path", "str"),), "dict", shape=DocumentContent, pack="documents"),
)

READ_ONLY: frozenset[str] = frozenset({"documents.read"})
# A write puts the same bytes for the same input, over whatever was at that path.
_WRITES = frozenset(f"documents.write_{fmt}" for fmt in ("docx", "odt", "xlsx", "ods", "pptx"))
IDEMPOTENT_WRITES: frozenset[str] = _WRITES
DESTRUCTIVE: frozenset[str] = _WRITES
