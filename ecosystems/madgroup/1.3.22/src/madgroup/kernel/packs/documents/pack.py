"""The documents pack: Gates's Office documents (docx, xlsx, pptx) and Stallman's OpenDocument ones (odt, ods).

A MAD describes a document as plain data (headings, paragraphs, bullet lists and tables; sheets of rows;
slides of bullets) and the pack renders it with python-docx, openpyxl, python-pptx or odfpy. It never
touches the disk itself: the bytes go into the ecosystem's file root through the files pack
(`PackContext.peer("files")`, with the caller's name), so the files pack's guards apply unchanged: no
path out of the root, no symlink or hard link followed, its size quotas, its audit of the write.
`documents.read` reads a file back the same way and answers its text and structure, whatever of the
five formats it is, told by its content (never by its name alone).

Guards when writing (each a setting of this pack, `pack_settings["documents"]`, default in DEFAULTS):

- The request is checked whole before anything is rendered: `max_blocks` (blocks of a text document,
  bullet items and slide bullets included), `max_slides`, `max_sheets`, `max_rows` (of one sheet),
  `max_cells` (table cells and sheet cells of one document: a table is padded to its widest row, so it
  costs width x rows, and every row of a table or sheet, an empty one too, costs at least one cell) and
  `max_text_chars` (all the text of one document). Rendering is CPU and memory bound; a limit passed is
  refused (audited) before it starts.
- Bad shapes are refused with where and what (`blocks[2].table[0][3]: ...`): unknown keys, wrong types,
  heading levels outside 1-3, text with characters XML cannot hold (controls, lone surrogates), sheet
  names a spreadsheet application rejects, numbers a spreadsheet cannot hold exactly (NaN, infinities,
  integers beyond 2**53), cells over 32,767 characters.
- Formula injection: a spreadsheet cell is a formula only if the pack makes it one, and it never does.
  Every string is stored as a string cell (xlsx `t="s"`, also for text like "#N/A" that openpyxl would
  otherwise store as an error value; ods `office:value-type="string"`), so "=HYPERLINK(...)" or
  "=cmd|'/c calc'!A1" is shown as text and never evaluated; in xlsx a string starting with = + - @ is
  also marked quotePrefix, so that editing the cell in Excel keeps it text.
- The rendered file may not pass `max_output_bytes`; then the files pack's own limits apply.
- The path's extension must be the format's (`.docx` for write_docx...), so a file's name never lies
  about what it holds.

Guards when reading, all before any library parses anything:

- Only a zip archive is considered (an OLE2 file, the legacy .doc/.xls/.ppt and password-protected
  Office files, is named as such and refused); files named as macro-enabled (.docm, .xlsm, ...) are
  refused before they are read.
- Zip bombs: the central directory's entry count (`max_zip_entries`) and total uncompressed size
  (`max_unzipped_bytes`) are checked before a single entry is inflated; Python's zipfile then never
  inflates an entry past its declared size and checks its CRC, so a directory that lies is an error,
  not a bomb. Encrypted entries, duplicate names and compression methods other than stored/deflated
  are refused.
- The format comes from the content: ODF's `mimetype` entry, or the main part's content type in OOXML's
  `[Content_Types].xml`; templates, presentations other than pptx and macro-enabled content types are
  refused, and so is any VBA project, Excel 4.0 macro sheet or OpenOffice Basic/Scripts folder.
- XXE and entity expansion: every XML entry (by name, .xml/.rels/.vml, or by its declared content type;
  SVG images aside, which no reader here parses) is scanned for markup declarations before parsing. Office
  and OpenDocument files never use a DTD; a `<!ENTITY` anywhere, or any `<!DOCTYPE` other than the
  external-only OpenOffice.org one old ODF manifests carry, is refused. Behind that scan, the parsers
  are safe on their own too: python-docx, python-pptx and openpyxl parse with lxml and
  `resolve_entities=False` (openpyxl also streams sheets through defusedxml, a dependency of odfpy), and
  this pack reads ODF with lxml and `resolve_entities=False, no_network=True, load_dtd=False`. (odfpy
  itself is used only to write: its loader prints an unparsable part to stdout and builds a DOM of
  Python objects, too heavy for untrusted spreadsheets.)
- Parser memory: a parsed XML element costs a hundred bytes and more, so `max_unzipped_bytes` alone does not
  bound it (64 MiB of `<w:p/>` is ten million elements). The XML entries' tags (their `<`) are counted while
  they are scanned, all of one document together, and past `max_xml_elements` the file is refused (audited)
  before any library parses it. XML is told by name, by declared content type (part names compared ignoring
  case, as python-docx does) and, for any other OOXML entry, by its first bytes; UTF-32 is refused (the scan
  reads UTF-8, its ASCII supersets and UTF-16, what libxml2 detects), and after the pack's own parses (ODF,
  `[Content_Types].xml`) the parsed tree is checked again for a DTD.
- Expansion while reading (ODS `number-columns-repeated="1000000000"` or `number-rows-repeated`, an xlsx
  row numbered 10**9, a `text:s c=...`) is bounded by `max_cells` (cells and rows: a repeated row costs its
  width for every copy, an empty paragraph a cell) and `max_read_chars` (text: numbers, dates and every
  copy of a repeated row too): past either, the answer stops there (copies are made only as far as the
  budget goes) and says `truncated: true`.
- Renders and reads run in threads, at most `max_pending` at once; one more is refused (audited) rather
  than queued.

Writes are reproducible: core-property dates are fixed (1980-01-01T00:00:00Z, also openpyxl's "modified",
which it stamps at save), ODF's XML is put in canonical form (C14N: odfpy declares on each root every
namespace any document of the process used so far), and the archive is re-packed with fixed entry times
and attributes in the library's entry order, so the same request gives the same bytes and sha256 (with
the same library, lxml and zlib versions). odfpy's process-wide namespace table is also why ODF rendering
holds a lock.

Refusals of a guard go through `context.denied` (audited), bad input is InvalidArgument; a successful
write is audited with the format, size and sha256 (the files pack audits its own write as well); reads are
not audited (the files pack's read is the access). Messages name the path, the place in the request and the
rule, never the request's text; a library's own parse error is passed on, cut to 200 characters.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import datetime as dt
import io
import math
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ...errors import InvalidArgument, KernelError
from .. import Pack, PackContext, implements

# The libraries (python-docx, openpyxl, python-pptx, lxml, odfpy: about 190 ms and 25 MB) are imported where
# they are used, on a first render or read, not when the runtime starts; `DocumentsPack.libraries` still makes
# a build that lacks one fail at start-up.
if TYPE_CHECKING:
    from docx.text.paragraph import Paragraph
    from lxml import etree

DEFAULTS: dict[str, int] = {
    "max_blocks": 10_000,  # blocks + bullet items of a text document; slide bullets of a deck
    "max_slides": 1_000,
    "max_sheets": 100,
    "max_rows": 100_000,  # of one sheet
    "max_cells": 200_000,  # table and sheet cells of one document (written, or read back)
    "max_text_chars": 1_000_000,  # all text of one written document
    "max_output_bytes": 32 << 20,  # 32 MiB rendered
    "max_zip_entries": 10_000,  # reading
    "max_unzipped_bytes": 64 << 20,  # reading: total declared uncompressed size
    "max_read_chars": 2_000_000,  # text answered by documents.read (truncated past it)
    "max_xml_elements": 1_000_000,  # reading: markup tags ("<") in all the XML of one document, before parsing
    "max_pending": 4,  # renders and reads running at once (each a thread); more are refused
}
MACRO_EXTENSIONS = frozenset({"docm", "dotm", "xlsm", "xltm", "xlam", "pptm", "potm", "ppsm", "ppam", "sldm"})
MAX_CELL_CHARS = 32_767  # what one spreadsheet cell holds (Excel's limit; LibreOffice's is larger)
MAX_COLUMNS = 16_384  # columns of a sheet (XFD)
MAX_EXACT_INT = 2**53  # a spreadsheet number is a double
SHEET_NAME_BAD = frozenset(":\\/?*[]")

FIXED_TIME = dt.datetime(1980, 1, 1, tzinfo=dt.timezone.utc)  # the zip format's epoch
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FIXED_W3CDTF = b"1980-01-01T00:00:00Z"
_CORE_DATES = re.compile(rb"(<dcterms:(created|modified)\b[^>]*>)[^<]*(</dcterms:\2>)")

_CT_MAIN = {
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml": "docx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml": "xlsx",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml": "pptx",
}
_CT_OTHER_MAIN = {  # main parts of OOXML kinds this pack does not read, by what to call them
    "wordprocessingml.template.main+xml": "a Word template (.dotx)",
    "spreadsheetml.template.main+xml": "an Excel template (.xltx)",
    "presentationml.template.main+xml": "a PowerPoint template (.potx)",
    "presentationml.slideshow.main+xml": "a PowerPoint show (.ppsx)",
    "ms-excel.sheet.binary": "a binary Excel workbook (.xlsb)",
}
_CT_MACRO = ("macroenabled", "vbaproject", "vbadata", "macrosheet", "ms-office.activex")
_ODF_TYPES = {"application/vnd.oasis.opendocument.text": "odt",
              "application/vnd.oasis.opendocument.spreadsheet": "ods"}
_ZIP_MAGIC = b"PK\x03\x04"
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# Old ODF manifests name an external DTD that no parser here ever loads; any other DOCTYPE is refused.
_OOO_DOCTYPE = re.compile(r'<!DOCTYPE\s+[\w:.-]+\s+PUBLIC\s+"-//OpenOffice\.org//DTD [^"<>\[\]]*"\s+"[\w.-]+\.dtd"\s*>')
_XML_ENCODING = re.compile(rb"""^<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_ASCII_SUPERSETS = re.compile(r"(utf-?8|us-ascii|ascii|iso-8859-\d{1,2}|latin-?1|windows-125\d|cp125\d)")
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

