"""The gateway as a third-party MCP client sees it: the MCP Inspector CLI (npm), pinned, over streamable HTTP.

`.ci/run` installs Node.js and warms npx's cache with this exact version, so the test does not
wait on a download. Without `npx` the test is skipped, saying why; any other failure fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest

from generator import harness

INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("npx") is None,
                       reason=f"npx is not on PATH: install Node.js and npm to run the MCP Inspector CLI ({INSPECTOR})"),
]


@pytest.fixture(scope="module")
def served(tiny_ecosystem, tmp_path_factory):
    """A running server, its default client's token, and the token of a client allowed only grace.*."""
    root, name = tiny_ecosystem
    state = tmp_path_factory.mktemp("inspector") / "state"
    added = subprocess.run([sys.executable, "-m", name, "clients", "add", "viewer", "--state", str(state), "--allow", "grace.*"],
                           env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    with harness.running_ecosystem(name, state, cwd=root) as eco:
        yield eco, eco.token, added.stdout.strip()


async def _call_as(eco, token: str, tool: str, args: dict):
    """A tool call with a plain MCP client, past the Inspector's own check against tools/list."""
    return await harness.call_tool(eco.url, token, tool, args)


def inspector(eco, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["npx", "-y", INSPECTOR, "--cli", eco.mcp_url, "--transport", "http",
           "--header", f"Authorization: Bearer {token}", "--stored-auth-only", *args]
    env = dict(os.environ, npm_config_prefer_offline="true", npm_config_update_notifier="false", NO_COLOR="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_inspector_lists_every_namespaced_tool_with_portable_strict_schemas(served):
    eco, token, _ = served
    listed = inspector(eco, token, "--method", "tools/list", "--strict")
    assert listed.returncode == 0, listed.stdout + listed.stderr  # --strict exits 6 on error-severity schema problems
    tools = {t["name"]: t for t in json.loads(listed.stdout)["tools"]}
    assert {"turing.get_secret", "rogers.history", "grace.status", "fiedler.send"} <= set(tools)
    schema = tools["rogers.history"]["inputSchema"]
    assert schema["required"] == ["conversation_id"] and schema["additionalProperties"] is False
    # and an outputSchema, an object, for every tool: bound ones their capability's shape
    assert [name for name, t in tools.items() if t.get("outputSchema", {}).get("type") != "object"] == []
    assert {"id", "title", "participants"} <= set(tools["rogers.create_conversation"]["outputSchema"]["required"])


def test_inspector_calls_a_tool_and_gets_its_correlation_id(served):
    eco, token, _ = served
    called = inspector(eco, token, "--method", "tools/call", "--tool-name", "rogers.list_conversations", "--tool-arg", "limit=5")
    assert called.returncode == 0, called.stdout + called.stderr
    result = json.loads(called.stdout)
    assert not result.get("isError") and len(result["_meta"]["regen/correlation_id"]) == 32
    assert {c["title"] for c in result["structuredContent"]["result"]} >= {"general", "security"}
    status = json.loads(inspector(eco, token, "--method", "tools/call", "--tool-name", "grace.status").stdout)
    assert not status.get("isError") and status["structuredContent"]["status"] == "ok"  # a `dict` tool: structured too


def test_inspector_sees_clear_errors_for_denied_invalid_and_unauthenticated_calls(served):
    eco, token, viewer = served
    # A client sees only the tools it may call: the Inspector does not even find the others ...
    listed = inspector(eco, viewer, "--method", "tools/list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert {t["name"] for t in json.loads(listed.stdout)["tools"]} == {"grace.status", "grace.mads", "grace.chat"}
    hidden = inspector(eco, viewer, "--method", "tools/call", "--tool-name", "turing.get_secret", "--tool-arg", "name=db")
    assert hidden.returncode != 0 and "Tool 'turing.get_secret' not found" in hidden.stdout + hidden.stderr
    # ... and a client that calls one anyway is refused by the server, clearly.
    with pytest.raises(Exception, match=r"access_denied: client 'viewer' may not call turing.get_secret \(it may call: grace.\*\)"):
        asyncio.run(_call_as(eco, viewer, "turing.get_secret", {"name": "db"}))

    invalid = inspector(eco, token, "--method", "tools/call", "--tool-name", "rogers.history",
                        "--tool-args-json", '{"conversation_id": 5, "limt": 3}')
    text = json.loads(invalid.stdout)["content"][0]["text"]
    assert text.startswith("invalid_argument: rogers.history: argument 'conversation_id' must be a string, not an integer; "
                           "'limt' is not an argument of rogers.history; it takes: conversation_id, limit")

    refused = inspector(eco, "not-a-token", "--method", "tools/list")
    assert refused.returncode != 0 and "a valid 'Authorization: Bearer <token>' header is required" in refused.stderr
