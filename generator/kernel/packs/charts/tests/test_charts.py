"""The charts pack as a rogue MAD would try it: no spec of its own, no URL, no expression, no way past a
limit, no crash of the runtime; and as Playfair uses it: every kind to SVG and PNG, the same bytes for the
same input, written into the file root through the files pack.

Most tests share one pack (and so one renderer process) per module; those that need other settings make
their own. The renderer is a separate process, so a 127.0.0.1 server in this process can watch for requests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import inspect
import json
import os
import re
import struct
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pack_helpers import CALLER, SECRET, SECRET_TEXT, Recorder, owner, refused, run, running

from generator.kernel import capabilities
from generator.kernel.capabilities import CAPABILITIES, PACKS, tool_hints
from generator.kernel.errors import AccessDenied, InvalidArgument, KernelError
from generator.kernel.packs import IMPL_ATTR, load
from generator.kernel.packs.charts import ChartRendered
from generator.kernel.packs.charts import pack as charts_module
from generator.kernel.packs.charts.pack import ChartsPack
from generator.kernel.packs.files.pack import FilesPack

ROWS = [{"month": "Jan", "sales": 3, "region": "north"}, {"month": "Feb", "sales": 5.5, "region": "south"},
        {"month": "Mar", "sales": 2, "region": "north"}, {"month": "Apr", "sales": 0, "region": "south"}]


@dataclass
class Env(Recorder):
    tmp: Path
    files: FilesPack | None = None

    def pack(self, **settings: Any) -> ChartsPack:
        self.files = FilesPack(self.context(self.tmp / "state" / "files"))

        def peer(name: str) -> Any:
            if name != "files":
                raise KernelError(f"the 'charts' pack does not require the {name!r} pack")
            return self.files

        return ChartsPack(self.context(self.tmp / "state" / "charts", settings, peer))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, ChartsPack]]:
    env = Env(tmp=tmp_path_factory.mktemp("charts"))
    pack = env.pack()
    yield env, pack
    run(pack.close())


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp=tmp_path)


class Counting:
    """A renderer that counts the requests it passes on."""

    def __init__(self, renderer: Any):
        self.renderer = renderer
        self.calls = 0

    def render(self, *args: Any) -> Any:
        self.calls += 1
        return self.renderer.render(*args)

    def close(self, **kwargs: Any) -> None:
        pass


@pytest.fixture
def borrow(env: Env, shared: tuple[Env, ChartsPack]) -> Iterator[Any]:
    """`borrow(**settings)`: a pack of `env` with these settings that draws with the shared pack's renderer
    process (the limits under test are the pack's, not the renderer's; this saves starting one per test)."""
    made: list[ChartsPack] = []

    def make(**settings: Any) -> ChartsPack:
        pack = env.pack(**settings)
        pack._renderer = Counting(shared[1]._renderer)  # type: ignore[assignment]
        made.append(pack)
        return pack

    yield make
    for pack in made:
        pack._executor.shutdown(wait=True)


def svg_tree(result: dict[str, Any]) -> ET.Element:
    return ET.fromstring(result["content"])


def texts(root: ET.Element) -> list[str]:
    return [el.text for el in root.iter() if el.tag.endswith("text") and el.text]


def png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        chunks.append(data[i + 4:i + 8])
        i += 12 + n
    return chunks


def draw(pack: ChartsPack, kind: str = "bar", rows: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    kw.setdefault("x", "month")
    kw.setdefault("y", "sales")
    return run(pack.render(CALLER, kind, ROWS if rows is None else rows, **kw))


# ---- the catalogue and the ordinary path ------------------------------------------------------------------


def test_the_capability_matches_the_catalogue_and_the_pack_is_loadable():
    marked = {getattr(v, IMPL_ATTR) for v in vars(ChartsPack).values() if hasattr(v, IMPL_ATTR)}
    assert marked == {"charts.render"} == {n for n, c in CAPABILITIES.items() if c.pack == "charts"}
    assert load("charts") is ChartsPack
    cap = CAPABILITIES["charts.render"]
    params = list(inspect.signature(ChartsPack.render).parameters.values())[1:]
    assert params[0].name == "caller"
    assert [(p.name, p.annotation) for p in params[1:]] == [(p.name, p.type) for p in cap.params]
    assert [p.default for p in params[1:] if p.default is not inspect.Parameter.empty] == [
        p.default for p in cap.params if not p.required]
    assert cap.shape is ChartRendered and cap.returns == "dict"
    assert PACKS["charts"].requires == ("files",)
    assert PACKS["charts"].dependencies == ("vl-convert-python==1.9.0.post1",)
    lock = (Path(__file__).resolve().parents[5] / "uv.lock").read_text()
    assert 'name = "vl-convert-python"\nversion = "1.9.0.post1"' in lock
    assert tool_hints("charts.render") == {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True,
                                           "openWorldHint": False}
    assert "charts.render" not in capabilities.READ_ONLY


@pytest.mark.parametrize("settings,match", [
    ({"max_rows": 0}, "charts.max_rows"), ({"timeout_s": "soon"}, "charts.timeout_s"),
    ({"timeout_s": float("inf")}, "charts.timeout_s"), ({"max_pending": True}, "charts.max_pending"),
    ({"max_width": 10}, "charts.max_width"), ({"default_height": 3000}, "charts.default_height"),
    ({"max_output_bytes": 1.5}, "charts.max_output_bytes"),
])
def test_bad_settings_are_refused_naming_the_setting(env: Env, settings: dict[str, Any], match: str):
    with pytest.raises(KernelError, match=match):
        env.pack(**settings)


@pytest.mark.parametrize("kind", ["bar", "line", "scatter", "pie"])
def test_each_kind_as_svg(shared: tuple[Env, ChartsPack], kind: str):
    _, pack = shared
    series = "" if kind == "pie" else "region"
    got = draw(pack, kind, title="Sales by month", series=series, width=420, height=260)
    ChartRendered.model_validate(got)
    assert (got["kind"], got["format"], got["width"], got["height"], got["rows"]) == (kind, "svg", 420, 260, 4)
    assert "path" not in got
    data = got["content"].encode()
    assert got["size"] == len(data) and got["sha256"] == hashlib.sha256(data).hexdigest()
    root = svg_tree(got)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (root.get("width"), root.get("height")) == ("420", "260")
    shown = texts(root)
    assert "Sales by month" in shown and "month" in shown  # the title; the x axis (or the pie's legend) title
    months = [t for t in shown if t in ("Jan", "Feb", "Mar", "Apr")]
    assert months == ["Jan", "Feb", "Mar", "Apr"]  # categories in the rows' order, not sorted
    if kind != "pie":
        assert "sales" in shown and "region" in shown and "north" in shown  # y axis title, legend
    assert all(el.tag.rsplit("}", 1)[-1] not in ("script", "image", "foreignObject") for el in root.iter())


@pytest.mark.parametrize("kind", ["bar", "line", "scatter", "pie"])
def test_each_kind_as_png(shared: tuple[Env, ChartsPack], kind: str):
    _, pack = shared
    got = draw(pack, kind, format="png", title="Sales", width=300, height=200)
    ChartRendered.model_validate(got)
    data = base64.b64decode(got["content"], validate=True)
    assert got["size"] == len(data) and got["sha256"] == hashlib.sha256(data).hexdigest()
    chunks = png_chunks(data)
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    assert not {b"tIME", b"tEXt", b"zTXt", b"iTXt"} & set(chunks)  # nothing that changes between runs
    assert struct.unpack(">II", data[16:24]) == (300, 200) == (got["width"], got["height"])


def test_numeric_x_and_categorical_scatter(shared: tuple[Env, ChartsPack]):
    _, pack = shared
    rows = [{"t": t, "v": t * t} for t in (0, 1.5, 3, 10)]
    line = draw(pack, "line", rows, x="t", y="v")
    assert "10" in texts(svg_tree(line))  # a quantitative axis: ticks, not the four values as categories
    scatter = draw(pack, "scatter", [{"a": "x", "b": "p"}, {"a": "y", "b": "q"}], x="a", y="b")
    assert {"x", "y", "p", "q"} <= set(texts(svg_tree(scatter)))
    assert draw(pack, "bar", rows, x="t", y="v")["rows"] == 4  # numbers as categories of a bar chart


# ---- determinism ------------------------------------------------------------------------------------------


def test_same_input_same_bytes_different_input_different_bytes(shared: tuple[Env, ChartsPack], env: Env):
    _, pack = shared
    for fmt in ("svg", "png"):
        first = draw(pack, "bar", format=fmt, title="T", series="region")
        draw(pack, "pie", format=fmt, title="something else in between")
        again = draw(pack, "bar", format=fmt, title="T", series="region")
        assert again["sha256"] == first["sha256"] and again["content"] == first["content"]
        changed = [dict(r) for r in ROWS]
        changed[1]["sales"] = 5.25
        assert draw(pack, "bar", changed, format=fmt, title="T", series="region")["sha256"] != first["sha256"]
        assert draw(pack, "bar", format=fmt, title="U", series="region")["sha256"] != first["sha256"]
        assert draw(pack, "line", format=fmt, title="T", series="region")["sha256"] != first["sha256"]
    # another pack, another renderer process: the same bytes
    other = env.pack()
    try:
        assert draw(other, "bar", format="png", title="T", series="region")["sha256"] == draw(
            pack, "bar", format="png", title="T", series="region")["sha256"]
    finally:
        run(other.close())


def test_pinned_config_font_and_no_aria_expressions():
    assert charts_module.CONFIG["font"] == "Liberation Sans" and charts_module.CONFIG["aria"] is False
    assert charts_module.VL_VERSION == "6.4"
    assert "allowed_base_urls=[]" in charts_module.WORKER


# ---- what a rogue puts in the text ------------------------------------------------------------------------


def test_html_in_values_titles_and_field_names_is_escaped(shared: tuple[Env, ChartsPack]):
    _, pack = shared
    evil = "<script>alert(1)</script>"
    rows = [{evil: evil, "v": 1, "s": "<img src=x onerror=alert(1)>"}, {evil: "b & c", "v": 2, "s": "ok"}]
    got = draw(pack, "bar", rows, x=evil, y="v", series="s", title=evil + '"><svg onload=alert(1)>')
    raw = got["content"]
    assert "<script" not in raw and "<img" not in raw and "<svg onload" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    root = svg_tree(got)  # still well-formed
    assert not [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] in ("script", "img", "image")]
    assert not [k for el in root.iter() for k in el.attrib if k.lower().startswith("on")]
    shown = texts(root)
    assert evil in shown and "b & c" in shown and "<img src=x onerror=alert(1)>" in shown


@pytest.mark.parametrize("name", [
    "datum.x || alert(1)", "a.b", "a[0]", "a\\\" + upper('pwned') + '", "x' + upper('pwned') + '",
    "${upper('pwned')}", "{{pwned}}", "signal: upper('pwned')", "datum['y']",
])
def test_a_field_name_is_only_ever_a_title(shared: tuple[Env, ChartsPack], name: str):
    """Names that Vega-Lite would read as nested fields, or that would break out of a string in a Vega
    expression, plot their own values and show up verbatim, and no expression ran (no PWNED)."""
    _, pack = shared
    rows = [{name: "first", "y": 1}, {name: "second", "y": 2}]
    for fmt in ("svg", "png"):
        got = draw(pack, "bar", rows, x=name, y="y", title=name, format=fmt)
        assert got["rows"] == 2
    got = draw(pack, "line", [{"x": 1, name: 1.0}, {"x": 2, name: 3.0}], x="x", y=name, title=name)
    shown = texts(svg_tree(got))
    assert name in shown and "PWNED" not in got["content"]
    got = draw(pack, "bar", rows, x=name, y="y")
    assert {"first", "second", name} <= set(texts(svg_tree(got)))


# ---- bad input: clear errors, nothing audited, the pack keeps working ---------------------------------------


BAD: list[tuple[dict[str, Any], str]] = [
    ({"kind": "histogram"}, "kind must be one of bar, line, scatter, pie"),
    ({"kind": None}, "kind must be one of"),
    ({"format": "jpeg"}, "format must be 'svg' or 'png'"),
    ({"rows": "a,b\n1,2"}, "rows must be a list of objects"),
    ({"rows": [{"month": "a", "sales": 1}, ["b", 2]]}, "rows must be a list of objects"),
    ({"rows": []}, "rows is empty"),
    ({"x": "monht"}, r"x field 'monht' is not in the rows; the fields there are: 'month', 'region', 'sales'"),
    ({"y": ""}, "y is empty"),
    ({"x": 3}, "x must be a string"),
    ({"rows": [{"month": "a", "sales": 1}, {"sales": 2}]}, r"row 1 has no x field 'month' \(it has: 'sales'\)"),
    ({"series": "colour"}, "series field 'colour' is not in the rows"),
    ({"rows": [{"month": "a", "sales": "12"}]}, r"row 0's y value \('sales'\) is '12', not a finite number"),
    ({"rows": [{"month": "a", "sales": None}]}, "is None, not a finite number; a bar chart needs numbers"),
    ({"rows": [{"month": "a", "sales": True}]}, "is True, not a finite number"),
    ({"rows": [{"month": "a", "sales": float("nan")}]}, "is nan, not a finite number"),
    ({"rows": [{"month": "a", "sales": float("inf")}], "kind": "line"}, "a line chart needs numbers on y"),
    ({"rows": [{"month": "a", "sales": 10**400}]}, "not a finite number"),
    ({"rows": [{"month": 10**5000, "sales": 1}]}, "is a number too large to show; it must be text or a finite number"),
    ({"rows": [{"month": {"nested": 1}, "sales": 1}]}, r"row 0's x value \('month'\) is \{'nested': 1\}; it must be"),
    ({"rows": [{"month": None, "sales": 1}]}, "is None; it must be text or a finite number"),
    ({"kind": "pie", "rows": [{"month": "a", "sales": 2}, {"month": "b", "sales": -1}]}, "must not be negative; row 1"),
    ({"kind": "pie", "rows": [{"month": "a", "sales": 0}]}, "needs a positive total"),
    ({"kind": "pie", "series": "region"}, "a pie chart is coloured by its x field; leave series empty"),
    ({"title": "two\nlines"}, r"title contains the character U\+000A"),
    ({"title": "nul\x00"}, r"U\+0000"),
    ({"title": "bell\x07"}, r"U\+0007"),
    ({"title": "\ufffe"}, r"U\+FFFE"),
    ({"title": "\ud800"}, r"U\+D800"),
    ({"title": 7}, "title must be a string"),
    ({"rows": [{"month": "a\x01b", "sales": 1}]}, r"row 0's x value \('month'\) contains the character U\+0001"),
    ({"rows": [{"month\x85": "a", "sales": 1}], "x": "month\x85"}, r"x contains the character U\+0085"),
    ({"width": "640"}, "width must be a whole number of pixels"),
    ({"height": 2.5}, "height must be a whole number of pixels"),
    ({"width": True}, "width must be a whole number"),
    ({"path": "chart.png"}, r"path 'chart.png' must end in '.svg' for a svg chart"),
    ({"path": 5}, "path must be a string"),
]


@pytest.mark.parametrize("change,match", BAD)
def test_bad_input_is_a_clear_invalid_argument(shared: tuple[Env, ChartsPack], change: dict[str, Any], match: str):
    env, pack = shared
    kw: dict[str, Any] = {"kind": "bar", "rows": ROWS, "x": "month", "y": "sales", **change}
    denials, audits = len(env.denials), len(env.audits)
    with pytest.raises(InvalidArgument, match=match):
        run(pack.render(CALLER, **kw))
    assert (len(env.denials), len(env.audits)) == (denials, audits)
    assert not list((env.tmp / "state" / "files").iterdir())


def test_the_renderer_survives_all_the_bad_input(shared: tuple[Env, ChartsPack]):
    _, pack = shared
    proc = pack._renderer._proc
    assert draw(pack, "bar")["rows"] == 4
    assert proc is None or pack._renderer._proc is proc  # no restart was needed


# ---- limits: refused through context.denied, audited, and the pack keeps working ------------------------------


def test_limits_are_refused_and_audited(env: Env, borrow: Any):
    pack = borrow(max_rows=3, max_width=500, max_height=300, max_title_chars=10, max_label_chars=8,
                    default_width=400, default_height=300)
    rows = [{"k": f"c{i}", "v": i} for i in range(4)]
    why = refused(env, "charts.render", "bar chart", pack.render(CALLER, "bar", rows, "k", "v"), match="4 rows")
    assert "charts.max_rows" in why and "3" in why
    refused(env, "charts.render", "bar chart", pack.render(CALLER, "bar", rows[:3], "k", "v", width=501),
            match="charts.max_width")
    refused(env, "charts.render", "bar chart", pack.render(CALLER, "bar", rows[:3], "k", "v", width=49), match="50..500")
    refused(env, "charts.render", "pie chart", pack.render(CALLER, "pie", rows[:3], "k", "v", height=301),
            match="charts.max_height")
    refused(env, "charts.render", "bar chart", pack.render(CALLER, "bar", rows[:3], "k", "v", title="x" * 11),
            match="title has 11 characters.*charts.max_title_chars")
    long_rows = [{"k": "123456789", "v": 1}]
    refused(env, "charts.render", "bar chart", pack.render(CALLER, "bar", long_rows, "k", "v"),
            match="charts.max_label_chars")
    refused(env, "charts.render", "out.svg",
            pack.render(CALLER, "bar", [{"long_name": "a", "v": 1}], "long_name", "v", path="out.svg"),
            match="x has 9 characters")
    assert env.audits == [] and not (env.tmp / "state" / "files" / "out.svg").exists()
    assert pack._renderer.calls == 0  # every refusal came before anything was drawn
    got = run(pack.render(CALLER, "bar", rows[:3], "k", "v", title="x" * 10, width=500, height=50))
    assert (got["rows"], got["width"], got["height"]) == (3, 500, 50)
    assert draw(pack, "bar", rows[:3], x="k", y="v", width=0)["width"] == 400  # 0: the setting's default


def test_output_size_limit(env: Env, borrow: Any):
    pack = borrow(max_output_bytes=2000)
    why = refused(env, "charts.render", "bar chart", pack.render(CALLER, "bar", ROWS, "month", "sales"),
                  match="max_output_bytes")
    assert "2000" in why
    refused(env, "charts.render", "bar chart", pack.render(CALLER, "bar", ROWS, "month", "sales", format="png"),
            match="max_output_bytes")
    assert env.files is not None and run(env.files.list(CALLER)) == []


def test_a_hung_render_is_killed_at_the_time_limit_and_the_next_one_works(env: Env, monkeypatch: pytest.MonkeyPatch):
    hang = charts_module.WORKER.replace("reply = render(json.loads(line))", "import time; time.sleep(3600)")
    assert hang != charts_module.WORKER
    monkeypatch.setattr(charts_module, "WORKER", hang)
    pack = env.pack(timeout_s=1.0)
    try:
        t0 = time.monotonic()
        why = refused(env, "charts.render", "bar chart", pack.render(CALLER, "bar", ROWS, "month", "sales"),
                      match=r"longer than 1 s")
        assert "charts.timeout_s" in why and time.monotonic() - t0 < 30
        assert pack._renderer._proc is None  # killed, not left running
        monkeypatch.undo()
        assert draw(pack, "bar")["rows"] == 4  # a fresh renderer
        proc = pack._renderer._proc
        assert proc is not None and proc.poll() is None
    finally:
        run(pack.close())
    assert proc.poll() is not None and pack._renderer._proc is None  # close stops the renderer


def test_closing_the_pack_during_a_render_ends_it_cleanly_and_later_renders_say_so(env: Env, monkeypatch):
    hang = charts_module.WORKER.replace("reply = render(json.loads(line))", "import time; time.sleep(3600)")
    monkeypatch.setattr(charts_module, "WORKER", hang)
    pack = env.pack(timeout_s=60.0)

    async def main() -> tuple[BaseException | None, float]:
        drawing = asyncio.create_task(pack.render(CALLER, "bar", ROWS, "month", "sales"))
        while not (pack._renderer._lock.locked() and pack._renderer._proc is not None):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        proc = pack._renderer._proc
        t0 = time.monotonic()
        await pack.close()  # the render holds the pipes: close kills the process, never closes them under it
        try:
            await drawing
        except Exception as exc:  # noqa: BLE001
            return exc, time.monotonic() - t0
        finally:
            assert proc is not None and proc.wait(timeout=10) is not None
        return None, time.monotonic() - t0

    caught, elapsed = run(main())
    assert isinstance(caught, KernelError) and not isinstance(caught, AccessDenied), caught
    assert "charts pack is closed" in str(caught) and elapsed < 20  # not the 60 s time limit
    assert env.denials == [] and pack._renderer._proc is None
    with pytest.raises(KernelError, match="charts pack is closed"):  # not a RuntimeError of the executor
        run(pack.render(CALLER, "bar", ROWS, "month", "sales"))
    with pytest.raises(charts_module._Closed):  # and the renderer never starts again
        pack._renderer.render(b"{}", 1.0, 1 << 20)
    assert pack._renderer._proc is None


def test_a_crash_of_the_renderer_is_contained(shared: tuple[Env, ChartsPack]):
    """A control character reaching vl-convert aborts its process (a Rust panic): here it is only the renderer,
    which the pack restarts; the pack's own checks keep such text from getting there at all."""
    _, pack = shared
    draw(pack, "bar")
    before = pack._renderer._proc
    assert before is not None
    spec = {"data": {"values": [{"x": "a\x01", "y": 1}]}, "mark": "bar",
            "encoding": {"x": {"field": "x", "type": "nominal"}, "y": {"field": "y", "type": "quantitative"}}}
    request = json.dumps({"spec": spec, "config": {}, "format": "svg"}).encode()
    with pytest.raises(charts_module._Crashed, match="renderer process (died|exited)"):
        pack._renderer.render(request, 30.0, 1 << 20)
    assert before.poll() is not None and pack._renderer._proc is None
    assert draw(pack, "bar", format="png")["rows"] == 4
    assert pack._renderer._proc is not None and pack._renderer._proc is not before


