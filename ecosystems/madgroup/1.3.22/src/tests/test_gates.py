"""End-to-end tests of Gates: every tool, called over MCP on a running ecosystem."""

import pytest

from harness import ToolCallError

from conftest import tool_for

pytestmark = pytest.mark.requirement('R15')


def test_write_docx(eco):
    """gates.write_docx: Write a Word document (a title, then headings, paragraphs, bullet lists and tables) into the file root."""
    import base64
    import hashlib
    import io

    from conftest import query

    blocks = [
        {"heading": "Findings", "level": 1},
        {"paragraph": "All systems nominal."},
        {"bullets": ["first point", "second point"]},
        {"heading": "Scores", "level": 2},
        {"table": [["name", "score"], ["ada", "=1+1"]]},
    ]
    path = "gates/docx/report.docx"
    written = eco.call("gates.write_docx", path=path, title="Quarterly report", blocks=blocks)
    assert set(written) == {"path", "size", "sha256", "format"}
    assert written["path"] == path and written["format"] == "docx" and written["size"] > 0
    # read back as it was written: the title first (a level-0 heading), the formula-looking cell as text
    got = eco.call(tool_for("documents.read"), path=path)
    assert (got["format"], got["title"], got["truncated"]) == ("docx", "Quarterly report", False)
    assert (got["size"], got["sha256"]) == (written["size"], written["sha256"])
    assert got["blocks"] == [{"heading": "Quarterly report", "level": 0}, *blocks]
    assert got["text"] == ("Quarterly report\nFindings\nAll systems nominal.\nfirst point\nsecond point\nScores\n"
                           "name\tscore\nada\t=1+1")
    # the same input gives the same bytes, at another path and over the first
    for again_path in ("gates/docx/report-again.docx", path):
        again = eco.call("gates.write_docx", path=again_path, title="Quarterly report", blocks=blocks)
        assert (again["size"], again["sha256"]) == (written["size"], written["sha256"])
    # guards: the extension must be the format's, the path inside the root, the blocks well formed
    with pytest.raises(ToolCallError, match=r"\.docx"):
        eco.call("gates.write_docx", path="gates/docx/report.odt", title="t", blocks=blocks)
    for escape in ("../escaped.docx", "/tmp/escaped.docx", "gates/../../escaped.docx"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("gates.write_docx", path=escape, title="t", blocks=blocks)
    bad = "gates/docx/bad.docx"
    with pytest.raises(ToolCallError, match=r"blocks\[1\]\.level"):
        eco.call("gates.write_docx", path=bad, title="t", blocks=[{"paragraph": "ok"}, {"heading": "h", "level": 7}])
    with pytest.raises(ToolCallError, match=r"blocks\[0\].*'colour'"):
        eco.call("gates.write_docx", path=bad, title="t", blocks=[{"paragraph": "p", "colour": "red"}])
    with pytest.raises(ToolCallError, match=r"blocks\[0\]\.table\[0\]\[1\]"):
        eco.call("gates.write_docx", path=bad, title="t", blocks=[{"table": [["a", {"x": 1}]]}])
    # oversized: 10000 bullet items and their block exceed documents.max_blocks: refused, and audited
    with pytest.raises(ToolCallError, match="max_blocks"):
        eco.call("gates.write_docx", path=bad, title="t", blocks=[{"bullets": ["x"] * 10000}])
    refused = query(eco.state_dir, "SELECT actor, ok FROM audit_log WHERE action = ? AND subject = ?",
                    ("documents.write_docx", bad))
    assert refused and all(row["ok"] == 0 and row["actor"] == "gates" for row in refused)
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call(tool_for("documents.read"), path=bad)  # no refused request wrote anything
    # still working: the bytes, fetched through the files pack, re-open with python-docx
    raw = base64.b64decode(eco.call(tool_for("files.read"), path=path, encoding="base64")["content"])
    assert hashlib.sha256(raw).hexdigest() == written["sha256"] and len(raw) == written["size"]
    import docx

    document = docx.Document(io.BytesIO(raw))
    assert document.core_properties.title == "Quarterly report"
    assert [(p.style.name, p.text) for p in document.paragraphs] == [
        ("Title", "Quarterly report"), ("Heading 1", "Findings"), ("Normal", "All systems nominal."),
        ("List Bullet", "first point"), ("List Bullet", "second point"), ("Heading 2", "Scores"),
    ]
    table = [[cell.text for cell in row.cells] for row in document.tables[0].rows]
    assert table == [["name", "score"], ["ada", "=1+1"]]


def test_write_xlsx(eco):
    """gates.write_xlsx: Write an Excel workbook (sheet name -> rows) into the file root; text is never a formula."""
    import base64
    import hashlib
    import io
    import zipfile

    from conftest import query

    sheets = {
        "Data": [["name", "score", "passed"], ["ada", 3, True], ["bob", 2.5, None, "=1+1"]],
        "Risky": [['=HYPERLINK("http://127.0.0.1/","click")'], ["+1+1"], ["-2+3"], ["@SUM(A1)"], ["#N/A"], [False, -7]],
    }
    path = "gates/xlsx/book.xlsx"
    written = eco.call("gates.write_xlsx", path=path, sheets=sheets)
    assert set(written) == {"path", "size", "sha256", "format"}
    assert written["path"] == path and written["format"] == "xlsx" and written["size"] > 0
    # read back cell for cell: numbers and booleans as they were, every formula-looking string as that string
    got = eco.call(tool_for("documents.read"), path=path)
    assert (got["format"], got["truncated"]) == ("xlsx", False)
    assert (got["size"], got["sha256"]) == (written["size"], written["sha256"])
    assert got["sheets"] == sheets
    # the same input gives the same bytes, at another path and over the first
    for again_path in ("gates/xlsx/book-again.xlsx", path):
        again = eco.call("gates.write_xlsx", path=again_path, sheets=sheets)
        assert (again["size"], again["sha256"]) == (written["size"], written["sha256"])
    # guards: the extension must be the format's (a macro-enabled name too), the path inside the root, cells sound
    for wrong in ("gates/xlsx/book.ods", "gates/xlsx/book.xlsm"):
        with pytest.raises(ToolCallError, match=r"\.xlsx"):
            eco.call("gates.write_xlsx", path=wrong, sheets=sheets)
    for escape in ("../escaped.xlsx", "/tmp/escaped.xlsx", "gates/../../escaped.xlsx"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("gates.write_xlsx", path=escape, sheets=sheets)
    bad = "gates/xlsx/bad.xlsx"
    with pytest.raises(ToolCallError, match="sheet name"):
        eco.call("gates.write_xlsx", path=bad, sheets={"a/b": [["x"]]})
    with pytest.raises(ToolCallError, match=r"\[1\]\[0\].*2\*\*53"):
        eco.call("gates.write_xlsx", path=bad, sheets={"Data": [["ok"], [2**60]]})
    with pytest.raises(ToolCallError, match=r"\[0\]\[0\]"):
        eco.call("gates.write_xlsx", path=bad, sheets={"Data": [[{"formula": "=1+1"}]]})
    # oversized: 101 sheets exceed documents.max_sheets: refused before rendering, and audited
    with pytest.raises(ToolCallError, match="max_sheets"):
        eco.call("gates.write_xlsx", path=bad, sheets={f"S{n}": [] for n in range(101)})
    refused = query(eco.state_dir, "SELECT actor, ok FROM audit_log WHERE action = ? AND subject = ?",
                    ("documents.write_xlsx", bad))
    assert refused and all(row["ok"] == 0 and row["actor"] == "gates" for row in refused)
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call(tool_for("documents.read"), path=bad)  # no refused request wrote anything
    # still working: the bytes, fetched through the files pack, re-open with openpyxl, and no cell is a formula
    raw = base64.b64decode(eco.call(tool_for("files.read"), path=path, encoding="base64")["content"])
    assert hashlib.sha256(raw).hexdigest() == written["sha256"] and len(raw) == written["size"]
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        parts = [archive.read(n) for n in archive.namelist() if n.startswith("xl/worksheets/")]
    assert len(parts) == 2 and not any(b"<f>" in part or b"<f " in part for part in parts)
    import openpyxl

    book = openpyxl.load_workbook(io.BytesIO(raw))
    assert book.sheetnames == ["Data", "Risky"]
    assert [list(row) for row in book["Data"].iter_rows(values_only=True)] == [
        ["name", "score", "passed", None], ["ada", 3, True, None], ["bob", 2.5, None, "=1+1"],
    ]
    formula = book["Data"]["D3"]
    assert (formula.value, formula.data_type, formula.quotePrefix) == ("=1+1", "s", True)
    risky = [row[0] for row in book["Risky"].iter_rows(max_row=5)]
    assert [(c.value, c.data_type) for c in risky] == [(row[0], "s") for row in sheets["Risky"][:5]]
    assert [c.quotePrefix for c in risky] == [True, True, True, True, False]


def test_write_pptx(eco):
    """gates.write_pptx: Write a PowerPoint deck (a title slide, then one slide per {title, bullets}) into the file root."""
    import base64
    import hashlib
    import io

    from conftest import query

    slides = [{"title": "Agenda", "bullets": ["one", "two", "=1+1"]}, {"title": "Close", "bullets": []}]
    path = "gates/pptx/deck.pptx"
    written = eco.call("gates.write_pptx", path=path, title="Status deck", slides=slides)
    assert set(written) == {"path", "size", "sha256", "format"}
    assert written["path"] == path and written["format"] == "pptx" and written["size"] > 0
    # read back: the title slide first, then one slide per entry, bullets as written
    got = eco.call(tool_for("documents.read"), path=path)
    assert (got["format"], got["title"], got["truncated"]) == ("pptx", "Status deck", False)
    assert (got["size"], got["sha256"]) == (written["size"], written["sha256"])
    assert got["slides"] == [{"title": "Status deck", "bullets": []}, *slides]
    assert got["text"] == "Status deck\nAgenda\none\ntwo\n=1+1\nClose"
    # the same input gives the same bytes, at another path and over the first
    for again_path in ("gates/pptx/deck-again.pptx", path):
        again = eco.call("gates.write_pptx", path=again_path, title="Status deck", slides=slides)
        assert (again["size"], again["sha256"]) == (written["size"], written["sha256"])
    # guards: the extension must be the format's (a macro-enabled name too), the path inside the root, slides sound
    for wrong in ("gates/pptx/deck.ppt", "gates/pptx/deck.pptm"):
        with pytest.raises(ToolCallError, match=r"\.pptx"):
            eco.call("gates.write_pptx", path=wrong, title="t", slides=slides)
    for escape in ("../escaped.pptx", "/tmp/escaped.pptx", "gates/../../escaped.pptx"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("gates.write_pptx", path=escape, title="t", slides=slides)
    bad = "gates/pptx/bad.pptx"
    with pytest.raises(ToolCallError, match=r"slides\[1\].*'notes'"):
        eco.call("gates.write_pptx", path=bad, title="t", slides=[{"title": "fine"}, {"title": "x", "notes": "y"}])
    with pytest.raises(ToolCallError, match=r"slides\[0\].*'title'"):
        eco.call("gates.write_pptx", path=bad, title="t", slides=[{"bullets": ["no title"]}])
    with pytest.raises(ToolCallError, match=r"slides\[0\]\.bullets\[0\]"):
        eco.call("gates.write_pptx", path=bad, title="t", slides=[{"title": "x", "bullets": [7]}])
    # oversized: 1001 slides exceed documents.max_slides: refused before rendering, and audited
    with pytest.raises(ToolCallError, match="max_slides"):
        eco.call("gates.write_pptx", path=bad, title="t", slides=[{"title": "s"}] * 1001)
    refused = query(eco.state_dir, "SELECT actor, ok FROM audit_log WHERE action = ? AND subject = ?",
                    ("documents.write_pptx", bad))
    assert refused and all(row["ok"] == 0 and row["actor"] == "gates" for row in refused)
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call(tool_for("documents.read"), path=bad)  # no refused request wrote anything
    # still working: the bytes, fetched through the files pack, re-open with python-pptx
    raw = base64.b64decode(eco.call(tool_for("files.read"), path=path, encoding="base64")["content"])
    assert hashlib.sha256(raw).hexdigest() == written["sha256"] and len(raw) == written["size"]
    import pptx

    deck = pptx.Presentation(io.BytesIO(raw))
    assert deck.core_properties.title == "Status deck"
    assert [slide.shapes.title.text for slide in deck.slides] == ["Status deck", "Agenda", "Close"]
    body = deck.slides[1].placeholders[1].text_frame
    assert [p.text for p in body.paragraphs] == ["one", "two", "=1+1"]


def test_read_document(eco):
    """gates.read_document: Read a docx, xlsx, pptx, odt or ods file of the file root as text and structure."""
    import base64
    import io
    import zipfile

    from conftest import TOOL_FOR, query

    base = "gates/read"

    def denials(path):
        return query(eco.state_dir, "SELECT actor, ok FROM audit_log WHERE action = 'documents.read' AND subject = ?",
                     (path,))

    # refused before anything is read: a path out of the root, a file that is not there, a macro-enabled name
    for escape in ("../ecosystem.db", "/etc/passwd", f"{base}/../../../outside.docx"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("gates.read_document", path=escape)
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call("gates.read_document", path=f"{base}/never-written.docx")
    with pytest.raises(ToolCallError, match="macro"):
        eco.call("gates.read_document", path=f"{base}/invoice.docm")
    assert [(row["actor"], row["ok"]) for row in denials(f"{base}/invoice.docm")] == [("gates", 0)]
    # every format a writer of this ecosystem makes reads back, told by its content
    text_doc = {"title": "Memo", "blocks": [{"paragraph": "read me"}]}
    text_read = {"blocks": [{"heading": "Memo", "level": 0}, {"paragraph": "read me"}]}
    book = {"sheets": {"Sheet": [["read me", 1]]}}
    samples = {  # capability: (request, what documents.read answers of it, its text)
        "documents.write_docx": (text_doc, text_read, "Memo\nread me"),
        "documents.write_odt": (text_doc, text_read, "Memo\nread me"),
        "documents.write_xlsx": (book, book, "Sheet\nread me\t1"),
        "documents.write_ods": (book, book, "Sheet\nread me\t1"),
        "documents.write_pptx": ({"title": "Memo", "slides": [{"title": "read me"}]},
                                 {"slides": [{"title": "Memo", "bullets": []}, {"title": "read me", "bullets": []}]},
                                 "Memo\nread me"),
    }
    # this MAD's own writers when it has some (the others' formats are read back in their own tests)
    mine = ['documents.write_docx', 'documents.write_xlsx', 'documents.write_pptx']
    writers = [c for c in samples if c in mine] or [c for c in samples if c in TOOL_FOR]
    written = {}
    for capability in writers:
        request, structure, text = samples[capability]
        fmt = capability.rsplit("_", 1)[1]
        path = f"{base}/sample.{fmt}"
        written[fmt] = eco.call(TOOL_FOR[capability], path=path, **request)
        got = eco.call("gates.read_document", path=path)
        assert (got["path"], got["format"], got["text"], got["truncated"]) == (path, fmt, text, False)
        assert (got["size"], got["sha256"]) == (written[fmt]["size"], written[fmt]["sha256"])
        assert {key: got[key] for key in structure} == structure
    # crafted files, put in the root through the files pack
    put = tool_for("files.write")

    def put_zip(path, entries):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, body in entries.items():
                archive.writestr(name, body, compress_type=zipfile.ZIP_STORED if name == "mimetype" else None)
        eco.call(put, path=path, content=base64.b64encode(buffer.getvalue()).decode(), encoding="base64")

    content_types = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/word/document.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
    )
    # not a document: text, even named .docx; a zip that is no document
    eco.call(put, path=f"{base}/notes.txt", content="just text")
    eco.call(put, path=f"{base}/fake.docx", content="just text, named .docx")
    for path in (f"{base}/notes.txt", f"{base}/fake.docx"):
        with pytest.raises(ToolCallError, match="not a docx"):
            eco.call("gates.read_document", path=path)
    put_zip(f"{base}/plain.zip.docx", {"readme.txt": "a zip, not a document"})
    with pytest.raises(ToolCallError, match="not a docx"):
        eco.call("gates.read_document", path=f"{base}/plain.zip.docx")
    # XXE: a docx and an odt whose XML declares an entity reading /etc/passwd are refused, leaking nothing
    xxe = '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    put_zip(f"{base}/xxe.docx", {
        "[Content_Types].xml": content_types,
        "word/document.xml": xxe + '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
                             "<w:body><w:p><w:r><w:t>&xxe;</w:t></w:r></w:p></w:body></w:document>",
    })
    put_zip(f"{base}/xxe.odt", {
        "mimetype": "application/vnd.oasis.opendocument.text",
        "content.xml": xxe + '<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
                       'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"><office:body><office:text>'
                       "<text:p>&xxe;</text:p></office:text></office:body></office:document-content>",
    })
    for path in (f"{base}/xxe.docx", f"{base}/xxe.odt"):
        with pytest.raises(ToolCallError, match="DOCTYPE|ENTITY") as refused:
            eco.call("gates.read_document", path=path)
        assert "root:" not in str(refused.value)
        assert [(row["actor"], row["ok"]) for row in denials(path)] == [("gates", 0)]
    # a macro project inside a document is refused whatever its name
    put_zip(f"{base}/macro.docx", {"[Content_Types].xml": content_types, "word/vbaProject.bin": b"\x00" * 16,
                                    "word/document.xml": "<w:document/>"})
    with pytest.raises(ToolCallError, match="macro"):
        eco.call("gates.read_document", path=f"{base}/macro.docx")
    # a zip bomb: 67108864 bytes of zeros and one more, deflated to a sliver of that; its
    # directory is checked before a byte is inflated: refused, and audited
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("[Content_Types].xml", content_types)
        with archive.open("word/document.xml", "w") as entry:
            chunk = bytes(1 << 20)
            for _ in range(67108864 // len(chunk) + 1):
                entry.write(chunk)
    eco.call(put, path=f"{base}/bomb.docx", content=base64.b64encode(bomb.getvalue()).decode(), encoding="base64")
    with pytest.raises(ToolCallError, match="max_unzipped_bytes"):
        eco.call("gates.read_document", path=f"{base}/bomb.docx")
    assert [(row["actor"], row["ok"]) for row in denials(f"{base}/bomb.docx")] == [("gates", 0)]
    # still working: a real document under a name that lies is read by its content
    if written:
        fmt, first = next(iter(written.items()))
        raw = eco.call(tool_for("files.read"), path=first["path"], encoding="base64")["content"]
        eco.call(put, path=f"{base}/renamed.bin", content=raw, encoding="base64")
        got = eco.call("gates.read_document", path=f"{base}/renamed.bin")
        assert (got["format"], got["sha256"]) == (fmt, first["sha256"])
