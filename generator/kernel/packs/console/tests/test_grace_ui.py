"""Grace's web UI over HTTP: sign-in and sessions, CSRF and Origin checks, size limits, headers, escaping, chat.

In-process with Starlette's TestClient (the app's lifespan starts and stops the runtime), plus one
test against the real server for the body limit, since TestClient reads a body whole before the
app sees it.
"""

from __future__ import annotations

import importlib
import re
import socket
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from generator import harness

ORIGIN = {"origin": "http://testserver"}
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=1</script>'
PAGES = ["/", "/chat", "/conversations", "/mads", "/health", "/audit"]


class Eco:
    """An in-process app with two clients: admin (every tool) and viewer (rogers.* only)."""

    def __init__(self, name: str, state: Path):
        config = importlib.import_module(f"{name}.ecosystem").CONFIG
        runtime_mod = importlib.import_module(f"{name}.kernel.runtime")
        self.gateway = importlib.import_module(f"{name}.kernel.gateway")
        self.grace_mod = importlib.import_module(f"{name}.kernel.packs.console.pack")
        self.clients = importlib.import_module(f"{name}.kernel.clients").ClientRegistry(state)
        self.admin = self.clients.add("admin", ["*"])
        self.viewer = self.clients.add("viewer", ["rogers.*"])
        self.runtime = runtime_mod.Runtime(config, state)
        self.app = self.gateway.build_app(self.runtime, self.clients)

    @property
    def grace(self):
        return self.app.state.grace

    def audit(self, action: str) -> list[dict]:
        return [a for a in self.runtime.audit.recent(200) if a["action"] == action]


@pytest.fixture
def eco(grace_eco, tmp_path, monkeypatch):
    _, name = grace_eco
    config = importlib.import_module(f"{name}.ecosystem").CONFIG
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    return Eco(name, tmp_path / "state")


@pytest.fixture
def client(eco):
    with TestClient(eco.app, follow_redirects=False) as c:
        yield c


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def sign_in(c: TestClient, token: str, next_path: str = "/") -> None:
    form = c.get("/signin")
    r = c.post("/signin", data={"csrf": csrf_of(form.text), "token": token, "next": next_path}, headers=ORIGIN)
    assert r.status_code == 303, r.text