def test_too_many_renders_at_once_are_refused(env: Env, borrow: Any):
    pack = borrow(max_pending=1)

    async def two() -> list[Any]:
        return await asyncio.gather(pack.render(CALLER, "bar", ROWS, "month", "sales"),
                                    pack.render(CALLER, "line", ROWS, "month", "sales"), return_exceptions=True)

    first, second = run(two())
    assert first["kind"] == "bar"
    assert isinstance(second, AccessDenied) and "busy" in str(second) and "charts.max_pending" in str(second)
    assert env.denials[-1][:3] == (CALLER, "charts.render", "line chart")
    assert draw(pack, "line")["kind"] == "line"


def test_the_event_loop_runs_while_a_chart_is_drawn(shared: tuple[Env, ChartsPack]):
    _, pack = shared
    rows = [{"a": i, "b": (i * 37) % 101, "c": f"s{i % 5}"} for i in range(3000)]

    async def main() -> tuple[int, float]:
        ticks = 0
        done = False

        async def tick() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        t0 = time.monotonic()
        await pack.render(CALLER, "scatter", rows, "a", "b", series="c", format="png", width=900, height=600)
        elapsed = time.monotonic() - t0
        done = True
        await ticker
        return ticks, elapsed

    ticks, elapsed = run(main())
    assert ticks >= max(3, int(elapsed / 0.005 * 0.3))  # the loop kept turning (the GIL is not held by vl-convert)


