"""End-to-end tests of madgroup as a whole, one area of the kernel's acceptance at a time: the
tool surface, the web UI, the gateway's authentication, state that survives a restart, secrets at rest,
the operator's clients, least privilege, durable requests between MADs, fault isolation, the audit log
and key rotation, and observability. Each test names the requirements it proves (`requirement` marker).

Run as a program (`python -m test_ecosystem serve ...`), this module serves the ecosystem with some MADs
instrumented to misbehave on request (see the end of the file): the isolation, durability and
observability tests start it so."""

import asyncio
import base64
import json
import os
import re
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from mcp.shared.exceptions import MCPError

from madgroup.ecosystem import CONFIG
from madgroup.kernel import tool
from madgroup.kernel.cli import main
from madgroup.kernel.errors import AccessDenied, KernelError
from madgroup.kernel.runtime import Runtime

from conftest import ALL_TOOLS, PACKAGE, SRC, TESTS, TOOL_FOR, query
from harness import ToolCallError, call_tool, mcp_client, result_value, running_ecosystem

CORRELATION = "regen/correlation_id"  # where a tool result's _meta carries the call's correlation id
# The persistent MADs (each started, served and asked) and the roles (spawned for a task, never asked).
MAD_NAMES = ['dewey', 'gates', 'hopper', 'horace', 'marco', 'mcnamara', 'playfair', 'stallman', 'turing', 'rogers', 'fiedler', 'grace']
ROLE_NAMES = ['developer', 'pm']
# A harmless call of a spec tool (tool, arguments), and one of a MAD other than VICTIM's (None: it has none).
SAMPLE = ('grace.status', {})
OTHER = ('grace.status', {})


@pytest.mark.requirement('R4')
def test_every_spec_tool_is_exposed_as_mad_dot_tool(eco):
    assert sorted(eco.list_tools()) == ALL_TOOLS


def audited(state: Path, action: str) -> list[dict]:
    return query(state, "SELECT actor, action, subject, ok, detail FROM audit_log WHERE action = ? ORDER BY id", (action,))


@pytest.mark.requirement('R4')
def test_the_web_ui_signs_in_with_a_client_token_and_health_answers(eco):
    with httpx.Client(base_url=eco.url, timeout=10, headers={"Origin": eco.url}) as browser:
        first = browser.get("/")
        assert first.status_code == 303 and first.headers["location"].startswith("/signin")
        form = browser.get("/signin")
        assert form.status_code == 200 and "madgroup" in form.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        refused = browser.post("/signin", data={"csrf": csrf, "token": "not-the-token", "next": "/"})
        assert refused.status_code == 401
        signed_in = browser.post("/signin", data={"csrf": csrf, "token": eco.token, "next": "/"}, follow_redirects=True)
        assert signed_in.status_code == 200 and "Sign out" in signed_in.text
    health = httpx.get(eco.url + "/healthz", timeout=10)
    assert health.status_code == 200


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no CSRF field"
    return found.group(1)


def sign_in(browser: httpx.Client, token: str) -> None:
    form = browser.get("/signin")
    assert browser.post("/signin", data={"csrf": csrf_of(form.text), "token": token, "next": "/"}).status_code == 303


@pytest.mark.requirement('R4')
def test_the_web_ui_refuses_forms_without_their_csrf_token_or_from_another_site(eco):
    evil = {"Origin": "http://evil.example"}
    rejected_before = len(audited(eco.state_dir, "grace.csrf-rejected")), len(audited(eco.state_dir, "grace.origin-rejected"))
    with httpx.Client(base_url=eco.url, timeout=10, headers={"Origin": eco.url}) as browser:
        anonymous_csrf = csrf_of(browser.get("/signin").text)
        # A valid token is not enough to sign in: the form must carry its session's CSRF token and come from this site.
        for data, headers in [({"token": eco.token}, {}), ({"csrf": "forged", "token": eco.token}, {}),
                              ({"csrf": anonymous_csrf, "token": eco.token}, evil)]:
            assert browser.post("/signin", data=data, headers=headers).status_code == 403
        assert browser.get("/chat").status_code == 303, "a refused sign-in signed in"
        sign_in(browser, eco.token)
        csrf = csrf_of(browser.get("/chat").text)
        assert csrf != anonymous_csrf, "signing in must give the session a new CSRF token"
        marker = "csrf-" + uuid.uuid4().hex
        for data, headers in [({"message": marker}, {}), ({"csrf": anonymous_csrf, "message": marker}, {}),
                              ({"csrf": csrf, "message": marker}, evil)]:
            assert browser.post("/chat", data=data, headers=headers).status_code == 403
        assert marker not in browser.get("/chat").text, "a refused form was acted on"
        # The same form with its token, from this site, goes through.
        assert browser.post("/chat", data={"csrf": csrf, "message": f"/{marker}"}).status_code == 303
        assert marker in browser.get("/chat").text
    csrf_rejected, origin_rejected = (len(audited(eco.state_dir, "grace.csrf-rejected")) - rejected_before[0],
                                      len(audited(eco.state_dir, "grace.origin-rejected")) - rejected_before[1])
    assert (csrf_rejected, origin_rejected) == (4, 2), "every refused form is audited, with its reason"


