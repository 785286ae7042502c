"""The documents pack as a rogue MAD would try it, and as an honest one uses it.

Every format is written into the files pack's root, re-opened with its own library and read back with
`documents.read`; every guard is tried (oversized requests, malformed blocks, formula injection, path escapes,
XXE, zip bombs, macros, expansion while reading, files that are not documents) and each refusal is audited,
leaves nothing behind and leaves the pack working. The packs are built directly on PackContexts under
tmp_path: <tmp>/state/files is the root, <tmp>/outside holds what must never be read or changed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import re
import struct
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docx
import openpyxl
import pptx
import pytest
from lxml import etree
from odf import teletype
from odf.opendocument import load as odf_load
from odf.table import Table, TableCell, TableRow
from odf.text import H, P
from pack_helpers import CALLER, SECRET, SECRET_TEXT, Recorder, outside, owner, refused, run, running, snapshot

from generator.kernel.capabilities import CAPABILITIES, PACKS
from generator.kernel.errors import AccessDenied, InvalidArgument, KernelError
from generator.kernel.packs import IMPL_ATTR, PackContext, load
from generator.kernel.packs.documents import pack as documents_module
from generator.kernel.packs.documents.pack import DEFAULTS, DocumentsPack
from generator.kernel.packs.files.pack import FilesPack

UV_LOCK = Path(__file__).resolve().parents[5] / "uv.lock"

BLOCKS = [
    {"heading": "Findings", "level": 1},
    {"paragraph": "Revenue rose\tby 12%.\nSee the table  below."},
    {"bullets": ["first point", "second point"]},
    {"heading": "Numbers", "level": 2},
    {"table": [["region", "q1", "ok"], ["north", 12, True], ["south", 7.5, None]]},
    {"heading": "Detail", "level": 3},
    {"paragraph": ""},
]
# What documents.read answers for BLOCKS: cells as text, the title as a level-0 heading first.
READ_BLOCKS = [
    {"heading": "Quarterly report", "level": 0},
    *BLOCKS[:4],
    {"table": [["region", "q1", "ok"], ["north", "12", "true"], ["south", "7.5", ""]]},
    *BLOCKS[5:],
]
INJECTIONS = ["=1+1", "=HYPERLINK(\"http://evil.example\",\"click\")", "=cmd|' /c calc'!A0", "+1+1", "-2+3", "@SUM(A1)",
              "#N/A"]
SHEETS = {
    "Data": [["name", "amount", "paid", "note"], ["alice", 3, True, None], ["bob", 2.5, False, "x"], [], [None, None, 7]],
    "Injections": [[s] for s in INJECTIONS],
    "Empty": [],
}
READ_SHEETS = {  # trailing empty cells and rows are not answered; inner ones are
    "Data": [["name", "amount", "paid", "note"], ["alice", 3, True], ["bob", 2.5, False, "x"], [], [None, None, 7]],
    "Injections": [[s] for s in INJECTIONS],
    "Empty": [],
}
SLIDES = [{"title": "Why", "bullets": ["because", "and also"]}, {"title": "How", "bullets": []},
          {"title": "Next"}]


@dataclass
class Env(Recorder):
    tmp: Path
    root: Path
    outside: Path
    files: FilesPack | None = None

    def pack(self, files: dict[str, Any] | None = None, **settings: Any) -> DocumentsPack:
        self.files = FilesPack(self.context(self.root, files or {}))
        peers = {"files": self.files}
        return DocumentsPack(self.context(self.tmp / "state" / "documents", settings, peer=lambda name: peers[name]))

    def put(self, path: str, data: bytes) -> None:
        """A file placed in the root as a MAD owning files could (through the files pack)."""
        assert self.files is not None
        run(self.files.write("horace", path, base64.b64encode(data).decode(), "base64"))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp=tmp_path, root=tmp_path / "state" / "files", outside=outside(tmp_path))


def still_works(env: Env, pack: DocumentsPack) -> None:
    """After a refusal the pack writes and reads as before."""
    done = run(pack.write_docx(CALLER, "alive.docx", "Alive", [{"paragraph": "still here"}]))
    assert done["format"] == "docx" and (env.root / "alive.docx").read_bytes()[:2] == b"PK"
    assert run(pack.read(CALLER, "alive.docx"))["blocks"][-1] == {"paragraph": "still here"}


def rezip(data: bytes, replace: dict[str, bytes | None] | None = None, add: dict[str, bytes] | None = None) -> bytes:
    """`data` (a zip) with entries replaced (None: removed) and added."""
    replace = replace or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in replace:
                if replace[info.filename] is not None:
                    dst.writestr(info.filename, replace[info.filename])
            else:
                dst.writestr(info, src.read(info))
        for name, body in (add or {}).items():
            dst.writestr(name, body)
    return out.getvalue()


def written(env: Env, pack: DocumentsPack, fmt: str, path: str | None = None) -> bytes:
    """Bytes of a fresh, honest document of format `fmt` (written through the pack)."""
    path = path or f"honest.{fmt}"
    if fmt in ("docx", "odt"):
        run(getattr(pack, f"write_{fmt}")(CALLER, path, "Quarterly report", BLOCKS))
    elif fmt in ("xlsx", "ods"):
        run(getattr(pack, f"write_{fmt}")(CALLER, path, SHEETS))
    else:
        run(pack.write_pptx(CALLER, path, "Deck", SLIDES))
    return (env.root / path).read_bytes()


W_NS = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
ODF_NS = ('xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
          'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" '
          'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0"')


def docx_body(inner: str, prolog: str = "") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n{prolog}<w:document {W_NS}><w:body>{inner}'
            "</w:body></w:document>").encode()


def odf_content(inner: str, kind: str = "text", prolog: str = "") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n{prolog}<office:document-content {ODF_NS} office:version="1.2">'
            f"<office:body><office:{kind}>{inner}</office:{kind}></office:body></office:document-content>").encode()


# ---- the pack and its catalogue entries -------------------------------------------------------------------------


def test_capabilities_are_marked_loadable_and_pinned():
    marked = {getattr(v, IMPL_ATTR) for v in vars(DocumentsPack).values() if hasattr(v, IMPL_ATTR)}
    assert marked == {name for name, cap in CAPABILITIES.items() if cap.pack == "documents"}
    assert marked == {f"documents.{op}" for op in ("write_docx", "write_odt", "write_xlsx", "write_ods", "write_pptx",
                                                   "read")}
    assert load("documents") is DocumentsPack
    info = PACKS["documents"]
    assert info.requires == ("files",)
    lock = UV_LOCK.read_text()
    for pin in info.dependencies:
        name, version = pin.split("==")
        assert f'name = "{name}"\nversion = "{version}"' in lock, pin


@pytest.mark.parametrize("key,value", [("max_blocks", 0), ("max_cells", "many"), ("max_output_bytes", True),
                                       ("max_unzipped_bytes", -1), ("max_read_chars", 1.5)])
def test_bad_settings_are_refused_naming_the_setting(env: Env, key: str, value: Any):
    with pytest.raises(KernelError, match=f"documents.{key}"):
        env.pack(**{key: value})
    assert env.pack(**{key: 7})._limits == {**DEFAULTS, key: 7}  # a good value is taken, the rest default


def test_without_the_files_pack_it_says_so(env: Env):
    pack = DocumentsPack(PackContext(ecosystem="eco", folder=env.tmp / "d"))
    with pytest.raises(KernelError, match="'files' capability pack is not loaded"):
        run(pack.write_docx(CALLER, "a.docx", "", []))


# ---- each format, written, re-opened with its own library, read back ---------------------------------------------


def test_docx_round_trip(env: Env):
    pack = env.pack()
    done = run(pack.write_docx(CALLER, "reports/q1.docx", "Quarterly report", BLOCKS))
    data = (env.root / "reports" / "q1.docx").read_bytes()
    assert done == {"path": "reports/q1.docx", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "format": "docx"}
    document = docx.Document(io.BytesIO(data))
    assert document.core_properties.title == "Quarterly report"
    paragraphs = [(p.style.name, p.text) for p in document.paragraphs]
    assert paragraphs == [("Title", "Quarterly report"), ("Heading 1", "Findings"),
                          ("Normal", "Revenue rose\tby 12%.\nSee the table  below."), ("List Bullet", "first point"),
                          ("List Bullet", "second point"), ("Heading 2", "Numbers"), ("Heading 3", "Detail"),
                          ("Normal", "")]
    (table,) = document.tables
    assert [[c.text for c in row.cells] for row in table.rows] == READ_BLOCKS[5]["table"]
    got = run(pack.read(CALLER, "reports/q1.docx"))
    assert got["blocks"] == READ_BLOCKS
    assert (got["format"], got["title"], got["truncated"], got["sha256"]) == ("docx", "Quarterly report", False,
                                                                             done["sha256"])
    assert got["text"].splitlines()[:3] == ["Quarterly report", "Findings", "Revenue rose\tby 12%."]
    assert "north\t12\ttrue" in got["text"]


def test_odt_round_trip(env: Env):
    pack = env.pack()
    done = run(pack.write_odt(CALLER, "q1.odt", "Quarterly report", BLOCKS))
    assert done["format"] == "odt"
    data = (env.root / "q1.odt").read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:  # ODF: the mimetype entry first, stored
        first = z.infolist()[0]
        assert (first.filename, first.compress_type, z.read("mimetype")) == (
            "mimetype", zipfile.ZIP_STORED, b"application/vnd.oasis.opendocument.text")
    document = odf_load(io.BytesIO(data))
    headings = [(h.getAttribute("outlinelevel"), teletype.extractText(h)) for h in document.getElementsByType(H)]
    assert headings == [("1", "Findings"), ("2", "Numbers"), ("3", "Detail")]
    paragraphs = [teletype.extractText(p) for p in document.text.getElementsByType(P)]
    assert paragraphs[:2] == ["Quarterly report", "Revenue rose\tby 12%.\nSee the table  below."]
    (table,) = document.getElementsByType(Table)
    assert [[teletype.extractText(c) for c in r.getElementsByType(TableCell)] for r in table.getElementsByType(TableRow)] \
        == READ_BLOCKS[5]["table"]
    got = run(pack.read(CALLER, "q1.odt"))
    assert got["blocks"] == READ_BLOCKS
    assert (got["format"], got["title"], got["truncated"]) == ("odt", "Quarterly report", False)


def test_xlsx_round_trip_and_text_is_never_a_formula(env: Env):
    pack = env.pack()
    done = run(pack.write_xlsx(CALLER, "book.xlsx", SHEETS))
    data = (env.root / "book.xlsx").read_bytes()
    assert done["format"] == "xlsx" and done["sha256"] == hashlib.sha256(data).hexdigest()
    book = openpyxl.load_workbook(io.BytesIO(data))
    assert book.sheetnames == ["Data", "Injections", "Empty"]
    assert [[c.value for c in row] for row in book["Data"].iter_rows(max_row=3)] == [
        ["name", "amount", "paid", "note"], ["alice", 3, True, None], ["bob", 2.5, False, "x"]]
    injected = [row[0] for row in book["Injections"].iter_rows()]
    assert [c.value for c in injected] == INJECTIONS
    assert {c.data_type for c in injected} == {"s"}  # text, not "f" (formula) nor "e" (error value)
    assert all(c.quotePrefix for c in injected[:6])
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        sheets_xml = b"".join(z.read(n) for n in z.namelist() if n.startswith("xl/worksheets/"))
    assert b"<f>" not in sheets_xml and b"<f " not in sheets_xml and b't="e"' not in sheets_xml
    got = run(pack.read(CALLER, "book.xlsx"))
    assert got["sheets"] == READ_SHEETS
    assert (got["format"], got["truncated"]) == ("xlsx", False)
    assert "alice\t3\tTrue" in got["text"] and "=1+1" in got["text"]


def test_ods_round_trip_and_text_is_never_a_formula(env: Env):
    pack = env.pack()
    done = run(pack.write_ods(CALLER, "book.ods", SHEETS))
    assert done["format"] == "ods"
    data = (env.root / "book.ods").read_bytes()
    document = odf_load(io.BytesIO(data))
    tables = {t.getAttribute("name"): t for t in document.spreadsheet.getElementsByType(Table)}
    assert list(tables) == ["Data", "Injections", "Empty"]
    cells = [r.getElementsByType(TableCell)[0] for r in tables["Injections"].getElementsByType(TableRow)]
    assert [teletype.extractText(c) for c in cells] == INJECTIONS
    assert {c.getAttribute("valuetype") for c in cells} == {"string"}
    assert {c.getAttribute("formula") for c in cells} == {None}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert b"table:formula" not in z.read("content.xml")
    got = run(pack.read(CALLER, "book.ods"))
    assert got["sheets"] == READ_SHEETS
    assert (got["format"], got["truncated"]) == ("ods", False)


def test_pptx_round_trip(env: Env):
    pack = env.pack()
    done = run(pack.write_pptx(CALLER, "deck.pptx", "Deck", SLIDES))
    assert done["format"] == "pptx"
    deck = pptx.Presentation(io.BytesIO((env.root / "deck.pptx").read_bytes()))
    assert deck.core_properties.title == "Deck"
    slides = list(deck.slides)
    assert [s.shapes.title.text for s in slides] == ["Deck", "Why", "How", "Next"]
    assert [p.text for p in slides[1].placeholders[1].text_frame.paragraphs] == ["because", "and also"]
    assert len(slides[0].placeholders) == 1  # the title slide has no empty subtitle placeholder
    got = run(pack.read(CALLER, "deck.pptx"))
    assert got["slides"] == [{"title": "Deck", "bullets": []}, {"title": "Why", "bullets": ["because", "and also"]},
                             {"title": "How", "bullets": []}, {"title": "Next", "bullets": []}]
    assert (got["format"], got["title"], got["text"]) == ("pptx", "Deck", "Deck\nWhy\nbecause\nand also\nHow\nNext")


def test_the_same_input_gives_the_same_bytes(env: Env):
    pack = env.pack()
    formats = ("docx", "odt", "xlsx", "ods", "pptx")
    first = {fmt: written(env, pack, fmt, f"one.{fmt}") for fmt in formats}
    time.sleep(2.1)  # the zip format's clock has two-second steps: a clock in the bytes would show now
    odf_load(io.BytesIO(first["odt"]))  # odfpy's process-wide namespace table grows meanwhile
    for fmt in formats:
        second = written(env, pack, fmt, f"two.{fmt}")
        assert hashlib.sha256(first[fmt]).hexdigest() == hashlib.sha256(second).hexdigest(), fmt
        with zipfile.ZipFile(io.BytesIO(second)) as z:
            assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}, fmt
            if "docProps/core.xml" in z.namelist():
                core = z.read("docProps/core.xml")
                assert re.findall(rb"<dcterms:(?:created|modified)[^>]*>([^<]*)<", core) == [b"1980-01-01T00:00:00Z"] * 2
        other = run(getattr(pack, f"write_{fmt}")(CALLER, f"three.{fmt}", *(
            [{"Data": [["different"]]}] if fmt in ("xlsx", "ods") else
            ["Other title", SLIDES] if fmt == "pptx" else ["Other title", BLOCKS])))
        assert other["sha256"] != hashlib.sha256(second).hexdigest(), fmt


def test_results_match_their_catalogue_shapes(env: Env):
    pack = env.pack()
    for fmt in ("docx", "odt", "xlsx", "ods", "pptx"):
        args = [SHEETS] if fmt in ("xlsx", "ods") else ["Deck", SLIDES] if fmt == "pptx" else ["T", BLOCKS]
        done = run(getattr(pack, f"write_{fmt}")(CALLER, f"shape.{fmt}", *args))
        shape = CAPABILITIES[f"documents.write_{fmt}"].shape
        assert shape is not None and shape.model_validate(done).model_dump() == done
        got = run(pack.read(CALLER, f"shape.{fmt}"))
        read_shape = CAPABILITIES["documents.read"].shape
        assert read_shape is not None and read_shape.model_validate(got).model_dump() == got
        assert {"blocks", "sheets", "slides"} & set(got) == {"blocks" if fmt in ("docx", "odt") else
                                                             "sheets" if fmt in ("xlsx", "ods") else "slides"}


def test_format_is_told_by_content_not_by_name(env: Env):
    pack = env.pack()
    env.put("looks-like.docx", written(env, pack, "xlsx"))
    got = run(pack.read(CALLER, "looks-like.docx"))
    assert got["format"] == "xlsx" and got["sheets"]["Data"][0] == ["name", "amount", "paid", "note"]
    env.put("noext", written(env, pack, "odt"))
    assert run(pack.read(CALLER, "noext"))["format"] == "odt"


# ---- bad requests: clear errors, nothing written ------------------------------------------------------------------


BAD_BLOCKS = [
    ("not a list", r"blocks must be a list"),
    ([["paragraph", "x"]], r"blocks\[0\] must be an object"),
    ([{}], r"blocks\[0\] must have exactly one of .*found none"),
    ([{"paragraph": "a", "heading": "b"}], r"exactly one of .*found 'heading', 'paragraph'"),
    ([{"paragraph": "a", "style": "x"}], r"blocks\[0\] has unknown key\(s\) 'style'"),
    ([{"paragraph": "a", "level": 1}], r"unknown key\(s\) 'level'"),
    ([{"heading": "h", "level": 4}], r"blocks\[0\]\.level must be 1, 2 or 3, not 4"),
    ([{"heading": "h", "level": True}], r"level must be 1, 2 or 3, not True"),
    ([{"heading": "", "level": 1}], r"blocks\[0\]\.heading is empty"),
    ([{"heading": 3}], r"blocks\[0\]\.heading must be text \(a string\), not int"),
    ([{"paragraph": None}], r"paragraph must be text \(a string\), not null"),
    ([{"paragraph": "ok"}, {"paragraph": "bell\x07"}], r"blocks\[1\]\.paragraph contains the character U\+0007"),
    ([{"paragraph": "lone \ud800"}], r"U\+D800"),
    ([{"bullets": "a, b"}], r"blocks\[0\]\.bullets must be a list of strings"),
    ([{"bullets": []}], r"bullets is empty"),
    ([{"bullets": ["a", 2]}], r"blocks\[0\]\.bullets\[1\] must be text"),
    ([{"table": []}], r"table has no rows"),
    ([{"table": [[], []]}], r"only empty rows"),
    ([{"table": ["abc"]}], r"table\[0\] must be a list of cells"),
    ([{"table": [["a", {"b": 1}]]}], r"table\[0\]\[1\] must be text, a number, true/false or null, not dict"),
    ([{"table": [[float("nan")]]}], r"table\[0\]\[0\] is nan"),
]


@pytest.mark.parametrize("blocks,message", BAD_BLOCKS)
@pytest.mark.parametrize("fmt", ["docx", "odt"])
def test_malformed_blocks_are_clear_errors(env: Env, fmt: str, blocks: Any, message: str):
    pack = env.pack()
    with pytest.raises(InvalidArgument, match=message):
        run(getattr(pack, f"write_{fmt}")(CALLER, f"bad.{fmt}", "T", blocks))
    assert not env.root.exists() or not list(env.root.iterdir())
    assert env.denials == []  # bad input is not an access refusal


BAD_SHEETS = [
    ([["a"]], r"sheets must be an object of sheet name to rows"),
    ({}, r"sheets is empty"),
    ({"": []}, r"sheet name '' must be text of 1 to 31"),
    ({"x" * 32: []}, r"1 to 31"),
    ({"a/b": []}, r"may not contain"),
    ({"'quoted'": []}, r"apostrophe"),
    ({"History": []}, r"reserves"),
    ({"Data": [], "DATA": []}, r"used twice"),
    ({"S": "rows"}, r"sheets\['S'\] must be a list of rows"),
    ({"S": [["ok"], "row"]}, r"sheets\['S'\]\[1\] must be a list of cells"),
    ({"S": [[{"x": 1}]]}, r"sheets\['S'\]\[0\]\[0\] must be text, a number, true/false or null, not dict"),
    ({"S": [[[1, 2]]]}, r"not list"),
    ({"S": [[float("inf")]]}, r"is inf, which a spreadsheet cannot hold"),
    ({"S": [[2**53 + 1]]}, r"beyond 2\*\*53.*pass it as a string"),
    ({"S": [["x" * 32_768]]}, r"holds at most 32767"),
    ({"S": [["tab\tok", "nul\x00"]]}, r"sheets\['S'\]\[0\]\[1\] contains the character U\+0000"),
    ({"S": [[None] * 16_385]}, r"at most 16384 columns"),
]


@pytest.mark.parametrize("sheets,message", BAD_SHEETS)
@pytest.mark.parametrize("fmt", ["xlsx", "ods"])
def test_malformed_sheets_are_clear_errors(env: Env, fmt: str, sheets: Any, message: str):
    pack = env.pack()
    with pytest.raises(InvalidArgument, match=message):
        run(getattr(pack, f"write_{fmt}")(CALLER, f"bad.{fmt}", sheets))
    assert not env.root.exists() or not list(env.root.iterdir())
    assert env.denials == []


@pytest.mark.parametrize("slides,message", [
    ({"title": "x"}, r"slides must be a list"),
    (["x"], r"slides\[0\] must be an object"),
    ([{"bullets": []}], r"slides\[0\] has no 'title'"),
    ([{"title": "t", "notes": "n"}], r"unknown key\(s\) 'notes'"),
    ([{"title": "t", "bullets": "a"}], r"slides\[0\]\.bullets must be a list"),
    ([{"title": "t", "bullets": ["\x1b[31m"]}], r"slides\[0\]\.bullets\[0\] contains the character U\+001B"),
])
def test_malformed_slides_are_clear_errors(env: Env, slides: Any, message: str):
    pack = env.pack()
    with pytest.raises(InvalidArgument, match=message):
        run(pack.write_pptx(CALLER, "bad.pptx", "T", slides))
    assert not env.root.exists() or not list(env.root.iterdir())


def test_title_and_path_must_be_right(env: Env):
    pack = env.pack()
    with pytest.raises(InvalidArgument, match=r"title must be text \(a string\), not int"):
        run(pack.write_docx(CALLER, "a.docx", 5, []))
    for path, call in (("a.odt", pack.write_docx(CALLER, "a.odt", "T", [])),
                       ("a.docx.txt", pack.write_docx(CALLER, "a.docx.txt", "T", [])),
                       ("a.xls", pack.write_xlsx(CALLER, "a.xls", {"S": []})),
                       ("a.xlsm", pack.write_xlsx(CALLER, "a.xlsm", {"S": []})),
                       ("a.pptx", pack.write_ods(CALLER, "a.pptx", {"S": []}))):
        with pytest.raises(InvalidArgument, match=r"must end in '\.(docx|xlsx|ods)'") as caught:
            run(call)
        assert path in str(caught.value)
    with pytest.raises(InvalidArgument, match="path must be a string"):
        run(pack.write_pptx(CALLER, None, "T", []))
    with pytest.raises(InvalidArgument, match="path must be a string"):
        run(pack.read(CALLER, ["a.docx"]))
    assert not env.root.exists() or not list(env.root.iterdir())
    assert run(pack.write_docx(CALLER, "UPPER.DOCX", "", []))["path"] == "UPPER.DOCX"  # any case of the extension


# ---- oversized requests: refused before rendering, audited, nothing written --------------------------------------


OVERSIZED = [
    ("max_blocks", 3, "write_docx", ("T", [{"paragraph": "a"}] * 4)),
    ("max_blocks", 3, "write_odt", ("T", [{"bullets": ["a", "b", "c"]}])),  # bullet items count as blocks
    ("max_blocks", 3, "write_pptx", ("T", [{"title": "s", "bullets": ["a", "b", "c", "d"]}])),
    ("max_slides", 2, "write_pptx", ("T", [{"title": "s"}] * 3)),
    ("max_sheets", 2, "write_xlsx", ({"a": [], "b": [], "c": []},)),
    ("max_rows", 5, "write_ods", ({"a": [[1]] * 6},)),
    ("max_cells", 10, "write_xlsx", ({"a": [[1, 2, 3]] * 2, "b": [[1, 2, 3]] * 2},)),
    ("max_cells", 10, "write_docx", ("T", [{"table": [["a"] * 11]}])),
    ("max_text_chars", 100, "write_docx", ("T" * 50, [{"paragraph": "p" * 51}])),
    ("max_text_chars", 100, "write_ods", ({"a": [["x" * 60], ["y" * 60]]},)),
    ("max_output_bytes", 5000, "write_docx", ("T", [])),
    ("max_output_bytes", 1000, "write_ods", ({"a": [["x"]]},)),
]


@pytest.mark.parametrize("key,limit,op,args", OVERSIZED)
def test_oversized_requests_are_refused_and_audited(env: Env, key: str, limit: int, op: str, args: tuple[Any, ...]):
    pack = env.pack(**{key: limit})
    fmt = op.rsplit("_", 1)[1]
    path = f"big/doc.{fmt}"
    before = snapshot(env.tmp)
    why = refused(env, f"documents.{op}", path, getattr(pack, op)(CALLER, path, *args))
    assert f"documents.{key}" in why and str(limit) in why
    assert snapshot(env.tmp) == before and not (env.root / "big").exists()
    assert not [a for a in env.audits if a[3]]  # no success was audited
    small = {"write_docx": ("T", [{"paragraph": "a"}]), "write_odt": ("T", [{"paragraph": "a"}]),
             "write_pptx": ("T", [{"title": "s"}]), "write_xlsx": ({"a": [[1]]},), "write_ods": ({"a": [[1]]},)}[op]
    if key != "max_output_bytes":
        assert run(getattr(pack, op)(CALLER, path, *small))["path"] == path  # and the pack still works


def test_the_files_pack_quota_still_applies(env: Env):
    pack = env.pack(files={"max_file_bytes": 4000})
    why = refused(env, "files.write", "q.docx", pack.write_docx(CALLER, "q.docx", "T", []))
    assert "files.max_file_bytes" in why
    assert not (env.root / "q.docx").exists()
    run(pack.write_ods(CALLER, "small.ods", {"a": [[1]]}))


# ---- path escapes: the files pack's guards, unchanged -------------------------------------------------------------


def test_path_escapes_are_refused_by_the_files_pack(env: Env):
    pack = env.pack()
    (env.tmp / "state").mkdir(parents=True, exist_ok=True)
    env.root.mkdir(parents=True, exist_ok=True)
    (env.root / "out").symlink_to(env.outside, target_is_directory=True)
    (env.root / "planted.docx").symlink_to(env.outside / "secret.txt")
    os.link(env.outside / "secret.txt", env.root / "hard.docx")
    before = snapshot(env.tmp)
    escapes = ["../x.docx", "../../x.docx", "a/../../x.docx", str(env.outside / "x.docx"), "out/x.docx",
               "planted.docx", "hard.docx", "a\\..\\x.docx"]
    for path in escapes:
        refused(env, "files.write", path, pack.write_docx(CALLER, path, "T", [{"paragraph": "pwned"}]))
        refused(env, "files.read", path, pack.read(CALLER, path))
    assert snapshot(env.tmp) == before
    assert (env.outside / "secret.txt").read_bytes() == SECRET and sorted(os.listdir(env.outside)) == ["secret.txt"]
    still_works(env, pack)


# ---- XXE, entity expansion and DTDs ----------------------------------------------------------------------------------


def xxe_docx(env: Env, pack: DocumentsPack, target: str, encoding: str = "utf-8") -> bytes:
    body = docx_body('<w:p><w:r><w:t>before &xxe; after</w:t></w:r></w:p>',
                     f'<!DOCTYPE w:document [<!ENTITY xxe SYSTEM "{target}">]>\n')
    if encoding != "utf-8":
        body = body.decode().replace('encoding="UTF-8"', f'encoding="{encoding.upper()}"').encode(encoding)
    return rezip(written(env, pack, "docx"), {"word/document.xml": body})


def xxe_odt(env: Env, pack: DocumentsPack, target: str) -> bytes:
    content = odf_content("<text:p>before &xxe; after</text:p>",
                          prolog=f'<!DOCTYPE office:document-content [<!ENTITY xxe SYSTEM "{target}">]>\n')
    return rezip(written(env, pack, "odt"), {"content.xml": content})


def test_xxe_in_docx_and_odt_is_refused_and_harmless_even_without_the_scan(env: Env, monkeypatch, capsys):
    pack = env.pack()
    secret_uri = (env.outside / "secret.txt").as_uri()
    crafted = {
        "xxe-secret.docx": xxe_docx(env, pack, secret_uri),
        "xxe-passwd.docx": xxe_docx(env, pack, "file:///etc/passwd"),
        "xxe-utf16.docx": xxe_docx(env, pack, secret_uri, "utf-16"),
        "xxe-secret.odt": xxe_odt(env, pack, secret_uri),
        "xxe-passwd.odt": xxe_odt(env, pack, "file:///etc/passwd"),
    }
    for name, data in crafted.items():
        env.put(name, data)
    for name in crafted:
        why = refused(env, "documents.read", name, pack.read(CALLER, name))
        assert "<!ENTITY>" in why and "root:" not in why
    still_works(env, pack)
    # Without the scan, the pack's own parse (ODF) still sees the DTD and refuses it.
    monkeypatch.setattr(documents_module, "_check_declarations", lambda name, data: data.count(b"<"))
    for name in ("xxe-secret.odt", "xxe-passwd.odt"):
        assert "(<!DOCTYPE>)" in refused(env, "documents.read", name, pack.read(CALLER, name))
    # Behind both, the parsers resolve no entity: nothing of the target ever shows.
    monkeypatch.setattr(documents_module, "_check_parsed", lambda name, root: None)
    for name in crafted:
        got = run(pack.read(CALLER, name))
        shown = repr(got)
        assert SECRET_TEXT not in shown and "root:" not in shown, name
        assert "before" in got["text"]
    # and odfpy's own loader (used by the tests, not by read) refuses entities too, printing nothing
    with pytest.raises(Exception, match="(?i)entit"):
        odf_load(io.BytesIO(crafted["xxe-secret.odt"]))
    printed = capsys.readouterr()
    assert SECRET_TEXT not in printed.out + printed.err


def test_entity_expansion_and_external_dtds_are_refused(env: Env):
    pack = env.pack()
    laughs = '<!ENTITY l0 "lol">' + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    crafted = {
        "laughs.docx": rezip(written(env, pack, "docx"), {"word/document.xml": docx_body(
            "<w:p><w:r><w:t>&l9;</w:t></w:r></w:p>", f"<!DOCTYPE w:document [{laughs}]>")}),
        "dtd.docx": rezip(written(env, pack, "docx"), {"word/document.xml": docx_body(
            "<w:p/>", f'<!DOCTYPE w:document SYSTEM "{(env.outside / "secret.txt").as_uri()}">')}),
        "param.xlsx": rezip(written(env, pack, "xlsx"), {"xl/workbook.xml": (
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><x/>')}),
        "ct.pptx": rezip(written(env, pack, "pptx"), {"[Content_Types].xml": (
            b'<?xml version="1.0"?><!DOCTYPE Types [<!ENTITY a "b">]><Types/>')}),
        "manifest.ods": rezip(written(env, pack, "ods"), {"META-INF/manifest.xml": (
            b'<?xml version="1.0"?><!DOCTYPE manifest:manifest SYSTEM "http://127.0.0.1:9/x.dtd"><m/>')}),
    }
    for name, data in crafted.items():
        env.put(name, data)
        why = refused(env, "documents.read", name, pack.read(CALLER, name))
        assert "(<!ENTITY>)" in why or "(<!DOCTYPE>)" in why
    # the external-only DOCTYPE old OpenOffice manifests carry is no threat and is read
    old = (b'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE manifest:manifest PUBLIC "-//OpenOffice.org//DTD '
           b'Manifest 1.0//EN" "Manifest.dtd">\n')
    ods = written(env, pack, "ods")
    with zipfile.ZipFile(io.BytesIO(ods)) as z:
        manifest = z.read("META-INF/manifest.xml").split(b"\n", 1)[1]
    env.put("old.ods", rezip(ods, {"META-INF/manifest.xml": old + manifest}))
    assert run(pack.read(CALLER, "old.ods"))["sheets"] == READ_SHEETS


# ---- zip bombs --------------------------------------------------------------------------------------------------------


def lying_sizes(data: bytes, name: str, size: int) -> bytes:
    """`data` with the central directory's uncompressed size of entry `name` set to `size` (the local header too)."""
    blob = bytearray(data)
    encoded = name.encode()
    at = 0
    while (at := blob.find(b"PK\x01\x02", at)) >= 0:
        name_len = struct.unpack_from("<H", blob, at + 28)[0]
        if bytes(blob[at + 46: at + 46 + name_len]) == encoded:
            struct.pack_into("<I", blob, at + 24, size)
            local = struct.unpack_from("<I", blob, at + 42)[0]
            struct.pack_into("<I", blob, local + 22, size)
        at += 4
    return bytes(blob)


