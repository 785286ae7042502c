"""The charts pack: Playfair's bar, line, scatter and pie charts of rows, as SVG or PNG, byte for byte the
same every time they are drawn from the same input.

Charts are drawn by Vega-Lite through vl-convert-python. The caller never hands the pack a chart
specification: a Vega-Lite or Vega spec can load data and images from URLs, and Vega expressions are a
small programming language. The pack writes the spec itself from validated parameters (a kind, the
names of the x, y and optional series fields, a title, a size), with the data inline and only the three
values it plots per row, under fixed internal names ("x", "y", "s"). The caller's field names are only
ever shown, as axis and legend titles; a name like `datum.x || alert(1)` is text, never a field path or
an expression. Rows' other fields are not sent anywhere.

What vl-convert 1.9 does, as measured here, and what the pack does about it:

- It holds the GIL for the whole of a render (a thread would not free the event loop), and a character
  that is not legal in XML (a control character, U+FFFE) anywhere in the text aborts the whole process
  (a Rust panic that cannot unwind). So every render runs in a **renderer process** of its own, one per
  pack, started on first use and kept: the runtime never loads vl-convert, stays responsive while a
  chart is drawn, and survives a crash of the renderer (it is restarted for the next chart). The time
  limit is real: a render that passes `timeout_s` has its process killed. The renderer gets a minimal
  environment (no secrets, no HOME: no per-user fonts; TZ=UTC), runs in the pack's folder, and Python's
  isolated mode (-I). Its stderr goes to `renderer.log` in the pack's folder (emptied at each start).
  Closing the pack stops it for good: a render in flight has its process killed (its pipes are only ever
  touched by the render holding them) and, like any render after, fails with a KernelError saying so.
- Text is also checked before it gets there: titles, field names and category values must be printable
  (no control characters, no surrogates or noncharacters) and within the length limits.
- External data: every render passes `allowed_base_urls=[]`, which refuses data URLs. But PNG
  rasterisation fetches an `<image>` href whatever that list says, so the renderer parses the SVG it
  drew and refuses one that has an image, script or foreign object, or any reference (href, url(...))
  that is not to a fragment of itself, before rasterising or returning it. The pack never emits such
  marks; this holds even if that changes by mistake. `file://` data is never read by vl-convert.
- Vega-Lite puts axis titles into the ARIA description *expressions* it generates, escaping quotes but
  not backslashes: a title can break out of its string literal. ARIA descriptions are switched off
  (`config.aria = false`), so titles never reach an expression.
- Determinism: the Vega-Lite version is pinned (VL_VERSION), and so is every config value that shapes the
  output: the font (Liberation Sans, which vl-convert bundles), font sizes, colours, padding, the number
  and time locales (en-US), the size (autosize "fit": the image is exactly width x height pixels),
  scale 1 and 72 ppi for PNG. Nothing time-dependent is plotted (no temporal fields). The PNG has no
  tIME or text chunks. Glyphs Liberation Sans lacks (CJK, emoji) fall back to whatever font the machine
  has, so charts with such text are only reproducible on machines with the same fonts.

Guards, from the pack's settings (defaults in DEFAULTS): `max_rows` (rows in one chart),
`max_width`/`max_height` (pixels; MIN_SIZE is the least), `default_width`/`default_height` (used when the
caller gives 0), `max_title_chars` (the title), `max_label_chars` (a field name or a category value),
`timeout_s` (one render; starting the renderer process has max(timeout_s, 60 s) of its own), `max_output_bytes` (the chart's bytes),
`max_pending` (charts drawn or waiting at once: renders run one at a time). Passing a limit is a refusal
through `context.denied` (audited); a malformed request (unknown kind, a missing field, a non-numeric y)
is InvalidArgument with what is wrong and how to fix it.

With `path`, the chart is also written into the ecosystem's file root through the files pack
(`PackInfo.requires`), as the caller: the files pack's guards (no way out of the root, quotas) and audit
apply; the extension must match the format. That write is audited by the files pack and the render
by this one ("charts.render", the path, the chart's hash); a render without a path changes nothing and
is not audited.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...errors import InvalidArgument, KernelError
from .. import Pack, PackContext, implements

KINDS = ("bar", "line", "scatter", "pie")
FORMATS = ("svg", "png")
MIN_SIZE = 50  # pixels: less leaves no room for axes
VL_VERSION = "6.4"  # the Vega-Lite vl-convert bundles that the pack's output is pinned to
STARTUP_S = 60.0  # the most a renderer process may take to start (at least timeout_s): not counted in a render

DEFAULTS: dict[str, int | float] = {
    "max_rows": 5000,
    "max_width": 2000,
    "max_height": 2000,
    "default_width": 640,
    "default_height": 400,
    "max_title_chars": 200,
    "max_label_chars": 200,
    "timeout_s": 30,
    "max_output_bytes": 16 << 20,
    "max_pending": 16,
}

FONT = "Liberation Sans"  # bundled by vl-convert: the same glyphs and metrics on every machine
CONFIG: dict[str, Any] = {
    "font": FONT,
    "background": "white",
    "padding": 8,
    "aria": False,  # no ARIA description expressions: titles never reach an expression (see above)
    "customFormatTypes": False,
    "title": {"font": FONT, "fontSize": 15, "fontWeight": "bold", "anchor": "start", "color": "#222222"},
    "axis": {"labelFont": FONT, "titleFont": FONT, "labelFontSize": 11, "titleFontSize": 12, "labelLimit": 180,
             "titleLimit": 400},
    "legend": {"labelFont": FONT, "titleFont": FONT, "labelFontSize": 11, "titleFontSize": 12, "labelLimit": 160,
               "titleLimit": 200},
    "header": {"labelFont": FONT, "titleFont": FONT},
    "mark": {"font": FONT},
    "range": {"category": {"scheme": "tableau10"}},
    "view": {"stroke": None},
    "line": {"strokeWidth": 2},
    "point": {"size": 40},
}
LOCALE = "en-US"

# The renderer process. It reads one JSON request per line on stdin and answers one JSON line on the
# descriptor it was given; its own stdout goes to stderr, so nothing a library prints can corrupt the
# answers. It exits at end of input (the runtime's process ended or closed the pack).
WORKER = r'''
import base64, json, os, re, sys
import xml.etree.ElementTree as ET

out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.path.insert(0, sys.argv[1])
import vl_convert as vlc

VL, LOCALE = sys.argv[2], sys.argv[3]
FORBIDDEN = {"image", "feImage", "script", "foreignObject", "iframe", "video", "audio", "a"}
OUTSIDE_URL = re.compile(r"url\(\s*['\"]?\s*(?!#)", re.I)


def local(name):
    return name.rsplit("}", 1)[-1]


def check(svg):
    if "<!DOCTYPE" in svg or "<!ENTITY" in svg:
        raise ValueError("the drawn SVG has a document type declaration")
    for el in ET.fromstring(svg).iter():
        tag = local(el.tag)
        if tag in FORBIDDEN:
            raise ValueError(f"the drawn SVG has an <{tag}> element, which the charts pack never emits")
        for key, value in el.attrib.items():
            if local(key) == "href" and not value.startswith("#"):
                raise ValueError("the drawn SVG refers to something outside itself (href)")
            if OUTSIDE_URL.search(value):
                raise ValueError("the drawn SVG refers to something outside itself (url())")


def render(req):
    svg = vlc.vegalite_to_svg(req["spec"], vl_version=VL, config=req["config"], allowed_base_urls=[],
                              format_locale=LOCALE, time_format_locale=LOCALE)
    check(svg)
    if req["format"] == "png":
        return {"ok": True, "png": base64.b64encode(vlc.svg_to_png(svg, scale=1.0, ppi=72.0)).decode("ascii")}
    return {"ok": True, "svg": svg}


def answer(reply):
    out.write(json.dumps(reply).encode("utf-8") + b"\n")
    out.flush()


render({"spec": {"data": {"values": [{"x": "a", "y": 1}]}, "mark": "bar",
                 "encoding": {"x": {"field": "x", "type": "nominal"}, "y": {"field": "y", "type": "quantitative"}}},
        "config": {}, "format": "png"})  # warm up: the first render starts the JavaScript engine
answer({"ready": True})
for line in sys.stdin.buffer:
    try:
        reply = render(json.loads(line))
    except Exception as exc:
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    answer(reply)
'''


class _Refusal(Exception):
    """A limit said no; turned into `context.denied(...)` at the capability's edge (which audits it)."""


