"""`regen mcp --http`: streamable HTTP on 127.0.0.1 behind a bearer token, with the real `mcp` client: a build of the
starter spec, the repository's madgroup verified and gated, and every request without the token refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp.shared.exceptions import MCPError
from mcp_helpers import REPO, TOKEN, _env, _files, _started, _value, http_client, http_server, new_workspace


@pytest.fixture
def workspace(tmp_path) -> Path:
    return new_workspace(tmp_path)


@pytest.fixture
def served(workspace) -> str:
    """`regen mcp --http` over the workspace: its URL."""
    with http_server(workspace) as url:
        yield url



def test_http_refuses_every_request_without_the_token(workspace, served):
    _started(workspace)
    before = _files(workspace)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "init", "arguments": {"folder": "x"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        refused = httpx2.post(served, json=body, headers=accept | headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer"), refused.text
        assert "REGEN_MCP_TOKEN" in refused.json()["message"]
    assert httpx2.get(served, headers=accept).status_code == 401
    assert _files(workspace) == before


def test_http_needs_a_token_to_start():
    done = subprocess.run([sys.executable, "-m", "generator.cli", "mcp", "--http"], capture_output=True, text=True,
                          env={k: v for k, v in _env().items() if k != "REGEN_MCP_TOKEN"}, timeout=60)
    assert done.returncode == 2 and "REGEN_MCP_TOKEN" in done.stderr, done.stderr


@pytest.mark.slow
def test_an_agent_builds_verifies_and_gates_over_http(workspace, served):
    progress: list[str] = []

    async def on_progress(step: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async def agent():
        async with http_client(served) as client:
            _value(await client.call_tool("init", {"folder": "notes"}))
            built = _value(await client.call_tool("regenerate", {"spec": "notes"}, progress_callback=on_progress))
            verified = _value(await client.call_tool("verify", {"artifact": built["path"]}))
            gated = _value(await client.call_tool("gate", {"spec": "notes", "trust_tests": True}))
            return built, verified, gated

    built, verified, gated = anyio.run(agent)
    assert built["version"] == "1.0.0" and verified["ok"] and gated["outcome"] == "approve"
    assert any(m.startswith("test:") for m in progress) and any(m.startswith("emit:") for m in progress)


def _leaves(exc: BaseException) -> list[BaseException]:
    return [leaf for inner in exc.exceptions for leaf in _leaves(inner)] if isinstance(exc, BaseExceptionGroup) else [exc]


def test_a_client_with_a_wrong_token_cannot_even_list_the_tools(served):
    async def agent():
        async with http_client(served, token="not-the-token-0123456789") as client:
            await client.list_tools()

    with pytest.raises(BaseException) as refused:
        anyio.run(agent)
    assert any(isinstance(leaf, MCPError) for leaf in _leaves(refused.value)), refused.value


@pytest.fixture
def madgroup_workspace(workspace) -> Path:
    """A copy of this repository's madgroup: its spec, pipelines and panels, and its two newest archived versions."""
    import shutil

    from generator.artifact.store import versions

    for folder in ("spec", "pipelines", "reviews"):
        shutil.copytree(REPO / folder, workspace / folder)
    for version in versions(REPO / "ecosystems" / "madgroup")[-2:]:
        shutil.copytree(REPO / "ecosystems" / "madgroup" / version, workspace / "ecosystems" / "madgroup" / version)
    return workspace


@pytest.mark.slow
def test_an_agent_verifies_and_gates_the_newest_madgroup_over_http(madgroup_workspace, served):
    from generator.artifact.store import versions

    newest = versions(madgroup_workspace / "ecosystems" / "madgroup")[-1]

    async def agent():
        async with http_client(served) as client:
            checked = _value(await client.call_tool("check", {}))
            verified = _value(await client.call_tool("verify", {"artifact": "madgroup@latest"}))
            gated = _value(await client.call_tool("gate", {"trust_tests": True}))
            return checked, verified, gated

    checked, verified, gated = anyio.run(agent)
    assert checked["ecosystem"] == "madgroup" and checked["mads"] >= 10
    assert verified["ok"] and verified["artifact"] == f"ecosystems/madgroup/{newest}", verified
    assert gated["outcome"] == "approve" and gated["artifact"] == f"ecosystems/madgroup/{newest}", gated
