"""The web pack as a rogue MAD would try it: every way to reach something that is not the public web is
refused, audited, and makes no connection; robots.txt, redirects and limits hold; the pack keeps working.

Real HTTP servers run on 127.0.0.1 in threads (`Site`), each counting the requests it got. They are
reachable only because a test's own settings allow-list them; nothing else is ever contacted: the
pack's resolver is replaced for every test (`dns`), so a host name resolves only to what the test says,
and a name the test did not define fails to resolve.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import hashlib
import http.server
import random
import re
import socket
import ssl
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trafilatura
import trafilatura.metadata
from pack_helpers import CALLER, Recorder, owner, refused, run, running

from generator.kernel.errors import AccessDenied, InvalidArgument, KernelError, NotFound
from generator.kernel.packs import IMPL_ATTR, load
from generator.kernel.packs.web import RobotsVerdict, WebPage
from generator.kernel.packs.web import pack as web_module
from generator.kernel.packs.web.pack import WebPack, _glob, _normalise, not_public, parse_robots

HTML = (b"<!doctype html><html><head><title>Hello  Page</title></head><body><nav>menu</nav><article>"
        b"<h1>Big news</h1><p>This is the first paragraph of the article, with enough words in it to count as "
        b"the main content of the page for the extractor.</p><p>Second <b>bold</b> paragraph with a "
        b"<a href='/x'>link</a>.</p></article><footer>foot</footer></body></html>")


# ---- a site on 127.0.0.1 ---------------------------------------------------------------------------------------

Route = tuple[int, dict[str, str], bytes] | Callable[[http.server.BaseHTTPRequestHandler], None]


class Site:
    """An HTTP(S) server on 127.0.0.1:<free port>; `routes` maps a path (with its query) to (status, headers,
    body) or to a function answering the request itself. /robots.txt is 404 unless routed. `hits` lists
    (path, headers) of every request, robots.txt included."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.routes: dict[str, Route] = {}
        self.hits: list[tuple[str, dict[str, str]]] = []
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                site.hits.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = site.routes.get(self.path)
                if route is None:
                    route = (404, {"Content-Type": "text/plain"}, b"not found")
                if callable(route):
                    route(self)
                    return
                status, headers, body = route
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def page_hits(self) -> list[str]:
        return [p for p, _ in self.hits if p != "/robots.txt"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.close()


@pytest.fixture
def other_site() -> Iterator[Site]:
    s = Site()
    yield s
    s.close()


@dataclass
class FakeDNS:
    """The pack's resolver in tests: names resolve to what a test put here, anything else fails."""

    names: dict[str, list[str] | Callable[[], list[str]]] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        found = self.names.get(host)
        if found is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return found() if callable(found) else list(found)


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(web_module, "resolve", fake)
    return fake


@dataclass
class Env(Recorder):
    def pack(self, tmp_path: Any = "/nonexistent", **settings: Any) -> WebPack:
        return WebPack(self.context(tmp_path, settings))


@pytest.fixture
def env() -> Env:
    return Env()


def allowing(site: Site, *more: str) -> dict[str, Any]:
    return {"allow": [f"127.0.0.1:{site.port}", *more]}


# ---- the ordinary path ----------------------------------------------------------------------------------------


def test_capabilities_are_marked_and_loadable():
    marked = {getattr(v, IMPL_ATTR) for v in vars(WebPack).values() if hasattr(v, IMPL_ATTR)}
    assert marked == {"web.fetch", "web.robots"}
    assert load("web") is WebPack


@pytest.mark.parametrize("key,value", [
    ("allow", "127.0.0.1"), ("allow", ["nope!"]), ("allow", ["127.1"]), ("allow", ["0x7f.0.0.1:80"]),
    ("allow", ["10.0.0.0/33"]), ("allow", ["[::1"]), ("allow", ["host:0"]), ("allow", ["host:"]), ("allow", [""]),
    ("allow", [7]), ("user_agent", ""), ("user_agent", "regen\r\nX-Evil: 1"), ("user_agent", "/1.0"),
    ("max_bytes", 0), ("max_bytes", True), ("max_redirects", 21), ("max_redirects", -1),
    ("timeout_seconds", 0), ("timeout_seconds", "20"), ("connect_timeout_seconds", -1), ("robots_ttl_seconds", -1),
    ("max_extract_bytes", 0), ("max_extract_bytes", 1.5), ("alow", ["127.0.0.1"]),
])
def test_bad_settings_are_refused_naming_the_setting(env: Env, key: str, value: Any):
    with pytest.raises(KernelError, match=f"web\\.{key}"):
        env.pack(**{key: value})


def test_good_settings_are_accepted(env: Env):
    pack = env.pack(allow=["10.0.0.0/8", "[fd00::/8]:443", "::1", "intranet.example:8443", "*.corp.example",
                           "169.254.169.254"], user_agent="Marco-Bot/2.0", max_bytes=10, max_redirects=0,
                    timeout_seconds=1.5, connect_timeout_seconds=1, robots_ttl_seconds=0)
    assert pack._product == "marco-bot"
    assert [a.port for a in pack._allow] == [None, 443, None, 8443, None, None]


def test_html_as_markdown_text_and_raw(env: Env, site: Site):
    site.routes["/page?x=1"] = (200, {"Content-Type": "text/html; charset=utf-8"}, HTML)
    pack = env.pack(**allowing(site))
    url = site.url("/page?x=1#frag")
    got = run(pack.fetch(CALLER, url))
    digest = hashlib.sha256(HTML).hexdigest()
    assert {k: got[k] for k in ("url", "status", "content_type", "title", "size", "sha256", "redirects")} == {
        "url": site.url("/page?x=1"), "status": 200, "content_type": "text/html", "title": "Hello Page",
        "size": len(HTML), "sha256": digest, "redirects": []}
    assert "Big news" in got["content"] and "**bold**" in got["content"]
    assert WebPage.model_validate(got).model_dump() == got  # the catalogue's shape, as the gateway checks it
    assert f"[link]({site.url('/x')})" in got["content"]  # links made absolute against the page's URL
    assert "menu" not in got["content"] and "<p>" not in got["content"]
    text = run(pack.fetch(CALLER, url, format="text"))
    assert "Second bold paragraph" in text["content"] and "**" not in text["content"]
    raw = run(pack.fetch(CALLER, url, format="raw"))
    assert raw["content"] == HTML.decode() and raw["title"] == "Hello Page"
    # robots.txt first (once: cached), then the page three times; the fragment never sent
    assert [p for p, _ in site.hits] == ["/robots.txt", "/page?x=1", "/page?x=1", "/page?x=1"]
    headers = site.hits[1][1]
    assert headers["host"] == f"127.0.0.1:{site.port}" and headers["user-agent"] == "regen-web/1 (+marco)"
    assert set(headers) <= {"host", "user-agent", "accept", "accept-encoding", "connection"}
    ok = [a for a in env.audits if a[1] == "web.fetch"]
    assert len(ok) == 3 and ok[0][:4] == (CALLER, "web.fetch", site.url("/page?x=1"), True)
    assert f"status 200, text/html, {len(HTML)} bytes, sha256 {digest}" == ok[0][4]
    assert env.denials == []


def test_cookies_are_never_sent_back(env: Env, site: Site):
    site.routes["/set"] = (302, {"Location": "/next", "Set-Cookie": "session=abc; Path=/"}, b"")
    site.routes["/next"] = (200, {"Content-Type": "text/plain", "Set-Cookie": "again=1"}, b"ok")
    pack = env.pack(**allowing(site))
    assert run(pack.fetch(CALLER, site.url("/set")))["content"] == "ok"
    run(pack.fetch(CALLER, site.url("/next")))
    assert all("cookie" not in headers for _, headers in site.hits)


def test_fragment_and_empty_pages(env: Env, site: Site):
    site.routes["/frag"] = (200, {"Content-Type": "text/html"}, b"<p>just a fragment</p>")
    site.routes["/empty"] = (200, {"Content-Type": "text/html"}, b"<html><head><title>T</title></head><body></body></html>")
    pack = env.pack(**allowing(site))
    assert run(pack.fetch(CALLER, site.url("/frag")))["content"] == "just a fragment"
    empty = run(pack.fetch(CALLER, site.url("/empty"), format="text"))
    assert empty["title"] == "T" and empty["content"] in ("", "T")


def test_text_types_come_back_as_served(env: Env, site: Site):
    site.routes["/a.txt"] = (200, {"Content-Type": "text/plain; charset=iso-8859-1"}, "café\n".encode("latin-1"))
    site.routes["/a.json"] = (200, {"Content-Type": "application/json"}, b'{"a": [1, 2]}')
    site.routes["/a.md"] = (200, {"Content-Type": "text/markdown"}, b"# Title\n\n*x*")
    site.routes["/feed"] = (200, {"Content-Type": "application/atom+xml"}, b"<feed/>")
    site.routes["/untyped"] = (200, {}, b"plain words")
    site.routes["/404"] = (404, {"Content-Type": "text/plain"}, b"gone")
    pack = env.pack(**allowing(site))
    assert run(pack.fetch(CALLER, site.url("/a.txt")))["content"] == "café\n"
    got = run(pack.fetch(CALLER, site.url("/a.json")))
    assert (got["content"], got["content_type"], got["title"]) == ('{"a": [1, 2]}', "application/json", "")
    assert run(pack.fetch(CALLER, site.url("/a.md"), format="text"))["content"] == "# Title\n\n*x*"
    assert run(pack.fetch(CALLER, site.url("/feed")))["content"] == "<feed/>"
    assert run(pack.fetch(CALLER, site.url("/untyped")))["content"] == "plain words"
    gone = run(pack.fetch(CALLER, site.url("/404")))
    assert (gone["status"], gone["content"]) == (404, "gone")


def test_binary_types_are_refused_naming_the_type(env: Env, site: Site):
    site.routes["/logo.png"] = (200, {"Content-Type": "image/png"}, b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    site.routes["/doc"] = (200, {"Content-Type": "application/pdf"}, b"%PDF-1.7")
    site.routes["/blob"] = (200, {}, b"\x00\x01\x02\xff\xfe")
    pack = env.pack(**allowing(site))
    with pytest.raises(InvalidArgument, match="'image/png', a binary type"):
        run(pack.fetch(CALLER, site.url("/logo.png")))
    with pytest.raises(InvalidArgument, match="application/pdf"):
        run(pack.fetch(CALLER, site.url("/doc"), format="raw"))
    with pytest.raises(InvalidArgument, match="no Content-Type and its body is not text"):
        run(pack.fetch(CALLER, site.url("/blob")))
    assert env.denials == []
    fetches = [a for a in env.audits if a[1] == "web.fetch"]
    assert [a[3] for a in fetches] == [False, False, False]  # the egress trail has them, as failures
    assert "image/png" in fetches[0][4]
    assert [a[1:4] for a in env.audits if a[1] == "web.robots"] == [("web.robots", site.url("/robots.txt"), True)]


@pytest.mark.parametrize("bad,error,match", [
    (123, InvalidArgument, "must be a string"), ("", InvalidArgument, "1 to 8192"),
    ("not a url", InvalidArgument, "whitespace"), ("/relative/path", InvalidArgument, "not an absolute URL"),
    ("http://", InvalidArgument, "no host"), ("http://exa$mple.com/", InvalidArgument, "not a valid"),
    ("http://example.com:99999/", InvalidArgument, "port"), ("http://example.com:0/", InvalidArgument, "port"),
    ("http://[::1/", InvalidArgument, "not a valid URL"), ("http://x" + "a" * 9000, InvalidArgument, "8192"),
    ("http://nowhere.invalid/", NotFound, "does not resolve"),
])
def test_bad_urls_are_plain_errors_not_refusals(env: Env, bad: Any, error: type, match: str):
    pack = env.pack()
    with pytest.raises(error, match=match):
        run(pack.fetch(CALLER, bad))
    assert env.denials == [] and env.audits == []


def test_bad_format_and_max_bytes(env: Env, site: Site):
    site.routes["/"] = (200, {"Content-Type": "text/plain"}, b"x" * 100)
    pack = env.pack(max_bytes=1000, **allowing(site))
    with pytest.raises(InvalidArgument, match="format must be one of 'markdown', 'text', 'raw'"):
        run(pack.fetch(CALLER, site.url(), format="pdf"))
    for bad in (-1, True, "10", 1.5):
        with pytest.raises(InvalidArgument, match="max_bytes"):
            run(pack.fetch(CALLER, site.url(), max_bytes=bad))
    why = refused(env, "web.fetch", site.url(), pack.fetch(CALLER, site.url(), max_bytes=1001))
    assert "web.max_bytes" in why
    assert site.hits == []
    assert run(pack.fetch(CALLER, site.url(), max_bytes=100))["size"] == 100  # exactly the limit is fine


# ---- SSRF: where a connection may go -------------------------------------------------------------------------


ROGUE_HOSTS = [
    "localhost", "LOCALHOST.", "api.localhost", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0", "[::]",
    "127.0.0.1", "127.0.0.1.", "127.255.255.254", "169.254.169.254", "169.254.170.2", "[fd00:ec2::254]",
    "100.100.100.200", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1", "198.18.0.1",
    "192.0.0.8", "192.0.2.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "[fe80::1]",
    "[fc00::1]", "[fec0::1]", "[ff02::1]", "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]", "[64:ff9b:1::1]",
    "[2002:7f00:1::]", "[2002:a9fe:a9fe::1]", "[::127.0.0.1]", "[2001:db8::1]", "[2001::1]", "[100::1]",
    # IPv4 spellings parsers and resolvers disagree about
    "2130706433", "0x7f000001", "0x7f.1", "0x7f.0.0.1", "0177.0.0.1", "0177.1", "127.1", "127.0.1", "017700000001",
    "0x7F.0X0.0.01", "1.0x7f", "3232235777", "0xa9fea9fe", "0251.0376.0251.0376",
]


@pytest.mark.parametrize("allow_it", [False, True], ids=["no-allow-list", "site-allow-listed"])
def test_rogue_hosts_are_refused_before_any_connection(env: Env, site: Site, dns: FakeDNS, allow_it: bool):
    """Every host that is not public is refused and audited, and the site (which all of them would reach)
    counts no request. With the site's 127.0.0.1:port allow-listed, only that exact address and port opens."""
    site.routes["/"] = (200, {"Content-Type": "text/plain"}, b"reached")
    pack = env.pack(**(allowing(site) if allow_it else {}))
    opened = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"} if allow_it else set()
    for host in ROGUE_HOSTS:
        url = site.url("/", host=host)
        if host in opened:
            continue
        why = refused(env, "web.fetch", url, pack.fetch(CALLER, url))
        assert "reached" not in why
        refused(env, "web.robots", url, pack.robots(CALLER, url))
    assert site.hits == [] and dns.calls == []  # no connection, and not one name was even resolved
    assert env.audits == []
    for host in sorted(opened):  # the allow-listed site, however IPv4-mapped, still works after all that
        assert run(pack.fetch(CALLER, site.url("/", host=host)))["content"] == "reached"


def test_refusal_messages_say_what_and_why(env: Env, site: Site):
    pack = env.pack()
    assert "a loopback address" in refused(env, "web.fetch", site.url(), pack.fetch(CALLER, site.url()))
    assert "web.allow" in env.denials[-1][3]
    url = "http://169.254.169.254/latest/meta-data/"
    assert "cloud metadata endpoint" in refused(env, "web.fetch", url, pack.fetch(CALLER, url))
    url = site.url(host="0x7f.1")
    assert "a.b.c.d" in refused(env, "web.fetch", url, pack.fetch(CALLER, url))
    url = "http://[64:ff9b::a9fe:a9fe]/"
    assert "NAT64 form of 169.254.169.254" in refused(env, "web.fetch", url, pack.fetch(CALLER, url))


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://127.0.0.1/", "gopher://127.0.0.1:6379/_INFO", "ws://example.com/", "data:text/plain,hi",
    "javascript:alert(1)", "dict://127.0.0.1:11211/stat",
])
def test_only_http_and_https(env: Env, url: str, dns: FakeDNS):
    pack = env.pack(allow=["127.0.0.1"])
    why = refused(env, "web.fetch", url, pack.fetch(CALLER, url))
    assert "only http and https" in why and dns.calls == []