class _Timeout(Exception):
    pass


class _Crashed(Exception):
    pass


class _TooBig(Exception):
    pass


class _Closed(Exception):
    """The pack was closed: no renderer is started again, a render in flight or still queued ends with this."""


def _bad_char(text: str) -> str | None:
    """The first character of `text` that may not be drawn (control, surrogate, noncharacter), as U+XXXX."""
    for ch in text:
        code = ord(ch)
        if (unicodedata.category(ch) in ("Cc", "Cs") or 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE):
            return f"U+{code:04X}"
    return None


def _num(value: Any) -> float | int | None:
    """`value` when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(float(value)) else None
    except OverflowError:
        return None


def _how_it_ended(code: int | None) -> str:
    if code is None:
        return "closed its output"
    if code < 0:
        try:
            return f"died of signal {signal.Signals(-code).name}"
        except ValueError:
            return f"died of signal {-code}"
    return f"exited with code {code}"


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a number too large to show"
    return text if len(text) <= 60 else text[:57] + "..."


class _Renderer:
    """The renderer process: started when needed, one request at a time, killed on timeout or misbehaviour."""

    def __init__(self, folder: Path, vl_dir: str):
        self._folder = folder
        self._vl_dir = vl_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # held by a render for its whole exchange with the process
        self._closed = False  # for good: set by close(final=True)

    def _start(self, timeout: float, limit: int) -> subprocess.Popen[bytes]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC"}
        with open(self._folder / "renderer.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", WORKER, self._vl_dir, VL_VERSION, LOCALE],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=self._folder, env=env,
                close_fds=True, bufsize=0)
        self._proc = proc
        try:
            hello = json.loads(self._exchange(proc, b"", time.monotonic() + max(timeout, STARTUP_S), limit))
        except (_Timeout, _Crashed, _TooBig, ValueError):
            self._kill()
            raise _Crashed("the renderer process did not start (see renderer.log in the charts pack's folder; "
                           "is vl-convert-python installed?)") from None
        if hello != {"ready": True}:
            self._kill()
            raise _Crashed("the renderer process did not start properly")
        return proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    @staticmethod
    def _exchange(proc: subprocess.Popen[bytes], payload: bytes, deadline: float, limit: int) -> bytes:
        """Send `payload`, then read one line back, both by `deadline`; a reply over `limit` bytes is _TooBig."""
        assert proc.stdin is not None and proc.stdout is not None
        out_fd, in_fd = proc.stdout.fileno(), proc.stdin.fileno()
        os.set_blocking(in_fd, False)
        os.set_blocking(out_fd, False)
        view = memoryview(payload)
        buf = bytearray()
        with selectors.DefaultSelector() as sel:
            if view:
                sel.register(in_fd, selectors.EVENT_WRITE)
            sel.register(out_fd, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Timeout
                for key, _ in sel.select(remaining):
                    if key.fd == in_fd:
                        try:
                            view = view[os.write(in_fd, view[: 1 << 16]):]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            raise _Crashed from None
                        if not view:
                            sel.unregister(in_fd)
                    else:
                        try:
                            chunk = os.read(out_fd, 1 << 20)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            raise _Crashed
                        start = len(buf)
                        buf += chunk
                        end = buf.find(b"\n", start)
                        if end >= 0:
                            return bytes(buf[:end])
                        if len(buf) > limit:
                            raise _TooBig

    def render(self, request: bytes, timeout: float, limit: int) -> dict[str, Any]:
        """The renderer's answer to one request; the process is killed (and restarted next time) on any trouble.
        After close(final=True), _Closed (a render cut short by it too, whatever it then saw)."""
        with self._lock:
            if self._closed:
                raise _Closed
            try:
                return self._render(request, timeout, limit)
            except (_Crashed, _Timeout, _TooBig, OSError):
                if self._closed:
                    self._kill()
                    raise _Closed from None
                raise

    def _render(self, request: bytes, timeout: float, limit: int) -> dict[str, Any]:
        """render() under its lock."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._kill()
            proc = self._start(timeout, limit)
            if self._closed:  # closed while it started: it is not kept
                self._kill()
                raise _Closed
        deadline = time.monotonic() + timeout
        try:
            reply = self._exchange(proc, request + b"\n", deadline, limit)
        except (_Crashed, OSError):  # OSError: its pipes were closed under us (the pack is closing)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)  # its output closed as it died: let it be reaped, for the exit status
            self._kill()
            how = _how_it_ended(proc.poll())
            raise _Crashed(f"the renderer process {how} while drawing this chart; it is started again for the "
                           "next one (see renderer.log in the charts pack's folder)") from None
        except BaseException:
            self._kill()
            raise
        try:
            answer = json.loads(reply)
            if not isinstance(answer, dict):
                raise ValueError(answer)
            return answer
        except ValueError:
            self._kill()
            raise _Crashed("the renderer process answered something that is not JSON; it is started again "
                           "for the next chart") from None

    def close(self, *, final: bool = False) -> None:
        """Stop the renderer process (the next render starts another, unless `final`). Its pipes belong to the
        render holding the lock: when one is in flight the process is only killed, which that render sees as
        its output closing; it cleans up (and, when final, reports _Closed)."""
        if final:
            self._closed = True
        if not self._lock.acquire(blocking=False):
            proc = self._proc
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # a signal only: no pipe is touched
            if not self._lock.acquire(timeout=10):
                return  # the render in flight reaps it when it returns
        try:
            proc = self._proc
            if proc is not None and proc.stdin is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # end of input: it exits by itself
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)
            self._kill()
        finally:
            self._lock.release()


