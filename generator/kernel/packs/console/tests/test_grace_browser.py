"""Grace in a real browser: headless Chromium (Debian's) driven by Playwright, against the real server.

Set GRACE_SCREENSHOTS=<dir> to keep a screenshot of every page visited.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from generator import harness

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,  # a server and a browser: about 20 s for the module
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)"),
]

XSS_IMG = '<img src=x onerror="window.__xss=1;alert(1)">'
XSS_SCRIPT = "<script>window.__xss=1;alert(2)</script>"
XSS_LINK = '<a href="javascript:window.__xss=1;alert(3)">click me</a>'
XSS_BARE = "javascript:window.__xss=1"


@pytest.fixture(scope="module")
def server(grace_eco, tmp_path_factory):
    root, name = grace_eco
    with harness.running_ecosystem(name, tmp_path_factory.mktemp("state"), cwd=root) as eco:
        yield eco


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page with everything that must not happen recorded: dialogs, script errors, CSP violations."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.csp: list[str] = []

        def on_dialog(dialog) -> None:
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda msg: self.csp.append(msg.text) if "Content Security Policy" in msg.text else None)

    def go(self, path: str) -> None:
        self.page.goto(self.url + path)

    def submit(self, selector: str = "button[type=submit]") -> None:
        with self.page.expect_navigation():
            self.page.click(selector)

    def sign_in(self, token: str) -> None:
        self.go("/")
        assert "/signin" in self.page.url
        self.page.fill("#token", token)
        self.submit()

    def say(self, text: str) -> None:
        if not self.page.url.endswith("/chat"):
            self.go("/chat")
        self.page.fill("#message", text)
        with self.page.expect_navigation():
            self.page.press("#message", "Enter")  # the page's script: Enter sends

    def shot(self, name: str) -> None:
        folder = os.environ.get("GRACE_SCREENSHOTS")
        if folder:
            self.page.screenshot(path=str(Path(folder) / f"grace-{name}.png"), full_page=True)

    def assert_clean(self) -> None:
        assert self.dialogs == [] and self.errors == [] and self.csp == []
        assert self.page.evaluate("typeof window.__xss") == "undefined"


@pytest.fixture
def ui(browser, server) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        yield Watched(context.new_page(), server.url)
    finally:
        context.close()


def test_sign_in_chat_and_commands(ui, server):
    ui.go("/chat")
    assert "/signin?next=%2Fchat" in ui.page.url
    ui.shot("signin")
    ui.page.fill("#token", "not-a-token")
    ui.submit()
    assert ui.page.locator(".alert.error").inner_text() == "That token was not accepted. Check it and try again."
    ui.shot("signin-error")
    ui.page.fill("#token", server.token)
    ui.submit()
    assert ui.page.url.endswith("/chat")  # back where the visitor was going
    assert "Signed in as default" in ui.page.locator("header").inner_text()

    ui.say("What is the state of the group?")
    log = ui.page.locator("#chat-log")
    assert "[offline echo model] What is the state of the group?" in log.inner_text()
    assert "You are Fiedler" not in log.inner_text()  # the system prompt is not echoed
    assert "grace → fiedler" in log.inner_text()

    ui.page.click('button.insert[data-command="/rogers.search"]')  # the command list fills the box
    assert ui.page.input_value("#message") == "/rogers.search "
    ui.page.fill("#message", "/rogers.search query=state limit=5")
    ui.submit("#send")
    reply = ui.page.locator(".msg").last
    assert "rogers.search" in reply.inner_text() and "What is the state of the group?" in reply.inner_text()
    ui.say("/rogers.search query=state limit=lots")
    assert "limit: expected int" in ui.page.locator(".msg.error").last.inner_text()
    ui.shot("chat")
    ui.assert_clean()


def test_browse_conversations_mads_health_audit_and_sign_out(ui, server):
    ui.sign_in(server.token)
    assert ui.page.locator("h1").inner_text() == "Overview"
    ui.say("hello from the browser")
    ui.go("/")
    ui.shot("overview")

    ui.page.click("nav >> text=Conversations")
    titles = ui.page.locator("table a").all_inner_texts()
    assert "Grace chat · default" in titles and "general" in titles
    ui.shot("conversations")
    ui.page.click("text=Grace chat · default")
    rows = ui.page.locator("tbody tr").all_inner_texts()
    assert any("hello from the browser" in r and "client:default" in r for r in rows)
    assert any("fiedler" in r and "[offline echo model] hello from the browser" in r for r in rows)
    ui.shot("conversation")

    ui.page.click("nav >> text=MADs")
    for mad in ("turing", "rogers", "fiedler", "grace"):
        assert ui.page.locator(f"#mad-{mad}").is_visible()
    assert "turing.get_secret(name: str)" in ui.page.locator("#mad-turing").inner_text()
    ui.shot("mads")

    ui.page.click("nav >> text=Health")
    cards = ui.page.locator(".cards section").all_inner_texts()
    assert len(cards) == 4 and all("healthy" in c for c in cards)
    ui.shot("health")

    ui.page.click("nav >> text=Audit log")
    actions = ui.page.locator("tbody td:nth-child(4)").all_inner_texts()
    assert "grace.signin" in actions
    ui.shot("audit")

    ui.submit("header button")  # sign out
    assert "You have signed out." in ui.page.locator(".alert").inner_text()
    ui.go("/health")
    assert "/signin" in ui.page.url
    ui.assert_clean()


def test_xss_attempts_render_as_inert_text(ui, server):
    ui.sign_in(server.token)
    ui.say(f"{XSS_IMG} {XSS_SCRIPT}")  # prose: the echo model repeats it, so Fiedler's answer carries it too
    ui.say(XSS_LINK)
    ui.say(f"/rogers.create_conversation title='{XSS_IMG}{XSS_SCRIPT} {XSS_BARE}'")
    ui.say(f"/rogers.create_conversation title='{XSS_LINK}'")

    ui.go("/chat")
    log = ui.page.locator("#chat-log")
    text = log.inner_text()
    assert XSS_IMG in text and XSS_SCRIPT in text and XSS_LINK in text  # shown as typed, as text
    assert f"[offline echo model] {XSS_IMG}" in text
    ui.shot("xss-chat")
    pages = ["/chat", "/conversations", "/"]
    ui.go("/conversations")
    for title in (f"{XSS_IMG}{XSS_SCRIPT} {XSS_BARE}", XSS_LINK):
        link = ui.page.get_by_role("link", name=title, exact=True)
        assert link.count() == 1  # the title is the link's text, not markup
        pages.append(link.get_attribute("href"))
    ui.shot("xss-conversations")
    for path in pages:
        ui.go(path)
        main = ui.page.locator("main")
        assert main.locator("img, script, iframe, object, embed").count() == 0, path
        assert main.locator('a[href^="javascript:"], [onerror], [onclick]').count() == 0, path
        ui.assert_clean()
    ui.go(pages[-1])
    ui.page.get_by_text("click me", exact=False).first.click()  # clicking the text runs nothing
    assert ui.page.url.endswith(pages[-1])
    ui.assert_clean()


def test_tool_answers_read_as_tables_with_the_raw_json_folded_even_without_javascript(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 860}, java_script_enabled=False)
    try:
        ui = Watched(context.new_page(), server.url)
        ui.sign_in(server.token)
        for command in ("/turing.set_secret name=shown_as_a_table value=v1", "/turing.list_secrets", "/grace.status"):
            ui.go("/chat")
            ui.page.fill("#message", command)
            ui.submit("#send")  # no script: the form posts as it is
        listing = ui.page.locator(".msg.result").nth(-2)  # the answer to /turing.list_secrets
        assert listing.locator("table.records thead th").all_inner_texts() == ["name", "version", "updated_at"]
        assert "shown_as_a_table" in listing.locator("table.records tbody").inner_text()
        raw = listing.locator("details.raw pre")
        assert not raw.is_visible()  # the JSON is folded away...
        listing.locator("details.raw summary").click()
        assert raw.is_visible() and '"name": "shown_as_a_table"' in raw.inner_text()  # ...and opens with no script
        status = ui.page.locator(".msg.result").last
        fields = status.locator("dl.fields").first.locator(":scope > dt").all_inner_texts()
        assert "status" in fields and "mads" in fields
        assert status.locator("table.records tbody tr").count() == 4  # a row per MAD
        ui.shot("chat-tool-tables")
        ui.assert_clean()
    finally:
        context.close()


def _mcp(server, tool: str, **args):
    """A tool call over MCP, as the client "default" (in a thread: Playwright's loop runs in this one)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(server.call, tool, **args).result(timeout=30)


def test_stored_content_reads_literally_once_and_names_the_client_an_mcp_post_was_for(ui, server):
    marker = "once-" + os.urandom(4).hex()
    literal = f"<b>&\"' {marker}"
    conv = _mcp(server, "rogers.create_conversation", title=f"escaping {marker}")
    _mcp(server, "rogers.post", conversation_id=conv["id"], content=literal)
    ui.sign_in(server.token)
    ui.say(f"/rogers.history conversation_id={conv['id']}")
    reply = ui.page.locator(".msg").last
    text = reply.inner_text()  # what the browser shows: the raw JSON is folded away
    assert text.count(literal) == 1, text
    assert "\\\"" not in text and "&amp;" not in text and "&lt;" not in text and "&quot;" not in text
    row = reply.locator("table.records tbody tr", has_text=marker)
    assert "client:default via rogers" in row.locator('td[data-label="sender"]').inner_text()
    ui.go(f"/conversations/{conv['id']}")
    main = ui.page.locator("main").inner_text()
    assert main.count(literal) == 1 and "client:default via rogers" in main and "\\\"" not in main
    ui.go("/conversations")
    ui.page.click("text=Grace chat · default")  # Grace's stored record of the answer reads the same
    rows = ui.page.locator("main tr", has_text=marker).all_inner_texts()  # grace's reply to /rogers.history
    assert rows and all(r.count(literal) == 1 and "\\\"" not in r and "&amp;" not in r for r in rows), rows
    ui.assert_clean()


def _overflow(page) -> int:
    """How far the page is wider than the window (0: it fits)."""
    return page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


def test_the_audit_log_fits_1280_and_every_page_reads_at_390(ui, server):
    ui.sign_in(server.token)
    # The audit entries that used to push the table wide: a long unbroken subject and detail.
    ui.say("/turing.get_secret name=" + "aSecretNameNobodyStored" * 3)
    ui.page.request.post(server.url + "/chat", form={"message": "x"},
                         headers={"origin": "http://" + "evilhost" * 14 + ".example"})
    ui.say("/rogers.search query=secret limit=5")  # a wide table answer in the chat
    ui.go("/audit")
    assert "grace.origin-rejected" in ui.page.locator("main table").inner_text()
    assert _overflow(ui.page) == 0
    section = ui.page.locator("main section").last.bounding_box()
    table = ui.page.locator("main table").bounding_box()
    assert table["x"] + table["width"] <= section["x"] + section["width"]  # inside its box, no scrolling
    ui.shot("audit-1280")
    ui.go("/conversations")
    ui.page.click("text=Grace chat · default")
    conversation = ui.page.url.removeprefix(server.url)
    assert _overflow(ui.page) == 0
    ui.page.set_viewport_size({"width": 390, "height": 844})
    for path in ["/", "/chat", "/conversations", conversation, "/mads", "/health", "/audit"]:
        ui.go(path)
        assert _overflow(ui.page) == 0, path
        ui.shot(f"390{path.replace('/', '-')[:20]}")
    head = ui.page.locator("table.audit thead").bounding_box()
    assert head["width"] <= 1  # on a phone each entry is a block of labelled lines
    ui.assert_clean()