def test_userinfo_is_refused_even_for_an_allowed_site(env: Env, site: Site):
    pack = env.pack(**allowing(site))
    for userinfo in ("user:pass@", "user@", ":@", "evil.com@"):
        url = f"http://{userinfo}127.0.0.1:{site.port}/"
        assert "user name or password" in refused(env, "web.fetch", url, pack.fetch(CALLER, url))
    assert site.hits == []


def test_allow_list_port_is_exact(env: Env, site: Site, other_site: Site):
    other_site.routes["/"] = (200, {"Content-Type": "text/plain"}, b"other")
    pack = env.pack(**allowing(site))  # the site's port only
    refused(env, "web.fetch", other_site.url(), pack.fetch(CALLER, other_site.url()))
    assert other_site.hits == []
    anyport = env.pack(allow=["127.0.0.0/8"])
    assert run(anyport.fetch(CALLER, other_site.url()))["content"] == "other"


def test_metadata_opens_only_for_an_entry_naming_it(env: Env, dns: FakeDNS):
    """Checked without connecting: `_check` is the gate every request passes."""
    dns.names["meta.internal"] = ["169.254.169.254"]
    for allow in (["169.254.0.0/16"], ["0.0.0.0/0"], ["meta.internal"], ["*.internal"]):
        pack = env.pack(allow=allow)
        with pytest.raises(web_module._Refusal, match="cloud metadata endpoint"):
            run(pack._check("http://meta.internal/"))
        with pytest.raises(web_module._Refusal, match="cloud metadata endpoint"):
            run(pack._check("http://169.254.169.254/"))
    pack = env.pack(allow=["169.254.169.254:80"])
    assert run(pack._check("http://169.254.169.254/latest"))
    with pytest.raises(web_module._Refusal):
        run(pack._check("http://169.254.169.254:8080/"))


