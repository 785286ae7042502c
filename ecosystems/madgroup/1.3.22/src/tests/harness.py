"""The test harness of every ecosystem regen builds (`tests/harness.py` in its src/): run the server as a
subprocess, talk to it over real MCP.

    from harness import running_ecosystem

    def test_secrets_roundtrip(tmp_path):
        with running_ecosystem("madgroup", tmp_path / "state") as eco:
            assert "turing.set_secret" in eco.list_tools()
            eco.call("turing.set_secret", name="db", value="s3cret")
            assert eco.call("turing.get_secret", name="db")["value"] == "s3cret"
            eco.restart()                     # same state dir, new process
            assert eco.call("turing.get_secret", name="db")["version"] == 1

Async code can use `mcp_client(url, token)` and `call_tool(url, token, name, args)` directly.

It is test code, not the kernel: the running ecosystem never imports it, so it sits with the tests (the
directory of conftest.py is on sys.path while pytest runs) and not in the package. It imports nothing of
the ecosystem: it runs it, and makes its client token with `python -m <package> token`, as an operator
would. Ecosystems built before it moved have it as `<package>.kernel.testing`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

try:  # httpx when the ecosystem pins it; else httpx2, which mcp 2.x always brings (same API)
    import httpx
except ImportError:  # pragma: no cover
    import httpx2 as httpx  # type: ignore[no-redef]


class ToolCallError(Exception):
    """A tool call came back with isError; the message is the server's text."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def mcp_client(url: str, token: str) -> AsyncIterator[Any]:
    """An initialised `mcp.Client` on `<url>/mcp` with `Authorization: Bearer <token>`.

    `url` is the server's base URL (http://127.0.0.1:P) or the /mcp endpoint itself.
    """
    import httpx2
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client

    endpoint = url.rstrip("/").removesuffix("/mcp") + "/mcp"
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30.0, read=120.0))
    async with http:
        async with Client(streamable_http_client(endpoint, http_client=http), cache=None) as client:
            yield client


def result_value(result: Any) -> Any:
    """The JSON value of a CallToolResult: structured content (unwrapped) or parsed text."""
    if getattr(result, "is_error", False):
        text = " ".join(getattr(c, "text", "") for c in result.content)
        raise ToolCallError(text)
    structured = getattr(result, "structured_content", None)
    if isinstance(structured, dict) and set(structured) == {"result"}:
        return structured["result"]  # a result that is no object, wrapped by the server
    if structured is not None:
        return structured
    values = [_json_or_text(c.text) for c in result.content if getattr(c, "text", None) is not None]
    return values[0] if len(values) == 1 else values or None


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


async def _with_client(url: str, token: str, ask: Callable[[Any], Awaitable[Any]]) -> Any:
    """What `ask(client)` returns on a new session. Connection failures (e.g. 401 for a bad token) surface as the
    underlying exception, not as the (nested) exception groups of the SDK's task groups."""
    try:
        async with mcp_client(url, token) as client:
            return await ask(client)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        raise leaf from group


async def call_tool(url: str, token: str, name: str, args: dict[str, Any] | None = None) -> Any:
    """Open a session, call one tool, return its JSON value (ToolCallError on isError)."""
    return result_value(await _with_client(url, token, lambda client: client.call_tool(name, args or {})))


async def list_tools(url: str, token: str) -> list[str]:
    listed = await _with_client(url, token, lambda client: client.list_tools())
    return [t.name for t in listed.tools]


class RunningEcosystem:
    """A `python -m <package> serve` subprocess on 127.0.0.1 with its own state dir."""

    def __init__(self, package: str, state_dir: Path, *, cwd: Path | None, env: dict[str, str] | None,
                 token_name: str, startup_timeout: float):
        self.package = package
        self.state_dir = Path(state_dir).resolve()  # the server runs in `cwd`
        self.cwd = Path(cwd) if cwd else None
        self.token_name = token_name
        self.env = {**os.environ, **(env or {})}
        if self.cwd is not None:
            self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.cwd), self.env.get("PYTHONPATH", "")) if p)
        self.startup_timeout = startup_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkdtemp(prefix=f"{package}-logs-")) / "server.log"
        made = subprocess.run([sys.executable, "-m", package, "token", "--state", str(self.state_dir), "--name",
                               token_name], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=120)
        # `token` prints the token file's path last on stdout, and a warning line on stderr when it holds no usable token
        printed = made.stdout.strip().splitlines()
        if made.returncode or not printed or any(line.startswith("warning:") for line in made.stderr.splitlines()):
            raise RuntimeError(f"no usable token for client {token_name!r}: {made.stderr.strip()[-2000:]}")
        self.token = Path(printed[-1]).read_text().strip()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"

    def logs(self) -> str:
        """What the server has written to stdout and stderr ("" before its first start)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("already running")
        self.port = free_port()
        cmd = [sys.executable, "-m", self.package, "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--state", str(self.state_dir)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.package} exited with {self.process.returncode} during start-up:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.package} did not become healthy in {self.startup_timeout}s:\n{self.logs()[-4000:]}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.process = None
        return proc.returncode

    def restart(self) -> None:
        self.stop()
        self.start()

    # sync conveniences for plain (non-async) pytest tests
    def call(self, tool: str, /, **args: Any) -> Any:
        return asyncio.run(call_tool(self.url, self.token, tool, args))

    def list_tools(self) -> list[str]:
        return asyncio.run(list_tools(self.url, self.token))

    def client(self):
        """`async with eco.client() as c:` an authenticated mcp.Client."""
        return mcp_client(self.url, self.token)


@contextmanager
def running_ecosystem(package: str, state_dir: str | os.PathLike[str], *, cwd: str | os.PathLike[str] | None = None,
                      env: dict[str, str] | None = None, token_name: str = "default",
                      startup_timeout: float = 30.0) -> Iterator[RunningEcosystem]:
    """Start `python -m <package> serve` on a free 127.0.0.1 port; yield it; stop it.

    `cwd` is the directory that contains the package (added to PYTHONPATH); the token is
    created in `state_dir` first. The same state dir can be reused across runs.
    """
    eco = RunningEcosystem(package, Path(state_dir), cwd=Path(cwd) if cwd else None, env=env,
                           token_name=token_name, startup_timeout=startup_timeout)
    eco.start()
    try:
        yield eco
    finally:
        eco.stop()
