"""Grace in a real browser: headless Chromium (Debian's) driven by Playwright, against the real server.

Set GRACE_SCREENSHOTS=<dir> to keep a screenshot of every page visited.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    testing = importlib.import_module(f"{name}.kernel.testing")
    with testing.running_ecosystem(name, tmp_path_factory.mktemp("state"), cwd=root) as eco:
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
    assert "echo: You are Fiedler. What is the state of the group?" in log.inner_text()
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
    assert any("fiedler" in r and "echo: You are Fiedler. hello from the browser" in r for r in rows)
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
    assert f"echo: You are Fiedler. {XSS_IMG}" in text
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