@pytest.mark.requirement('R4')
def test_the_web_ui_escapes_what_people_and_tools_wrote(eco):
    xss = '<script>alert("xss")</script><img src=x onerror="alert(1)">'
    with httpx.Client(base_url=eco.url, timeout=10, headers={"Origin": eco.url}) as browser:
        sign_in(browser, eco.token)
        page = browser.get("/chat")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        # A command nobody has: the person's words and the error that answers them both repeat the markup.
        assert browser.post("/chat", data={"csrf": csrf_of(page.text), "message": f"/{xss}"}).status_code == 303
        chat = browser.get("/chat").text
        assert "&lt;script&gt;alert(&quot;xss&quot;)&lt;/script&gt;" in chat
        assert "<script>alert" not in chat and "<img src=x" not in chat
        conversation = eco.call(TOOL_FOR["conversations.create"], title=xss)
        eco.call(TOOL_FOR["conversations.post"], conversation_id=conversation["id"], content=xss)
        shown = browser.get(f"/conversations/{conversation['id']}")
        assert shown.status_code == 200 and "&lt;script&gt;alert(&quot;xss&quot;)" in shown.text
        assert "<script>alert" not in shown.text and "<img src=x" not in shown.text


REQUESTS = [
    {"method": "tools/list", "params": {}},
    {"method": "tools/call", "params": {"name": "turing.set_secret", "arguments": {'name': 'x', 'value': 'y'}}},
    {"method": "tools/call", "params": {"name": "turing.get_secret", "arguments": {'name': 'x'}}},
    {"method": "tools/call", "params": {"name": "rogers.post", "arguments": {'conversation_id': 'c', 'content': 'hi'}}},
    {"method": "tools/call", "params": {"name": "rogers.history", "arguments": {'conversation_id': 'c'}}},
]


@pytest.mark.requirement('R4', 'R6')
@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic dXNlcjpwYXNz"])
@pytest.mark.parametrize("request_body", REQUESTS, ids=lambda r: r["params"].get("name", r["method"]))
def test_mcp_requests_without_a_valid_token_are_refused(eco, header, request_body):
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if header:
        headers["Authorization"] = header
    body = {"jsonrpc": "2.0", "id": 1, **request_body}
    response = httpx.post(eco.mcp_url, json=body, headers=headers, timeout=10)
    assert response.status_code == 401
    assert "Bearer" in response.headers.get("WWW-Authenticate", "")


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@pytest.mark.requirement('R4', 'R6')
def test_an_mcp_client_with_a_wrong_token_cannot_call_tools(eco):
    async def attempt():
        async with mcp_client(eco.url, "not-the-token") as client:
            await client.call_tool(ALL_TOOLS[0], {})

    with pytest.raises(BaseException) as caught:
        asyncio.run(attempt())
    assert any(isinstance(leaf, MCPError) for leaf in _leaves(caught.value))


@pytest.mark.requirement('R1', 'R5')
def test_conversations_and_secrets_survive_a_restart(tmp_path):
    value = "survives-" + uuid.uuid4().hex
    with running_ecosystem(PACKAGE, tmp_path / "state", cwd=SRC) as eco:
        conversation = eco.call(TOOL_FOR["conversations.create"], title="durable")
        eco.call(TOOL_FOR["conversations.post"], conversation_id=conversation["id"], content="written before the restart")
        eco.call(TOOL_FOR["secrets.set"], name="durable", value=value)
        eco.restart()
        assert [m["content"] for m in eco.call(TOOL_FOR["conversations.history"], conversation_id=conversation["id"])] == [
            "written before the restart"
        ]
        assert eco.call(TOOL_FOR["secrets.get"], name="durable")["value"] == value