_NS = {
    "office": "urn:oasis:names:tc:opendocument:xmlns:office:1.0",
    "text": "urn:oasis:names:tc:opendocument:xmlns:text:1.0",
    "table": "urn:oasis:names:tc:opendocument:xmlns:table:1.0",
    "dc": "http://purl.org/dc/elements/1.1/",
}


def _q(prefix: str, local: str) -> str:
    return f"{{{_NS[prefix]}}}{local}"


def _safe_parser() -> etree.XMLParser:
    """lxml with no entity resolution, no DTD loading, no network, no huge-tree mode."""
    from lxml import etree

    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                           huge_tree=False, remove_comments=True, remove_pis=True)


class _Refusal(Exception):
    """A guard said no; turned into `context.denied(...)` at the capability's edge (which audits it)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class _Full(Exception):
    """Reading reached max_cells or max_read_chars: the answer stops here, marked truncated."""


def _shown(path: Any) -> str:
    if isinstance(path, str) and path.isprintable() and len(path) <= 512:
        return path
    text = repr(path)
    return text if len(text) <= 512 else text[:509] + "..."


def _kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---- the request, checked whole before anything is rendered ------------------------------------------------


class _Tally:
    """Counts a write request against the pack's limits while its shape is checked."""

    def __init__(self, limits: dict[str, int]):
        self.limits = limits
        self.blocks = self.cells = self.chars = 0

    def _over(self, what: str, key: str) -> _Refusal:
        limit = self.limits[key]
        return _Refusal(f"the document has more than {limit} {what} (setting documents.{key}); split it into "
                        "several documents or raise the setting")

    def block(self, n: int = 1) -> None:
        self.blocks += n
        if self.blocks > self.limits["max_blocks"]:
            raise self._over("blocks and bullet items", "max_blocks")

    def cell(self, n: int = 1) -> None:
        self.cells += n
        if self.cells > self.limits["max_cells"]:
            raise self._over("table or sheet cells", "max_cells")

    def text(self, value: Any, where: str, *, empty_ok: bool = True) -> str:
        if not isinstance(value, str):
            raise InvalidArgument(f"{where} must be text (a string), not {_kind_of(value)}")
        if not value and not empty_ok:
            raise InvalidArgument(f"{where} is empty; give it some text")
        bad = _BAD_CHARS.search(value)
        if bad:
            raise InvalidArgument(f"{where} contains the character U+{ord(bad.group()):04X} at position {bad.start()}, "
                                  "which documents cannot hold (a control character or lone surrogate); remove it "
                                  "(tabs and newlines are fine)")
        self.chars += len(value)
        if self.chars > self.limits["max_text_chars"]:
            raise self._over("characters of text", "max_text_chars")
        return value

    def count(self, items: list[Any], key: str, what: str) -> None:
        limit = self.limits[key]
        if len(items) > limit:
            raise _Refusal(f"the document has {len(items)} {what}, more than {limit} (setting documents.{key}); "
                           "split it into several documents or raise the setting")


