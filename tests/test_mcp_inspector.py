"""`regen mcp` as a third-party MCP client sees it: the MCP Inspector CLI (npm), pinned, over stdio and over HTTP.

`.ci/run` installs Node.js and warms npx's cache with this exact version (the pin is the kernel gateway test's,
tests/kernel/test_inspector.py). Without `npx` the tests are skipped, saying why; any other failure fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mcp_helpers import TOKEN, http_server

from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.cli import default_pipeline
from generator.config import RunOptions
from generator.progress import Reporter
from generator.spec.starter import init

INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"
REPO = Path(__file__).resolve().parents[1]
TOOLS = {"check", "plan", "regenerate", "verify", "gate", "diff", "versions", "init"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("npx") is None,
                       reason=f"npx is not on PATH: install Node.js and npm to run the MCP Inspector CLI ({INSPECTOR})"),
]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), npm_config_prefer_offline="true",
                npm_config_update_notifier="false", NO_COLOR="1")


def inspector(*args: str, target: list[str]) -> tuple[int, dict]:
    done = subprocess.run(["npx", "-y", INSPECTOR, "--cli", *args, "--", *target], capture_output=True, text=True,
                          timeout=300, env=_env())
    try:
        return done.returncode, json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"the Inspector printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """The starter spec, built once in this process (a build takes longer than the Inspector waits for an answer,
    60 s, on a busy machine; the real `mcp` client builds in tests/test_mcp_server.py)."""
    init(tmp_path / "notes")
    monkeypatch.chdir(tmp_path)
    options = RunOptions(spec_dir=Path("notes"), pipeline_file=default_pipeline(), out_dir=Path("ecosystems"))
    regenerate(BuildContext(options=options, report=Reporter(quiet=True)))
    return tmp_path


def stdio_server(root: Path) -> list[str]:
    return [sys.executable, "-m", "generator.cli", "mcp", "--root", str(root)]


def passed_on() -> list[str]:
    """The Inspector, like other MCP clients, gives a stdio server only a few variables of its own environment (HOME,
    PATH, ...): the build's uv needs its index and TLS settings, the test its signing key folder, so they are passed
    with -e, as the README's client configuration does with "env"."""
    wanted = ("PYTHONPATH", "XDG_CONFIG_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")
    names = sorted(k for k in _env() if k in wanted or k.startswith(("UV_", "PIP_")))
    return [arg for k in names for arg in ("-e", f"{k}={_env()[k]}")]


def test_inspector_over_stdio_lists_strict_schemas_verifies_and_sees_tool_errors(root):
    code, listed = inspector("--method", "tools/list", "--strict", target=stdio_server(root))
    assert code == 0, listed  # --strict exits 6 on error-severity schema problems
    tools = {t["name"]: t for t in listed["tools"]}
    assert set(tools) == TOOLS
    assert all(t["outputSchema"]["type"] == "object" and t["inputSchema"]["type"] == "object" for t in tools.values())
    assert tools["verify"]["inputSchema"]["required"] == ["artifact"]

    code, verified = inspector(*passed_on(), "--method", "tools/call", "--tool-name", "verify", "--tool-arg",
                               "artifact=notes@latest", target=stdio_server(root))
    assert code == 0 and not verified["isError"], verified
    assert verified["structuredContent"]["ok"] and verified["structuredContent"]["artifact"] == "ecosystems/notes/1.0.0"

    code, refused = inspector("--method", "tools/call", "--tool-name", "check", "--tool-arg", "spec=../elsewhere",
                              target=stdio_server(root))
    assert code == 5 and refused["isError"], refused  # the Inspector exits 5 on a tool's isError
    assert "is outside" in refused["content"][0]["text"] and refused["_meta"]["regen/error"]["exit_code"] == 2


def test_inspector_over_http_with_and_without_the_token(root):
    with http_server(root) as url:
        base = ["--transport", "http", "--stored-auth-only"]
        code, listed = inspector(*base, "--header", f"Authorization: Bearer {TOKEN}", "--method", "tools/list",
                                 target=[url])
        assert code == 0 and {t["name"] for t in listed["tools"]} == TOOLS, listed
        code, checked = inspector(*base, "--header", f"Authorization: Bearer {TOKEN}", "--method", "tools/call",
                                  "--tool-name", "check", "--tool-arg", "spec=notes", target=[url])
        assert code == 0 and checked["structuredContent"]["mads"] == 2, checked
        done = subprocess.run(["npx", "-y", INSPECTOR, "--cli", *base, "--method", "tools/list", url],
                              capture_output=True, text=True, timeout=300, env=_env())
        said = done.stdout + done.stderr
        assert done.returncode != 0 and "auth_required" in said and "REGEN_MCP_TOKEN" in said, said