@pytest.mark.requirement('R3')
def test_no_secret_value_is_stored_in_plaintext(tmp_path):
    set_secret, rotate = TOOL_FOR["secrets.set"], TOOL_FOR.get("secrets.rotate")
    values = ["plaintext-" + uuid.uuid4().hex for _ in range(2)]
    state = tmp_path / "state"
    with running_ecosystem(PACKAGE, state, cwd=SRC) as eco:
        eco.call(set_secret, name="api-key", value=values[0])
        if rotate:
            eco.call(rotate, name="api-key", value=values[1])
        logs = eco.logs()
    for value in values[: 2 if rotate else 1]:
        needle = value.encode()
        leaks = [p for p in Path(state).rglob("*") if p.is_file() and needle in p.read_bytes()]
        assert leaks == [], f"secret value found in plaintext in {leaks}"
        assert value not in logs, "secret value found in the server log"


@pytest.mark.requirement('R6')
def test_the_operator_adds_lists_and_revokes_clients_whose_calls_are_logged_and_denials_audited(tmp_path, cli):
    tool, args = SAMPLE
    outside = next((t for t in ALL_TOOLS if t != tool), "nomad.notool")  # a tool outside the client's pattern
    name = "client-" + uuid.uuid4().hex[:8]
    with running_ecosystem(PACKAGE, tmp_path / "state", cwd=SRC) as eco:
        state = str(eco.state_dir)
        code, out, err = cli("clients", "add", name, "--state", state, "--allow", tool)
        token = out.strip()
        assert code == 0 and token and "will not be shown again" in err
        assert token not in (eco.state_dir / "tokens.json").read_text(), "a client's token is stored only as its hash"
        code, out, _ = cli("clients", "list", "--state", state, "--json")
        listed = {c["name"]: c for c in json.loads(out)}
        assert code == 0 and listed[name]["allow"] == [tool] and listed[name]["revoked_at"] == ""
        assert token not in out

        async def calls():
            async with mcp_client(eco.url, token) as client:
                return await client.call_tool(tool, args), await client.call_tool(outside, {})

        allowed, denied = asyncio.run(calls())
        assert not allowed.is_error and denied.is_error
        assert denied.content[0].text.startswith(f"access_denied: client {name!r} may not call {outside}")
        # Every call is logged: client, tool, correlation id and outcome, in the call log and the JSON log.
        logged = query(eco.state_dir, "SELECT tool, outcome, correlation_id FROM gateway_calls WHERE client = ? "
                                      "ORDER BY id", (name,))
        assert [(c["tool"], c["outcome"]) for c in logged] == [(tool, "ok"), (outside, "denied")]
        assert logged[0]["correlation_id"] == allowed.meta[CORRELATION]
        assert denied.content[0].text.endswith(f"(correlation id {logged[1]['correlation_id']})")
        lines = [(line["tool"], line["outcome"], line["correlation_id"]) for line in log_lines(eco)
                 if line["msg"] == "gateway call" and line.get("client") == name]
        assert lines == [(c["tool"], c["outcome"], c["correlation_id"]) for c in logged]
        code, out, _ = cli("clients", "list", "--state", state, "--json")
        assert {c["name"]: c for c in json.loads(out)}[name]["calls_today"] == 1  # the refused call is not counted

        code, out, _ = cli("clients", "revoke", name, "--state", state)
        assert code == 0 and "revoked" in out
        code, out, _ = cli("clients", "list", "--state", state, "--json")
        assert {c["name"]: c for c in json.loads(out)}[name]["revoked_at"] != ""
        revoked = httpx.post(eco.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
                             headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
                             timeout=10)
        assert revoked.status_code == 401, "a revoked client is refused from its next request"
        with pytest.raises(Exception):
            asyncio.run(call_tool(eco.url, token, tool, args))
    # The operator's changes and every denial are in the audit log, under the client's name.
    entries = query(tmp_path / "state", "SELECT actor, action, subject, ok, detail FROM audit_log ORDER BY id")
    mine = [(e["actor"], e["action"], e["ok"]) for e in entries if name in (e["subject"], e["actor"].removeprefix("client:"))]
    assert ("operator", "clients.add", 1) in mine and ("operator", "clients.revoke", 1) in mine
    assert (f"client:{name}", "gateway.tool-denied", 0) in mine
    assert any(e["action"] == "gateway.tool-denied" and e["detail"] == outside for e in entries)
    assert (f"client:{name}", "gateway.revoked", 0) in mine
    assert all(token not in json.dumps(e) for e in entries), "the audit log never holds a token"




# ---- least privilege: what each MAD's spec grants it -----------------------------------------------------