def _list(value: Any, where: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{where} must be a list of {what}, not {_kind_of(value)}")
    return value


def _table(value: Any, where: str, tally: _Tally) -> list[list[str]]:
    """A table of a text document: rows of cells (text, numbers, true/false or null), as text."""
    rows = _list(value, where, "rows (each a list of cells)")
    if not rows:
        raise InvalidArgument(f"{where} has no rows; give at least one row of cells")
    out = []
    for r, row in enumerate(rows):
        cells = _list(row, f"{where}[{r}]", "cells")
        tally.cell(max(1, len(cells)))  # a row is at least one cell: it is rendered as one at least
        texts = []
        for c, cell in enumerate(cells):
            here = f"{where}[{r}][{c}]"
            if cell is None:
                texts.append("")
            elif isinstance(cell, str):
                texts.append(tally.text(cell, here))
            elif isinstance(cell, bool):
                texts.append("true" if cell else "false")
            elif isinstance(cell, int | float):
                if isinstance(cell, float) and not math.isfinite(cell):
                    raise InvalidArgument(f"{here} is {cell!r}; write it as text if you mean it")
                texts.append(tally.text(str(cell), here))
            else:
                raise InvalidArgument(f"{here} must be text, a number, true/false or null, not {_kind_of(cell)}")
        out.append(texts)
    width = max(len(row) for row in out)
    if width == 0:
        raise InvalidArgument(f"{where} has only empty rows; give at least one cell")
    if width > MAX_COLUMNS:
        raise InvalidArgument(f"{where} has a row of {width} cells; a table has at most {MAX_COLUMNS} columns")
    # Every row is padded to the widest: the table renders width x rows cells, so that is what it costs.
    tally.cell(width * len(out) - sum(max(1, len(row)) for row in out))
    return [row + [""] * (width - len(row)) for row in out]


_BLOCK_KEYS = ("heading", "paragraph", "bullets", "table")


def _blocks(value: Any, tally: _Tally) -> list[tuple[str, Any, int]]:
    """[(kind, content, level)] from the caller's blocks, or a clear error about the first bad one."""
    blocks = _list(value, "blocks", 'blocks ({"heading": ..., "level": 1-3}, {"paragraph": ...}, '
                   '{"bullets": [...]} or {"table": [[...], ...]})')
    tally.count(blocks, "max_blocks", "blocks")
    out: list[tuple[str, Any, int]] = []
    for i, block in enumerate(blocks):
        where = f"blocks[{i}]"
        if not isinstance(block, dict):
            raise InvalidArgument(f"{where} must be an object such as {{\"paragraph\": \"text\"}}, not {_kind_of(block)}")
        kinds = [k for k in _BLOCK_KEYS if k in block]
        if len(kinds) != 1:
            found = ", ".join(repr(k) for k in kinds) or "none"
            raise InvalidArgument(f"{where} must have exactly one of 'heading', 'paragraph', 'bullets' or 'table' "
                                  f"(found {found})")
        kind = kinds[0]
        extra = sorted(str(k) for k in block if k != kind and not (kind == "heading" and k == "level"))
        if extra:
            allowed = "'heading' and 'level'" if kind == "heading" else repr(kind)
            raise InvalidArgument(f"{where} has unknown key(s) {', '.join(map(repr, extra))}; a {kind} block has "
                                  f"only {allowed}")
        tally.block()
        level = 0
        if kind == "heading":
            level = block.get("level", 1)
            if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 3:
                raise InvalidArgument(f"{where}.level must be 1, 2 or 3, not {level!r}")
            content: Any = tally.text(block["heading"], f"{where}.heading", empty_ok=False)
        elif kind == "paragraph":
            content = tally.text(block["paragraph"], f"{where}.paragraph")
        elif kind == "bullets":
            items = _list(block["bullets"], f"{where}.bullets", "strings")
            if not items:
                raise InvalidArgument(f"{where}.bullets is empty; give at least one item")
            tally.block(len(items))
            content = [tally.text(item, f"{where}.bullets[{j}]") for j, item in enumerate(items)]
        else:
            content = _table(block["table"], f"{where}.table", tally)
        out.append((kind, content, level))
    return out


def _slides(value: Any, tally: _Tally) -> list[tuple[str, list[str]]]:
    slides = _list(value, "slides", 'slides ({"title": "...", "bullets": ["...", ...]})')
    tally.count(slides, "max_slides", "slides")
    out = []
    for i, slide in enumerate(slides):
        where = f"slides[{i}]"
        if not isinstance(slide, dict):
            raise InvalidArgument(f"{where} must be an object such as {{\"title\": \"...\", \"bullets\": [...]}}, "
                                  f"not {_kind_of(slide)}")
        extra = sorted(str(k) for k in slide if k not in ("title", "bullets"))
        if extra:
            raise InvalidArgument(f"{where} has unknown key(s) {', '.join(map(repr, extra))}; a slide has only "
                                  "'title' and 'bullets'")
        if "title" not in slide:
            raise InvalidArgument(f"{where} has no 'title'")
        title = tally.text(slide["title"], f"{where}.title")
        items = _list(slide.get("bullets", []), f"{where}.bullets", "strings")
        tally.block(len(items))
        out.append((title, [tally.text(item, f"{where}.bullets[{j}]") for j, item in enumerate(items)]))
    return out


Cell = str | int | float | bool | None


def _sheets(value: Any, tally: _Tally) -> list[tuple[str, list[list[Cell]]]]:
    if not isinstance(value, dict):
        raise InvalidArgument('sheets must be an object of sheet name to rows, e.g. {"Data": [["a", 1], ["b", 2]]}, '
                              f"not {_kind_of(value)}")
    if not value:
        raise InvalidArgument("sheets is empty; a workbook needs at least one sheet")
    tally.count(list(value), "max_sheets", "sheets")
    seen: set[str] = set()
    out = []
    for name, rows in value.items():
        where = f"sheets[{name!r}]"
        _sheet_name(name, seen)
        tally.text(name, "a sheet name")
        rows = _list(rows, where, "rows (each a list of cells)")
        if len(rows) > tally.limits["max_rows"]:
            raise _Refusal(f"sheet {name!r} has {len(rows)} rows, more than {tally.limits['max_rows']} "
                           "(setting documents.max_rows); split it or raise the setting")
        checked = []
        for r, row in enumerate(rows):
            cells = _list(row, f"{where}[{r}]", "cells")
            if len(cells) > MAX_COLUMNS:
                raise InvalidArgument(f"{where}[{r}] has {len(cells)} cells; a sheet has at most {MAX_COLUMNS} columns")
            tally.cell(max(1, len(cells)))  # an empty row is still a row to render: never free
            for c, cell in enumerate(cells):
                _sheet_cell(cell, f"{where}[{r}][{c}]", tally)
            checked.append(cells)
        out.append((name, checked))
    return out


def _sheet_name(name: Any, seen: set[str]) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 31:
        raise InvalidArgument(f"sheet name {name!r} must be text of 1 to 31 characters")
    bad = sorted(set(name) & SHEET_NAME_BAD)
    if bad or name.startswith("'") or name.endswith("'"):
        raise InvalidArgument(f"sheet name {name!r} may not contain {' '.join(sorted(SHEET_NAME_BAD))} nor start or "
                              "end with an apostrophe")
    if name.casefold() == "history":
        raise InvalidArgument("'History' is a sheet name Excel reserves; choose another")
    if name.casefold() in seen:
        raise InvalidArgument(f"sheet name {name!r} is used twice (names are compared ignoring case)")
    seen.add(name.casefold())


def _sheet_cell(cell: Any, where: str, tally: _Tally) -> None:
    if cell is None or isinstance(cell, bool):
        return
    if isinstance(cell, str):
        tally.text(cell, where)
        if len(cell) > MAX_CELL_CHARS:
            raise InvalidArgument(f"{where} has {len(cell)} characters; a spreadsheet cell holds at most "
                                  f"{MAX_CELL_CHARS}")
    elif isinstance(cell, int):
        if abs(cell) > MAX_EXACT_INT:
            raise InvalidArgument(f"{where} is an integer beyond 2**53, which a spreadsheet number cannot hold "
                                  "exactly; pass it as a string")
    elif isinstance(cell, float):
        if not math.isfinite(cell):
            raise InvalidArgument(f"{where} is {cell!r}, which a spreadsheet cannot hold; pass it as a string or null")
    else:
        raise InvalidArgument(f"{where} must be text, a number, true/false or null, not {_kind_of(cell)}")


# ---- rendering ----------------------------------------------------------------------------------------------


def _canonical(body: bytes) -> bytes:
    """Our own XML in canonical form (C14N, unused namespace declarations dropped): odfpy declares on each root
    every namespace any document of the process used so far, in the order they were first used."""
    from lxml import etree

    root = etree.fromstring(body, parser=_safe_parser())
    etree.cleanup_namespaces(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + etree.tostring(root, method="c14n")


def _reproducible(data: bytes) -> bytes:
    """The archive again, in the same entry order, with fixed entry times and attributes and fixed core-property
    dates (and ODF's XML canonical): the same document gives the same bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        odf = "mimetype" in src.namelist()
        for info in src.infolist():
            body = src.read(info)
            if info.filename == "docProps/core.xml":
                body = _CORE_DATES.sub(rb"\g<1>" + _FIXED_W3CDTF + rb"\g<3>", body)
            elif odf and info.filename.endswith(".xml"):
                body = _canonical(body)
            entry = zipfile.ZipInfo(info.filename, _FIXED_ZIP_TIME)
            entry.compress_type = info.compress_type
            entry.create_system = 3
            entry.external_attr = 0o100644 << 16
            dst.writestr(entry, body)
    return out.getvalue()


def _fix_core(props: Any, title: str) -> None:
    props.title = title
    props.author = ""
    props.last_modified_by = ""
    props.comments = ""
    props.revision = 1
    props.created = props.modified = props.last_printed = FIXED_TIME.replace(tzinfo=None)


def _saved(save: Callable[[io.BytesIO], None]) -> bytes:
    buffer = io.BytesIO()
    save(buffer)
    return _reproducible(buffer.getvalue())


def _render_docx(title: str, blocks: list[tuple[str, Any, int]]) -> bytes:
    import docx

    document = docx.Document()
    _fix_core(document.core_properties, title)
    if title:
        document.add_heading(title, 0)
    for kind, content, level in blocks:
        if kind == "heading":
            document.add_heading(content, level)
        elif kind == "paragraph":
            document.add_paragraph(content)
        elif kind == "bullets":
            for item in content:
                document.add_paragraph(item, style="List Bullet")
        else:
            table = document.add_table(rows=len(content), cols=len(content[0]))
            table.style = "Table Grid"
            for row, values in zip(table.rows, content, strict=True):
                for cell, text in zip(row.cells, values, strict=True):
                    if text:
                        cell.text = text
    return _saved(document.save)


def _render_pptx(title: str, slides: list[tuple[str, list[str]]]) -> bytes:
    import pptx

    deck = pptx.Presentation()
    _fix_core(deck.core_properties, title)
    if title:
        slide = deck.slides.add_slide(deck.slide_layouts[0])  # Title Slide
        slide.shapes.title.text = title
        for shape in list(slide.placeholders):
            if shape.placeholder_format.idx != 0:  # the empty subtitle would show "Click to add subtitle"
                shape._element.getparent().remove(shape._element)
    for slide_title, bullets in slides:
        slide = deck.slides.add_slide(deck.slide_layouts[1])  # Title and Content
        slide.shapes.title.text = slide_title
        body = slide.placeholders[1].text_frame
        for i, item in enumerate(bullets):
            paragraph = body.paragraphs[0] if i == 0 else body.add_paragraph()
            paragraph.text = item
    return _saved(deck.save)


def _render_xlsx(sheets: list[tuple[str, list[list[Cell]]]]) -> bytes:
    import openpyxl

    book = openpyxl.Workbook()
    book.remove(book.active)
    props = book.properties
    props.creator = props.lastModifiedBy = None
    props.created = props.modified = FIXED_TIME.replace(tzinfo=None)
    for name, rows in sheets:
        sheet = book.create_sheet(title=name)
        for r, row in enumerate(rows, start=1):
            for c, value in enumerate(row, start=1):
                if value is None:
                    continue
                cell = sheet.cell(row=r, column=c, value=value)
                if isinstance(value, str):
                    cell.data_type = "s"  # never a formula ("=...") or an error value ("#N/A"): text
                    if value[:1] in ("=", "+", "-", "@"):
                        cell.quotePrefix = True
    return _saved(book.save)


# odfpy keeps the namespaces it has seen in one dict shared by every element of the process, which
# serialising iterates: two documents built at once in two threads could change it under each other.
_ODF_LOCK = threading.Lock()


def _render_odt(title: str, blocks: list[tuple[str, Any, int]]) -> bytes:
    with _ODF_LOCK:
        return _build_odt(title, blocks)


def _build_odt(title: str, blocks: list[tuple[str, Any, int]]) -> bytes:
    from odf import dc, teletype
    from odf.opendocument import OpenDocumentText
    from odf.style import ListLevelProperties, ParagraphProperties, Style, TableColumnProperties, TextProperties
    from odf.table import Table, TableCell, TableColumn, TableRow
    from odf.text import H, List, ListItem, ListLevelStyleBullet, ListStyle, P

    document = OpenDocumentText()
    if title:
        document.meta.addElement(dc.Title(text=title))
    styles = document.styles
    title_style = Style(name="Title", displayname="Title", family="paragraph")
    title_style.addElement(TextProperties(fontsize="24pt", fontweight="bold"))
    styles.addElement(title_style)
    headings = {}
    for level, size in ((1, "18pt"), (2, "15pt"), (3, "13pt")):
        style = Style(name=f"Heading_20_{level}", displayname=f"Heading {level}", family="paragraph",
                      defaultoutlinelevel=str(level))
        style.addElement(TextProperties(fontsize=size, fontweight="bold"))
        style.addElement(ParagraphProperties(margintop="0.2in", marginbottom="0.08in"))
        styles.addElement(style)
        headings[level] = style
    bullets = ListStyle(name="Bullets")
    bullet = ListLevelStyleBullet(level=1, bulletchar="•")
    bullet.addElement(ListLevelProperties(spacebefore="0.25in", minlabelwidth="0.25in"))
    bullets.addElement(bullet)
    styles.addElement(bullets)
    column = Style(name="Column", family="table-column")
    column.addElement(TableColumnProperties())
    document.automaticstyles.addElement(column)
    body = document.text
    if title:
        paragraph = P(stylename=title_style)
        teletype.addTextToElement(paragraph, title)
        body.addElement(paragraph)
    tables = 0
    for kind, content, level in blocks:
        if kind == "heading":
            heading = H(outlinelevel=level, stylename=headings[level])
            teletype.addTextToElement(heading, content)
            body.addElement(heading)
        elif kind == "paragraph":
            paragraph = P()
            teletype.addTextToElement(paragraph, content)
            body.addElement(paragraph)
        elif kind == "bullets":
            items = List(stylename=bullets)
            for text in content:
                item = ListItem()
                paragraph = P()
                teletype.addTextToElement(paragraph, text)
                item.addElement(paragraph)
                items.addElement(item)
            body.addElement(items)
        else:
            tables += 1
            table = Table(name=f"Table{tables}")
            table.addElement(TableColumn(numbercolumnsrepeated=len(content[0]), stylename=column))
            for values in content:
                row = TableRow()
                for text in values:
                    cell = TableCell(valuetype="string")
                    paragraph = P()
                    teletype.addTextToElement(paragraph, text)
                    cell.addElement(paragraph)
                    row.addElement(cell)
                table.addElement(row)
            body.addElement(table)
    return _saved(document.write)


def _render_ods(sheets: list[tuple[str, list[list[Cell]]]]) -> bytes:
    with _ODF_LOCK:
        return _build_ods(sheets)


def _build_ods(sheets: list[tuple[str, list[list[Cell]]]]) -> bytes:
    from odf import teletype
    from odf.opendocument import OpenDocumentSpreadsheet
    from odf.table import Table, TableCell, TableColumn, TableRow
    from odf.text import P

    document = OpenDocumentSpreadsheet()
    for name, rows in sheets:
        table = Table(name=name)
        width = max((len(row) for row in rows), default=0)
        if width:
            table.addElement(TableColumn(numbercolumnsrepeated=width))
        for values in rows:
            row = TableRow()
            for value in values:
                if value is None:
                    cell = TableCell()
                elif isinstance(value, bool):
                    cell = TableCell(valuetype="boolean", booleanvalue="true" if value else "false")
                    cell.addElement(P(text="TRUE" if value else "FALSE"))
                elif isinstance(value, int | float):
                    cell = TableCell(valuetype="float", value=repr(value))
                    cell.addElement(P(text=repr(value)))
                else:  # a string cell: never a formula, whatever it starts with
                    cell = TableCell(valuetype="string")
                    paragraph = P()
                    teletype.addTextToElement(paragraph, value)
                    cell.addElement(paragraph)
                row.addElement(cell)
            table.addElement(row)
        document.spreadsheet.addElement(table)
    return _saved(document.write)


# ---- reading: the archive first, then the format's reader ---------------------------------------------------


# The first bytes by which libxml2 tells UCS-4 (UTF-32) without a byte order mark, in its four byte orders.
_UCS4_STARTS = (b"<\x00\x00\x00", b"\x00\x00\x00<", b"\x00\x00<\x00", b"\x00<\x00\x00",
                codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, b"\x00\x00\xff\xfe", b"\xfe\xff\x00\x00")


_XML_START = re.compile(rb"(\xef\xbb\xbf)?[ \t\r\n]*<[?!A-Za-z_:\x80-\xff]")  # UTF-8 and ASCII supersets
_UTF16_START = re.compile(rb"\xff\xfe|\xfe\xff|<\x00[^\x00]\x00|\x00<\x00[^\x00]")  # BOM, or how libxml2 tells it


def _xml_text(name: str, data: bytes) -> str:
    """An XML entry as text good enough to search for markup declarations in: decoded as libxml2 would
    (UTF-8/ASCII supersets, or UTF-16 told by its byte order mark or first bytes); anything else is refused."""
    if data.startswith(codecs.BOM_UTF8):
        return data[3:].decode("utf-8", "replace")
    if data.startswith(_UCS4_STARTS):  # before UTF-16: b"<\0\0\0" also starts like UTF-16-LE
        raise InvalidArgument(f"XML entry {name!r} is UTF-32 (UCS-4), which Office and OpenDocument files never use")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", "replace")
    if data.startswith(b"<\x00"):
        return data.decode("utf-16-le", "replace")
    if data.startswith(b"\x00<"):
        return data.decode("utf-16-be", "replace")
    declared = _XML_ENCODING.match(data[:200])
    if declared and not _ASCII_SUPERSETS.fullmatch(declared.group(1).decode("ascii").lower()):
        raise InvalidArgument(f"XML entry {name!r} declares the encoding {declared.group(1).decode('ascii')!r}; "
                              "Office and OpenDocument files are UTF-8 or UTF-16")
    if b"\x00" in data:  # XML never holds U+0000: NULs here are a wide encoding this scan would not see through
        raise InvalidArgument(f"XML entry {name!r} has NUL bytes but is not UTF-16; Office and OpenDocument files "
                              "are UTF-8 or UTF-16")
    return data.decode("latin-1")  # byte for byte: markup is ASCII in any ASCII-compatible encoding


def _check_declarations(name: str, data: bytes) -> int:
    """Refuses DTDs and entity declarations in an XML entry; answers how many tags ("<") it has."""
    text = _xml_text(name, data)
    upper = text.upper()
    if "<!ENTITY" in upper:
        raise _Refusal(f"XML entry {name!r} declares entities (<!ENTITY>), the way XML external-entity (XXE) and "
                       "entity-expansion attacks are carried; Office and OpenDocument files never do, so the file "
                       "is refused")
    at = upper.find("<!DOCTYPE")
    while at >= 0:
        end = text.find(">", at)
        if end < 0 or not _OOO_DOCTYPE.fullmatch(text[at:end + 1]):
            raise _Refusal(f"XML entry {name!r} has a document type declaration (<!DOCTYPE>); Office and "
                           "OpenDocument files never need one and it is how XXE attacks begin, so the file is refused")
        at = upper.find("<!DOCTYPE", end)
    return text.count("<")


def _check_parsed(name: str, root: Any) -> None:
    """After our own parse, what libxml2 saw: no internal DTD subset, no DOCTYPE but the OpenOffice.org one
    (the scan before parsing already refused them; this holds even if an encoding fooled that scan)."""
    info = root.getroottree().docinfo
    dtd = info.internalDTD
    declares = dtd is not None and (any(True for _ in dtd.iterentities()) or any(True for _ in dtd.iterelements()))
    if declares or (info.doctype and not (info.public_id or "").startswith("-//OpenOffice.org//DTD ")):
        raise _Refusal(f"XML entry {name!r} has a document type declaration (<!DOCTYPE>); Office and "
                       "OpenDocument files never need one and it is how XXE attacks begin, so the file is refused")


class _Archive:
    """A document's zip, checked from its central directory before anything is inflated."""

    def __init__(self, data: bytes, limits: dict[str, int], where: str):
        self.where = where
        if data.startswith(_OLE2_MAGIC):
            raise InvalidArgument(f"{where!r} is an OLE2 compound file: a legacy .doc/.xls/.ppt, or a password-"
                                  "protected Office document; this pack reads docx, xlsx, pptx, odt and ods (save it "
                                  "in one of those formats, without a password)")
        if not data.startswith(_ZIP_MAGIC):
            raise InvalidArgument(f"{where!r} is not a docx, xlsx, pptx, odt or ods document (those are zip "
                                  "archives; this file is not one)")
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError):
            raise InvalidArgument(f"{where!r} is not a readable zip archive (damaged or truncated), so not a document "
                                  "this pack reads") from None
        limit = limits["max_zip_entries"]
        if len(infos) > limit:
            raise _Refusal(f"{where!r} is an archive of {len(infos)} entries, more than {limit} (setting "
                           "documents.max_zip_entries); refused before inflating anything")
        total = sum(i.file_size for i in infos)
        limit = limits["max_unzipped_bytes"]
        if total > limit:
            raise _Refusal(f"{where!r} would inflate to {total} bytes, more than {limit} (setting "
                           "documents.max_unzipped_bytes), as a zip bomb does; refused before inflating anything")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"{where!r} has two zip entries of the same name; a document never does")
        for info in infos:
            if info.flag_bits & 0x1:
                raise InvalidArgument(f"{where!r} has encrypted zip entries; remove the password and try again")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise InvalidArgument(f"{where!r} uses zip compression method {info.compress_type}; documents are "
                                      "stored or deflated")
        self.names = set(names)
        self.svg = {n for n in names if n.lower().endswith(".svg")}
        self.tags = 0
        self.max_tags = limits["max_xml_elements"]

    def scan(self, name: str, *, sniffed: bool = False) -> bytes:
        """An XML entry, refused if it declares a DTD or entities or passes the document's tag budget (all
        before any parser sees it: a parsed element costs far more memory than its bytes). `sniffed`: an entry
        neither named nor typed as XML whose first bytes could start XML; one a parser would refuse anyway
        (NUL bytes in an ASCII-compatible encoding) is left alone, as the binary it most likely is."""
        data = self.read(name)
        if sniffed and b"\x00" in data and not data.startswith(_UCS4_STARTS) and not _UTF16_START.match(data):
            return data
        self.tags += _check_declarations(name, data)
        if self.tags > self.max_tags:
            raise _Refusal(f"{self.where!r} has more than {self.max_tags} XML tags (setting "
                           "documents.max_xml_elements), more than its parsed form may take in memory; refused "
                           "before parsing it")
        return data

    def looks_like_xml(self, name: str) -> bool:
        """Whether an entry's first bytes could start an XML document, in any encoding libxml2 detects."""
        try:
            with self.zip.open(name) as entry:
                head = entry.read(16)
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, OSError) as exc:
            raise InvalidArgument(f"{self.where!r}: zip entry {name!r} is damaged ({type(exc).__name__}); not a "
                                  "readable document") from None
        return bool(head.startswith(_UCS4_STARTS) or _UTF16_START.match(head) or _XML_START.match(head))

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(name)
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, OSError) as exc:
            raise InvalidArgument(f"{self.where!r}: zip entry {name!r} is damaged ({type(exc).__name__}); not a "
                                  "readable document") from None

    def detect(self) -> str:
        """The format, from the content; refuses macros, DTDs and kinds this pack does not read."""
        where, names = self.where, self.names
        lowered = {n.lower() for n in names}
        if any("vbaproject" in n or n.startswith(("basic/", "scripts/")) for n in lowered):
            raise _Refusal(f"{where!r} carries macros (a VBA project or Basic/Scripts folder); macro-enabled "
                           "documents are refused")
        has_ct, has_odf = "[Content_Types].xml" in names, "mimetype" in names
        if has_ct == has_odf:
            raise InvalidArgument(f"{where!r} is a zip archive but not a docx, xlsx, pptx, odt or ods document "
                                  "(those have either a [Content_Types].xml or a mimetype entry that tells what "
                                  "they are)")
        if has_odf:
            for name in sorted(names):
                if name.lower().endswith(".xml"):  # the reader parses content.xml and meta.xml, by name
                    self.scan(name)
            mimetype = self.read("mimetype")[:200].decode("ascii", "replace").strip()
            if mimetype in _ODF_TYPES:
                return _ODF_TYPES[mimetype]
            kind = mimetype.rsplit(".", 1)[-1] if mimetype.startswith("application/vnd.oasis.opendocument.") else ""
            raise InvalidArgument(f"{where!r} is an OpenDocument {kind or 'file of type ' + repr(mimetype[:80])}; "
                                  "this pack reads odt and ods (and docx, xlsx, pptx)")
        types = _parsed(self.scan("[Content_Types].xml"), where, "[Content_Types].xml")
        defaults = {(e.get("Extension") or "").lower(): (e.get("ContentType") or "") for e in types
                    if isinstance(e.tag, str) and e.tag.endswith("}Default")}
        # part names are compared ignoring case, as python-docx/python-pptx do: no part's type is missed
        overrides = {(e.get("PartName") or "").lstrip("/").lower(): (e.get("ContentType") or "") for e in types
                     if isinstance(e.tag, str) and e.tag.endswith("}Override")}
        every = [*defaults.values(), *overrides.values()]
        macros = sorted({ct for ct in every if any(marker in ct.lower() for marker in _CT_MACRO)})
        if macros:
            raise _Refusal(f"{where!r} declares macro or active content ({', '.join(macros)[:200]}); macro-enabled "
                           "documents are refused")
        for name in sorted(names):
            if name == "[Content_Types].xml":
                continue
            ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
            ct = overrides.get(name.lower(), defaults.get(ext, "")).lower()
            svg = ct == "image/svg+xml" or name in self.svg
            if name.lower().endswith((".xml", ".rels", ".vml")) or (ct.endswith("xml") and not svg):
                self.scan(name)
            elif not svg and self.looks_like_xml(name):  # a part a reader may parse as XML, however named and typed
                self.scan(name, sniffed=True)
        found = {_CT_MAIN[ct] for ct in overrides.values() if ct in _CT_MAIN}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            raise InvalidArgument(f"{where!r} declares main parts of several kinds ({', '.join(sorted(found))}); "
                                  "not a document any application would open")
        for ct in every:
            for marker, kind in _CT_OTHER_MAIN.items():
                if marker in ct:
                    raise InvalidArgument(f"{where!r} is {kind}; this pack reads docx, xlsx, pptx, odt and ods")
        raise InvalidArgument(f"{where!r} is an Office Open XML package, but not a docx, xlsx or pptx document")