def say(c: TestClient, message: str) -> str:
    """Send a chat message as a browser would; return the chat page that follows."""
    r = c.post("/chat", data={"csrf": csrf_of(c.get("/chat").text), "message": message}, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/chat", r.text
    return c.get("/chat").text


# ---- sign-in, sessions -----------------------------------------------------------------------

def test_every_page_needs_sign_in(client):
    for path in [*PAGES, "/conversations/abc"]:
        r = client.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/signin?next="), path
    r = client.post("/chat", data={"message": "hi"}, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"].startswith("/signin")


def test_sign_in_sets_a_strict_session_cookie_and_returns_to_the_page(eco, client):
    r = client.get("/mads")
    assert r.headers["location"] == "/signin?next=%2Fmads"
    form = client.get(r.headers["location"])
    anonymous_sid = client.cookies["grace_session"]
    r = client.post("/signin", data={"csrf": csrf_of(form.text), "token": eco.admin, "next": "/mads"}, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/mads"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http on loopback: a Secure cookie would never come back
    assert client.cookies["grace_session"] != anonymous_sid  # a fresh id after sign-in: no session fixation
    page = client.get("/mads")
    assert page.status_code == 200 and "Signed in as <strong>admin</strong>" in page.text
    assert eco.admin not in page.text
    [entry] = eco.audit("grace.signin")
    assert entry["ok"] and entry["actor"] == "client:admin"


def test_session_cookie_is_secure_over_https(eco):
    with TestClient(eco.app, base_url="https://testserver", follow_redirects=False) as c:
        form = c.get("/signin")
        assert "Secure" in form.headers["set-cookie"]
        r = c.post("/signin", data={"csrf": csrf_of(form.text), "token": eco.admin},
                   headers={"origin": "https://testserver"})
        assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
        assert r.headers["strict-transport-security"].startswith("max-age=")


def test_wrong_token_is_refused_clearly_and_audited(eco, client):
    form = client.get("/signin")
    r = client.post("/signin", data={"csrf": csrf_of(form.text), "token": eco.admin[:-2] + "xy"}, headers=ORIGIN)
    assert r.status_code == 401
    assert "That token was not accepted" in r.text
    assert eco.admin[:-2] not in r.text  # the attempt is not echoed back
    assert client.get("/").status_code == 303  # still signed out
    [entry] = eco.audit("grace.signin")
    assert not entry["ok"] and entry["actor"] == "anonymous" and entry["detail"] == "invalid token"
    assert eco.admin[:-2] not in str(eco.runtime.audit.recent(50))


def test_repeated_failures_lock_the_address_out_but_never_a_valid_token(eco, client):
    csrf = csrf_of(client.get("/signin").text)
    for _ in range(5):
        assert client.post("/signin", data={"csrf": csrf, "token": "guess"}, headers=ORIGIN).status_code == 401
    r = client.post("/signin", data={"csrf": csrf, "token": "another guess"}, headers=ORIGIN)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert "Too many failed sign-ins" in r.text
    refused = [a for a in eco.audit("grace.signin") if not a["ok"]]
    assert len(refused) == 6 and "too many" in refused[0]["detail"]
    # Someone else behind the same address (a proxy) with a real token is not locked out by the guesser.
    r = client.post("/signin", data={"csrf": csrf, "token": eco.admin}, headers=ORIGIN)
    assert r.status_code == 303 and client.get("/").status_code == 200


def test_the_operator_lifts_a_sign_in_lock_from_the_command_line(eco, client, grace_eco, capsys):
    config = importlib.import_module(f"{grace_eco[1]}.ecosystem").CONFIG
    cli = importlib.import_module(f"{grace_eco[1]}.kernel.cli")
    csrf = csrf_of(client.get("/signin").text)
    for _ in range(5):
        client.post("/signin", data={"csrf": csrf, "token": "guess"}, headers=ORIGIN)
    assert client.post("/signin", data={"csrf": csrf, "token": "guess"}, headers=ORIGIN).status_code == 429
    assert cli.main(config, ["clients", "unlock", "testclient", "--state", str(eco.runtime.state_dir)]) == 0
    assert "unlocked testclient (5 failed sign-ins forgotten)" in capsys.readouterr().out
    assert client.post("/signin", data={"csrf": csrf, "token": "guess"}, headers=ORIGIN).status_code == 401
    assert [a["subject"] for a in eco.audit("clients.unlock")] == ["testclient"]
    assert cli.main(config, ["clients", "unlock", "--state", str(eco.runtime.state_dir)]) == 2  # which, then?


def test_sessions_expire_end_at_sign_out_and_at_revocation(eco, client):
    clock = [1000.0]
    eco.grace.sessions.clock = lambda: clock[0]
    sign_in(client, eco.admin)
    assert client.get("/").status_code == 200
    clock[0] += eco.grace.sessions.idle_s + 1
    assert client.get("/").status_code == 303  # idle too long

    sign_in(client, eco.admin)
    sid = client.cookies["grace_session"]
    r = client.post("/signout", data={"csrf": csrf_of(client.get("/").text)}, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/signin?m=signed-out"
    assert 'grace_session=""' in r.headers["set-cookie"] or "Max-Age=0" in r.headers["set-cookie"]
    client.cookies.set("grace_session", sid)  # a copied cookie does not outlive sign-out
    assert client.get("/").status_code == 303
    assert eco.audit("grace.signout")[0]["actor"] == "client:admin"

    sign_in(client, eco.viewer)
    eco.clients.revoke("viewer")  # as `python -m <eco> clients revoke viewer` does, while the server runs
    r = client.get("/chat")
    assert r.status_code == 303 and r.headers["location"].endswith("&m=expired")
    assert eco.audit("grace.session-ended")


def test_sign_in_only_returns_to_local_paths(eco, client):
    for bad in ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"]:
        form = client.get("/signin")
        r = client.post("/signin", data={"csrf": csrf_of(form.text), "token": eco.admin, "next": bad}, headers=ORIGIN)
        assert r.headers["location"] == "/", bad
        client.cookies.clear()


# ---- CSRF, Origin, size ----------------------------------------------------------------------

def _chat_messages(eco) -> list[str]:
    return [m["content"] for c in eco.runtime.bus.list(50) for m in eco.runtime.bus.history(c["id"], 50)]


def test_post_without_or_with_a_wrong_csrf_token_is_refused(eco, client):
    sign_in(client, eco.admin)
    good = csrf_of(client.get("/chat").text)
    wrong = good[:-1] + ("B" if good.endswith("A") else "A")  # one character off, never the token itself
    for data in ({"message": "no token"}, {"message": "wrong token", "csrf": wrong}, {"message": "empty", "csrf": ""}):
        r = client.post("/chat", data=data, headers=ORIGIN)
        assert r.status_code == 403, data
        assert "Request refused" in r.text
    other = TestClient(eco.app, follow_redirects=False)  # another browser (the app is running already)
    sign_in(other, eco.admin)
    theirs = csrf_of(other.get("/chat").text)  # another session's token is no good here
    assert client.post("/chat", data={"message": "theirs", "csrf": theirs}, headers=ORIGIN).status_code == 403
    assert client.post("/signout", data={"csrf": "forged"}, headers=ORIGIN).status_code == 403
    assert client.get("/").status_code == 200  # the refused sign-out did not sign out
    r = client.post("/signin", data={"token": eco.admin}, headers=ORIGIN)  # login CSRF
    assert r.status_code == 403
    assert not any(m in _chat_messages(eco) for m in ("no token", "wrong token", "empty", "theirs"))
    assert len(eco.audit("grace.csrf-rejected")) == 6
    assert client.post("/chat", data={"message": "fine", "csrf": good}, headers=ORIGIN).status_code == 303


def test_post_from_another_origin_is_refused(eco, client):
    sign_in(client, eco.admin)
    csrf = csrf_of(client.get("/chat").text)
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"}, {}, {"referer": "http://evil.example/x"}):
        r = client.post("/chat", data={"message": "cross-site", "csrf": csrf}, headers=headers)
        assert r.status_code == 403, headers
    assert "cross-site" not in _chat_messages(eco)
    assert len(eco.audit("grace.origin-rejected")) == 4
    same = {"referer": "http://testserver/chat"}  # a browser that sends no Origin still sends a same-origin Referer
    assert client.post("/chat", data={"message": "same site", "csrf": csrf}, headers=same).status_code == 303


def test_oversize_body_is_refused_with_413(eco, client):
    sign_in(client, eco.admin)
    csrf = csrf_of(client.get("/chat").text)
    big = "x" * (eco.grace_mod.MAX_BODY + 1)
    r = client.post("/chat", data={"message": big, "csrf": csrf}, headers=ORIGIN)
    assert r.status_code == 413 and "larger than" in r.text
    assert big not in _chat_messages(eco)
    form = {**ORIGIN, "content-type": "application/x-www-form-urlencoded"}
    r = client.post("/signin", content=b"token=" + b"a" * 70_000, headers=form)
    assert r.status_code == 413
    chunks = iter([b"csrf=" + csrf.encode() + b"&message=", *[b"y" * 8192] * 10])  # chunked: no Content-Length
    r = client.post("/chat", content=chunks, headers=form)
    assert "content-length" not in r.request.headers and r.status_code == 413


def test_real_server_refuses_a_huge_body_before_reading_it(grace_eco, tmp_path):
    """The server answers 413 from the Content-Length alone, with the 50 MB body never sent."""
    root, name = grace_eco
    with harness.running_ecosystem(name, tmp_path / "state", cwd=root) as eco:
        with socket.create_connection(("127.0.0.1", eco.port), timeout=10) as sock:
            sock.sendall(b"POST /signin HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://127.0.0.1\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 50000000\r\n\r\ntoken=")
            head = sock.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head


# ---- headers and escaping --------------------------------------------------------------------

def test_security_headers_on_every_response(eco, client):
    sign_in(client, eco.admin)
    responses = {p: client.get(p) for p in [*PAGES, "/signin", "/nowhere", "/healthz"]}
    responses["csrf-refused"] = client.post("/chat", data={"message": "x"}, headers=ORIGIN)
    page = responses["/"].text
    for asset in re.findall(r'(?:href|src)="(/static/[^"]+)"', page):
        responses[asset] = client.get(asset)
    assert any(k.endswith(".js") for k in responses) and any(k.endswith(".css") for k in responses)
    for path, r in responses.items():
        csp = r.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp, path
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, path
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["x-frame-options"] == "DENY", path
        assert r.headers["referrer-policy"] == "same-origin", path
        assert "camera=()" in r.headers["permissions-policy"], path
    anonymous = TestClient(eco.app)  # a second browser, signed out (the app is running already)
    pages = {"/signin": anonymous.get("/signin"), **{p: responses[p] for p in PAGES}}
    for path, r in pages.items():
        html = r.text
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store", path
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), f"inline script on {path}"
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html), f"inline style or handler on {path}"


def test_all_user_content_is_escaped(eco, client):
    sign_in(client, eco.admin)
    say(client, f"/rogers.create_conversation title='{XSS}'")
    say(client, XSS)  # prose: the echo model repeats it, so the MAD's answer carries it too
    conv = next(c for c in eco.runtime.bus.list(50) if c["title"] == XSS)
    # an audit detail an attacker controls: the Origin of a refused POST
    client.post("/chat", data={"message": "x"}, headers={"origin": f"http://{XSS}"})
    pages = {p: client.get(p).text for p in [*PAGES, f"/conversations/{conv['id']}"]}
    for path, html in pages.items():
        assert "<img src=x" not in html and "<script>window" not in html, path
    assert "&lt;img src=x onerror=&quot;window.__xss=1&quot;&gt;" in pages["/conversations"]
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in pages["/chat"]
    assert "[offline echo model] &lt;img" in pages["/chat"]
    assert "&lt;script&gt;" in pages["/audit"]
    assert "Secrets keeper &lt;of the group&gt;" in pages["/mads"]
    assert "A tiny &lt;test&gt; ecosystem &amp; friends" in pages["/"]


# ---- chat ------------------------------------------------------------------------------------

def test_prose_goes_to_fiedler_and_is_recorded_on_the_bus(eco, client):
    sign_in(client, eco.admin)
    page = say(client, "hello there")
    assert "[offline echo model] hello there" in page
    assert "You are Fiedler" not in page  # the echo model never repeats the system (imperator) prompt
    [conv] = [c for c in eco.runtime.bus.list(50) if c["title"] == "Grace chat · admin"]
    history = eco.runtime.bus.history(conv["id"], 50)
    assert [(m["sender"], m["kind"]) for m in history] == [("client:admin", "message"), ("grace", "request"),
                                                          ("fiedler", "reply")]
    assert len({m["correlation_id"] for m in history}) == 1
    assert conv["id"] in client.get("/conversations").text
    assert "[offline echo model] hello there" in client.get(f"/conversations/{conv['id']}").text


def test_commands_route_to_tools(eco, client):
    sign_in(client, eco.admin)
    say(client, "needle in the haystack")
    page = say(client, "/rogers.search query=needle limit=5")
    assert "rogers.search" in page and "needle in the haystack" in page
    say(client, '/rogers.create_conversation title="Team notes" participants=["turing"]')
    assert any(c["title"] == "Team notes" and "turing" in c["participants"] for c in eco.runtime.bus.list(50))
    assert "limit: expected int, got &#x27;many&#x27;" in say(client, "/rogers.search query=x limit=many")
    assert "unknown command /nope.tool" in say(client, "/nope.tool")
    assert "has no parameter &#x27;colour&#x27;" in say(client, "/rogers.search query=x colour=red")
    assert "missing query" in say(client, "/rogers.search")
    assert "query: the value is not valid JSON" in say(client, '/rogers.search query="open')
    assert "/turing.get_secret name=&lt;str&gt;" in say(client, "/help")


def test_a_token_only_reaches_what_it_allows(eco, client):
    sign_in(client, eco.viewer)
    page = say(client, "/turing.list_secrets")
    assert "access_denied: your token does not allow turing.list_secrets" in page
    assert "access_denied: your token does not allow fiedler.send" in say(client, "please answer")
    assert "[offline echo model]" not in client.get("/chat").text
    assert "/rogers.search" in page and "/turing.get_secret" not in page  # only allowed commands are offered
    r = client.get("/audit")
    assert r.status_code == 403 and "grace.audit" in r.text
    denied = eco.audit("grace.tool-denied")
    assert {a["subject"] for a in denied} == {"turing.list_secrets", "fiedler.send"}
    assert all(a["actor"] == "client:viewer" for a in denied)
    assert eco.audit("grace.view-denied")[0]["subject"] == "grace.audit"
    assert "search" in say(client, "/rogers.search query=x")  # what it allows still works


def test_a_secret_is_shown_once_and_never_stored(eco, client):
    secret = "hunter2-never-on-disk-" + uuid.uuid4().hex
    sign_in(client, eco.admin)
    say(client, f"/turing.set_secret name=db_password value={secret}")
    page = say(client, "/turing.get_secret name=db_password")
    assert secret in page  # the answer, shown to the client that asked
    assert secret not in client.get("/chat").text  # once
    contents = _chat_messages(eco)
    assert not any(secret in c for c in contents)
    assert "/turing.set_secret name=db_password value=[redacted]" in contents
    db = sqlite3.connect(f"file:{eco.runtime.state_dir / 'ecosystem.db'}?mode=ro", uri=True)
    rows = " ".join(str(r) for t in ("messages", "audit_log") for r in db.execute(f"SELECT * FROM {t}"))
    db.close()
    assert secret not in rows


def test_a_flood_of_sign_in_forms_writes_nothing_and_signs_nobody_out(eco):
    store = eco.grace_mod.SessionStore(eco.runtime.db, max_sessions=3)
    signed_in = store.new("admin", "credential")
    visitors = [store.anonymous() for _ in range(50)]  # what GET /signin does for every cookieless visitor
    assert eco.runtime.db.one("SELECT COUNT(*) AS n FROM console_sessions")["n"] == 1
    assert store.get(signed_in.sid).client == "admin"
    assert all(store.get(v.sid).csrf == v.csrf and not store.get(v.sid).client for v in visitors)
    other = visitors[0].sid[:-1] + ("A" if visitors[0].sid[-1] != "A" else "B")
    assert store.get(other).csrf != visitors[0].csrf  # the form's token is the cookie's own: another cookie, another token
    stale = f"anon.{int(time.time()) - 16 * 60}.{'x' * 43}"
    future = f"anon.{int(time.time()) + 3600}.{'x' * 43}"
    assert store.get(stale) is None and store.get(future) is None and store.get("anon.1.short") is None
    newer = [store.new("admin", "credential") for _ in range(3)]  # at the bound the oldest signed-in one goes
    assert store.get(signed_in.sid) is None and all(store.get(s.sid) for s in newer)


def test_recorded_commands_hide_secret_values_however_quoted(eco):
    record = eco.grace_mod.recorded_command
    for typed in ('/turing.set_secret name=db value="two words secret"', "/turing.set_secret value='two words secret' name=db",
                  '/turing.set_secret name=db value=["two words secret"]', "/turing.set_secret\tname=db\nvalue=two-words-secret"):
        recorded = record(typed)
        assert "two" not in recorded and "value=[redacted]" in recorded and "name=db" in recorded, typed
    unreadable = record('/turing.set_secret name=db value="unclosed two')
    assert unreadable == "/turing.set_secret [arguments not recorded: the command could not be read]"
    assert record("/rogers.search query='a b' limit=5") == "/rogers.search query='a b' limit=5"


@pytest.mark.parametrize(
    ("allow", "may_list", "may_read", "may_audit"),
    [
        (["grace.status"], False, False, False),  # a status probe reads no conversation
        (["grace.*"], False, False, True),  # the auditor: the audit log, not the conversations
        (["rogers.list_conversations"], True, False, False),  # the titles, not what was said
        (["rogers.list_conversations", "rogers.history"], True, True, False),
    ],
    ids=["status-only", "auditor", "titles-only", "reader"],
)
def test_pages_show_only_what_the_clients_tools_allow(eco, client, allow, may_list, may_read, may_audit):
    token = eco.clients.add("limited", allow)
    sign_in(client, token)
    general = next(c for c in eco.runtime.bus.list(50) if c["title"] == "general")
    posted = eco.runtime.bus.post(general["id"], "rogers", "the words only a reader may see")
    assert posted
    nav = client.get("/").text.split('<nav aria-label="Main">', 1)[1].split("</nav>", 1)[0]
    overview = client.get("/").text
    assert ('href="/conversations"' in nav) is may_list and ("Recent conversations" in overview) is may_list
    assert ('href="/audit"' in nav) is may_audit
    listing = client.get("/conversations")
    assert listing.status_code == (200 if may_list else 403)
    reading = client.get(f"/conversations/{general['id']}")
    assert reading.status_code == (200 if may_read else 403)
    assert ("the words only a reader may see" in reading.text) is may_read
    if not may_read:
        assert "rogers.history" in reading.text  # the refusal names what would allow it
    assert client.get("/audit").status_code == (200 if may_audit else 403)
    denied = {a["subject"] for a in eco.audit("grace.view-denied") if a["actor"] == "client:limited"}
    assert ("rogers.history" in denied) is not may_read and ("rogers.list_conversations" in denied) is not may_list


def test_a_post_made_for_a_client_shows_the_client_as_its_sender(eco, client):
    import asyncio

    general = next(c for c in eco.runtime.bus.list(50) if c["title"] == "general")
    asyncio.run(eco.runtime.invoke_tool("rogers", "post", {"conversation_id": general["id"], "content": "from ci"},
                                        principal="client:ci"))
    sign_in(client, eco.admin)
    page = client.get(f"/conversations/{general['id']}").text
    row = next(r for r in page.split("<tr>") if "from ci" in r)
    assert "client:ci" in row and "via rogers" in row


# ---- tool answers as people read them -------------------------------------------------------

LITERAL = "<b>&\"'"  # what a person typed: it must reach the page escaped once, and read back as typed
ONCE = "&lt;b&gt;&amp;&quot;&#x27;"


def test_tool_answers_are_tables_or_fields_with_the_raw_json_behind_a_toggle(eco, client):
    sign_in(client, eco.admin)
    say(client, "/turing.set_secret name=listed value=v1")
    page = say(client, "/turing.list_secrets")
    reply = page.rsplit('<div class="msg', 1)[1]  # the newest message: the answer to /turing.list_secrets
    assert '<table class="stack records">' in reply
    assert [h for h in re.findall(r'<th scope="col">(.*?)</th>', reply)] == ["name", "version", "updated_<wbr>at"]
    assert '<td data-label="name"><div>listed</div></td>' in reply
    raw = reply.split('<details class="raw"><summary>Raw JSON</summary>', 1)[1]  # JSON only behind the toggle
    assert raw.startswith("<pre>[\n  {\n    &quot;name&quot;: &quot;listed&quot;")
    assert "&quot;name&quot;" not in reply.split('<details class="raw">', 1)[0]
    status = say(client, "/grace.status").rsplit('<div class="msg', 1)[1]
    assert '<dl class="kv fields"><dt>name</dt>' in status and '<dt class="wide">mads</dt>' in status
    [conv] = [c for c in eco.runtime.bus.list(50) if c["title"] == "Grace chat · admin"]
    stored = client.get(f"/conversations/{conv['id']}").text  # the stored replies read the same way
    assert '<td data-label="name"><div>listed</div></td>' in stored and '<dl class="kv fields"><dt>name</dt>' in stored
    assert stored.count('<details class="raw">') == 3  # set_secret, list_secrets, status


def test_stored_content_is_escaped_exactly_once_wherever_it_is_shown(eco, client):
    import asyncio

    general = next(c for c in eco.runtime.bus.list(50) if c["title"] == "general")
    asyncio.run(eco.runtime.invoke_tool("rogers", "post", {"conversation_id": general["id"], "content": LITERAL},
                                        principal="client:ci"))
    sign_in(client, eco.admin)
    chat = say(client, f"/rogers.history conversation_id={general['id']}")
    [conv] = [c for c in eco.runtime.bus.list(50) if c["title"] == "Grace chat · admin"]
    pages = {"chat": chat, "conversation": client.get(f"/conversations/{general['id']}").text,
             "chat record": client.get(f"/conversations/{conv['id']}").text}
    for name, html in pages.items():
        shown = html.split('<details class="raw">', 1)[0]  # what is on show (the raw JSON is JSON, folded)
        assert ONCE in shown, name
        for twice in ("&amp;lt;", "&amp;amp;", "&amp;quot;", "&amp;#x27;", "\\&quot;", "\\u0026"):
            assert twice not in shown, (name, twice)
    # The history's rows name the client the post was made for, via the MAD that made it.
    row = next(r for r in chat.split("<tr>") if ONCE in r)
    assert 'client:ci <span class="muted small">via rogers</span>' in row


def test_a_post_made_for_a_client_in_the_chat_shows_the_client_via_the_mad(eco, client):
    import asyncio

    sign_in(client, eco.admin)
    say(client, "/help")  # the chat's conversation exists from the first message
    [conv] = [c for c in eco.runtime.bus.list(50) if c["title"] == "Grace chat · admin"]
    asyncio.run(eco.runtime.invoke_tool("rogers", "post", {"conversation_id": conv["id"], "content": "from ci"},
                                        principal="client:ci"))
    message = client.get("/chat").text.rsplit('<div class="msg', 1)[1]
    assert "from ci" in message and "<strong>client:ci</strong> via rogers" in message