# The capability families each MAD owns (those of the capabilities its spec'd tools are bound to), the
# secrets it may read and the MADs it may ask: its spec's.
OWNS = {
    'developer': [],
    'dewey': ['data'],
    'gates': ['documents'],
    'hopper': [],
    'horace': ['files'],
    'marco': ['web'],
    'mcnamara': ['security'],
    'playfair': ['charts'],
    'pm': [],
    'stallman': ['documents'],
    'turing': ['secrets'],
    'rogers': ['conversations'],
    'fiedler': ['models'],
    'grace': ['ecosystem'],
}
SECRETS = {
    'developer': [],
    'dewey': [],
    'gates': [],
    'hopper': [],
    'horace': [],
    'marco': [],
    'mcnamara': [],
    'playfair': [],
    'pm': [],
    'stallman': [],
    'turing': [],
    'rogers': [],
    'fiedler': [],
    'grace': [],
}
TALKS_TO = {
    'developer': [],
    'dewey': [],
    'gates': [],
    'hopper': [],
    'horace': [],
    'marco': [],
    'mcnamara': [],
    'playfair': [],
    'pm': [],
    'stallman': [],
    'turing': [],
    'rogers': ['turing'],
    'fiedler': ['turing', 'rogers'],
    'grace': ['rogers', 'fiedler', 'turing'],
}
# What every MAD may use whatever it owns, each narrowed per call: its own Thought Engine, posting and reading
# in the conversations it joined, reading the secrets its spec names.
EVERY_MAD = {"models.send", "conversations.post", "conversations.history", "secrets.get", "secrets.list"}


@pytest.mark.requirement('R7')
def test_each_mad_is_refused_every_capability_its_spec_does_not_grant(tmp_path):
    from madgroup.kernel.capabilities import CAPABILITIES

    refused: list[tuple[str, str, str]] = []  # (MAD, the action audited, its subject)

    async def refuse(mad: str, action: str, subject: str, attempt) -> None:
        with pytest.raises(AccessDenied):
            await attempt
        refused.append((mad, action, subject))

    async def granted(attempt) -> None:
        """What the MAD is granted may fail for its arguments, never for want of a grant."""
        try:
            await attempt
        except AccessDenied:
            raise
        except KernelError:
            pass

    async def scenario() -> None:
        rt = Runtime(CONFIG, tmp_path / "state")
        await rt.start()
        try:
            stranger = rt.bus.create("joined by no MAD", [], "operator")["id"]
            for name in MAD_NAMES:
                mad, owns = rt.mad(name), set(OWNS[name])
                for capability in CAPABILITIES:
                    if capability.split(".")[0] in owns or capability in EVERY_MAD:
                        await granted(mad.use(capability))
                    else:
                        await refuse(name, "kernel.use", capability, mad.use(capability))
                if "secrets" not in owns:
                    await refuse(name, "secrets.get", "not-granted", mad.use("secrets.get", name="not-granted"))
                    for secret in SECRETS[name]:
                        await granted(mad.use("secrets.get", name=secret))
                if "conversations" not in owns:
                    await refuse(name, "conversations.post", stranger,
                                 mad.use("conversations.post", conversation_id=stranger, content="let me in"))
                    await refuse(name, "conversations.history", stranger,
                                 mad.use("conversations.history", conversation_id=stranger))
                    for joined in mad.conversation_ids.values():
                        await granted(mad.use("conversations.post", conversation_id=joined, content="mine"))
                for other in MAD_NAMES:
                    if other in TALKS_TO[name]:
                        await granted(mad.ask(other, tool="no_such_tool"))
                    elif other != name:
                        await refuse(name, "bus.ask", other, mad.ask(other, tool="no_such_tool"))
            denials = {(e["actor"], e["action"], e["subject"]) for e in rt.audit.recent(1000) if not e["ok"]}
            assert set(refused) <= denials, f"refusals not audited: {sorted(set(refused) - denials)}"
        finally:
            await rt.stop()

    asyncio.run(scenario())
    assert refused, "no MAD was refused anything: the test proved nothing"


@pytest.mark.requirement('R7')
def test_a_client_is_refused_every_tool_outside_its_patterns(eco):
    from madgroup.kernel.clients import ClientRegistry

    allowed, client = ALL_TOOLS[0], "narrow-" + uuid.uuid4().hex[:8]
    token = ClientRegistry(eco.state_dir).add(client, [allowed])

    async def calls():
        async with mcp_client(eco.url, token) as session:
            listed = [t.name for t in (await session.list_tools()).tools]
            return listed, {t: await session.call_tool(t, {}) for t in ALL_TOOLS if t != allowed}

    listed, results = asyncio.run(calls())
    assert listed == [allowed], "tools/list shows a client only what it may call"
    for name, result in results.items():
        assert result.is_error, name
        assert result.content[0].text.startswith(f"access_denied: client {client!r} may not call {name} "), name
    denied = query(eco.state_dir, "SELECT detail FROM audit_log WHERE actor = ? AND action = 'gateway.tool-denied'",
                   (f"client:{client}",))
    assert sorted(e["detail"] for e in denied) == sorted(results), "every refused call is audited"


