"""Grace's web console is the `console` deployment pack: mounted only when the build has it and its spec names it.

Without it an ecosystem has no web surface but /mcp, /healthz and /metrics; `GET /` says how to add the console,
and `clients unlock` (the console's sign-in lock) says the same; the security headers still guard every response.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import build_ecosystem, importable, without_pack
from starlette.testclient import TestClient

from generator import harness

ADVICE = "add `console: {}` under `packs:` in spec/ecosystem.yaml"


@pytest.fixture(scope="module")
def core_only(tmp_path_factory):
    """An ecosystem whose spec does not name the console and whose build has no copy of it: its package name."""
    root, name = without_pack(tmp_path_factory, "noconsole", "console")
    ecosystem = root / name / "ecosystem.py"
    named = 'pack_settings={"console": {}}, '
    assert named in ecosystem.read_text(), "build_ecosystem no longer names the console; update this fixture"
    ecosystem.write_text(ecosystem.read_text().replace(named, ""))
    with importable(root):
        yield name


def _modules(name: str):
    return (importlib.import_module(f"{name}.ecosystem").CONFIG, importlib.import_module(f"{name}.kernel.runtime"),
            importlib.import_module(f"{name}.kernel.gateway"), importlib.import_module(f"{name}.kernel.clients"))


def _initialize(http: TestClient, token: str):
    return http.post("/mcp", headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
                     json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                           "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                      "clientInfo": {"name": "probe", "version": "1"}}})


def _assert_no_console(app, registry) -> None:
    token = registry.add("ci", ["*"])
    with TestClient(app, follow_redirects=False, base_url="http://127.0.0.1:8000") as http:  # MCP checks Host
        root = http.get("/")
        assert root.status_code == 404 and ADVICE in root.text and "nox -s regenerate" in root.text
        assert "default-src 'none'" in root.headers["content-security-policy"]  # the core's headers, console or not
        assert root.headers["x-frame-options"] == "DENY"
        for path in ("/signin", "/chat", "/audit"):
            assert http.get(path).status_code == 404, path
        assert http.post("/signin", data={"token": token}).status_code in (404, 405)
        assert http.get("/healthz").status_code == 200
        assert http.get("/metrics").status_code == 200  # loopback: no token needed
        assert http.post("/mcp", json={}).status_code == 401
        assert _initialize(http, token).status_code == 200
    assert app.state.grace is None


def test_a_build_without_the_console_serves_mcp_and_health_and_says_how_to_add_the_web_ui(core_only, tmp_path):
    config, runtime_mod, gateway, clients = _modules(core_only)
    assert "console" not in config.pack_settings
    registry = clients.ClientRegistry(tmp_path)
    _assert_no_console(gateway.build_app(runtime_mod.Runtime(config, tmp_path / "state"), registry), registry)
    assert f"{core_only}.kernel.packs.console.pack" not in sys.modules


def test_a_build_with_the_console_that_its_spec_does_not_name_mounts_none(eco_modules, tmp_path):
    """Both are needed: the pack in the build and its name in the config (a kernel copy carrying every pack, as
    the tests' does, must not open a web surface the spec did not ask for)."""
    config, kernel, runtime_mod = eco_modules
    assert "console" in config.pack_settings  # the tests' ecosystem names it, as madgroup's spec does
    unnamed = config.model_copy(update={"pack_settings": {}})
    registry = importlib.import_module(f"{kernel.__name__}.clients").ClientRegistry(tmp_path)
    gateway = importlib.import_module(f"{kernel.__name__}.gateway")
    _assert_no_console(gateway.build_app(runtime_mod.Runtime(unnamed, tmp_path / "state"), registry), registry)


def test_a_spec_naming_the_console_of_a_build_without_it_is_a_clear_error(core_only, tmp_path):
    config, runtime_mod, gateway, clients = _modules(core_only)
    named = config.model_copy(update={"pack_settings": {"console": {}}})
    errors = importlib.import_module(f"{core_only}.kernel.errors")
    with pytest.raises(errors.KernelError, match="names the console pack, but this build has no copy of it"):
        gateway.build_app(runtime_mod.Runtime(named, tmp_path / "state"), clients.ClientRegistry(tmp_path))


def test_clients_unlock_without_the_console_says_how_to_add_it(core_only, tmp_path, capsys):
    config, *_ = _modules(core_only)
    cli = importlib.import_module(f"{core_only}.kernel.cli")
    assert cli.main(config, ["clients", "unlock", "--all", "--state", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no web console" in err and "`console: {}` under `packs:`" in err and "Traceback" not in err
    # `grace.audit` (the console's audit page) is still a permission a client may be granted: it is the core's.
    assert cli.main(config, ["clients", "add", "auditor", "--allow", "grace.audit", "--state", str(tmp_path)]) == 0


def _serve_banner(name: str, tmp_path) -> str:
    """The line `serve` prints once it is about to listen, from a real process (then stopped)."""
    root = Path(importlib.import_module(name).__file__).parents[1]
    port = harness.free_port()
    with subprocess.Popen([sys.executable, "-m", name, "serve", "--state", str(tmp_path / "state"), "--port", str(port)],
                          cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as server:
        try:
            return next((line for line in server.stdout if " serving " in line), "")
        finally:
            # At once, likely before uvicorn has taken over SIGTERM: the server must still stop, cleanly.
            server.terminate()
            try:
                assert server.wait(timeout=60) == 0, "serve did not stop cleanly on a SIGTERM while it started"
            except subprocess.TimeoutExpired:
                server.kill()
                raise AssertionError("a SIGTERM while serve started was lost: the server kept running") from None


def test_serve_says_where_mcp_is_and_whether_there_is_a_web_console(core_only, tmp_path):
    """The first thing an operator reads: a build without the console does not point them at a page that is a 404."""
    banner = _serve_banner(core_only, tmp_path / "bare")
    assert "serving MCP at http://127.0.0.1:" in banner and "/mcp; no web console (the console pack)" in banner
    with_console = f"console_{uuid.uuid4().hex[:8]}"
    build_ecosystem(tmp_path, with_console)
    with importable(tmp_path):
        banner = _serve_banner(with_console, tmp_path / "full")
    assert "/mcp; Grace's web console at http://127.0.0.1:" in banner