def test_a_name_that_resolves_to_any_private_address_is_refused(env: Env, site: Site, dns: FakeDNS):
    dns.names.update({
        "intranet.example": ["10.1.2.3"],
        "mixed.example": ["93.184.216.34", "127.0.0.1"],  # one public, one not: refused, nothing contacted
        "mapped.example": ["::ffff:169.254.169.254"],
        "v6.example": ["fd12:3456::1"],
        "nat64.example": ["64:ff9b::c0a8:101"],
        "scoped.example": ["fe80::1%1"],
    })
    pack = env.pack()
    for name, reason in [("intranet.example", "resolves to 10.1.2.3, which is a private address"),
                         ("mixed.example", "resolves to 127.0.0.1, which is a loopback address"),
                         ("mapped.example", "cloud metadata endpoint"), ("v6.example", "unique local"),
                         ("nat64.example", "NAT64 form of 192.168.1.1"), ("scoped.example", "resolves to fe80::1%1")]:
        url = f"http://{name}:{site.port}/"
        assert reason in refused(env, "web.fetch", url, pack.fetch(CALLER, url))
    assert site.hits == []
    assert [c[0] for c in dns.calls] == ["intranet.example", "mixed.example", "mapped.example", "v6.example",
                                         "nat64.example", "scoped.example"]