# ---- instrumented servers: this module, run as a program ---------------------------------------------

VICTIM = 'dewey'  # the MAD given tools that raise, hang and answer
# A MAD that talks to another whose tool has an effect the tests can count ({sender, target, tool, capability}):
# the sender is given a tool that relays requests to it over the bus (None: no MAD talks to such a one).
RELAY = {'sender': 'fiedler', 'target': 'rogers', 'tool': 'post', 'capability': 'conversations.post'}
FEATURES, HOLD = "REGEN_TEST_FEATURES", "REGEN_TEST_HOLD"  # what an instrumented server is told, in its environment
DETAIL = "internal-detail-5e1f"  # in what a faulty tool raises: for the operator's log, never for the caller


def instrumented(state: Path, *features: str, hold: Path | None = None):
    """The ecosystem served by this module (`python -m test_ecosystem serve ...`, see the end of the file)
    with `features`: "faults" gives VICTIM the tools explode, hang and alive; "relay" gives RELAY's sender the
    tool relay, and makes RELAY's target hold each delivery while the file `hold` exists."""
    env = {"PYTHONPATH": str(TESTS), FEATURES: ",".join(features), HOLD: str(hold or state.parent / "no-hold")}
    return running_ecosystem("test_ecosystem", state, cwd=SRC, env=env)


def log_lines(eco) -> list[dict]:
    """The server's JSON log, one object per line."""
    return [json.loads(line) for line in eco.logs().splitlines() if line.startswith("{")]


def relay_arguments(label: str, conversation_id: str) -> dict:
    """Arguments of rogers.post (conversations.post) that only the request labelled `label` has."""
    return {"conversation_id": conversation_id, "content": label}


def relay_effect(state: Path, label: str) -> int:
    """How many times the request labelled `label` took effect."""
    return query(state, "SELECT COUNT(*) AS n FROM messages WHERE kind = 'message' AND content = ?", (label,))[0]["n"]


@pytest.mark.requirement('R8')
def test_a_request_between_mads_survives_a_kill_9_and_is_handled_exactly_once(tmp_path):
    """fiedler asks rogers to run post: once to the end, then three times with the
    process killed (SIGKILL) while those three are accepted and their handlers started, none acknowledged. After
    a restart each of the four took effect exactly once and has one reply; the first did not run again."""
    state, hold = tmp_path / "state", tmp_path / "hold"
    sender, target, relay = RELAY["sender"], RELAY["target"], f"{RELAY['sender']}.relay"
    labels = [f"durable-{n}-{uuid.uuid4().hex[:8]}" for n in range(4)]
    with instrumented(state, "relay", hold=hold) as eco:
        conversation_id = eco.call(TOOL_FOR["conversations.create"], title="durable")["id"]
        arguments = {label: relay_arguments(label, conversation_id) for label in labels}
        eco.call(relay, arguments=arguments[labels[0]])  # handled and acknowledged before the crash
        hold.touch()  # from now on the target's deliveries start, and wait

        def in_flight() -> tuple[int, int]:
            pending = query(state, "SELECT COUNT(*) AS n FROM bus_deliveries WHERE state = 'pending'")[0]["n"]
            return pending, httpx.get(eco.url + "/healthz", timeout=10).json()["mads"][target]["in_flight"]

        async def crash() -> None:
            calls = [asyncio.create_task(call_tool(eco.url, eco.token, relay, {"arguments": arguments[label]}))
                     for label in labels[1:]]
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(in_flight) != (3, 3):
                assert time.monotonic() < deadline, f"the requests were not accepted and started: {in_flight()}"
                await asyncio.sleep(0.02)
            eco.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(eco.process.wait, 10)
            await asyncio.wait(calls, timeout=10)  # the callers lose their connections
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

        asyncio.run(crash())
        assert eco.process.returncode == -signal.SIGKILL

    requests = {}
    for row in query(state, "SELECT m.id, m.payload, d.state FROM messages m JOIN bus_deliveries d ON d.envelope_id = m.id "
                            "WHERE m.kind = 'request' AND m.sender = ?", (sender,)):
        sent = json.dumps(json.loads(row["payload"]).get("args", {}))
        requests.update({label: row for label in labels if label in sent})
    assert [requests[label]["state"] for label in labels] == ["acked", "pending", "pending", "pending"]
    assert [relay_effect(state, label) for label in labels] == [1, 0, 0, 0], "the killed handlers did nothing yet"

    with running_ecosystem(PACKAGE, state, cwd=SRC) as eco:  # the ecosystem itself, restarted on that state
        assert eco.process.poll() is None
    ids = [requests[label]["id"] for label in labels]
    deliveries = {row["envelope_id"]: row for row in query(state, "SELECT envelope_id, state, attempts FROM bus_deliveries")}
    replies: dict[str, list[str]] = {}
    for row in query(state, "SELECT kind, payload FROM messages WHERE kind IN ('reply', 'error')"):
        replies.setdefault(json.loads(row["payload"]).get("in_reply_to", ""), []).append(row["kind"])
    assert [deliveries[i]["state"] for i in ids] == ["acked"] * 4, "a request accepted before the crash was lost"
    assert [deliveries[i]["attempts"] for i in ids] == [1, 2, 2, 2], "only the unacknowledged ones ran again"
    assert [replies.get(i) for i in ids] == [["reply"]] * 4, "each request has exactly one reply"
    assert [relay_effect(state, label) for label in labels] == [1, 1, 1, 1], "each took effect exactly once"


