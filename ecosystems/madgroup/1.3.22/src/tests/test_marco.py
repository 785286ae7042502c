"""End-to-end tests of Marco: every tool, called over MCP on a running ecosystem."""

import pytest

from harness import ToolCallError

from conftest import tool_for

pytestmark = pytest.mark.requirement('R14')


def test_fetch(eco):
    """marco.fetch: Fetch a public web page and return its main content as markdown or text, with its title and sha256."""
    import http.server
    import threading

    from conftest import query

    def serve(pages: dict, hits: list) -> tuple:
        """A stdlib HTTP server on 127.0.0.1:<free port> in a thread: `pages` maps a path to (status, type,
        body; a redirect's body is its Location); `hits` gets every path asked for."""

        class Site(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                status, kind, body = pages.get(self.path, (404, "text/plain", b"not here"))
                self.send_response(status)
                if status in (301, 302, 303, 307, 308):
                    self.send_header("Location", body.decode())
                    body = b""
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, server.server_address[1]

    def refused_and_audited(url: str, **args) -> None:
        with pytest.raises(ToolCallError):
            eco.call("marco.fetch", url=url, **args)
        rows = query(eco.state_dir, "SELECT actor, ok FROM audit_log WHERE action = ? AND subject = ?",
                     ("web.fetch", url))
        assert {"actor": "marco", "ok": 0} in rows, f"the refusal of {url} is not audited: {rows}"

    page = (b"<!doctype html><html><head><title>Marco's Test Page</title></head><body><article>"
            b"<h1>Local Heading</h1><p>The quick brown fox jumps over the lazy dog near the riverbank.</p>"
            b"<p>A second paragraph with <a href=\"/other\">a link</a> and <b>bold words</b> in it.</p>"
            b"</article></body></html>")
    hits: list = []
    server, port = serve({
        "/robots.txt": (200, "text/plain", b"User-agent: *\nDisallow: /private\n"),
        "/page": (200, "text/html; charset=utf-8", page),
        "/private/plans": (200, "text/html", page),
        "/data.json": (200, "application/json", b'{"rows": [1, 2, 3]}'),
        "/big.txt": (200, "text/plain", b"x" * 4096),
        "/logo.png": (200, "image/png", b"\x89PNG\r\n\x1a\n" + bytes(64)),
        "/moved": (302, "text/plain", b"/page"),
        "/escape": (302, "text/plain", b"http://169.254.169.254/latest/meta-data/"),
    }, hits)
    base = f"http://127.0.0.1:{port}"
    # Never reachable, allow-list or not: other loopback spellings, private, link-local and metadata
    # addresses, and other schemes. Refused before any connection (the server counts none).
    elsewhere = [f"http://[::1]:{port}/page", f"http://localhost:{port}/page", f"http://2130706433:{port}/page",
                 f"http://0x7f.1:{port}/page", f"http://127.1:{port}/page",
                 "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://192.168.1.1/",
                 "file:///etc/passwd", f"ftp://127.0.0.1:{port}/page"]

    try:
        # The spec allow-lists nothing on this machine: a server on 127.0.0.1 is out of reach, as is every
        # other non-public address; each refusal is audited and the server is never contacted.
        for url in [base + "/page", base + "/robots.txt", f"http://[::ffff:127.0.0.1]:{port}/page", *elsewhere]:
            refused_and_audited(url)
        with pytest.raises(ToolCallError):
            eco.call("marco.fetch", url=base + "/page", format="pdf")
        with pytest.raises(ToolCallError):
            eco.call("marco.fetch", url="not a url")
        assert hits == []
        assert "marco.fetch" in eco.list_tools()
    finally:
        server.shutdown()
        server.server_close()


def test_robots(eco):
    """marco.robots: Whether robots.txt lets this ecosystem fetch a URL, and the rule that decided."""
    import http.server
    import threading

    from conftest import query

    def serve(pages: dict, hits: list) -> tuple:
        """A stdlib HTTP server on 127.0.0.1:<free port> in a thread: `pages` maps a path to (status, type,
        body; a redirect's body is its Location); `hits` gets every path asked for."""

        class Site(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                status, kind, body = pages.get(self.path, (404, "text/plain", b"not here"))
                self.send_response(status)
                if status in (301, 302, 303, 307, 308):
                    self.send_header("Location", body.decode())
                    body = b""
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, server.server_address[1]

    def refused_and_audited(url: str, **args) -> None:
        with pytest.raises(ToolCallError):
            eco.call("marco.robots", url=url, **args)
        rows = query(eco.state_dir, "SELECT actor, ok FROM audit_log WHERE action = ? AND subject = ?",
                     ("web.robots", url))
        assert {"actor": "marco", "ok": 0} in rows, f"the refusal of {url} is not audited: {rows}"

    page = (b"<!doctype html><html><head><title>Marco's Test Page</title></head><body><article>"
            b"<h1>Local Heading</h1><p>The quick brown fox jumps over the lazy dog near the riverbank.</p>"
            b"<p>A second paragraph with <a href=\"/other\">a link</a> and <b>bold words</b> in it.</p>"
            b"</article></body></html>")
    hits: list = []
    server, port = serve({
        "/robots.txt": (200, "text/plain", b"User-agent: *\nDisallow: /private\n"),
        "/page": (200, "text/html; charset=utf-8", page),
        "/private/plans": (200, "text/html", page),
        "/data.json": (200, "application/json", b'{"rows": [1, 2, 3]}'),
        "/big.txt": (200, "text/plain", b"x" * 4096),
        "/logo.png": (200, "image/png", b"\x89PNG\r\n\x1a\n" + bytes(64)),
        "/moved": (302, "text/plain", b"/page"),
        "/escape": (302, "text/plain", b"http://169.254.169.254/latest/meta-data/"),
    }, hits)
    base = f"http://127.0.0.1:{port}"
    # Never reachable, allow-list or not: other loopback spellings, private, link-local and metadata
    # addresses, and other schemes. Refused before any connection (the server counts none).
    elsewhere = [f"http://[::1]:{port}/page", f"http://localhost:{port}/page", f"http://2130706433:{port}/page",
                 f"http://0x7f.1:{port}/page", f"http://127.1:{port}/page",
                 "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://192.168.1.1/",
                 "file:///etc/passwd", f"ftp://127.0.0.1:{port}/page"]

    down_hits: list = []
    down, down_port = serve({"/robots.txt": (503, "text/plain", b"busy")}, down_hits)
    try:
        # The spec allow-lists nothing on this machine: not even robots.txt is read from 127.0.0.1.
        for url in [base + "/page", f"http://127.0.0.1:{down_port}/page", *elsewhere]:
            refused_and_audited(url)
        with pytest.raises(ToolCallError):
            eco.call("marco.robots", url="not a url")
        assert hits == [] and down_hits == []
        assert "marco.robots" in eco.list_tools()
    finally:
        for running in (server, down):
            running.shutdown()
            running.server_close()