class _Budget:
    """What documents.read may still answer: cells (and rows) and characters."""

    def __init__(self, cells: int, chars: int):
        self.cells, self.chars = cells, chars
        self.text: list[str] = []

    def cell(self, n: int = 1) -> None:
        self.cells -= n
        if self.cells < 0:
            raise _Full

    def take(self, value: str, *, line: bool = True) -> str:
        """Count `value` against the characters left; a line of the answer's text too when `line`."""
        self.chars -= len(value)
        if self.chars < 0:
            raise _Full
        if line and value:
            self.text.append(value)
        return value

    def line(self, value: str) -> None:
        """A line of the answer's text made of what was counted already."""
        if value:
            self.text.append(value)


def _docx_kind(paragraph: Paragraph, names: dict[str | None, str]) -> tuple[str, int]:
    """A paragraph's kind from its style's name, looked up once per style id (`names`, for one document: python-docx
    scans every style of the document for each lookup, minutes for a document of many paragraphs)."""
    style_id = paragraph._p.style
    if style_id not in names:
        try:
            names[style_id] = (paragraph.style.name or "") if paragraph.style is not None else ""
        except (KeyError, ValueError, AttributeError):
            names[style_id] = ""
    lowered = names[style_id].lower()
    if lowered == "title":
        return "heading", 0
    match = re.fullmatch(r"heading (\d)", lowered)
    if match:
        return "heading", int(match.group(1))
    ppr = paragraph._p.pPr
    if lowered.startswith(("list bullet", "list number", "list paragraph")) or (ppr is not None and ppr.numPr is not None):
        return "bullets", 0
    return "paragraph", 0


