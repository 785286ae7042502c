"""End-to-end tests of Stallman: every tool, called over MCP on a running ecosystem."""

import pytest

from harness import ToolCallError

from conftest import tool_for

pytestmark = pytest.mark.requirement('R15')


def test_write_odt(eco):
    """stallman.write_odt: Write an OpenDocument text (a title, then headings, paragraphs, bullet lists and tables) into the file root."""
    import base64
    import hashlib
    import io
    import zipfile

    from conftest import query

    blocks = [
        {"heading": "Findings", "level": 1},
        {"paragraph": "All systems nominal."},
        {"bullets": ["first point", "second point"]},
        {"heading": "Scores", "level": 2},
        {"table": [["name", "score"], ["ada", "=1+1"]]},
    ]
    path = "stallman/odt/report.odt"
    written = eco.call("stallman.write_odt", path=path, title="Quarterly report", blocks=blocks)
    assert set(written) == {"path", "size", "sha256", "format"}
    assert written["path"] == path and written["format"] == "odt" and written["size"] > 0
    # read back as it was written: the title first (a level-0 heading), the formula-looking cell as text
    got = eco.call(tool_for("documents.read"), path=path)
    assert (got["format"], got["title"], got["truncated"]) == ("odt", "Quarterly report", False)
    assert (got["size"], got["sha256"]) == (written["size"], written["sha256"])
    assert got["blocks"] == [{"heading": "Quarterly report", "level": 0}, *blocks]
    assert got["text"] == ("Quarterly report\nFindings\nAll systems nominal.\nfirst point\nsecond point\nScores\n"
                           "name\tscore\nada\t=1+1")
    # the same input gives the same bytes, at another path and over the first
    for again_path in ("stallman/odt/report-again.odt", path):
        again = eco.call("stallman.write_odt", path=again_path, title="Quarterly report", blocks=blocks)
        assert (again["size"], again["sha256"]) == (written["size"], written["sha256"])
    # guards: the extension must be the format's, the path inside the root, the blocks well formed
    with pytest.raises(ToolCallError, match=r"\.odt"):
        eco.call("stallman.write_odt", path="stallman/odt/report.docx", title="t", blocks=blocks)
    for escape in ("../escaped.odt", "/tmp/escaped.odt", "stallman/../../escaped.odt"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("stallman.write_odt", path=escape, title="t", blocks=blocks)
    bad = "stallman/odt/bad.odt"
    with pytest.raises(ToolCallError, match=r"blocks\[1\]\.level"):
        eco.call("stallman.write_odt", path=bad, title="t", blocks=[{"paragraph": "ok"}, {"heading": "h", "level": 0}])
    with pytest.raises(ToolCallError, match=r"blocks\[0\]\.bullets"):
        eco.call("stallman.write_odt", path=bad, title="t", blocks=[{"bullets": []}])
    with pytest.raises(ToolCallError, match=r"blocks\[0\]\.paragraph.*U\+0007"):
        eco.call("stallman.write_odt", path=bad, title="t", blocks=[{"paragraph": "bell \x07"}])
    # oversized: 10000 bullet items and their block exceed documents.max_blocks: refused, and audited
    with pytest.raises(ToolCallError, match="max_blocks"):
        eco.call("stallman.write_odt", path=bad, title="t", blocks=[{"bullets": ["x"] * 10000}])
    refused = query(eco.state_dir, "SELECT actor, ok FROM audit_log WHERE action = ? AND subject = ?",
                    ("documents.write_odt", bad))
    assert refused and all(row["ok"] == 0 and row["actor"] == "stallman" for row in refused)
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call(tool_for("documents.read"), path=bad)  # no refused request wrote anything
    # still working: the bytes, fetched through the files pack, re-open with odfpy
    raw = base64.b64decode(eco.call(tool_for("files.read"), path=path, encoding="base64")["content"])
    assert hashlib.sha256(raw).hexdigest() == written["sha256"] and len(raw) == written["size"]
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        assert archive.namelist()[0] == "mimetype"
        assert archive.read("mimetype") == b"application/vnd.oasis.opendocument.text"
    from odf import dc, teletype
    from odf.opendocument import load
    from odf.table import TableCell
    from odf.text import H, P

    document = load(io.BytesIO(raw))
    assert [teletype.extractText(t) for t in document.meta.getElementsByType(dc.Title)] == ["Quarterly report"]
    assert [(h.getAttribute("outlinelevel"), teletype.extractText(h)) for h in document.text.getElementsByType(H)] == [
        ("1", "Findings"), ("2", "Scores"),
    ]
    assert [teletype.extractText(p) for p in document.text.getElementsByType(P)] == [
        "Quarterly report", "All systems nominal.", "first point", "second point", "name", "score", "ada", "=1+1",
    ]
    cells = document.text.getElementsByType(TableCell)
    assert [(c.getAttribute("valuetype"), c.getAttribute("formula")) for c in cells] == [("string", None)] * 4


def test_write_ods(eco):
    """stallman.write_ods: Write an OpenDocument spreadsheet (sheet name -> rows) into the file root; text is never a formula."""
    import base64
    import hashlib
    import io
    import zipfile

    from conftest import query

    sheets = {
        "Data": [["name", "score", "passed"], ["ada", 3, True], ["bob", 2.5, None, "=1+1"]],
        "Risky": [['=HYPERLINK("http://127.0.0.1/","click")'], ["+1+1"], ["@SUM(A1)"], ["#N/A"], [False, -7]],
    }
    path = "stallman/ods/book.ods"
    written = eco.call("stallman.write_ods", path=path, sheets=sheets)
    assert set(written) == {"path", "size", "sha256", "format"}
    assert written["path"] == path and written["format"] == "ods" and written["size"] > 0
    # read back cell for cell: numbers and booleans as they were, every formula-looking string as that string
    got = eco.call(tool_for("documents.read"), path=path)
    assert (got["format"], got["truncated"]) == ("ods", False)
    assert (got["size"], got["sha256"]) == (written["size"], written["sha256"])
    assert got["sheets"] == sheets
    # the same input gives the same bytes, at another path and over the first
    for again_path in ("stallman/ods/book-again.ods", path):
        again = eco.call("stallman.write_ods", path=again_path, sheets=sheets)
        assert (again["size"], again["sha256"]) == (written["size"], written["sha256"])
    # guards: the extension must be the format's, the path inside the root, the cells sound
    with pytest.raises(ToolCallError, match=r"\.ods"):
        eco.call("stallman.write_ods", path="stallman/ods/book.xlsx", sheets=sheets)
    for escape in ("../escaped.ods", "/tmp/escaped.ods", "stallman/../../escaped.ods"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("stallman.write_ods", path=escape, sheets=sheets)
    bad = "stallman/ods/bad.ods"
    with pytest.raises(ToolCallError, match="used twice"):
        eco.call("stallman.write_ods", path=bad, sheets={"Data": [["x"]], "DATA": [["y"]]})
    with pytest.raises(ToolCallError, match=r"\[0\]\[1\].*32767"):
        eco.call("stallman.write_ods", path=bad, sheets={"Data": [["ok", "x" * 32768]]})
    with pytest.raises(ToolCallError, match="empty"):
        eco.call("stallman.write_ods", path=bad, sheets={})
    # oversized: 101 sheets exceed documents.max_sheets: refused before rendering, and audited
    with pytest.raises(ToolCallError, match="max_sheets"):
        eco.call("stallman.write_ods", path=bad, sheets={f"S{n}": [] for n in range(101)})
    refused = query(eco.state_dir, "SELECT actor, ok FROM audit_log WHERE action = ? AND subject = ?",
                    ("documents.write_ods", bad))
    assert refused and all(row["ok"] == 0 and row["actor"] == "stallman" for row in refused)
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call(tool_for("documents.read"), path=bad)  # no refused request wrote anything
    # still working: the bytes, fetched through the files pack, re-open with odfpy, and no cell is a formula
    raw = base64.b64decode(eco.call(tool_for("files.read"), path=path, encoding="base64")["content"])
    assert hashlib.sha256(raw).hexdigest() == written["sha256"] and len(raw) == written["size"]
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        assert archive.read("mimetype") == b"application/vnd.oasis.opendocument.spreadsheet"
        assert b"formula" not in archive.read("content.xml")
    from odf import teletype
    from odf.opendocument import load
    from odf.table import Table, TableCell, TableRow

    document = load(io.BytesIO(raw))
    tables = document.spreadsheet.getElementsByType(Table)
    assert [t.getAttribute("name") for t in tables] == ["Data", "Risky"]
    def cell(c):
        return (c.getAttribute("valuetype"), c.getAttribute("value"), c.getAttribute("booleanvalue"),
                teletype.extractText(c))

    data = [[cell(c) for c in row.getElementsByType(TableCell)] for row in tables[0].getElementsByType(TableRow)]
    text = ("string", None, None)
    assert data == [
        [(*text, "name"), (*text, "score"), (*text, "passed")],
        [(*text, "ada"), ("float", "3", None, "3"), ("boolean", None, "true", "TRUE")],
        [(*text, "bob"), ("float", "2.5", None, "2.5"), (None, None, None, ""), (*text, "=1+1")],
    ]
    risky = [row.getElementsByType(TableCell)[0] for row in tables[1].getElementsByType(TableRow)][:4]
    assert [(c.getAttribute("valuetype"), c.getAttribute("formula"), teletype.extractText(c)) for c in risky] == [
        ("string", None, row[0]) for row in sheets["Risky"][:4]
    ]


def test_read_document(eco):
    """stallman.read_document: Read an odt, ods, docx, xlsx or pptx file of the file root as text and structure."""
    import base64
    import io
    import zipfile

    from conftest import TOOL_FOR, query

    base = "stallman/read"

    def denials(path):
        return query(eco.state_dir, "SELECT actor, ok FROM audit_log WHERE action = 'documents.read' AND subject = ?",
                     (path,))

    # refused before anything is read: a path out of the root, a file that is not there, a macro-enabled name
    for escape in ("../ecosystem.db", "/etc/passwd", f"{base}/../../../outside.docx"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("stallman.read_document", path=escape)
    with pytest.raises(ToolCallError, match="not_found"):
        eco.call("stallman.read_document", path=f"{base}/never-written.docx")
    with pytest.raises(ToolCallError, match="macro"):
        eco.call("stallman.read_document", path=f"{base}/invoice.docm")
    assert [(row["actor"], row["ok"]) for row in denials(f"{base}/invoice.docm")] == [("stallman", 0)]
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
    mine = ['documents.write_odt', 'documents.write_ods']
    writers = [c for c in samples if c in mine] or [c for c in samples if c in TOOL_FOR]
    written = {}
    for capability in writers:
        request, structure, text = samples[capability]
        fmt = capability.rsplit("_", 1)[1]
        path = f"{base}/sample.{fmt}"
        written[fmt] = eco.call(TOOL_FOR[capability], path=path, **request)
        got = eco.call("stallman.read_document", path=path)
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
            eco.call("stallman.read_document", path=path)
    put_zip(f"{base}/plain.zip.docx", {"readme.txt": "a zip, not a document"})
    with pytest.raises(ToolCallError, match="not a docx"):
        eco.call("stallman.read_document", path=f"{base}/plain.zip.docx")
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
            eco.call("stallman.read_document", path=path)
        assert "root:" not in str(refused.value)
        assert [(row["actor"], row["ok"]) for row in denials(path)] == [("stallman", 0)]
    # a macro project inside a document is refused whatever its name
    put_zip(f"{base}/macro.docx", {"[Content_Types].xml": content_types, "word/vbaProject.bin": b"\x00" * 16,
                                    "word/document.xml": "<w:document/>"})
    with pytest.raises(ToolCallError, match="macro"):
        eco.call("stallman.read_document", path=f"{base}/macro.docx")
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
        eco.call("stallman.read_document", path=f"{base}/bomb.docx")
    assert [(row["actor"], row["ok"]) for row in denials(f"{base}/bomb.docx")] == [("stallman", 0)]
    # still working: a real document under a name that lies is read by its content
    if written:
        fmt, first = next(iter(written.items()))
        raw = eco.call(tool_for("files.read"), path=first["path"], encoding="base64")["content"]
        eco.call(put, path=f"{base}/renamed.bin", content=raw, encoding="base64")
        got = eco.call("stallman.read_document", path=f"{base}/renamed.bin")
        assert (got["format"], got["sha256"]) == (fmt, first["sha256"])
