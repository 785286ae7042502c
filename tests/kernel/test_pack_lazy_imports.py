"""The documents, web and data packs import their heavy libraries on first use, not when the runtime starts.

Each check that looks at `sys.modules` runs in a fresh process (other tests import these libraries), on the tiny
ecosystem (conftest's `tiny_ecosystem`): a runtime whose MADs own the three packs starts without python-docx,
openpyxl, python-pptx, lxml, odfpy, trafilatura or sqlglot; then a call of each pack works, and so do two calls of
each at once, which race to import the libraries in the packs' own threads. duckdb stays eager: the data pack
opens its lake when it is made, so that a lake it cannot open stops the start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from generator.kernel.errors import KernelError
from generator.kernel.packs import Pack, PackContext
from generator.kernel.packs.documents.pack import DocumentsPack

LAZY = ("docx", "openpyxl", "pptx", "lxml", "odf", "trafilatura", "sqlglot")

PROBE = """
import asyncio, http.server, importlib, sys, threading

name, state, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
LAZY = {lazy!r}
config = importlib.import_module(f"{{name}}.ecosystem").CONFIG
kernel = importlib.import_module(f"{{name}}.kernel")
Runtime = importlib.import_module(f"{{name}}.kernel.runtime").Runtime


class Site(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        page = self.path == "/"
        body = b"<html><head><title>Lazy</title></head><body><article><p>Imported on first use.</p></article></body></html>"
        self.send_response(200 if page else 404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body) if page else 0))
        self.end_headers()
        self.wfile.write(body if page else b"")

    def log_message(self, *args):
        pass


site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
threading.Thread(target=site.serve_forever, daemon=True).start()


def owner(mad, *families):
    return type(mad.title(), (kernel.Mad,), {{"name": mad, "role": "uses a pack", "owns": families}})


def loaded():
    return sorted({{m.split(".")[0] for m in sys.modules}} & set(LAZY))


async def main():
    mads = (owner("gates", "documents"), owner("marco", "web"), owner("dewey", "data"))
    settings = {{"web": {{"allow": [f"127.0.0.1:{{site.server_port}}"]}}}}
    runtime = Runtime(config.model_copy(update={{"mads": (*config.mads, *mads), "pack_settings": settings}}), state)
    await runtime.start()
    try:
        assert set(runtime.packs) == {{"documents", "files", "web", "data"}}, runtime.packs
        assert not loaded(), f"imported at start-up: {{loaded()}}"
        gates, marco, dewey = (runtime.mad(m) for m in ("gates", "marco", "dewey"))
        url = f"http://127.0.0.1:{{site.server_port}}/"
        written, pages, answers = await asyncio.gather(
            asyncio.gather(*(gates.use("documents.write_docx", path=f"r{{i}}.docx", title="T",
                                       blocks=[{{"paragraph": "hello"}}]) for i in range(calls))),
            asyncio.gather(*(marco.use("web.fetch", url=url) for _ in range(calls))),
            asyncio.gather(*(dewey.use("data.query", sql=f"SELECT {{i}} + 1 AS n") for i in range(calls))))
        assert [w["format"] for w in written] == ["docx"] * calls, written
        assert all(p["title"] == "Lazy" and "Imported on first use." in p["content"] for p in pages), pages
        assert [a["rows"] for a in answers] == [[[i + 1]] for i in range(calls)], answers
        got = await gates.use("documents.read", path="r0.docx")
        assert got["blocks"] == [{{"heading": "T", "level": 0}}, {{"paragraph": "hello"}}], got
        assert {{"docx", "lxml", "trafilatura", "sqlglot"}} <= set(loaded()), loaded()
    finally:
        await runtime.stop()


asyncio.run(main())
print("ok")
"""


@pytest.mark.parametrize("calls", [1, 2], ids=["one-call-each", "two-calls-each-at-once"])
def test_the_packs_libraries_wait_for_their_first_use(tmp_path, tiny_ecosystem, calls):
    root, name = tiny_ecosystem
    probe = subprocess.run([sys.executable, "-c", PROBE.format(lazy=LAZY), name, str(tmp_path / "state"), str(calls)],
                           env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr[-3000:]


def test_a_build_missing_a_packs_library_still_fails_when_the_pack_is_made(tmp_path, monkeypatch):
    """find_spec, not an import: a build without the library fails at start-up, as the import used to."""
    monkeypatch.setitem(sys.modules, "odf", None)  # what an absent package looks like to the import system
    with pytest.raises(ModuleNotFoundError, match="No module named 'odf'") as caught:
        DocumentsPack(PackContext(ecosystem="eco", folder=tmp_path))
    assert caught.value.name == "odf"

    class Needy(Pack):
        name = "needy"
        libraries = ("regen_no_such_library",)

    with pytest.raises(ModuleNotFoundError, match="No module named 'regen_no_such_library'"):
        Needy(PackContext(ecosystem="eco", folder=tmp_path, denied=lambda *_: KernelError("")))
