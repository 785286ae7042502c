"""End-to-end tests of madgroup as a whole: the tool surface, the gateway's
authentication, state that survives a restart, and no secret in plaintext at rest."""

import asyncio
import re
import uuid
from pathlib import Path

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from madgroup.kernel.testing import mcp_client, running_ecosystem

from conftest import ALL_TOOLS, PACKAGE, SRC, TOOL_FOR, tool_for


def test_every_spec_tool_is_exposed_as_mad_dot_tool(eco):
    assert sorted(eco.list_tools()) == ALL_TOOLS


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


REQUESTS = [
    {"method": "tools/list", "params": {}},
    {"method": "tools/call", "params": {"name": "turing.set_secret", "arguments": {'name': 'x', 'value': 'y'}}},
    {"method": "tools/call", "params": {"name": "turing.get_secret", "arguments": {'name': 'x'}}},
    {"method": "tools/call", "params": {"name": "rogers.post", "arguments": {'conversation_id': 'c', 'content': 'hi'}}},
    {"method": "tools/call", "params": {"name": "rogers.history", "arguments": {'conversation_id': 'c'}}},
]


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


def test_an_mcp_client_with_a_wrong_token_cannot_call_tools(eco):
    async def attempt():
        async with mcp_client(eco.url, "not-the-token") as client:
            await client.call_tool(ALL_TOOLS[0], {})

    with pytest.raises(BaseException) as caught:
        asyncio.run(attempt())
    assert any(isinstance(leaf, MCPError) for leaf in _leaves(caught.value))


def test_conversations_and_secrets_survive_a_restart(tmp_path):
    create, post, history = (tool_for(c) for c in ("conversations.create", "conversations.post", "conversations.history"))
    set_secret, get_secret = tool_for("secrets.set"), tool_for("secrets.get")
    value = "survives-" + uuid.uuid4().hex
    with running_ecosystem(PACKAGE, tmp_path / "state", cwd=SRC) as eco:
        conversation = eco.call(create, title="durable")
        eco.call(post, conversation_id=conversation["id"], content="written before the restart")
        eco.call(set_secret, name="durable", value=value)
        eco.restart()
        assert [m["content"] for m in eco.call(history, conversation_id=conversation["id"])] == [
            "written before the restart"
        ]
        assert eco.call(get_secret, name="durable")["value"] == value


def test_no_secret_value_is_stored_in_plaintext(tmp_path):
    set_secret, rotate = tool_for("secrets.set"), TOOL_FOR.get("secrets.rotate")
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