# ---- no network, no files -------------------------------------------------------------------------------------


@pytest.fixture
def web() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            body = json.dumps([{"x": "NETDATA", "y": 1}]).encode() if self.path.endswith(".json") else b""
            self.send_response(200)
            self.send_header("Content-Type", "application/json" if body else "image/png")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_the_renderer_reaches_no_url_and_no_file_even_given_a_hostile_spec(shared: tuple[Env, ChartsPack], web, tmp_path):
    """The pack never builds such specs; this is the renderer's own guard, tried with specs sent to it directly."""
    _, pack = shared
    base, hits = web
    secret = tmp_path / "secret.csv"
    secret.write_bytes(b"x,y\n" + SECRET.strip() + b",1\n")
    enc = {"x": {"field": "x", "type": "nominal"}, "y": {"field": "y", "type": "quantitative"}}
    hostile = [
        ({"data": {"url": f"{base}/data.json"}, "mark": "bar", "encoding": enc}, "not allowed"),
        ({"data": {"url": "/data.json"}, "mark": "bar", "encoding": enc}, "not allowed"),
        ({"data": {"values": [{"u": f"{base}/i.png", "x": "a", "y": 1}]}, "mark": {"type": "image", "width": 9},
          "encoding": {**enc, "url": {"field": "u"}}}, "<image> element"),
        ({"data": {"values": [{"u": f"{base}/a", "x": "a", "y": 1}]}, "mark": "bar",
          "encoding": {**enc, "href": {"field": "u"}}}, r"<a> element|outside itself"),
    ]
    for spec, match in hostile:
        for fmt in ("svg", "png"):
            request = json.dumps({"spec": spec, "config": charts_module.CONFIG, "format": fmt}).encode()
            reply = pack._renderer.render(request, 30.0, 1 << 22)
            assert reply["ok"] is False, (spec, fmt)
            assert re.search(match, reply["error"]), reply["error"]
    file_spec = {"data": {"url": secret.as_uri(), "format": {"type": "csv"}}, "mark": "bar", "encoding": enc}
    reply = pack._renderer.render(json.dumps({"spec": file_spec, "config": {}, "format": "svg"}).encode(), 30.0, 1 << 22)
    assert SECRET_TEXT not in json.dumps(reply)
    # through the capability, a URL in the rows is only a label
    got = draw(pack, "bar", [{"u": f"{base}/data.json", "v": 1}], x="u", y="v", format="png")
    assert got["rows"] == 1
    assert hits == []