@pytest.mark.requirement('R9')
def test_a_mad_that_raises_or_hangs_does_not_take_the_process_down_and_health_is_per_mad(tmp_path):
    explode, hang, alive = (f"{VICTIM}.{name}" for name in ("explode", "hang", "alive"))
    with instrumented(tmp_path / "state", "faults") as eco:

        def health() -> tuple[int, dict]:
            response = httpx.get(eco.url + "/healthz", timeout=10)
            return response.status_code, response.json()

        code, body = health()
        assert code == 200 and sorted(body["mads"]) == sorted(MAD_NAMES + ROLE_NAMES)
        assert all(mad["ok"] and mad["breaker"] == "closed" for mad in body["mads"].values())

        with pytest.raises(ToolCallError) as raised:
            eco.call(explode)
        assert str(raised.value).startswith(f"mad_error: MAD {VICTIM!r} failed in 'explode' (RuntimeError)")
        assert DETAIL not in str(raised.value), "the exception's message is for the server log, not the caller"
        started = time.monotonic()
        with pytest.raises(ToolCallError) as hung:
            eco.call(hang)
        assert str(hung.value).startswith(f"timeout: MAD {VICTIM!r} did not finish 'hang' within 1 s")
        assert time.monotonic() - started < 15
        assert eco.process.poll() is None, "the process went down"

        code, body = health()
        assert code == 200 and body["mads"][VICTIM]["failures"] == 2
        assert body["mads"][VICTIM]["last_error"] == "hang: timed out after 1 s"
        assert eco.call(alive) == {"alive": True}
        assert eco.call(OTHER[0], **OTHER[1]) is not None

        for _ in range(5):  # failures in a row open the MAD's circuit breaker
            with pytest.raises(ToolCallError):
                eco.call(explode)
        code, body = health()
        assert code == 503 and body["status"] == "degraded"
        assert not body["mads"][VICTIM]["ok"] and body["mads"][VICTIM]["breaker"] in ("open", "half_open")
        assert all(mad["ok"] for name, mad in body["mads"].items() if name != VICTIM), "one MAD's faults hurt another"
        assert eco.call(OTHER[0], **OTHER[1]) is not None, "the other MADs keep answering"
        deadline = time.monotonic() + 30
        while health()[1]["mads"][VICTIM]["restarts"] < 1:  # the supervisor restarts the failing MAD
            assert time.monotonic() < deadline, "the failing MAD was not restarted"
            time.sleep(0.05)
        assert eco.call(alive) == {"alive": True}  # the new instance's trial call closes the breaker
        code, body = health()
        assert code == 200 and body["mads"][VICTIM]["ok"] and body["mads"][VICTIM]["breaker"] == "closed"
        assert eco.process.poll() is None
        assert DETAIL in eco.logs() and "Traceback" in eco.logs(), "the operator's log has what the caller was not told"


