"""End to end: the ecosystem as a subprocess, a real MCP client over streamable HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys

import httpx
import pytest

from generator import harness

SECRET = "pa55-word-that-must-never-hit-disk-7731"


def _grep(state_dir, needle: bytes) -> list[str]:
    hits = []
    for root, _, files in os.walk(state_dir):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                if needle in fh.read():
                    hits.append(os.path.join(root, f))
    return hits


def test_serve_mcp_roundtrip_restart_and_auth(tiny_ecosystem, tmp_path):
    root, name = tiny_ecosystem
    state = tmp_path / "state"
    with harness.running_ecosystem(name, state, cwd=root) as eco:
        tools = eco.list_tools()
        assert {"turing.set_secret", "turing.get_secret", "rogers.post", "rogers.history", "grace.status"} <= set(tools)
        assert all(t.count(".") == 1 for t in tools)

        async def first_run():
            async with eco.client() as client:
                listed = {t.name: t for t in (await client.list_tools()).tools}
                schema = listed["rogers.history"].input_schema
                assert schema["required"] == ["conversation_id"]
                assert schema["properties"]["limit"]["type"] == "integer"
                assert schema["properties"]["limit"]["default"] == 50
                call = lambda n, **a: client.call_tool(n, a)  # noqa: E731
                v = harness.result_value(await call("turing.set_secret", name="db_password", value=SECRET))
                assert v == {"name": "db_password", "version": 1}
                got = harness.result_value(await call("turing.get_secret", name="db_password"))
                assert got["value"] == SECRET
                convs = harness.result_value(await call("rogers.list_conversations"))
                general = next(c for c in convs if c["title"] == "general")
                await call("rogers.post", conversation_id=general["id"], content="hello over mcp")
                hist = harness.result_value(await call("rogers.history", conversation_id=general["id"]))
                assert [e["content"] for e in hist] == ["hello over mcp"]
                assert hist[0]["sender"] == "rogers"
                assert hist[0]["payload"] == {"on_behalf_of": "client:default"}
                # a refused call is an MCP tool error with a clear message, not a crash
                bad = await call("rogers.history", conversation_id="missing")
                assert bad.is_error and "not_found" in bad.content[0].text
                over = await call("fiedler.send", model="default", prompt="word " * 100)
                assert over.is_error and "budget exceeded" in over.content[0].text
                # arguments are validated against the schema
                assert (await call("rogers.history", conversation_id="x", limit="many")).is_error
                return general["id"]

        conv_id = asyncio.run(first_run())

        # no token / wrong token: 401, audited
        assert httpx.post(eco.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).status_code == 401
        r = httpx.post(eco.mcp_url, json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        with pytest.raises(Exception):  # the real client is refused at the HTTP layer
            asyncio.run(harness.call_tool(eco.url, "not-the-token", "grace.status"))

        health = httpx.get(f"{eco.url}/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"

        eco.restart()
        assert eco.call("turing.get_secret", name="db_password") == {"name": "db_password", "version": 1, "value": SECRET}
        assert [e["content"] for e in eco.call("rogers.history", conversation_id=conv_id)] == ["hello over mcp"]
        assert eco.call("turing.rotate_secret", name="db_password", value=SECRET + "!")["version"] == 2
        audit = eco.call("turing.audit", limit=20)
        assert any(a["on_behalf_of"] == "client:default" and a["action"] == "get" for a in audit)
        rc = eco.stop()
    assert rc == 0  # graceful SIGTERM shutdown

    assert _grep(state, SECRET.encode()) == []
    assert _grep(state, eco.token.encode()) == [str(state / "client-token")]
    assert stat.S_IMODE((state / "tokens.json").stat().st_mode) == 0o600
    db = sqlite3.connect(state / "ecosystem.db")
    # Refusals of one address within a minute are coalesced: the first is a row, the rest a count.
    refusals = [r[0] for r in db.execute("SELECT detail FROM audit_log WHERE action = 'gateway.unauthorized'")]
    assert refusals[0] in ("missing bearer token", "invalid bearer token")
    assert any(d.endswith("more refused requests from 127.0.0.1") for d in refusals[1:]), refusals
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("DELETE FROM audit_log")
    db.close()
    logs = eco.logs()
    assert SECRET not in logs
    for line in logs.splitlines():
        if line.startswith("{"):
            json.loads(line)


def test_token_patterns_limit_tools(tiny_ecosystem, tmp_path):
    root, name = tiny_ecosystem
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-m", name, "token", "--state", str(state), "--name", "viewer",
                          "--allow", "grace.*"], env=env, capture_output=True, text=True, check=True)
    viewer = open(out.stdout.strip()).read().strip()
    with harness.running_ecosystem(name, state, cwd=root) as eco:
        assert asyncio.run(harness.call_tool(eco.url, viewer, "grace.status"))["status"] == "ok"
        with pytest.raises(harness.ToolCallError, match="access_denied"):
            asyncio.run(harness.call_tool(eco.url, viewer, "turing.get_secret", {"name": "x"}))


def test_grace_page_escapes_user_content(tiny_ecosystem, tmp_path):
    root, name = tiny_ecosystem
    with harness.running_ecosystem(name, tmp_path / "state", cwd=root) as eco:
        eco.call("rogers.create_conversation", title="<script>alert(1)</script>")
        with httpx.Client(base_url=eco.url) as browser:  # Grace's pages need a signed-in session
            assert browser.get("/").status_code == 303
            csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get("/signin").text).group(1)
            signed_in = browser.post("/signin", data={"csrf": csrf, "token": eco.token}, headers={"origin": eco.url})
            assert signed_in.status_code == 303
            page = browser.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            html = page.text + browser.get("/mads").text
        assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "Secrets keeper &lt;of the group&gt;" in html
        assert "A tiny &lt;test&gt; ecosystem &amp; friends" in html
        assert "turing" in html and "set_secret" in html
        assert "default-src 'none'" in page.headers["content-security-policy"]