class ChartsPack(Pack):
    """The `charts.*` capabilities: charts of rows drawn by a renderer process, optionally saved as files."""

    name = "charts"

    def __init__(self, context: PackContext):
        super().__init__(context)
        self._limits = {key: self._setting(key) for key in DEFAULTS}
        for axis in ("width", "height"):
            most, default = self._limits[f"max_{axis}"], self._limits[f"default_{axis}"]
            if most < MIN_SIZE:
                raise KernelError(f"pack setting charts.max_{axis} must be at least {MIN_SIZE} pixels, not {most}")
            if not MIN_SIZE <= default <= most:
                raise KernelError(f"pack setting charts.default_{axis} must be from {MIN_SIZE} to charts.max_{axis} "
                                  f"({most}), not {default}")
        spec = importlib.util.find_spec("vl_convert")
        if spec is None or not spec.submodule_search_locations:
            raise KernelError("the charts pack needs the vl-convert-python package, which is not installed "
                              "(rebuild the artifact: its pyproject pins it)")
        vl_dir = str(Path(next(iter(spec.submodule_search_locations))).parent)
        folder = Path(context.folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._renderer = _Renderer(folder, vl_dir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="charts-render")
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._closed = False

    CLOSED = ("charts.render failed: the charts pack is closed (the runtime is stopping), so no chart is drawn; "
              "try again once it runs")

    def _setting(self, key: str) -> int | float:
        default = DEFAULTS[key]
        value = self.context.settings.get(key, default)
        number_ok = (isinstance(value, (int, float)) and math.isfinite(value)) if key == "timeout_s" else isinstance(value, int)
        if isinstance(value, bool) or not number_ok or value <= 0:
            kind = "a positive number of seconds" if key == "timeout_s" else "a positive whole number"
            raise KernelError(f"pack setting charts.{key} must be {kind}, not {value!r} (default {default})")
        return value

    async def close(self) -> None:
        self._closed = True
        # Renders still queued run and end at once (_Closed): none is left waiting on a cancelled future.
        self._executor.shutdown(wait=False)
        await asyncio.to_thread(self._renderer.close, final=True)

    # ---- checks ------------------------------------------------------------------------------------

    def _text(self, value: Any, what: str, limit_key: str, *, empty_ok: bool) -> str:
        """A caller's text that will be drawn: a string, printable, within its length setting."""
        if not isinstance(value, str):
            raise InvalidArgument(f"{what} must be a string, not {type(value).__name__}")
        if not value and not empty_ok:
            raise InvalidArgument(f"{what} is empty; name a field of the rows")
        limit = self._limits[limit_key]
        if len(value) > limit:
            raise _Refusal(f"{what} has {len(value)} characters, more than {limit} (setting charts.{limit_key}); "
                           "shorten it or raise the setting")
        bad = _bad_char(value)
        if bad:
            raise InvalidArgument(f"{what} contains the character {bad} (a control character, surrogate or "
                                  "noncharacter), which cannot be drawn; use printable text on one line")
        return value

    def _size(self, value: Any, axis: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{axis} must be a whole number of pixels (0 for the default), not {_shown(value)}")
        if value == 0:
            return int(self._limits[f"default_{axis}"])
        most = self._limits[f"max_{axis}"]
        if not MIN_SIZE <= value <= most:
            raise _Refusal(f"{axis} {value} is outside {MIN_SIZE}..{most} pixels (setting charts.max_{axis}); "
                           f"choose a size in that range, or 0 for the default")
        return value

    def _fields(self, rows: list[dict[str, Any]], name: str, role: str) -> None:
        """Every row has field `name`; else the error lists the fields the rows do have."""
        for i, row in enumerate(rows):
            if name not in row:
                if not any(name in r for r in rows):
                    there = sorted({str(k) for r in rows for k in r})
                    listed = ", ".join(repr(k) for k in there[:40]) + (", ..." if len(there) > 40 else "")
                    raise InvalidArgument(f"{role} field {name!r} is not in the rows; the fields there are: {listed}")
                raise InvalidArgument(f"row {i} has no {role} field {name!r} (it has: "
                                      f"{', '.join(repr(k) for k in sorted(map(str, row))[:40])}); every row needs one")

    def _category(self, value: Any, i: int, name: str, role: str) -> str:
        if isinstance(value, str):
            return self._text(value, f"row {i}'s {role} value ({name!r})", "max_label_chars", empty_ok=True)
        number = _num(value)
        if number is None:
            raise InvalidArgument(f"row {i}'s {role} value ({name!r}) is {_shown(value)}; it must be text or a finite "
                                  "number")
        return str(number)

    def _numbers(self, rows: list[dict[str, Any]], name: str, role: str, kind: str) -> list[float | int]:
        values = []
        for i, row in enumerate(rows):
            number = _num(row[name])
            if number is None:
                raise InvalidArgument(f"row {i}'s {role} value ({name!r}) is {_shown(row[name])}, not a finite number; "
                                      f"a {kind} chart needs numbers on {role}")
            values.append(number)
        return values

    def _axis(self, rows: list[dict[str, Any]], name: str, role: str) -> tuple[list[Any], bool]:
        """The values of an axis that may be numeric (quantitative) or categorical: all numbers, or all text."""
        numbers = [_num(row[name]) for row in rows]
        if all(n is not None for n in numbers):
            return numbers, True
        return [self._category(row[name], i, name, role) for i, row in enumerate(rows)], False

    # ---- the chart ---------------------------------------------------------------------------------

    def _spec(self, kind: str, rows: list[dict[str, Any]], x: str, y: str, series: str, title: str,
              width: int, height: int) -> dict[str, Any]:
        """The Vega-Lite spec of a checked request: inline data under internal names, the caller's names as titles."""
        y_numeric = True
        if kind == "pie":
            xs: list[Any] = [self._category(r[x], i, x, "x") for i, r in enumerate(rows)]
            ys: list[Any] = self._numbers(rows, y, "y", kind)
            if any(v < 0 for v in ys):
                raise InvalidArgument(f"a pie chart's y values ({y!r}) must not be negative; row "
                                      f"{next(i for i, v in enumerate(ys) if v < 0)} is")
            if not any(v > 0 for v in ys):
                raise InvalidArgument(f"a pie chart needs a positive total; every y value ({y!r}) is 0")
            x_numeric = False
        elif kind == "bar":
            xs = [self._category(r[x], i, x, "x") for i, r in enumerate(rows)]
            ys = self._numbers(rows, y, "y", kind)
            x_numeric = False
        elif kind == "line":
            xs, x_numeric = self._axis(rows, x, "x")
            ys = self._numbers(rows, y, "y", kind)
        else:  # scatter: either axis numeric or categorical
            xs, x_numeric = self._axis(rows, x, "x")
            ys, y_numeric = self._axis(rows, y, "y")
        values: list[dict[str, Any]] = [{"x": a, "y": b} for a, b in zip(xs, ys, strict=True)]
        if series:
            for i, row in enumerate(rows):
                values[i]["s"] = self._category(row[series], i, series, "series")

        spec: dict[str, Any] = {
            "width": width, "height": height, "autosize": {"type": "fit", "contains": "padding"},
            "data": {"values": values},
        }
        if title:
            spec["title"] = {"text": title}
        color = {"field": "s", "type": "nominal", "title": series} if series else None
        if kind == "pie":
            spec["mark"] = {"type": "arc"}
            spec["encoding"] = {"theta": {"field": "y", "type": "quantitative", "stack": True},
                                "color": {"field": "x", "type": "nominal", "sort": None, "title": x}}
            return spec
        x_type = "quantitative" if x_numeric else ("ordinal" if kind == "line" else "nominal")
        encoding: dict[str, Any] = {
            "x": {"field": "x", "type": x_type, "title": x},
            "y": {"field": "y", "type": "quantitative" if y_numeric else "nominal", "title": y},
        }
        if not x_numeric:
            encoding["x"]["sort"] = None  # categories in the rows' order
        if color:
            encoding["color"] = color
        spec["encoding"] = encoding
        spec["mark"] = {"bar": {"type": "bar"}, "line": {"type": "line"},
                        "scatter": {"type": "point", "filled": True}}[kind]
        return spec

    async def _draw(self, spec: dict[str, Any], fmt: str) -> bytes:
        """The chart's bytes, from the renderer process (one at a time, within the time and size limits)."""
        limit = int(self._limits["max_output_bytes"])
        timeout = float(self._limits["timeout_s"])
        request = json.dumps({"spec": spec, "config": CONFIG, "format": fmt}, ensure_ascii=True).encode("ascii")
        if self._closed:
            raise KernelError(self.CLOSED)
        with self._pending_lock:
            if self._pending >= self._limits["max_pending"]:
                raise _Refusal(f"the renderer is busy with {self._pending} charts (setting charts.max_pending); "
                               "try again shortly")
            self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            try:
                drawn = loop.run_in_executor(self._executor, self._renderer.render, request, timeout, 2 * limit + 4096)
            except RuntimeError:  # the executor was shut down: the pack is closed
                raise _Closed from None
            reply = await drawn
        except _Closed:
            raise KernelError(self.CLOSED) from None
        except _Timeout:
            raise _Refusal(f"drawing the chart took longer than {timeout:g} s (setting charts.timeout_s), so the "
                           "renderer was stopped; plot fewer rows or raise the setting") from None
        except _TooBig:
            raise _Refusal(f"the chart is larger than {limit} bytes (setting charts.max_output_bytes); make it "
                           "smaller, use SVG, or raise the setting") from None
        except _Crashed as exc:
            raise KernelError(f"charts.render failed: {exc}") from None
        except OSError as exc:
            raise KernelError(f"charts.render failed: could not run the renderer process ({exc.strerror or exc})") from None
        finally:
            with self._pending_lock:
                self._pending -= 1
        if not reply.get("ok"):
            first = str(reply.get("error", "unknown error")).splitlines()[0][:300]
            raise KernelError(f"charts.render failed: the renderer could not draw this chart ({first})")
        if fmt == "png":
            try:
                data = base64.b64decode(reply["png"], validate=True)
            except (KeyError, TypeError, binascii.Error, ValueError):
                raise KernelError("charts.render failed: the renderer answered no PNG") from None
        else:
            if not isinstance(reply.get("svg"), str):
                raise KernelError("charts.render failed: the renderer answered no SVG")
            data = reply["svg"].encode("utf-8")
        if len(data) > limit:
            raise _Refusal(f"the chart is {len(data)} bytes, more than {limit} (setting charts.max_output_bytes); "
                           "make it smaller, use SVG, or raise the setting")
        return data

    # ---- capabilities ------------------------------------------------------------------------------

    @implements("charts.render")
    async def render(self, caller: str, kind: str, rows: list[dict], x: str, y: str, title: str = "",
                     format: str = "svg", series: str = "", path: str = "", width: int = 0,
                     height: int = 0) -> dict:
        """Draw a chart of `rows`: `x` and `y` name the fields plotted (pie: x is the category, y its value),
        `series` an optional field that colours them. With `path`, also write it into the file root."""
        op = "charts.render"
        subject = path if isinstance(path, str) and path and path.isprintable() and len(path) <= 512 else (
            f"{kind} chart" if kind in KINDS else "chart")
        try:
            if kind not in KINDS:
                raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, not {_shown(kind)}")
            if format not in FORMATS:
                raise InvalidArgument(f"format must be 'svg' or 'png', not {_shown(format)}")
            if not isinstance(path, str):
                raise InvalidArgument(f"path must be a string ('' for none), not {type(path).__name__}")
            if path and not path.lower().endswith("." + format):
                raise InvalidArgument(f"path {path!r} must end in '.{format}' for a {format} chart")
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise InvalidArgument("rows must be a list of objects (one per row, field name to value)")
            if not rows:
                raise InvalidArgument("rows is empty; give at least one row to plot")
            most = self._limits["max_rows"]
            if len(rows) > most:
                raise _Refusal(f"{len(rows)} rows is more than one chart plots ({most}, setting charts.max_rows); "
                               "aggregate or sample the rows first, or raise the setting")
            x = self._text(x, "x", "max_label_chars", empty_ok=False)
            y = self._text(y, "y", "max_label_chars", empty_ok=False)
            series = self._text(series, "series", "max_label_chars", empty_ok=True)
            title = self._text(title, "title", "max_title_chars", empty_ok=True)
            if kind == "pie" and series:
                raise InvalidArgument("a pie chart is coloured by its x field; leave series empty")
            w, h = self._size(width, "width"), self._size(height, "height")
            self._fields(rows, x, "x")
            self._fields(rows, y, "y")
            if series:
                self._fields(rows, series, "series")
            spec = self._spec(kind, rows, x, y, series, title, w, h)
            data = await self._draw(spec, format)
        except _Refusal as refusal:
            raise self.context.denied(caller, op, subject, str(refusal)) from None
        if format == "png":
            content = base64.b64encode(data).decode("ascii")
            w, h = struct.unpack(">II", data[16:24])
        else:
            content = data.decode("utf-8")
            head = re.match(r'<svg[^>]*?\swidth="(\d+)"[^>]*?\sheight="(\d+)"', content)
            if head:
                w, h = int(head.group(1)), int(head.group(2))
        digest = hashlib.sha256(data).hexdigest()
        result: dict[str, Any] = {"kind": kind, "format": format, "width": w, "height": h, "content": content,
                                  "size": len(data), "sha256": digest, "rows": len(rows)}
        if path:
            b64 = content if format == "png" else base64.b64encode(data).decode("ascii")
            written = await self.context.peer("files").write(caller, path, b64, "base64")
            result["path"] = written["path"]
            self.context.audit(caller, op, written["path"], True,
                               f"{kind} {format} {w}x{h}, {len(rows)} rows, {len(data)} bytes, sha256 {digest}")
        return result