def test_zip_bombs_are_refused_from_the_directory_before_inflating(env: Env, monkeypatch):
    pack = env.pack(max_zip_entries=50, max_unzipped_bytes=2 << 20)
    honest = written(env, pack, "docx")
    zeros = b"\0" * (3 << 20)  # 3 MiB of zeros: about 3 KiB deflated
    crafted = {
        "many.docx": rezip(honest, add={f"pad/{i}.bin": b"x" for i in range(60)}),
        "big.docx": rezip(honest, add={"word/media/zeros.bin": zeros}),
        "big.ods": rezip(written(env, pack, "ods"), add={"Pictures/zeros.png": zeros}),
        "liar.docx": lying_sizes(honest, "word/document.xml", 0xFFFF_0000),
    }
    assert len(crafted["big.docx"]) < 100_000
    inflated: list[str] = []
    real_open = zipfile.ZipFile.open

    def spying_open(self: zipfile.ZipFile, name: Any, *args: Any, **kwargs: Any) -> Any:
        inflated.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *args, **kwargs)

    for name, data in crafted.items():
        env.put(name, data)
    monkeypatch.setattr(zipfile.ZipFile, "open", spying_open)
    for name in crafted:
        why = refused(env, "documents.read", name, pack.read(CALLER, name))
        assert ("documents.max_zip_entries" in why) if name == "many.docx" else ("documents.max_unzipped_bytes" in why)
    assert inflated == []  # refused from the central directory alone
    monkeypatch.undo()
    still_works(env, pack)


