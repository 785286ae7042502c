"""End-to-end tests of Playfair: every tool, called over MCP on a running ecosystem."""

import pytest

from harness import ToolCallError

from conftest import tool_for

pytestmark = pytest.mark.requirement('R16')


def test_chart(eco):
    """playfair.chart: Draw a bar, line, scatter or pie chart of rows as SVG or PNG; saved into the file root when a path is given."""
    import base64
    import hashlib
    import xml.etree.ElementTree as ET

    from conftest import query as read_state

    rows = [{"month": "Jan", "sales": 3, "region": "north"}, {"month": "Feb", "sales": 5.5, "region": "south"},
            {"month": "Mar", "sales": 4, "region": "north"}]

    def texts(svg):
        """The text an SVG shows, in document order; it must parse as SVG."""
        root = ET.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert not [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] in ("script", "image", "foreignObject")]
        return ["".join(el.itertext()) for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "text"]

    for kind in ("bar", "line", "scatter", "pie"):
        got = eco.call("playfair.chart", kind=kind, rows=rows, x="month", y="sales", title="Sales by month", width=420,
                       height=260)
        assert (got["kind"], got["format"], got["width"], got["height"], got["rows"]) == (kind, "svg", 420, 260, 3)
        assert got.get("path") is None
        data = got["content"].encode()
        assert got["size"] == len(data) and got["sha256"] == hashlib.sha256(data).hexdigest()
        shown = texts(got["content"])
        assert "Sales by month" in shown and "month" in shown  # the title; the x axis' (or the pie legend's) title
        assert [t for t in shown if t in ("Jan", "Feb", "Mar")] == ["Jan", "Feb", "Mar"]  # in the rows' order
        if kind != "pie":
            assert "sales" in shown  # the y axis' title
    png = eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="sales", format="png", width=300, height=200)
    data = base64.b64decode(png["content"], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (300, 200)
    assert (png["format"], png["width"], png["height"], png["size"]) == ("png", 300, 200, len(data))
    assert png["sha256"] == hashlib.sha256(data).hexdigest()
    # The same input gives the same bytes; a different input different ones.
    again = eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="sales", format="png", width=300, height=200)
    assert again["sha256"] == png["sha256"] and again["content"] == png["content"]
    first = eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="sales", series="region", title="T")
    assert "north" in texts(first["content"])  # the legend
    assert eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="sales", series="region", title="T") == first
    changed = [dict(r) for r in rows]
    changed[1]["sales"] = 5.25
    assert eco.call("playfair.chart", kind="bar", rows=changed, x="month", y="sales", series="region",
                    title="T")["sha256"] != first["sha256"]
    # Text is text: markup in a value or title is escaped, a field named like a Vega expression is only a title.
    evil = "<script>alert(1)</script>"
    marked = [{"name": evil, "v": 1}, {"name": "b & c", "v": 2}]
    got = eco.call("playfair.chart", kind="bar", rows=marked, x="name", y="v", title=evil)
    assert "<script" not in got["content"] and "&lt;script&gt;alert(1)&lt;/script&gt;" in got["content"]
    assert evil in texts(got["content"]) and "b & c" in texts(got["content"])
    name = "datum.x || alert(1)"
    named = [{name: "first", "y": 1}, {name: "second", "y": 2}]
    got = eco.call("playfair.chart", kind="bar", rows=named, x=name, y="y")
    assert {name, "first", "second"} <= set(texts(got["content"]))
    # Refused: a field the rows lack (the error lists those they have), a y that is not numeric, an unknown kind
    # or format, a size out of bounds (a limit: audited).
    with pytest.raises(ToolCallError, match="the fields there are: 'month', 'region', 'sales'"):
        eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="profit")
    with pytest.raises(ToolCallError, match="not a finite number"):
        eco.call("playfair.chart", kind="line", rows=rows, x="month", y="region")
    with pytest.raises(ToolCallError, match="invalid_argument"):
        eco.call("playfair.chart", kind="donut", rows=rows, x="month", y="sales")
    with pytest.raises(ToolCallError, match="invalid_argument"):
        eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="sales", format="gif")
    with pytest.raises(ToolCallError, match="invalid_argument"):
        eco.call("playfair.chart", kind="bar", rows=[], x="month", y="sales")
    with pytest.raises(ToolCallError, match="access_denied"):
        eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="sales", width=100000)
    denied = read_state(eco.state_dir, "SELECT detail FROM audit_log WHERE actor = ? AND action = 'charts.render' "
                        "AND ok = 0", ("playfair",))
    assert any("width 100000" in e["detail"] for e in denied), "the refused limit is audited"
    # ... and it keeps drawing, the same bytes as before.
    assert eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="sales", series="region", title="T") == first
    # Saved into the file root through the files pack (when the ecosystem has one), read back the same; a path out
    # of the root is refused by the files pack's guard and writes nothing.
    read = tool_for("files.read")
    line = eco.call("playfair.chart", kind="line", rows=rows, x="month", y="sales", path="charts/sales.svg")
    assert line["path"] == "charts/sales.svg"
    back = eco.call(read, path="charts/sales.svg")
    assert back["content"] == line["content"] and back["sha256"] == line["sha256"]
    saved = eco.call("playfair.chart", kind="pie", rows=rows, x="month", y="sales", format="png",
                     path="charts/sales.png")
    back = eco.call(read, path="charts/sales.png", encoding="base64")
    assert back["content"] == saved["content"] and back["sha256"] == saved["sha256"]
    with pytest.raises(ToolCallError, match="invalid_argument"):
        eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="sales", path="charts/sales.png")  # svg to .png
    for escape in ("../escaped.svg", "/tmp/escaped.svg", "charts/../../escaped.svg"):
        with pytest.raises(ToolCallError, match="access_denied"):
            eco.call("playfair.chart", kind="bar", rows=rows, x="month", y="sales", path=escape)
    assert not (eco.state_dir / "escaped.svg").exists() and not (eco.state_dir.parent / "escaped.svg").exists()
    assert eco.call(read, path="charts/sales.svg")["sha256"] == line["sha256"]  # untouched by the refusals