def test_the_renderer_gets_no_secrets_from_the_environment(shared: tuple[Env, ChartsPack], monkeypatch):
    _, pack = shared
    monkeypatch.setenv("ECO_SECRETS_KEY", "hunter2")
    pack._renderer.close()  # the next render starts a renderer with this environment
    draw(pack, "bar")
    proc = pack._renderer._proc
    assert proc is not None
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    assert not [e for e in environ if b"hunter2" in e or e.startswith(b"HOME=")]
    assert b"TZ=UTC" in environ


# ---- saving through the files pack ----------------------------------------------------------------------------


def test_path_writes_the_chart_into_the_file_root(env: Env, borrow: Any):
    pack = borrow()
    for fmt in ("svg", "png"):
        got = draw(pack, "bar", format=fmt, path=f"reports/q1/sales.{fmt}", title="Q1")
        assert got["path"] == f"reports/q1/sales.{fmt}"
        on_disk = (env.tmp / "state" / "files" / "reports" / "q1" / f"sales.{fmt}").read_bytes()
        assert hashlib.sha256(on_disk).hexdigest() == got["sha256"] and len(on_disk) == got["size"]
        expected = base64.b64decode(got["content"]) if fmt == "png" else got["content"].encode()
        assert on_disk == expected
    ops = [(a[1], a[2], a[3]) for a in env.audits]
    assert ops == [("files.write", "reports/q1/sales.svg", True), ("charts.render", "reports/q1/sales.svg", True),
                   ("files.write", "reports/q1/sales.png", True), ("charts.render", "reports/q1/sales.png", True)]
    assert got["sha256"] in env.audits[-1][4] and "bar png 640x400" in env.audits[-1][4]
    # the extension check is case-insensitive; an overwrite is allowed (the same bytes)
    assert draw(pack, "bar", format="png", path="reports/q1/sales.PNG", title="Q1")["sha256"] == got["sha256"]