def test_an_entry_larger_than_it_claims_is_damage_not_a_bomb(env: Env):
    pack = env.pack()
    honest = written(env, pack, "docx")
    with zipfile.ZipFile(io.BytesIO(honest)) as z:
        size = z.getinfo("word/document.xml").file_size
    env.put("short.docx", lying_sizes(honest, "word/document.xml", size // 2))
    with pytest.raises(InvalidArgument, match=r"damaged|could not be read"):
        run(pack.read(CALLER, "short.docx"))
    still_works(env, pack)


# ---- macros ---------------------------------------------------------------------------------------------------------


def test_macro_enabled_documents_are_refused(env: Env):
    pack = env.pack()
    docx_bytes = written(env, pack, "docx")
    with zipfile.ZipFile(io.BytesIO(docx_bytes)) as z:
        types = z.read("[Content_Types].xml")
    word_main = b"application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"
    crafted = {
        "vba.docx": rezip(docx_bytes, add={"word/vbaProject.bin": b"\xd0\xcf\x11\xe0 vba"}),
        "typed.docx": rezip(docx_bytes, {"[Content_Types].xml": types.replace(
            word_main, b"application/vnd.ms-word.document.macroEnabled.main+xml")}),
        "xlm.xlsx": rezip(written(env, pack, "xlsx"), {"[Content_Types].xml": None}, add={
            "[Content_Types].xml": (b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
                                    b'content-types"><Override PartName="/xl/macrosheets/sheet1.xml" ContentType='
                                    b'"application/vnd.ms-excel.macrosheet+xml"/></Types>')}),
        "basic.ods": rezip(written(env, pack, "ods"), add={"Basic/Standard/Module1.xml": b"<m/>"}),
        "scripts.odt": rezip(written(env, pack, "odt"), add={"Scripts/python/evil.py": b"import os"}),
    }
    for name, data in crafted.items():
        env.put(name, data)
        why = refused(env, "documents.read", name, pack.read(CALLER, name))
        assert "macro" in why
    for ext in ("docm", "xlsm", "pptm", "dotm"):
        env.put(f"named.{ext}", docx_bytes)
        why = refused(env, "documents.read", f"named.{ext}", pack.read(CALLER, f"named.{ext}"))
        assert f".{ext}" in why and "macro-enabled" in why
    still_works(env, pack)


# ---- files that are not (readable) documents --------------------------------------------------------------------------


def test_files_that_are_not_documents_are_clear_errors(env: Env):
    pack = env.pack()
    honest = written(env, pack, "docx")
    plain_zip = io.BytesIO()
    with zipfile.ZipFile(plain_zip, "w") as z:
        z.writestr("readme.txt", "hi")
    odp = rezip(written(env, pack, "odt"), {"mimetype": b"application/vnd.oasis.opendocument.presentation"})
    with zipfile.ZipFile(io.BytesIO(honest)) as z:
        types = z.read("[Content_Types].xml")
    template = rezip(honest, {"[Content_Types].xml": types.replace(b"document.main+xml", b"template.main+xml")})
    cases = {
        "notes.docx": (b"just some text, not a document\n", r"not a docx, xlsx, pptx, odt or ods document"),
        "legacy.doc": (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600, r"OLE2 compound file"),
        "archive.zip": (plain_zip.getvalue(), r"zip archive but not a docx"),
        "truncated.docx": (honest[: len(honest) // 2], r"not a readable zip archive"),
        "slides.odp": (odp, r"OpenDocument presentation"),
        "template.dotx": (template, r"Word template"),
        "garbled.docx": (rezip(honest, {"word/document.xml": b"<w:document><unclosed>"}), r"could not be read as docx"),
        "nobody.odt": (rezip(written(env, pack, "odt"), {"content.xml": b"<x/>"}), r"no office:text body"),
        "badxml.ods": (rezip(written(env, pack, "ods"), {"content.xml": b"<office:document-content"}),
                       r"content.xml is not well-formed"),
        "ebcdic.docx": (rezip(honest, {"word/document.xml": b'<?xml version="1.0" encoding="EBCDIC-US"?><x/>'}),
                        r"declares the encoding 'EBCDIC-US'"),
    }
    for name, (data, message) in cases.items():
        env.put(name, data)
        with pytest.raises(InvalidArgument, match=message):
            run(pack.read(CALLER, name))
    assert [d for d in env.denials if d[1] == "documents.read"] == []
    still_works(env, pack)


def test_duplicate_and_encrypted_entries_are_refused(env: Env):
    pack = env.pack()
    honest = written(env, pack, "docx")
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(honest)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        with pytest.warns(UserWarning, match="Duplicate name"):
            dst.writestr("word/document.xml", docx_body("<w:p><w:r><w:t>shadow</w:t></w:r></w:p>"))
    env.put("twice.docx", out.getvalue())
    with pytest.raises(InvalidArgument, match="two zip entries of the same name"):
        run(pack.read(CALLER, "twice.docx"))
    blob = bytearray(honest)
    at = blob.find(b"PK\x01\x02")
    struct.pack_into("<H", blob, at + 8, struct.unpack_from("<H", blob, at + 8)[0] | 1)  # the "encrypted" flag
    env.put("locked.docx", bytes(blob))
    with pytest.raises(InvalidArgument, match="encrypted"):
        run(pack.read(CALLER, "locked.docx"))


# ---- expansion while reading: bounded and marked truncated -------------------------------------------------------------


def test_repeats_and_huge_indexes_are_bounded_when_reading(env: Env):
    pack = env.pack(max_cells=5000, max_read_chars=20_000)
    huge = "1000000000"
    crafted = {
        "repeat.ods": rezip(written(env, pack, "ods"), {"content.xml": odf_content(
            f'<table:table table:name="Bomb"><table:table-row table:number-rows-repeated="{huge}">'
            f'<table:table-cell table:number-columns-repeated="{huge}" office:value-type="string"><text:p>xx</text:p>'
            "</table:table-cell></table:table-row></table:table>", "spreadsheet")}),
        "gap.ods": rezip(written(env, pack, "ods"), {"content.xml": odf_content(
            f'<table:table table:name="Gap"><table:table-row table:number-rows-repeated="{huge}"><table:table-cell/>'
            '</table:table-row><table:table-row><table:table-cell office:value-type="float" office:value="1"/>'
            "</table:table-row></table:table>", "spreadsheet")}),
        "spaces.odt": rezip(written(env, pack, "odt"), {"content.xml": odf_content(
            f'<text:p>a<text:s text:c="{huge}"/>b</text:p>')}),
        "row.xlsx": rezip(written(env, pack, "xlsx"), {"xl/worksheets/sheet1.xml": (
            b'<?xml version="1.0"?><worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
            b'<dimension ref="A1:XFD1048576"/><sheetData><row r="1048576"><c r="XFD1048576" t="inlineStr"><is><t>x'
            b"</t></is></c></row></sheetData></worksheet>")}),
        "span.docx": rezip(written(env, pack, "docx"), {"word/document.xml": docx_body(
            f'<w:tbl><w:tr><w:tc><w:tcPr><w:gridSpan w:val="{huge}"/></w:tcPr><w:p><w:r><w:t>wide</w:t></w:r></w:p>'
            "</w:tc></w:tr></w:tbl>")}),
    }
    for name, data in crafted.items():
        env.put(name, data)
    t0 = time.monotonic()
    answers = {name: run(pack.read(CALLER, name)) for name in crafted}
    assert time.monotonic() - t0 < 10
    assert answers["repeat.ods"]["truncated"] and answers["repeat.ods"]["sheets"] == {"Bomb": []}
    assert answers["gap.ods"]["truncated"]
    assert answers["spaces.odt"]["truncated"] and len(answers["spaces.odt"]["text"]) <= 20_000
    assert answers["row.xlsx"]["truncated"]
    assert answers["span.docx"]["blocks"] == [{"table": [["wide"]]}] and not answers["span.docx"]["truncated"]
    assert all(len(repr(a)) < 200_000 for a in answers.values())
    # a read that fits is not marked
    assert run(pack.read(CALLER, "honest.ods"))["truncated"] is False


def test_reads_past_max_read_chars_are_cut_and_marked(env: Env):
    pack = env.pack(max_read_chars=50)
    run(pack.write_docx(CALLER, "long.docx", "", [{"paragraph": "a" * 30}, {"paragraph": "b" * 30}]))
    got = run(pack.read(CALLER, "long.docx"))
    assert got["truncated"] is True and got["blocks"] == [{"paragraph": "a" * 30}] and got["text"] == "a" * 30
    for fmt in ("ods", "xlsx"):  # a sheet cut short keeps the rows read before the cut
        run(getattr(pack, f"write_{fmt}")(CALLER, f"long.{fmt}", {"S": [["x" * 20, 1], ["y" * 20, 2], ["z" * 20, 3]]}))
        got = run(pack.read(CALLER, f"long.{fmt}"))
        assert got["truncated"] is True and got["sheets"] == {"S": [["x" * 20, 1], ["y" * 20, 2]]}, fmt


def ods_repeated_row(width: int, copies: int, cell: str) -> bytes:
    repeated = cell.replace("/>", f' table:number-columns-repeated="{width}"/>')
    return odf_content(f'<table:table table:name="R"><table:table-row table:number-rows-repeated="{copies}">'
                       f"{repeated}</table:table-row></table:table>", "spreadsheet")


def test_a_repeated_ods_row_costs_its_width_and_its_characters_for_every_copy(env: Env):
    pack = env.pack(max_cells=1000, max_read_chars=100_000)
    number = '<table:table-cell office:value-type="float" office:value="1"/>'
    env.put("wide.ods", rezip(written(env, pack, "ods"), {"content.xml": ods_repeated_row(50, 1000, number)}))
    got = run(pack.read(CALLER, "wide.ods"))
    rows = got["sheets"]["R"]
    assert got["truncated"] is True and 0 < len(rows) < 1000 // 50  # copies made only as far as the budget goes
    assert sum(len(r) for r in rows) <= 1000 and rows[0] == [1] * 50
    # numbers (and the tabs between them) cost characters, in every copy
    pack = env.pack(max_cells=100_000, max_read_chars=1000)
    env.put("long.ods", rezip(written(env, pack, "ods"), {"content.xml": ods_repeated_row(10, 1000, number)}))
    got = run(pack.read(CALLER, "long.ods"))
    assert got["truncated"] is True and len(got["text"]) <= 1000 + 60 and len(got["sheets"]["R"]) <= 1000 // 19
    # an odt table squared to its widest row: the padding is counted too
    pack = env.pack(max_cells=500)
    content = odf_content('<table:table table:name="T"><table:table-row>' + "<table:table-cell><text:p>w</text:p>"
                          "</table:table-cell>" * 100 + "</table:table-row>" + "<table:table-row><table:table-cell>"
                          "<text:p>n</text:p></table:table-cell></table:table-row>" * 100 + "</table:table>")
    env.put("square.odt", rezip(written(env, pack, "odt"), {"content.xml": content}))
    got = run(pack.read(CALLER, "square.odt"))
    table = got["blocks"][-1]["table"]
    assert got["truncated"] is True and sum(len(r) for r in table) <= 500 and {len(r) for r in table} == {100}


def test_ods_dates_times_and_unparsable_numbers_count_against_max_read_chars(env: Env):
    pack = env.pack(max_read_chars=1000)
    big = "A" * 600
    for kind, cell in {"date": f'office:value-type="date" office:date-value="{big}"',
                       "time": f'office:value-type="time" office:time-value="{big}"',
                       "float": f'office:value-type="float" office:value="{big}"'}.items():
        cells = f"<table:table-cell {cell}/>" * 5
        env.put(f"{kind}.ods", rezip(written(env, pack, "ods"), {"content.xml": odf_content(
            f'<table:table table:name="S"><table:table-row>{cells}</table:table-row></table:table>', "spreadsheet")}))
        got = run(pack.read(CALLER, f"{kind}.ods"))
        assert got["truncated"] is True and len(repr(got)) < 3000, kind


@pytest.mark.parametrize("fmt", ["docx", "odt"])
def test_a_table_padded_to_its_widest_row_costs_width_x_rows(env: Env, fmt: str):
    pack = env.pack(max_cells=1000)
    table = [[""] * 39 + ["x"]] + [[] for _ in range(39)]  # 40 cells given, 1600 rendered
    why = refused(env, f"documents.write_{fmt}", f"pad.{fmt}", getattr(pack, f"write_{fmt}")(
        CALLER, f"pad.{fmt}", "T", [{"table": table}]))
    assert "documents.max_cells" in why and not (env.root / f"pad.{fmt}").exists()
    many = [[] for _ in range(999)] + [["x"]]  # rows of no cells are still rows: one cell each at least
    refused(env, f"documents.write_{fmt}", f"rows.{fmt}", getattr(pack, f"write_{fmt}")(
        CALLER, f"rows.{fmt}", "T", [{"table": many}, {"table": [["y"]]}]))
    assert run(getattr(pack, f"write_{fmt}")(CALLER, f"ok.{fmt}", "T", [{"table": [["a", "b"], []] * 250}]))


@pytest.mark.parametrize("fmt", ["ods", "xlsx"])
def test_empty_sheet_rows_are_not_free(env: Env, fmt: str):
    pack = env.pack(max_cells=10)
    why = refused(env, f"documents.write_{fmt}", f"e.{fmt}", getattr(pack, f"write_{fmt}")(
        CALLER, f"e.{fmt}", {"a": [[] for _ in range(11)]}))
    assert "documents.max_cells" in why
    assert run(getattr(pack, f"write_{fmt}")(CALLER, f"e.{fmt}", {"a": [[] for _ in range(10)]}))


def test_xml_tags_are_budgeted_before_any_parser_runs(env: Env, monkeypatch):
    pack = env.pack(max_xml_elements=40_000)
    honest = written(env, pack, "docx")
    env.put("many.docx", rezip(honest, {"word/document.xml": docx_body("<w:p/>" * 40_000)}))
    env.put("many.ods", rezip(written(env, pack, "ods"), {"content.xml": odf_content(
        '<table:table table:name="S">' + "<table:table-row/>" * 40_000 + "</table:table>", "spreadsheet")}))
    parsed: list[int] = []
    real_fromstring = etree.fromstring

    def fromstring(text: bytes, *args: Any, **kwargs: Any) -> Any:
        parsed.append(len(text))
        return real_fromstring(text, *args, **kwargs)

    monkeypatch.setattr(docx, "Document", lambda *a, **k: parsed.append(-1))
    monkeypatch.setattr(etree, "fromstring", fromstring)  # the lxml the pack imports on first use
    for name in ("many.docx", "many.ods"):
        why = refused(env, "documents.read", name, pack.read(CALLER, name))
        assert "documents.max_xml_elements" in why and "40000" in why
    assert all(0 <= n < 40_000 for n in parsed)  # only [Content_Types].xml, before the parts it names
    monkeypatch.undo()
    assert run(pack.read(CALLER, "honest.docx"))["blocks"] == READ_BLOCKS
    # the paragraphs a reader does parse are counted as cells: an empty one too
    pack = env.pack(max_cells=100)
    env.put("empty.docx", rezip(honest, {"word/document.xml": docx_body("<w:p/>" * 1000)}))
    got = run(pack.read(CALLER, "empty.docx"))
    assert got["truncated"] is True and len(got["blocks"]) <= 100


def test_renders_and_reads_at_once_are_capped_by_max_pending(env: Env):
    pack = env.pack(max_pending=1)
    written(env, pack, "docx")
    gate = threading.Event()
    real = pack._parse

    def slow(data: bytes, where: str) -> Any:
        gate.wait(10)
        return real(data, where)

    pack._parse = slow  # type: ignore[method-assign]

    async def main() -> Any:
        first = asyncio.create_task(pack.read(CALLER, "honest.docx"))
        try:
            while pack._pending == 0:
                await asyncio.sleep(0.01)
            for coro in (pack.read(CALLER, "honest.docx"), pack.write_odt(CALLER, "busy.odt", "T", [])):
                with pytest.raises(AccessDenied, match="documents.max_pending"):
                    await coro
        finally:
            gate.set()
        return await first

    assert run(main())["blocks"] == READ_BLOCKS
    assert [d[1:3] for d in env.denials] == [("documents.read", "honest.docx"), ("documents.write_odt", "busy.odt")]
    assert pack._pending == 0 and not (env.root / "busy.odt").exists()
    still_works(env, pack)


def test_no_xml_part_skips_the_declaration_scan(env: Env, monkeypatch):
    pack = env.pack()
    honest = written(env, pack, "docx")
    evil = docx_body("<w:p><w:r><w:t>&x;</w:t></w:r></w:p>", '<!DOCTYPE w:document [<!ENTITY x "y">]>')
    crafted = {  # UTF-32 without a byte order mark, in libxml2's four byte orders (one it parses)
        "le.docx": evil.decode().replace("UTF-8", "UTF-32").encode("utf-32-le"),
        "be.docx": evil.decode().replace("UTF-8", "UTF-32").encode("utf-32-be"),
        "nul.docx": evil.replace(b"<!DOCTYPE", b"<\0!DOCTYPE"),
    }
    for name, body in crafted.items():
        env.put(name, rezip(honest, {"word/document.xml": body}))
        with pytest.raises(InvalidArgument, match="UTF-32|NUL bytes"):
            run(pack.read(CALLER, name))
    # a part typed by an override whose name differs only in case (python-docx matches it), or named as anything
    with zipfile.ZipFile(io.BytesIO(honest)) as z:
        types, rels = z.read("[Content_Types].xml"), z.read("word/_rels/document.xml.rels")
    odd = rels.replace(b'Target="styles.xml"', b'Target="Styles.bin"')
    for name, extra in {"case.docx": b'<Override PartName="/WORD/STYLES.BIN" ContentType="application/vnd.'
                        b'openxmlformats-officedocument.wordprocessingml.styles+xml"/>', "sniffed.docx": b""}.items():
        env.put(name, rezip(honest, {"word/styles.xml": None, "[Content_Types].xml": types.replace(
            b"</Types>", extra + b"</Types>"), "word/_rels/document.xml.rels": odd}, add={
            "word/Styles.bin": b'<?xml version="1.0"?><!DOCTYPE w:styles [<!ENTITY a "b">]><w:styles/>'}))
        assert "(<!ENTITY>)" in refused(env, "documents.read", name, pack.read(CALLER, name))
    with monkeypatch.context() as patch:  # the override alone (the first bytes not looked at) finds it too
        patch.setattr(documents_module._Archive, "looks_like_xml", lambda self, name: False)
        assert "(<!ENTITY>)" in refused(env, "documents.read", "case.docx", pack.read(CALLER, "case.docx"))
    # binary entries that only start like XML are left alone
    env.put("bin.docx", rezip(honest, add={"word/media/blob.bin": b"<a\x00\x01\x02" * 100}))
    assert run(pack.read(CALLER, "bin.docx"))["blocks"] == READ_BLOCKS


# ---- what the operator is told ------------------------------------------------------------------------------------------


def test_audit_of_writes_reads_and_refusals(env: Env):
    pack = env.pack()
    body = "confidential paragraph"
    done = run(pack.write_docx(CALLER, "r.docx", "T", [{"paragraph": body}]))
    run(pack.read(CALLER, "r.docx"))
    mine = [a for a in env.audits if a[1].startswith("documents.")]
    assert mine == [(CALLER, "documents.write_docx", "r.docx", True, f"docx, {done['size']} bytes, sha256 {done['sha256']}")]
    files_audit = [a for a in env.audits if a[1] == "files.write"]
    assert [a[:4] for a in files_audit] == [(CALLER, "files.write", "r.docx", True)]  # the write, as the caller
    assert all(body not in a[4] for a in env.audits)
    assert env.denials == []
    env.put("m.docm", (env.root / "r.docx").read_bytes())
    with pytest.raises(AccessDenied) as caught:
        run(pack.read("other-mad", "m.docm"))
    assert env.denials == [("other-mad", "documents.read", "m.docm", str(caught.value))]


# ---- the pack in a runtime: a MAD owning documents writes, a MAD owning files reads ---------------------------------------


def test_a_mad_owning_documents_writes_into_the_file_root_through_the_runtime(tmp_path, eco_modules):
    kernel = eco_modules[1]
    Gates = owner(kernel, "gates", "writes the reports", "documents")
    Horace = owner(kernel, "horace", "keeps the files", "files")

    async def main():
        async with running(eco_modules, tmp_path / "state", Gates, Horace,
                           pack_settings={"documents": {"max_blocks": 5}}) as runtime:
            assert set(runtime.packs) == {"documents", "files"}
            gates, horace = runtime.mad("gates"), runtime.mad("horace")
            done = await gates.use("documents.write_docx", path="reports/q1.docx", title="Q1",
                                   blocks=[{"heading": "Summary", "level": 1}, {"paragraph": "All good."}])
            assert done["path"] == "reports/q1.docx" and done["format"] == "docx"
            got = await horace.use("files.read", path="reports/q1.docx", encoding="base64")
            assert got["sha256"] == done["sha256"]
            document = docx.Document(io.BytesIO(base64.b64decode(got["content"])))
            assert [p.text for p in document.paragraphs] == ["Q1", "Summary", "All good."]
            assert (await gates.use("documents.read", path="reports/q1.docx"))["blocks"][1:] == [
                {"heading": "Summary", "level": 1}, {"paragraph": "All good."}]
            with pytest.raises(kernel.AccessDenied, match="documents.max_blocks"):  # the config's setting
                await gates.use("documents.write_odt", path="big.odt", title="", blocks=[{"paragraph": "x"}] * 6)
            with pytest.raises(kernel.AccessDenied):
                await gates.use("documents.write_docx", path="../escape.docx", title="", blocks=[])
            with pytest.raises(kernel.AccessDenied, match="may not use files.read"):  # documents is not files
                await gates.use("files.read", path="reports/q1.docx")
            with pytest.raises(kernel.AccessDenied, match="may not use documents.write_docx"):
                await runtime.mad("rogers").use("documents.write_docx", path="r.docx", title="", blocks=[])
            return runtime.db.query("SELECT actor, action, subject, ok FROM audit_log WHERE action LIKE 'documents.%' "
                                    "OR action LIKE 'files.%' OR subject LIKE 'documents.%' OR subject LIKE 'files.%' "
                                    "ORDER BY id")

    rows = asyncio.run(main())
    landed = tmp_path / "state" / "files" / "reports" / "q1.docx"  # the files pack's root: <state>/files
    assert docx.Document(str(landed)).core_properties.title == "Q1"
    assert not (tmp_path / "state" / "escape.docx").exists() and not (tmp_path / "escape.docx").exists()
    assert {"actor": "gates", "action": "files.write", "subject": "reports/q1.docx", "ok": 1} in rows
    assert {"actor": "gates", "action": "documents.write_docx", "subject": "reports/q1.docx", "ok": 1} in rows
    assert [(r["action"], r["subject"]) for r in rows if r["ok"] == 0 and r["actor"] == "gates"] == [
        ("documents.write_odt", "big.odt"), ("files.write", "../escape.docx"), ("kernel.use", "files.read")]
    assert {"actor": "rogers", "action": "kernel.use", "subject": "documents.write_docx", "ok": 0} in rows