def _read_docx(data: bytes, budget: _Budget, out: dict[str, Any]) -> None:
    import docx
    import docx.table

    document = docx.Document(io.BytesIO(data))
    out["title"] = budget.take(document.core_properties.title or "", line=False)
    blocks: list[dict[str, Any]] = []
    out["blocks"] = blocks
    style_names: dict[str | None, str] = {}
    for item in document.iter_inner_content():
        if isinstance(item, docx.table.Table):
            rows: list[list[str]] = []
            blocks.append({"table": rows})
            for tr in item._tbl.tr_lst:
                budget.cell()
                row: list[str] = []
                rows.append(row)
                for tc in tr.tc_lst:  # each cell once: a gridSpan is not expanded
                    budget.cell()
                    row.append(budget.take(docx.table._Cell(tc, item).text, line=False))
                budget.line("\t".join(row))
            continue
        budget.cell()  # a block, like a cell (an empty paragraph too: it costs the parser as much)
        kind, level = _docx_kind(item, style_names)
        text = budget.take(item.text)
        if kind == "heading":
            blocks.append({"heading": text, "level": level})
        elif kind == "bullets":
            if blocks and "bullets" in blocks[-1]:
                blocks[-1]["bullets"].append(text)
            else:
                blocks.append({"bullets": [text]})
        else:
            blocks.append({"paragraph": text})