def test_the_checked_address_is_the_one_connected_to(env: Env, site: Site, dns: FakeDNS,
                                                     monkeypatch: pytest.MonkeyPatch):
    """No second resolution (DNS rebinding): the request goes to the checked IP with Host set to the name,
    and nothing below the pack asks a resolver for the name again."""
    asked: list[Any] = []
    real = socket.getaddrinfo

    def spy(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    site.routes["/"] = (200, {"Content-Type": "text/plain"}, b"by name")
    dns.names["site.test"] = ["127.0.0.1"]
    pack = env.pack(allow=["site.test"])  # the host allow-listed, not the address
    assert run(pack.fetch(CALLER, f"http://site.test:{site.port}/"))["content"] == "by name"
    assert [h["host"] for _, h in site.hits] == [f"site.test:{site.port}"] * 2
    assert "site.test" not in asked
    assert dns.calls == [("site.test", site.port)]  # once: robots.txt and the page both went to that answer
    # the name rebinds to a private address after the first answer: the next fetch is checked and refused
    answers = iter([["127.0.0.1"], ["10.0.0.7"]])
    dns.names["rebind.test"] = lambda: next(answers)
    pack = env.pack(allow=[f"127.0.0.1:{site.port}"])
    url = f"http://rebind.test:{site.port}/"
    assert run(pack.fetch(CALLER, url))["content"] == "by name"
    assert "10.0.0.7" in refused(env, "web.fetch", url, pack.fetch(CALLER, url))
    assert site.page_hits() == ["/", "/"]  # site.test's page and rebind.test's first; never the second
    # the host entry's port is exact too
    pack = env.pack(allow=["site.test:1"])
    refused(env, "web.fetch", f"http://site.test:{site.port}/", pack.fetch(CALLER, f"http://site.test:{site.port}/"))


def test_proxies_in_the_environment_are_ignored(env: Env, site: Site, other_site: Site,
                                                monkeypatch: pytest.MonkeyPatch):
    other_site.routes[site.url("/")] = (200, {"Content-Type": "text/plain"}, b"via the proxy")
    site.routes["/"] = (200, {"Content-Type": "text/plain"}, b"direct")
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, other_site.url())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    pack = env.pack(**allowing(site))
    assert run(pack.fetch(CALLER, site.url()))["content"] == "direct"
    assert other_site.hits == []


# ---- redirects ----------------------------------------------------------------------------------------------


def redirect(to: str, status: int = 302) -> tuple[int, dict[str, str], bytes]:
    return status, {"Location": to}, b""


def test_redirects_are_followed_and_reported(env: Env, site: Site):
    site.routes["/a"] = redirect("/b", 301)
    site.routes["/b"] = redirect(site.url("/c"), 307)
    site.routes["/c"] = redirect("d?q=1#x", 308)
    site.routes["/d?q=1"] = (200, {"Content-Type": "text/plain"}, b"landed")
    pack = env.pack(**allowing(site))
    got = run(pack.fetch(CALLER, site.url("/a")))
    assert (got["url"], got["content"]) == (site.url("/d?q=1"), "landed")
    assert got["redirects"] == [site.url("/a"), site.url("/b"), site.url("/c")]
    assert "via 3 redirect(s)" in env.audits[-1][4]


@pytest.mark.parametrize("target", [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "http://[::1]:{port}/",
    "http://10.0.0.1/", "http://0x7f.1:{port}/", "file:///etc/passwd", "http://u:p@127.0.0.1:{port}/",
    "http://127.0.0.1:{other}/",
])
def test_a_redirect_to_a_refused_place_is_refused_and_audited(env: Env, site: Site, other_site: Site, target: str):
    target = target.format(port=site.port, other=other_site.port)
    site.routes["/go"] = redirect(target)
    other_site.routes["/"] = (200, {"Content-Type": "text/plain"}, b"other")
    pack = env.pack(**allowing(site))
    subject = str(httpx.URL(site.url("/go")).join(target))  # as the pack resolved the Location
    why = refused(env, "web.fetch", subject, pack.fetch(CALLER, site.url("/go")))
    assert f"reached by a redirect from {site.url('/go')}" in why
    assert other_site.hits == [] and site.page_hits() == ["/go"]
    site.routes["/fine"] = (200, {"Content-Type": "text/plain"}, b"still working")
    assert run(pack.fetch(CALLER, site.url("/fine")))["content"] == "still working"


def test_redirect_loops_and_too_many_redirects(env: Env, site: Site):
    site.routes["/self"] = redirect("/self")
    site.routes["/a"] = redirect("/b")
    site.routes["/b"] = redirect("/a")
    for i in range(7):
        site.routes[f"/c{i}"] = redirect(f"/c{i + 1}")
    site.routes["/c7"] = (200, {"Content-Type": "text/plain"}, b"end")
    pack = env.pack(**allowing(site))
    with pytest.raises(KernelError, match=r"redirect loop: .*/self -> .*/self"):
        run(pack.fetch(CALLER, site.url("/self")))
    with pytest.raises(KernelError, match=r"redirect loop: .*/a -> .*/b -> .*/a"):
        run(pack.fetch(CALLER, site.url("/a")))
    why = refused(env, "web.fetch", site.url("/c6"), pack.fetch(CALLER, site.url("/c0")))
    assert "more than 5 times (setting web.max_redirects)" in why
    assert site.page_hits().count("/c5") == 1 and "/c6" not in site.page_hits()
    assert run(pack.fetch(CALLER, site.url("/c2")))["content"] == "end"  # 5 redirects: fine
    strict = env.pack(max_redirects=0, **allowing(site))
    refused(env, "web.fetch", site.url("/c3"), strict.fetch(CALLER, site.url("/c2")))


# ---- robots.txt -----------------------------------------------------------------------------------------------


ROBOTS = b"""# comments are ignored
User-agent: *
Disallow: /private
Allow: /private/open$

User-agent: regen-web
User-agent: other-bot
Disallow: /no-regen
Disallow: /*.secret$
Allow: /no-regen/but-this

Sitemap: https://example.com/sitemap.xml
"""