@pytest.mark.requirement('R3', 'R10')
def test_the_audit_log_is_hash_chained_and_audit_verify_detects_tampering(tmp_path, cli):
    state = tmp_path / "state"
    with running_ecosystem(PACKAGE, state, cwd=SRC) as eco:
        refused = httpx.post(eco.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
                             headers={"Authorization": "Bearer not-a-token"}, timeout=10)
        assert refused.status_code == 401
        eco.call(TOOL_FOR["secrets.set"], name="audited", value="audited-" + uuid.uuid4().hex)
    code, out, err = cli("audit", "verify", "--state", str(state))
    chain = query(state, "SELECT id, action, prev_hash, hash FROM audit_log ORDER BY id")
    assert code == 0 and out.strip() == f"{len(chain)} entries, chain intact, head {chain[-1]['hash']}", err
    assert chain[0]["prev_hash"] == "0" * 64
    assert all(entry["prev_hash"] == before["hash"] for before, entry in zip(chain, chain[1:]))
    actions = [entry["action"] for entry in chain]
    assert "gateway.unauthorized" in actions and "secrets.set" in actions

    forged = next(entry["id"] for entry in chain if entry["action"] == "gateway.unauthorized")
    conn = sqlite3.connect(state / "ecosystem.db")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit_log SET detail = 'nothing happened' WHERE id = ?", (forged,))
        conn.rollback()
        # An intruder with the database file drops its guards, then rewrites an entry.
        triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'").fetchall()
        for (trigger,) in triggers:
            conn.execute(f'DROP TRIGGER "{trigger}"')
        conn.execute("UPDATE audit_log SET detail = 'nothing happened' WHERE id = ?", (forged,))
        conn.commit()
    finally:
        conn.close()
    code, out, err = cli("audit", "verify", "--state", str(state))
    assert code == 1 and out == ""
    assert err.startswith(f"audit log broken: entry {forged} ") and "edited" in err


def sealed(state: Path, name: str) -> list[dict]:
    """Every stored version of a secret: nonce, ciphertext, key id."""
    return query(state, "SELECT name, version, nonce, ciphertext, key_id FROM secrets WHERE name = ? ORDER BY version", (name,))


def opened(key_file_text: bytes, version: dict) -> str | None:
    """The value a key (as its file holds it) decrypts a stored version to; None when it does not."""
    try:
        plain = AESGCM(base64.b64decode(key_file_text)).decrypt(version["nonce"], version["ciphertext"], version["name"].encode())
    except InvalidTag:
        return None
    return plain.decode()


@pytest.mark.requirement('R3', 'R10')
def test_secrets_are_re_encrypted_under_a_new_key_and_read_as_before(tmp_path, cli, monkeypatch):
    from madgroup.kernel.secrets import KEY_FILE

    monkeypatch.delenv(f"{CONFIG.env_prefix}_SECRETS_KEY", raising=False)  # the key lives in the state, as run.sh keeps it
    state = tmp_path / "state"
    key_file = state / "keys" / KEY_FILE
    values = ["re-encrypted-" + uuid.uuid4().hex for _ in range(2)]

    def re_encrypted(old_key: bytes) -> bytes:
        new_key = key_file.read_bytes()
        assert new_key != old_key
        versions = sealed(state, "rekeyed")
        assert [opened(new_key, v) for v in versions] == values, "every version opens with the new key"
        assert [opened(old_key, v) for v in versions] == [None, None], "and none with the old one"
        return new_key

    with running_ecosystem(PACKAGE, state, cwd=SRC) as eco:
        for value in values:
            eco.call(TOOL_FOR["secrets.set"], name="rekeyed", value=value)
        key = key_file.read_bytes()
        assert [opened(key, v) for v in sealed(state, "rekeyed")] == values
        rotated = eco.call(TOOL_FOR["secrets.rotate_key"])  # while it runs: turing.rotate
        assert rotated["versions"] >= 2
        key = re_encrypted(key)
        assert eco.call(TOOL_FOR["secrets.get"], name="rekeyed")["value"] == values[-1]
    code, out, err = cli("secrets", "rotate-key", "--state", str(state))  # the operator's, with the ecosystem stopped
    assert code == 0 and out.startswith("re-encrypted 2 versions of "), err
    re_encrypted(key)
    with running_ecosystem(PACKAGE, state, cwd=SRC) as eco:
        assert eco.call(TOOL_FOR["secrets.get"], name="rekeyed")["value"] == values[-1]
    rotations = audited(state, "secrets.rotate_key")
    assert len(rotations) == 2 and all(r["ok"] for r in rotations)
    assert cli("audit", "verify", "--state", str(state))[0] == 0