def _pptx_shapes(shapes: Any) -> Iterator[Any]:
    import pptx.enum.shapes

    for shape in shapes:
        if getattr(shape, "shape_type", None) == pptx.enum.shapes.MSO_SHAPE_TYPE.GROUP:
            yield from _pptx_shapes(shape.shapes)
        else:
            yield shape


def _read_pptx(data: bytes, budget: _Budget, out: dict[str, Any]) -> None:
    import pptx

    deck = pptx.Presentation(io.BytesIO(data))
    out["title"] = budget.take(deck.core_properties.title or "", line=False)
    slides: list[dict[str, Any]] = []
    out["slides"] = slides
    for slide in deck.slides:
        budget.cell()
        title_shape = slide.shapes.title
        entry: dict[str, Any] = {"title": budget.take(title_shape.text_frame.text if title_shape is not None else ""),
                                 "bullets": []}
        slides.append(entry)
        for shape in _pptx_shapes(slide.shapes):
            if title_shape is not None and shape.shape_id == title_shape.shape_id:
                continue
            if getattr(shape, "has_text_frame", False) and shape.has_text_frame:
                for paragraph in shape.text_frame.paragraphs:
                    budget.cell()
                    text = paragraph.text
                    if text:
                        entry["bullets"].append(budget.take(text))
            elif getattr(shape, "has_table", False) and shape.has_table:
                rows: list[list[str]] = []
                entry.setdefault("tables", []).append(rows)
                for row in shape.table.rows:
                    budget.cell()
                    cells: list[str] = []
                    rows.append(cells)
                    for cell in row.cells:
                        budget.cell()
                        cells.append(budget.take(cell.text, line=False))
                    budget.line("\t".join(cells))


def _cell_value(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def _trimmed(row: list[Any]) -> list[Any]:
    while row and row[-1] is None:
        row.pop()
    return row


def _finish_sheet(rows: list[list[Any]]) -> None:
    while rows and not rows[-1]:
        rows.pop()


def _read_xlsx(data: bytes, budget: _Budget, out: dict[str, Any]) -> None:
    import openpyxl

    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True, keep_links=False, keep_vba=False)
    try:
        out["title"] = budget.take(book.properties.title or "", line=False)
        sheets: dict[str, list[list[Any]]] = {}
        out["sheets"] = sheets
        for sheet in book.worksheets:
            rows: list[list[Any]] = []
            sheets[sheet.title] = rows
            budget.take(sheet.title)
            if hasattr(sheet, "reset_dimensions"):
                sheet.reset_dimensions()  # the <dimension> tag is the file's claim, not a fact: never pad to it
            try:
                for values in sheet.iter_rows(values_only=True):
                    budget.cell(1 + len(values))
                    row = _trimmed([_cell_value(v) for v in values])
                    for v in row:
                        if isinstance(v, str):
                            budget.take(v, line=False)
                    rows.append(row)
                    budget.line("\t".join("" if v is None else str(v) for v in row))
            finally:
                _finish_sheet(rows)
    finally:
        book.close()


def _parsed(data: bytes, where: str, name: str) -> Any:
    """Entry `name` of the file at `where` parsed by the pack's own safe parser, and checked again for a DTD."""
    from lxml import etree

    try:
        root = etree.fromstring(data, parser=_safe_parser())
    except etree.XMLSyntaxError:
        raise InvalidArgument(f"{where!r}: its {name} is not well-formed XML") from None
    _check_parsed(name, root)
    return root


def _odf_root(archive: _Archive, name: str) -> Any:
    return _parsed(archive.read(name), archive.where, name) if name in archive.names else None


