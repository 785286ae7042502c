"""What the tests of `regen mcp` share: a workspace with the starter spec, the stdio and HTTP clients, the server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx2
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"


def _env() -> dict[str, str]:
    """A stdio server gets this process's environment: its uv and TLS settings, and the test's signing key folder. (An
    MCP client passes only a few variables unless told; the README's configuration says so.)"""
    return dict(os.environ, PYTHONPATH=str(REPO))


@asynccontextmanager
async def stdio(root: Path):
    params = StdioServerParameters(command=sys.executable, args=["-m", "generator.cli", "mcp", "--root", str(root)],
                                   env=_env(), cwd=str(root))
    async with Client(stdio_client(params), cache=None) as client:
        yield client


def _value(result) -> dict:
    assert not result.is_error, result.content[0].text
    return result.structured_content


def _error(result) -> tuple[str, dict]:
    assert result.is_error, result.structured_content
    return result.content[0].text, result.meta["regen/error"]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _started(root: Path, name: str = "notes") -> Path:
    from generator.spec.starter import init

    init(root / name)
    return root / name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def http_client(url: str, token: str = TOKEN):
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30.0, read=300.0))
    async with http, Client(streamable_http_client(url, http_client=http), cache=None) as client:
        yield client


def new_workspace(tmp_path: Path) -> Path:
    root = tmp_path / "work"
    root.mkdir()
    return root


@contextmanager
def http_server(workspace: Path) -> Iterator[str]:
    """`regen mcp --http` on a free port over `workspace`, with TOKEN; its URL."""
    port = _free_port()
    log = open(workspace.parent / "mcp-http.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "generator.cli", "mcp", "--http", "--port", str(port), "--root",
                             str(workspace)], env=_env() | {"REGEN_MCP_TOKEN": TOKEN}, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/mcp"
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert proc.poll() is None, (workspace.parent / "mcp-http.log").read_text()
            time.sleep(0.1)
    try:
        yield url
    finally:  # the test failed or not: the server goes
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