def test_robots_rules_are_honoured(env: Env, site: Site):
    site.routes["/robots.txt"] = (200, {"Content-Type": "text/plain"}, ROBOTS)
    for path in ("/private", "/no-regen/x", "/no-regen/but-this/y", "/a.secret", "/a.secret?x", "/fine"):
        site.routes[path] = (200, {"Content-Type": "text/plain"}, b"page")
    pack = env.pack(**allowing(site))
    for path in ("/no-regen/x", "/a.secret"):
        why = refused(env, "web.fetch", site.url(path), pack.fetch(CALLER, site.url(path)))
        assert "robots.txt forbids" in why and "'regen-web' group" in why
    for path in ("/private", "/no-regen/but-this/y", "/a.secret?x", "/fine"):  # regen-web's group replaces '*'
        assert run(pack.fetch(CALLER, site.url(path)))["content"] == "page"
    assert site.page_hits() == ["/private", "/no-regen/but-this/y", "/a.secret?x", "/fine"]
    assert [p for p, _ in site.hits].count("/robots.txt") == 1  # cached for the origin
    verdict = run(pack.robots(CALLER, site.url("/no-regen/x")))
    assert verdict == {"url": site.url("/no-regen/x"), "robots_url": site.url("/robots.txt"),
                       "user_agent": "regen-web/1 (+marco)", "allowed": False, "status": 200,
                       "reason": verdict["reason"], "rule": "'Disallow: /no-regen' (line 8)"}
    assert RobotsVerdict.model_validate(verdict).model_dump() == verdict
    assert run(pack.robots(CALLER, site.url("/no-regen/but-this")))["rule"] == "'Allow: /no-regen/but-this' (line 10)"
    other = env.pack(user_agent="someone-else/2", **allowing(site))  # the '*' group
    refused(env, "web.fetch", site.url("/private"), other.fetch(CALLER, site.url("/private")))
    assert run(other.robots(CALLER, site.url("/private/open")))["allowed"] is True
    assert run(other.robots(CALLER, site.url("/private/open/x")))["allowed"] is False


@pytest.mark.parametrize("status,allowed", [(404, True), (410, True), (401, True), (403, True), (429, False),
                                            (500, False), (503, False)])
def test_robots_status_decides_for_the_whole_origin(env: Env, site: Site, status: int, allowed: bool):
    site.routes["/robots.txt"] = (status, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /")
    site.routes["/page"] = (200, {"Content-Type": "text/plain"}, b"page")
    pack = env.pack(**allowing(site))
    if allowed:
        assert run(pack.fetch(CALLER, site.url("/page")))["content"] == "page"
    else:
        why = refused(env, "web.fetch", site.url("/page"), pack.fetch(CALLER, site.url("/page")))
        assert f"answers {status}, so it is unreachable" in why
        assert site.page_hits() == []
    verdict = run(pack.robots(CALLER, site.url("/page")))
    assert (verdict["allowed"], verdict["status"]) == (allowed, status)


def test_unreachable_robots_means_no_fetch(env: Env, site: Site):
    def hang_up(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)

    site.routes["/robots.txt"] = hang_up
    site.routes["/page"] = (200, {"Content-Type": "text/plain"}, b"page")
    pack = env.pack(**allowing(site))
    with pytest.raises(KernelError, match="the site did not answer: .*robots.txt is read first"):
        run(pack.fetch(CALLER, site.url("/page")))
    assert site.page_hits() == [] and env.audits[-1][3] is False
    site.routes["/robots.txt"] = (404, {}, b"")  # a failure is never cached: the next fetch asks again
    assert run(pack.fetch(CALLER, site.url("/page")))["content"] == "page"


def test_robots_redirects_are_checked_too(env: Env, site: Site):
    site.routes["/robots.txt"] = redirect("http://169.254.169.254/robots.txt")
    site.routes["/page"] = (200, {"Content-Type": "text/plain"}, b"page")
    pack = env.pack(**allowing(site))
    why = refused(env, "web.fetch", site.url("/page"), pack.fetch(CALLER, site.url("/page")))
    assert "redirects to a refused URL" in why and "cloud metadata endpoint" in why
    assert site.page_hits() == []
    site.routes["/robots.txt"] = redirect("/real-robots.txt")
    site.routes["/real-robots.txt"] = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /page")
    fresh = env.pack(**allowing(site))
    refused(env, "web.fetch", site.url("/page"), fresh.fetch(CALLER, site.url("/page")))
    assert site.page_hits() == ["/real-robots.txt"]


def test_robots_cache_ttl(env: Env, site: Site):
    site.routes["/page"] = (200, {"Content-Type": "text/plain"}, b"page")
    pack = env.pack(robots_ttl_seconds=0, **allowing(site))
    run(pack.fetch(CALLER, site.url("/page")))
    site.routes["/robots.txt"] = (200, {}, b"User-agent: *\nDisallow: /")
    refused(env, "web.fetch", site.url("/page"), pack.fetch(CALLER, site.url("/page")))  # asked again at once
    assert [p for p, _ in site.hits] == ["/robots.txt", "/page", "/robots.txt"]


def test_oversized_robots_is_read_up_to_500_kib(env: Env, site: Site):
    head = b"User-agent: *\nDisallow: /early\n"
    filler = b"# " + b"x" * 1000 + b"\n"
    body = head + filler * 600 + b"Disallow: /late\n"  # past 500 KiB: never read
    site.routes["/robots.txt"] = (200, {"Content-Type": "text/plain"}, body)
    for path in ("/early", "/late"):
        site.routes[path] = (200, {"Content-Type": "text/plain"}, b"page")
    pack = env.pack(**allowing(site))
    refused(env, "web.fetch", site.url("/early"), pack.fetch(CALLER, site.url("/early")))
    assert run(pack.fetch(CALLER, site.url("/late")))["content"] == "page"
    assert "first 500 KiB" in run(pack.robots(CALLER, site.url("/late")))["reason"]


def test_robots_matching_follows_rfc_9309():
    group, rules = parse_robots(ROBOTS.decode(), "regen-web")
    assert group == "'regen-web'" and [r.text for r in rules] == ["/no-regen", "/*.secret$", "/no-regen/but-this"]
    assert parse_robots("User-agent: Regen-Web/2.0\nDisallow: /x\n", "regen-web")[0] == "'regen-web'"
    assert parse_robots("User-agent: googlebot\nDisallow: /\n", "regen-web") == ("", ())
    # two groups for the same agent combine
    assert len(parse_robots("User-agent: a\nDisallow: /1\n\nUser-agent: b\nDisallow: /2\nUser-agent: a\nDisallow: /3",
                            "a")[1]) == 2
    assert _glob("/fish", "/fish.html") and _glob("/fish", "/fish/salmon") and not _glob("/fish", "/Fish")
    assert _glob("/*.php$", "/folder/filename.php") and not _glob("/*.php$", "/filename.php?x")
    assert _glob("/fish*.php", "/fishheads/catfish.php?p") and not _glob("/fish*.php", "/Fish.PHP")
    assert _glob("/*", "/") and _glob("*", "/anything") and _glob("/a$", "/a") and not _glob("/a$", "/ab")
    assert _glob("/" + "*a" * 200 + "$", "/" + "a" * 5000)  # no catastrophic backtracking: returns at once
    assert not _glob("/" + "*a" * 200 + "b$", "/" + "a" * 5000)
    assert _normalise("/%7Efoo/%2fbar/caf\u00e9") == "/~foo/%2Fbar/caf%C3%A9"
    robots = web_module._Robots(200, None, "r", parse_robots("User-agent: *\nDisallow: /p\nAllow: /p\n", "x")[1], "'*'")
    assert robots.verdict("/p")[0] is True  # equally specific: Allow wins
    robots = web_module._Robots(200, None, "r", parse_robots("User-agent: *\nDisallow: /\n", "x")[1], "'*'")
    assert robots.verdict("/robots.txt")[0] is True and robots.verdict("/x")[0] is False


def test_address_policy_table():
    import ipaddress

    public = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1",
              "::ffff:8.8.8.8"]
    for text in public:
        assert not_public(ipaddress.ip_address(text)) is None, text
    private = ["127.0.0.1", "10.255.0.1", "169.254.0.1", "::1", "::", "fe80::1", "ff02::1", "2001:db8::1", "fc00::1",
               "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:c0a8:101::1", "::8.8.8.8", "4000::1", "100.127.255.255"]
    for text in private:
        assert not_public(ipaddress.ip_address(text)) is not None, text