def scrape(eco) -> str:
    response = httpx.get(eco.url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the series `name` with these labels in a Prometheus text exposition (0 when it has none)."""
    for line in text.splitlines():
        series = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if series and series.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', series.group(2))) == labels:
            return float(series.group(3))
    return 0.0


@pytest.mark.requirement('R11')
def test_json_logs_carry_the_correlation_id_of_each_call_and_metrics_count_calls_messages_and_errors(tmp_path):
    called_tool = 'rogers.post'
    mad, _, called_name = called_tool.partition(".")
    with instrumented(tmp_path / "state", "faults", "relay") as eco:
        before = scrape(eco)

        async def calls():
            async with eco.client() as client:
                conversation = result_value(await client.call_tool(TOOL_FOR["conversations.create"], {"title": "observed"}))
                called = await client.call_tool(called_tool, {"conversation_id": conversation["id"], "content": "observed"})
                relayed = await client.call_tool(f"{RELAY['sender']}.relay", {"arguments": relay_arguments(
                    "observed-" + uuid.uuid4().hex[:8], conversation["id"])})
                failed = await client.call_tool(f"{VICTIM}.explode", {})
                return called, relayed, failed

        called, relayed, failed = asyncio.run(calls())
        after = scrape(eco)
        lines = log_lines(eco)
    assert not called.is_error and failed.is_error

    # One id follows a call from the gateway into the MAD and onto the bus; the caller gets it too.
    call_id = called.meta[CORRELATION]
    traced = [line for line in lines if line.get("correlation_id") == call_id]
    assert any(line["msg"] == "gateway call" and line["tool"] == called_tool and line["outcome"] == "ok"
               and line["client"] == "default" for line in traced), traced
    assert any(line["msg"] == "tool call" and line["tool"] == called_tool and line.get("mad") == mad
               and line.get("principal") == "client:default" for line in traced), traced
    assert result_value(called)["correlation_id"] == call_id, "the message posted carries the call's correlation id"
    text = failed.content[0].text
    failed_id = re.search(r"\(correlation id ([0-9a-f]+)\)$", text).group(1)
    assert DETAIL not in text
    assert any(line.get("mad") == VICTIM and DETAIL in line.get("exc", "") for line in lines
               if line.get("correlation_id") == failed_id), "the failure is in the log under the id the caller got"
    hop_id = relayed.meta[CORRELATION]
    hop = [line for line in lines if line.get("correlation_id") == hop_id]
    assert any(line["msg"] == "tool call" and line.get("mad") == RELAY["sender"] for line in hop), hop
    assert any(line["msg"] == "bus delivery" and line.get("mad") == RELAY["target"]
               and line.get("sender") == RELAY["sender"] for line in hop), "the id crosses the bus into the other MAD"
    carried = query(tmp_path / "state", "SELECT kind FROM messages WHERE correlation_id = ?", (hop_id,))
    assert {m["kind"] for m in carried} >= {"request", "reply"}

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("regen_tool_calls_total", mad=mad, tool=called_name, outcome="ok") == 1
    assert grew("regen_tool_calls_total", mad=VICTIM, tool="explode", outcome="crashed") == 1
    assert grew("regen_errors_total", mad=VICTIM, where="tool") == 1
    assert grew("regen_bus_messages_total", mad=mad, kind="message") == 2
    assert grew("regen_bus_messages_total", mad=RELAY["sender"], kind="request") == 1
    assert grew("regen_bus_messages_total", mad=RELAY["target"], kind="reply") == 1


# ---- what an instrumented server runs (`python -m test_ecosystem serve ...`) ---------------------------


class Faults:
    """Tools that raise, that hang past a short timeout, and that answer."""

    handler_timeout_s = 1.0

    @tool
    async def explode(self) -> dict:
        """Raises."""
        raise RuntimeError(f"exploded on purpose ({DETAIL})")

    @tool
    async def hang(self) -> dict:
        """Never answers on its own."""
        await asyncio.Event().wait()
        return {}

    @tool
    async def alive(self) -> dict:
        """Answers."""
        return {"alive": True}


class Relays:
    """A tool that asks RELAY's target, over the bus, to run RELAY's tool."""

    handler_timeout_s = 120.0

    @tool
    async def relay(self, arguments: dict) -> dict:
        """Relays a request to another MAD."""
        return await self.ask(RELAY["target"], tool=RELAY["tool"], args=arguments)


class Holds:
    """Bus deliveries that wait while the hold file exists: accepted, their handler started, not acknowledged."""

    handler_timeout_s = 120.0

    async def handle(self, envelope: dict):
        hold = Path(os.environ[HOLD])
        while hold.exists():
            await asyncio.sleep(0.01)
        return await super().handle(envelope)


def serve_instrumented(args: list[str]) -> int:
    """`python -m madgroup *args` with the MADs instrumented as the environment's FEATURES say."""
    features = set(os.environ.get(FEATURES, "").split(","))
    mixins: dict[str, list[type]] = {}
    if "faults" in features:
        mixins.setdefault(VICTIM, []).append(Faults)
    if "relay" in features and RELAY:
        mixins.setdefault(RELAY["sender"], []).append(Relays)
        mixins.setdefault(RELAY["target"], []).append(Holds)
    mads = tuple(type(cls.__name__, (*mixins[cls.name], cls), {}) if cls.name in mixins else cls for cls in CONFIG.mads)
    return main(CONFIG.model_copy(update={"mads": mads}), args)


if __name__ == "__main__":
    raise SystemExit(serve_instrumented(sys.argv[1:]))