def _odf_text(element: Any, budget: _Budget) -> str:
    """The text of an ODF paragraph-like element: spans followed, text:s/tab/line-break expanded."""
    parts: list[str] = []

    def walk(node: Any) -> None:
        if node.text:
            parts.append(budget.take(node.text, line=False))
        for child in node:
            if not isinstance(child.tag, str):
                pass
            elif child.tag == _q("text", "s"):
                count = child.get(_q("text", "c"), "1")
                n = int(count) if count.isdigit() else 1
                parts.append(budget.take(" " * min(n, budget.chars + 1), line=False))
            elif child.tag == _q("text", "tab"):
                parts.append(budget.take("\t", line=False))
            elif child.tag == _q("text", "line-break"):
                parts.append(budget.take("\n", line=False))
            elif child.tag in (_q("office", "annotation"), _q("text", "note")):
                pass  # comments and footnotes are not the running text
            else:
                walk(child)
            if child.tail:
                parts.append(budget.take(child.tail, line=False))

    walk(element)
    return "".join(parts)


def _repeat(element: Any, attribute: str) -> int:
    value = element.get(_q("table", attribute), "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


_ROW_GROUPS = frozenset(_q("table", t) for t in ("table-header-rows", "table-rows", "table-row-group"))


def _odf_table_rows(table: Any) -> Iterator[Any]:
    """The rows of a table, through row groups, not those of tables nested in its cells."""
    for child in table:
        if child.tag == _q("table", "table-row"):
            yield child
        elif child.tag in _ROW_GROUPS:
            yield from _odf_table_rows(child)


def _odf_rows(table: Any, budget: _Budget, value: Callable[[Any], Any], rows: list[list[Any]]) -> None:
    """A table's rows, appended to `rows` as they come; repeated rows and cells expanded only as far as something
    follows them, and counted against the budget before they are: a row costs one cell plus its width, and the
    characters of its line (numbers and tabs too), for every copy. Copies of a repeated row are made only as far
    as the budget goes; then the answer stops there (truncated)."""
    pending_rows = 0
    for row in _odf_table_rows(table):
        cells: list[Any] = []
        pending = 0
        for cell in row:
            if cell.tag not in (_q("table", "table-cell"), _q("table", "covered-table-cell")):
                continue
            times = _repeat(cell, "number-columns-repeated")
            got = value(cell)
            if got is None or got == "":
                pending += times  # trailing empties are never materialised
                continue
            budget.cell(pending + times)
            if isinstance(got, str):  # counted once when read; each further copy counts too
                budget.chars -= len(got) * (times - 1)
                if budget.chars < 0:
                    raise _Full
            cells.extend([None] * pending)
            cells.extend([got] * times)
            pending = 0
        times = _repeat(row, "number-rows-repeated")
        if not cells:
            pending_rows += times
            continue
        budget.cell(pending_rows + 1)  # the empty rows before it (one cell each), and this row (its cells are counted)
        line = "\t".join("" if v is None else str(v) for v in cells)
        counted = sum(len(v) for v in cells if isinstance(v, str))  # the text of its cells, counted as it was read
        budget.chars -= len(line) - counted  # its numbers, true/false and tabs
        if budget.chars < 0:
            raise _Full
        rows.extend([] for _ in range(pending_rows))
        pending_rows = 0
        rows.append(cells)
        budget.line(line)
        copies = times - 1
        if copies:  # each copy costs what the row does: cells, the row itself, every character of its line
            cost = len(cells) + 1
            fit = min(copies, budget.cells // cost, budget.chars // len(line) if line else copies)
            budget.cells -= fit * cost
            budget.chars -= fit * len(line)
            for _ in range(fit):
                rows.append(list(cells))
                budget.line(line)
            if fit < copies:
                raise _Full


def _ods_value(budget: _Budget) -> Callable[[Any], Any]:
    def value(cell: Any) -> Any:
        kind = cell.get(_q("office", "value-type"))
        # Text answered from an attribute is counted like a cell's text (numbers and true/false are counted by
        # _odf_rows, in the row's line).
        if kind in ("float", "percentage", "currency"):
            raw = cell.get(_q("office", "value"), "")
            try:
                number = float(raw)
            except ValueError:
                return budget.take(raw, line=False)
            if len(raw) <= 40 and re.fullmatch(r"[+-]?\d+", raw.strip()) and abs(number) <= MAX_EXACT_INT:
                return int(raw)
            return number if math.isfinite(number) else budget.take(raw, line=False)
        if kind == "boolean":
            return cell.get(_q("office", "boolean-value"), "").lower() == "true"
        if kind in ("date", "time"):
            found = cell.get(_q("office", f"{kind}-value"))
            return None if found is None else budget.take(found, line=False)
        return _odf_cell_text(cell, budget)

    return value


def _odf_cell_text(cell: Any, budget: _Budget) -> str | None:
    """A table cell's paragraphs, one line each (None: no paragraph at all)."""
    paragraphs = [_odf_text(p, budget) for p in cell.iter(_q("text", "p"), _q("text", "h"))]
    return "\n".join(paragraphs) if paragraphs else None


def _odf_meta_title(archive: _Archive, budget: _Budget) -> str:
    meta = _odf_root(archive, "meta.xml")
    if meta is None:
        return ""
    title = meta.find(f".//{_q('dc', 'title')}")
    return budget.take(title.text or "", line=False) if title is not None else ""


def _odf_body(archive: _Archive, kind: str) -> Any:
    content = _odf_root(archive, "content.xml")
    body = None if content is None else content.find(f"{_q('office', 'body')}/{_q('office', kind)}")
    if body is None:
        raise InvalidArgument(f"{archive.where!r} has no office:{kind} body in its content.xml; not a readable "
                              "OpenDocument file")
    return body


def _read_odt(archive: _Archive, budget: _Budget, out: dict[str, Any]) -> None:
    out["title"] = _odf_meta_title(archive, budget)
    blocks: list[dict[str, Any]] = []
    out["blocks"] = blocks

    def cell_text(cell: Any) -> str | None:
        return _odf_cell_text(cell, budget)

    def paragraph(element: Any) -> str:
        text = _odf_text(element, budget)
        budget.line(text)
        return text

    def visit(container: Any) -> None:
        for element in container:
            if not isinstance(element.tag, str):
                continue
            budget.cell()
            if element.tag == _q("text", "h"):
                level = element.get(_q("text", "outline-level"), "1")
                blocks.append({"heading": paragraph(element), "level": int(level) if level.isdigit() else 1})
            elif element.tag == _q("text", "p"):
                style = element.get(_q("text", "style-name"), "")
                text = paragraph(element)
                blocks.append({"heading": text, "level": 0} if style == "Title" else {"paragraph": text})
            elif element.tag == _q("text", "list"):
                items: list[str] = []
                blocks.append({"bullets": items})
                for item in element.iter(_q("text", "p"), _q("text", "h")):
                    budget.cell()
                    items.append(paragraph(item))
            elif element.tag == _q("table", "table"):
                rows: list[list[Any]] = []
                blocks.append({"table": rows})
                full = False
                try:
                    _odf_rows(element, budget, cell_text, rows)
                except _Full:
                    full = True
                # Squared like a whole table (one cut short too), the padding counted as cells: rows past what
                # the budget pads are dropped and the answer is marked truncated.
                width = max((len(row) for row in rows), default=0)
                padding = kept = 0
                for row in rows:
                    if padding + width - len(row) > budget.cells:
                        full = True
                        break
                    padding += width - len(row)
                    kept += 1
                del rows[kept:]
                budget.cells -= padding
                rows[:] = [["" if v is None else v for v in row] + [""] * (width - len(row)) for row in rows]
                if full:
                    raise _Full
            elif element.tag == _q("text", "section"):
                visit(element)

    visit(_odf_body(archive, "text"))


def _read_ods(archive: _Archive, budget: _Budget, out: dict[str, Any]) -> None:
    out["title"] = _odf_meta_title(archive, budget)
    sheets: dict[str, list[list[Any]]] = {}
    out["sheets"] = sheets
    value = _ods_value(budget)
    for table in _odf_body(archive, "spreadsheet").iterchildren(_q("table", "table")):
        name = table.get(_q("table", "name"), f"Sheet{len(sheets) + 1}")
        budget.take(name)
        rows: list[list[Any]] = []
        sheets[name] = rows
        try:
            _odf_rows(table, budget, value, rows)  # no row ends in an empty cell: empties are only written before others
        finally:
            _finish_sheet(rows)


# ---- the pack ----------------------------------------------------------------------------------------------------


class DocumentsPack(Pack):
    """The `documents.*` capabilities: render documents into the files pack's root, and read them back."""

    name = "documents"
    libraries = ("docx", "openpyxl", "pptx", "lxml", "odf")

    def __init__(self, context: PackContext):
        super().__init__(context)
        self._limits = {key: self._setting(key) for key in DEFAULTS}
        self._pending = 0  # renders and reads in (or waiting for) a thread
        self._pending_lock = threading.Lock()

    async def _in_thread(self, work: Callable[[], Any]) -> Any:
        """`work()` in a thread, at most max_pending at once: one more is refused rather than queued (each
        holds a document's memory). A slot is given back when the thread ends, not when its caller stops waiting."""
        with self._pending_lock:
            if self._pending >= self._limits["max_pending"]:
                raise _Refusal(f"the documents pack is busy with {self._pending} renders and reads (setting "
                               "documents.max_pending); try again shortly")
            self._pending += 1
        state = {"started": False, "abandoned": False}

        def run() -> Any:
            with self._pending_lock:
                if state["abandoned"]:
                    return None
                state["started"] = True
            try:
                return work()
            finally:
                with self._pending_lock:
                    self._pending -= 1

        try:
            return await asyncio.to_thread(run)
        finally:
            with self._pending_lock:
                if not state["started"]:  # cancelled before its thread began: it never will
                    state["abandoned"] = True
                    self._pending -= 1

    def _setting(self, key: str) -> int:
        value = self.context.settings.get(key, DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise KernelError(f"pack setting documents.{key} must be a positive whole number, not {value!r} "
                              f"(default {DEFAULTS[key]})")
        return value

    @contextmanager
    def _guard(self, caller: str, op: str, path: Any) -> Iterator[None]:
        try:
            yield
        except _Refusal as refusal:
            raise self.context.denied(caller, op, _shown(path), refusal.why) from None

    @staticmethod
    def _check_path(path: Any, fmt: str, op: str) -> None:
        if not isinstance(path, str):
            raise InvalidArgument(f"path must be a string such as 'reports/q1.{fmt}', not {_kind_of(path)}")
        if not path.lower().endswith(f".{fmt}"):
            raise InvalidArgument(f"{op} writes a .{fmt} file, so path {_shown(path)!r} must end in '.{fmt}' "
                                  f"(e.g. 'reports/q1.{fmt}')")

    async def _write(self, caller: str, op: str, fmt: str, path: Any, render: Callable[[], bytes]) -> dict:
        with self._guard(caller, op, path):
            self._check_path(path, fmt, op)
            try:
                data = await self._in_thread(render)
            except (KernelError, _Refusal):
                raise
            except Exception as exc:  # a library refused what the checks let through: still the caller's answer
                raise KernelError(f"{op} could not render the {fmt}: {type(exc).__name__}: {str(exc)[:200]}") from exc
            limit = self._limits["max_output_bytes"]
            if len(data) > limit:
                raise _Refusal(f"the rendered {fmt} is {len(data)} bytes, more than {limit} (setting "
                               "documents.max_output_bytes); write a smaller document or raise the setting")
        written = await self.context.peer("files").write(caller, path, base64.b64encode(data).decode("ascii"), "base64")
        self.context.audit(caller, op, written["path"], True,
                           f"{fmt}, {written['size']} bytes, sha256 {written['sha256']}")
        return {**written, "format": fmt}

    @implements("documents.write_docx")
    async def write_docx(self, caller: str, path: str, title: str, blocks: list[dict]) -> dict:
        """Render a Word document (title, headings, paragraphs, bullet lists, tables) into the file root."""
        def render() -> bytes:
            tally = _Tally(self._limits)
            text = tally.text(title, "title")
            return _render_docx(text, _blocks(blocks, tally))

        return await self._write(caller, "documents.write_docx", "docx", path, render)

    @implements("documents.write_odt")
    async def write_odt(self, caller: str, path: str, title: str, blocks: list[dict]) -> dict:
        """Render an OpenDocument text (the same blocks as write_docx) into the file root."""
        def render() -> bytes:
            tally = _Tally(self._limits)
            text = tally.text(title, "title")
            return _render_odt(text, _blocks(blocks, tally))

        return await self._write(caller, "documents.write_odt", "odt", path, render)

    @implements("documents.write_xlsx")
    async def write_xlsx(self, caller: str, path: str, sheets: dict) -> dict:
        """Render an Excel workbook ({sheet name: rows of cells}) into the file root; text is never a formula."""
        def render() -> bytes:
            return _render_xlsx(_sheets(sheets, _Tally(self._limits)))

        return await self._write(caller, "documents.write_xlsx", "xlsx", path, render)

    @implements("documents.write_ods")
    async def write_ods(self, caller: str, path: str, sheets: dict) -> dict:
        """Render an OpenDocument spreadsheet (the same sheets as write_xlsx) into the file root."""
        def render() -> bytes:
            return _render_ods(_sheets(sheets, _Tally(self._limits)))

        return await self._write(caller, "documents.write_ods", "ods", path, render)

    @implements("documents.write_pptx")
    async def write_pptx(self, caller: str, path: str, title: str, slides: list[dict]) -> dict:
        """Render a PowerPoint deck (a title slide, then one slide of bullets each) into the file root."""
        def render() -> bytes:
            tally = _Tally(self._limits)
            text = tally.text(title, "title")
            return _render_pptx(text, _slides(slides, tally))

        return await self._write(caller, "documents.write_pptx", "pptx", path, render)

    @implements("documents.read")
    async def read(self, caller: str, path: str) -> dict:
        """The text and structure of a docx, xlsx, pptx, odt or ods file of the root, told by its content."""
        op = "documents.read"
        with self._guard(caller, op, path):
            if not isinstance(path, str):
                raise InvalidArgument(f"path must be a string such as 'reports/q1.docx', not {_kind_of(path)}")
            ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
            if ext in MACRO_EXTENSIONS:
                raise _Refusal(f"{path!r} is named as a macro-enabled document (.{ext}); macro-enabled documents are "
                               "refused")
        got = await self.context.peer("files").read(caller, path, "base64")
        data = base64.b64decode(got["content"])
        with self._guard(caller, op, path):
            answer = await self._in_thread(lambda: self._parse(data, got["path"]))
        return {"path": got["path"], "size": got["size"], "sha256": got["sha256"], **answer}

    def _parse(self, data: bytes, where: str) -> dict[str, Any]:
        archive = _Archive(data, self._limits, where)
        try:
            fmt = archive.detect()
            budget = _Budget(self._limits["max_cells"], self._limits["max_read_chars"])
            out: dict[str, Any] = {"format": fmt, "title": ""}
            truncated = False
            try:
                if fmt in ("odt", "ods"):
                    (_read_odt if fmt == "odt" else _read_ods)(archive, budget, out)
                else:
                    {"docx": _read_docx, "xlsx": _read_xlsx, "pptx": _read_pptx}[fmt](data, budget, out)
            except _Full:
                truncated = True
            except (KernelError, _Refusal):
                raise
            except Exception as exc:  # the library could not make sense of it
                message = str(exc).replace("\n", " ")
                raise InvalidArgument(f"{where!r} could not be read as {fmt}: {type(exc).__name__}: "
                                      f"{message[:200]}") from None
            title = out.get("title") or ""
            lines = budget.text if not title or budget.text[:1] == [title] else [title, *budget.text]
            text = "\n".join(lines)
            return {**out, "text": text, "truncated": truncated}
        finally:
            archive.zip.close()
