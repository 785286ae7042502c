"""The charts pack's catalogue: what it is for, its pinned dependencies,
its capabilities, the shapes of their results and their MCP hints.

Light on purpose (pydantic and the core's catalogue types only): the compiler and `capabilities.py` read it;
the implementation, with its libraries, is `pack.py`, imported only when the pack is loaded.
"""

from __future__ import annotations

from ...capabilities import Capability, PackInfo, Shape
from ...capabilities import param as _p

PACK = PackInfo("charts", "Bar, line, scatter and pie charts of rows as SVG or PNG with the same bytes for the same "
                          "input (Vega-Lite in a sandboxed renderer process: spec built by the pack, data inline, no "
                          "URLs, bundled font); row, size, title, time and output limits; saved through the files pack",
                dependencies=("vl-convert-python==1.9.0.post1",), requires=("files",))


class ChartRendered(Shape):
    """A chart as drawn: its kind and format, its size in pixels, its content (SVG text, or the PNG's bytes in
    base64), the content's size in bytes and SHA-256, how many rows it plots, and, when it was also written
    into the file root, its path there."""

    kind: str
    format: str
    width: int
    height: int
    content: str
    size: int
    sha256: str
    rows: int
    path: str | None = None


CAPABILITIES: tuple[Capability, ...] = (
    Capability(
        "charts.render",
        "Draw a bar, line, scatter or pie chart of rows as SVG or PNG (the same bytes for the same input); x and "
        "y name the fields plotted (pie: x the category, y its value), series an optional colour field; with "
        "path, also write it into the file root; returns {kind, format, width, height, content, size, sha256, "
        "rows, path}.",
        (_p("kind", "str"), _p("rows", "list[dict]"), _p("x", "str"), _p("y", "str"), _p("title", "str", ""),
         _p("format", "str", "svg"), _p("series", "str", ""), _p("path", "str", ""), _p("width", "int", 0),
         _p("height", "int", 0)),
        shape=ChartRendered,
        pack="charts",
    ),
)

IDEMPOTENT_WRITES: frozenset[str] = frozenset({"charts.render"})
DESTRUCTIVE: frozenset[str] = frozenset({"charts.render"})