# ---- limits -------------------------------------------------------------------------------------------------


def test_oversize_bodies_are_refused_not_cut(env: Env, site: Site):
    def chunked(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for _ in range(20):
            handler.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")

    bomb = gzip.compress(b"z" * 200_000)
    site.routes["/big"] = (200, {"Content-Type": "text/plain"}, b"x" * 20_000)
    site.routes["/chunked"] = chunked
    site.routes["/bomb"] = (200, {"Content-Type": "text/plain", "Content-Encoding": "gzip"}, bomb)
    pack = env.pack(max_bytes=10_000, **allowing(site))
    assert "declares 20000 bytes" in refused(env, "web.fetch", site.url("/big"), pack.fetch(CALLER, site.url("/big")))
    assert "sent more than 10000 bytes" in refused(env, "web.fetch", site.url("/chunked"),
                                                   pack.fetch(CALLER, site.url("/chunked")))
    assert len(bomb) < 10_000
    assert "sent more than 10000 bytes" in refused(env, "web.fetch", site.url("/bomb"),
                                                   pack.fetch(CALLER, site.url("/bomb")))
    refused(env, "web.fetch", site.url("/big"), pack.fetch(CALLER, site.url("/big"), max_bytes=19_999))
    site.routes["/small"] = (200, {"Content-Type": "text/plain"}, b"x" * 500)
    refused(env, "web.fetch", site.url("/small"), pack.fetch(CALLER, site.url("/small"), max_bytes=499))
    assert run(pack.fetch(CALLER, site.url("/small"), max_bytes=500))["size"] == 500


def test_a_slow_site_hits_the_timeout_of_the_whole_fetch(env: Env, site: Site):
    def trickle(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        try:
            for _ in range(100):  # a byte every 50 ms: no single read waits long, the whole takes 5 s
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    site.routes["/slow"] = trickle
    pack = env.pack(timeout_seconds=0.5, **allowing(site))
    started = time.monotonic()
    with pytest.raises(KernelError, match=r"took longer than 0.5 s \(setting web.timeout_seconds\)"):
        run(pack.fetch(CALLER, site.url("/slow")))
    assert time.monotonic() - started < 2
    assert env.audits[-1][3] is False and "web.timeout_seconds" in env.audits[-1][4]


def test_connection_refused_is_a_clear_failure(env: Env):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    pack = env.pack(allow=[f"127.0.0.1:{port}"])
    with pytest.raises(KernelError, match="the site did not answer: could not connect") as caught:
        run(pack.fetch(CALLER, f"http://127.0.0.1:{port}/"))  # robots.txt first: no answer is a failure
    assert not isinstance(caught.value, AccessDenied) and env.denials == []
    assert [a[:4] for a in env.audits] == [(CALLER, "web.robots", f"http://127.0.0.1:{port}/robots.txt", False),
                                           (CALLER, "web.fetch", f"http://127.0.0.1:{port}/", False)]
    assert "could not connect to" in env.audits[0][4] and "could not connect to" in env.audits[1][4]
    verdict = run(pack.robots(CALLER, f"http://127.0.0.1:{port}/"))
    assert verdict["allowed"] is False and verdict["status"] == 0 and "could not connect" in verdict["reason"]


# ---- https: the certificate is checked against the name, the connection goes to the checked address ----------


def _tls_pair(name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for `name` and a client context trusting only its CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regen test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
        f.write(leaf.public_bytes(pem) + key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        f.flush()
        server.load_cert_chain(f.name)
    client = ssl.create_default_context(cadata=ca.public_bytes(pem).decode())
    return server, client


def test_https_verifies_the_real_name_while_connecting_to_the_checked_address(env: Env, dns: FakeDNS,
                                                                              monkeypatch: pytest.MonkeyPatch):
    server_ctx, client_ctx = _tls_pair("site.test")
    names: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)
    monkeypatch.setattr(web_module, "ssl_context", lambda: client_ctx)
    site = Site(tls=server_ctx)
    try:
        site.routes["/"] = (200, {"Content-Type": "text/plain"}, b"secure")
        dns.names["site.test"] = ["127.0.0.1"]
        dns.names["wrong.test"] = ["127.0.0.1"]
        pack = env.pack(**allowing(site))
        got = run(pack.fetch(CALLER, f"https://site.test:{site.port}/"))
        assert (got["content"], got["url"]) == ("secure", f"https://site.test:{site.port}/")
        assert names == ["site.test", "site.test"]  # SNI is the name, though the socket went to 127.0.0.1
        assert [h["host"] for _, h in site.hits] == [f"site.test:{site.port}"] * 2
        # the same address under a name the certificate does not carry: verification fails, nothing is read
        with pytest.raises(KernelError, match="(?i)certificate"):
            run(pack.fetch(CALLER, f"https://wrong.test:{site.port}/"))
        verdict = run(pack.robots(CALLER, f"https://wrong.test:{site.port}/"))
        assert "CERTIFICATE_VERIFY_FAILED" in verdict["reason"] or "certificate" in verdict["reason"].lower()
        assert len(site.hits) == 2
    finally:
        site.close()


# ---- the pack in a runtime: loaded for the MAD that owns the family, settings from the config ----------------


def test_a_mad_owning_web_uses_the_pack_through_the_runtime_and_others_are_refused(tmp_path, eco_modules, site: Site):
    kernel = eco_modules[1]
    site.routes["/"] = (200, {"Content-Type": "text/html"}, HTML)
    Marco = owner(kernel, "marco", "explores the web", "web")

    async def main():
        async with running(eco_modules, tmp_path / "state", Marco,
                           pack_settings={"web": {"allow": [f"127.0.0.1:{site.port}"], "max_bytes": 4096}}) as runtime:
            assert set(runtime.packs) == {"web"}
            marco = runtime.mad("marco")
            page = await marco.use("web.fetch", url=site.url())
            assert page["title"] == "Hello Page" and "Big news" in page["content"]
            assert (await runtime.use("web.robots", caller="marco", url=site.url()))["allowed"] is True
            with pytest.raises(kernel.AccessDenied, match="web.max_bytes"):  # the config's setting, not the default
                await marco.use("web.fetch", url=site.url(), max_bytes=5000)
            with pytest.raises(kernel.AccessDenied, match="cloud metadata endpoint"):
                await marco.use("web.fetch", url="http://169.254.169.254/latest/meta-data/")
            with pytest.raises(kernel.AccessDenied, match="may not use web.fetch"):
                await runtime.mad("rogers").use("web.fetch", url=site.url())
            return runtime.db.query("SELECT actor, action, subject, ok FROM audit_log "
                                    "WHERE (action LIKE 'web.%' OR subject LIKE 'web.%') "
                                    "AND NOT (action IN ('kernel.use', 'tool.call') AND ok = 1) ORDER BY id")

    rows = asyncio.run(main())
    assert rows == [
        {"actor": "marco", "action": "web.robots", "subject": site.url("/robots.txt"), "ok": 1},
        {"actor": "marco", "action": "web.fetch", "subject": site.url(), "ok": 1},
        {"actor": "marco", "action": "web.fetch", "subject": site.url(), "ok": 0},
        {"actor": "marco", "action": "web.fetch", "subject": "http://169.254.169.254/latest/meta-data/", "ok": 0},
        {"actor": "rogers", "action": "kernel.use", "subject": "web.fetch", "ok": 0},
    ]
    assert site.page_hits() == ["/"]  # rogers' call never reached the pack


# ---- review findings: bombs, hostile robots.txt, slow extraction, odd charsets, the robots.txt trail -----------


def _zeros_gzip(mib: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(mib)) + packer.flush()


def test_a_compression_bomb_is_decoded_only_as_far_as_max_bytes(env: Env, site: Site):
    bomb = _zeros_gzip(64)  # 64 MiB of zeros in ~64 KiB: httpx would inflate a whole network read at once
    site.routes["/bomb"] = (200, {"Content-Type": "text/plain", "Content-Encoding": "gzip"}, bomb)
    pack = env.pack(max_bytes=100_000, **allowing(site))  # more than the wire bytes, far less than decoded
    tracemalloc.start()
    try:
        why = refused(env, "web.fetch", site.url("/bomb"), pack.fetch(CALLER, site.url("/bomb")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "sent more than 100000 bytes" in why and len(bomb) < 100_000
    assert peak < 8 << 20, f"decoding took {peak} bytes for a 100000-byte limit"


@pytest.mark.parametrize("coding", ["gzip, gzip", "gzip,deflate", "br", "compress", "x-evil"])
def test_stacked_or_unknown_content_codings_are_refused_audited_and_never_decoded(env: Env, site: Site, coding: str):
    body = gzip.compress(gzip.compress(b"hello"))
    site.routes["/page"] = (200, {"Content-Type": "text/plain", "Content-Encoding": coding}, body)
    site.routes["/robots.txt"] = (200, {"Content-Type": "text/plain", "Content-Encoding": coding}, body)
    site.routes["/ok"] = (200, {"Content-Type": "text/plain"}, b"ok")
    pack = env.pack(**allowing(site))
    with pytest.raises(KernelError, match="Content-Encoding .*one layer of gzip or deflate"):
        run(pack.fetch(CALLER, site.url("/page")))  # robots.txt first: the same refusal, as the site failing
    assert env.audits[-1][1:4] == ("web.fetch", site.url("/page"), False)
    assert env.audits[-2][1:4] == ("web.robots", site.url("/robots.txt"), False)
    site.routes["/robots.txt"] = (404, {}, b"")
    with pytest.raises(KernelError, match="Content-Encoding .*one layer of gzip or deflate"):
        run(pack.fetch(CALLER, site.url("/page")))
    assert env.audits[-1][1:4] == ("web.fetch", site.url("/page"), False) and "Content-Encoding" in env.audits[-1][4]
    assert env.denials == []


def test_gzip_and_both_deflates_are_decoded_and_a_cut_stream_is_a_failure(env: Env, site: Site):
    text = b"plain words " * 500
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    site.routes["/gz"] = (200, {"Content-Type": "text/plain", "Content-Encoding": "gzip"}, gzip.compress(text))
    site.routes["/zlib"] = (200, {"Content-Type": "text/plain", "Content-Encoding": "deflate"}, zlib.compress(text))
    site.routes["/raw"] = (200, {"Content-Type": "text/plain", "Content-Encoding": "Deflate"},
                           raw_deflate.compress(text) + raw_deflate.flush())
    site.routes["/id"] = (200, {"Content-Type": "text/plain", "Content-Encoding": "identity"}, text)
    site.routes["/cut"] = (200, {"Content-Type": "text/plain", "Content-Encoding": "gzip"}, gzip.compress(text)[:-30])
    site.routes["/junk"] = (200, {"Content-Type": "text/plain", "Content-Encoding": "gzip"}, b"not gzip at all")
    pack = env.pack(**allowing(site))
    for path in ("/gz", "/zlib", "/raw", "/id"):
        page = run(pack.fetch(CALLER, site.url(path)))
        assert page["content"] == text.decode() and page["size"] == len(text), path
    with pytest.raises(KernelError, match="ends before its compressed stream does"):
        run(pack.fetch(CALLER, site.url("/cut")))
    with pytest.raises(KernelError, match="not valid gzip"):
        run(pack.fetch(CALLER, site.url("/junk")))


def _reference_glob(pattern: str, text: str) -> bool:
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    regex = ".*".join(re.escape(piece) for piece in body.split("*")) + ("$" if anchored else "")
    return re.match(regex, text, re.DOTALL) is not None


def test_robots_glob_agrees_with_a_reference_and_is_linear():
    rng = random.Random(9309)
    for _ in range(3000):
        pattern = "".join(rng.choice("ab*$/") for _ in range(rng.randint(0, 8)))
        text = "".join(rng.choice("ab$/") for _ in range(rng.randint(0, 10)))
        assert _glob(pattern, text) == _reference_glob(pattern, text), (pattern, text)
    rules = "".join(f"Disallow: /*{'a' * 1500}b{i}\n" for i in range(4))
    robots = web_module._Robots(200, None, "r", parse_robots("User-agent: *\n" + rules, "x")[1], "'*'")
    started = time.monotonic()
    assert robots.verdict("/" + "a" * 8000)[0] is True  # was seconds per rule, on the event loop
    assert time.monotonic() - started < 0.2


def test_robots_rules_are_capped_and_other_agents_cost_nothing():
    many = "User-agent: *\n" + "".join(f"Disallow: /p{i}\n" for i in range(web_module.ROBOTS_MAX_RULES + 500))
    assert len(parse_robots(many, "x")[1]) == web_module.ROBOTS_MAX_RULES
    long_rule = "User-agent: *\nDisallow: /" + "x" * (web_module.ROBOTS_MAX_RULE_CHARS + 1) + "\nDisallow: /short\n"
    assert [r.text for r in parse_robots(long_rule, "x")[1]] == ["/short"]
    agents = "".join(f"User-agent: bot{i}\n" for i in range(5000)) + "User-agent: *\n" + "Disallow: /z\n" * 100
    assert len(parse_robots(agents, "x")[1]) == 100  # rules are kept for this product and '*' only


def test_a_hostile_robots_txt_does_not_stall_the_event_loop(env: Env, site: Site):
    path = "/" + "a" * 3000
    rules = "".join(f"Disallow: /*{'a' * 1500}b\n" for _ in range(4)).encode()
    site.routes["/robots.txt"] = (200, {"Content-Type": "text/plain"}, b"User-agent: *\n" + rules)
    site.routes[path] = (200, {"Content-Type": "text/plain"}, b"ok")
    pack = env.pack(timeout_seconds=5, **allowing(site))
    started = time.monotonic()
    assert run(pack.fetch(CALLER, site.url(path), format="raw"))["content"] == "ok"
    assert time.monotonic() - started < 2


def test_large_html_skips_trafilatura_and_extraction_uses_the_packs_own_threads(env: Env, site: Site,
                                                                              monkeypatch: pytest.MonkeyPatch):
    big = b"<html><head><title>Big</title><script>var x = 1;</script></head><body>" + \
          b"".join(b"<p>para %d</p>" % i for i in range(400)) + b"</body></html>"
    site.routes["/big"] = (200, {"Content-Type": "text/html"}, big)
    site.routes["/small"] = (200, {"Content-Type": "text/html"}, HTML)
    threads: list[str] = []
    real_render = web_module._render

    def render(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_render(*args)

    def no_extract(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a page over max_extract_bytes was handed to trafilatura")

    monkeypatch.setattr(web_module, "_render", render)
    pack = env.pack(max_extract_bytes=4096, **allowing(site))
    assert "Big news" in run(pack.fetch(CALLER, site.url("/small")))["content"]
    monkeypatch.setattr(trafilatura, "extract", no_extract)  # the pack imports them on first use, from there
    monkeypatch.setattr(trafilatura.metadata, "extract_metadata", no_extract)
    page = run(pack.fetch(CALLER, site.url("/big"), format="text"))
    assert page["title"] == "Big" and "para 0 para 1" in page["content"] and "para 399" in page["content"]
    assert "var x" not in page["content"]
    assert threads and all(name.startswith("web-pack") for name in threads)
    assert pack._pool._max_workers == web_module.POOL_THREADS
    run(pack.close())


@pytest.mark.parametrize("charset", ["idna", "punycode", "unicode_escape", "rot13", "base64", "nonsense"])
def test_a_charset_that_is_not_a_web_encoding_is_read_as_utf8_and_audited(env: Env, site: Site, charset: str):
    site.routes["/page"] = (200, {"Content-Type": f"text/plain; charset={charset}"}, b"caf\xc3\xa9 \xff")
    site.routes["/robots.txt"] = (200, {"Content-Type": f"text/plain; charset={charset}"},
                                  b"User-agent: *\nDisallow: /no\n# \xff\n")
    pack = env.pack(**allowing(site))
    assert run(pack.fetch(CALLER, site.url("/page")))["content"] == "caf\u00e9 \ufffd"
    assert run(pack.robots(CALLER, site.url("/no")))["allowed"] is False
    assert [a[1:4] for a in env.audits] == [("web.robots", site.url("/robots.txt"), True),
                                            ("web.fetch", site.url("/page"), True)]


def test_a_failure_of_the_pack_after_the_network_was_reached_is_still_audited(env: Env, site: Site,
                                                                             monkeypatch: pytest.MonkeyPatch):
    site.routes["/page"] = (200, {"Content-Type": "text/html"}, HTML)

    def broken(*args: Any) -> Any:
        raise UnicodeError("a codec blew up")

    monkeypatch.setattr(web_module, "_render", broken)
    pack = env.pack(**allowing(site))
    with pytest.raises(UnicodeError):
        run(pack.fetch(CALLER, site.url("/page")))
    assert env.audits[-1][1:4] == ("web.fetch", site.url("/page"), False) and "UnicodeError" in env.audits[-1][4]


def test_web_robots_downloads_are_audited_with_every_redirect(env: Env, site: Site, other_site: Site):
    site.routes["/robots.txt"] = redirect(other_site.url("/robots.txt"))
    other_site.routes["/robots.txt"] = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private\n")
    pack = env.pack(allow=[f"127.0.0.1:{site.port}", f"127.0.0.1:{other_site.port}"])
    verdict = run(pack.robots(CALLER, site.url("/any?leak=secret")))
    assert verdict["allowed"] is True
    assert len(env.audits) == 1
    actor, action, subject, ok, detail = env.audits[0]
    assert (actor, action, subject, ok) == (CALLER, "web.robots", site.url("/robots.txt"), True)
    assert "status 200" in detail and other_site.url("/robots.txt") in detail and "sha256" in detail
    run(pack.robots(CALLER, site.url("/other")))  # cached: no network, nothing new
    assert len(env.audits) == 1
    site.routes["/robots.txt"] = redirect("http://169.254.169.254/robots.txt")
    fresh = env.pack(allow=[f"127.0.0.1:{site.port}"])
    assert run(fresh.robots(CALLER, site.url("/x")))["allowed"] is False
    assert env.audits[-1][1:4] == ("web.robots", site.url("/robots.txt"), False)
    assert "refused URL" in env.audits[-1][4] and "169.254.169.254" in env.audits[-1][4]