def test_path_escapes_are_refused_by_the_files_pack(env: Env, borrow: Any):
    pack = borrow()
    outside = env.tmp / "outside"
    outside.mkdir()
    (outside / "keep.svg").write_bytes(SECRET)
    root = env.tmp / "state" / "files"
    (root / "link").symlink_to(outside, target_is_directory=True)
    for bad in ("../x.svg", "../../outside/keep.svg", str(outside / "keep.svg"), "link/keep.svg", "a//b.svg",
                "./x.svg"):
        refused(env, "files.write", bad, pack.render(CALLER, "bar", ROWS, "month", "sales", path=bad))
    assert (outside / "keep.svg").read_bytes() == SECRET and sorted(os.listdir(outside)) == ["keep.svg"]
    assert sorted(os.listdir(root)) == ["link"] and not (env.tmp / "state" / "x.svg").exists()
    assert [a for a in env.audits if a[1] == "charts.render"] == []  # nothing saved, nothing claimed
    assert draw(pack, "bar", path="ok.svg")["path"] == "ok.svg"


# ---- the pack in a runtime: loaded (with the files pack) for the MAD that owns charts -----------------------


def test_a_mad_owning_charts_uses_the_pack_through_the_runtime_and_others_are_refused(tmp_path, eco_modules):
    kernel = eco_modules[1]
    Playfair = owner(kernel, "playfair", "draws charts", "charts")

    async def main() -> list[dict[str, Any]]:
        async with running(eco_modules, tmp_path / "state", Playfair,
                           pack_settings={"charts": {"max_rows": 4}}) as runtime:
            assert set(runtime.packs) == {"charts", "files"}  # files comes with charts, which requires it
            playfair = runtime.mad("playfair")
            got = await playfair.use("charts.render", kind="pie", rows=ROWS, x="month", y="sales", format="png",
                                     path="charts/sales.png", title="Sales")
            assert got["path"] == "charts/sales.png" and got["rows"] == 4
            ChartRendered.model_validate(got)
            again = await runtime.use("charts.render", caller="playfair", kind="pie", rows=ROWS, x="month",
                                      y="sales", format="png", title="Sales")
            assert again["sha256"] == got["sha256"]
            with pytest.raises(kernel.AccessDenied, match="charts.max_rows"):  # the config's setting
                await playfair.use("charts.render", kind="bar", rows=ROWS * 2, x="month", y="sales")
            with pytest.raises(kernel.AccessDenied):
                await playfair.use("charts.render", kind="bar", rows=ROWS, x="month", y="sales", path="../x.svg")
            with pytest.raises(kernel.InvalidArgument, match="the fields there are"):
                await playfair.use("charts.render", kind="bar", rows=ROWS, x="nope", y="sales")
            with pytest.raises(kernel.InvalidArgument, match="charts.render"):
                await playfair.use("charts.render", kind="bar", rows=ROWS, x="month", y="sales", colour="red")
            with pytest.raises(kernel.AccessDenied, match="may not use charts.render"):
                await runtime.mad("rogers").use("charts.render", kind="bar", rows=ROWS, x="month", y="sales")
            with pytest.raises(kernel.AccessDenied, match="may not use files.write"):  # files came along, not granted
                await playfair.use("files.write", path="x.txt", content="x")
            assert (await playfair.use("charts.render", kind="line", rows=ROWS, x="month", y="sales"))["kind"] == "line"
            return runtime.db.query("SELECT actor, action, subject, ok FROM audit_log WHERE action LIKE 'charts.%' "
                                    "OR action LIKE 'files.%' OR subject LIKE 'charts.%' OR subject LIKE 'files.%' "
                                    "ORDER BY id")

    rows = asyncio.run(main())
    saved = (tmp_path / "state" / "files" / "charts" / "sales.png").read_bytes()
    assert saved[:8] == b"\x89PNG\r\n\x1a\n"
    assert rows == [
        {"actor": "playfair", "action": "kernel.use", "subject": "charts.render", "ok": 1},  # its first use, once
        {"actor": "playfair", "action": "files.write", "subject": "charts/sales.png", "ok": 1},
        {"actor": "playfair", "action": "charts.render", "subject": "charts/sales.png", "ok": 1},
        {"actor": "playfair", "action": "charts.render", "subject": "bar chart", "ok": 0},
        {"actor": "playfair", "action": "files.write", "subject": "../x.svg", "ok": 0},
        {"actor": "rogers", "action": "kernel.use", "subject": "charts.render", "ok": 0},
        {"actor": "playfair", "action": "kernel.use", "subject": "files.write", "ok": 0},
    ]
