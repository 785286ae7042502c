"""The committed build, used as its README says: `cd src && ./deploy/run.sh`, then an MCP client."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from generator.artifact.store import versions
from generator.harness import free_port, mcp_client, result_value
from generator.spec.load import load_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ECOSYSTEM = REPO / "ecosystems" / "madgroup"


@pytest.fixture
def running(tmp_path):
    """The latest archived madgroup, copied out (running it writes a venv and state) and started."""
    from uv import find_uv_bin

    latest = versions(ECOSYSTEM)[-1]
    src = shutil.copytree(ECOSYSTEM / latest / "src", tmp_path / "src")
    port = free_port()
    # As inside a nox session, VIRTUAL_ENV and UV_PROJECT_ENVIRONMENT point at a venv that
    # run.sh must leave alone (a decoy here, so a regression cannot wreck the suite's own venv).
    decoy = tmp_path / "caller-venv"
    env = dict(os.environ, PATH=f"{Path(find_uv_bin()).parent}:{os.environ['PATH']}",
               VIRTUAL_ENV=str(decoy), UV_PROJECT_ENVIRONMENT=str(decoy),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        ["./deploy/run.sh", "--port", str(port), "--state", str(tmp_path / "state")],
        cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url, tmp_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_run_sh_starts_it_and_an_mcp_client_uses_every_mad(running):
    url, tmp_path = running
    output = (tmp_path / "run.log").read_text()
    token_file = tmp_path / "state" / "client-token"
    assert f"token is kept in {token_file}" in output
    assert (tmp_path / "cache" / "madgroup" / "venv").is_dir()
    assert not (tmp_path / "src" / ".venv").exists(), "run.sh must not write beside the sources"
    assert not (tmp_path / "caller-venv").exists(), "run.sh must not touch the caller's environment"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    token = token_file.read_text().strip()

    async def session():
        async with mcp_client(url, token) as client:
            listed = (await client.list_tools()).tools
            names = [t.name for t in listed]
            hints = {t.name: t.annotations for t in listed}
            # MCP clients are told which tools only read: those bound to a read capability.
            assert hints["rogers.history"].read_only_hint is True and hints["rogers.history"].idempotent_hint is True
            assert hints["turing.set_secret"].read_only_hint is False
            assert hints["rogers.post"].destructive_hint is False and hints["rogers.post"].idempotent_hint is False

            async def call(tool, /, **args):
                return result_value(await client.call_tool(tool, args))

            await call("turing.set_secret", name="db-password", value="correct horse")
            secret = await call("turing.get_secret", name="db-password")
            conversation = await call("rogers.create_conversation", title="ops")
            await call("rogers.post", conversation_id=conversation["id"], content="deploying 1.0.0")
            history = await call("rogers.history", conversation_id=conversation["id"])
            return names, secret, history

    names, secret, history = asyncio.run(session())
    assert len(names) >= 12
    # Every MAD of the version's own spec serves its tools; a role (lifecycle: ephemeral) serves none.
    spec = load_spec(ECOSYSTEM / versions(ECOSYSTEM)[-1] / "spec")
    assert {name.split(".")[0] for name in names} == {m.name for m in spec.mads if m.lifecycle == "persistent"}
    assert sorted(names) == sorted(f"{m.name}.{t.name}" for m in spec.mads for t in m.tools)
    assert secret["value"] == "correct horse"
    assert [m["content"] for m in history] == ["deploying 1.0.0"]

    # It says which build it is: the version the archive has, in /metrics and its pyproject.
    manifest = json.loads((ECOSYSTEM / versions(ECOSYSTEM)[-1] / "manifest.json").read_text())
    metrics = httpx.get(url + "/metrics").text
    assert (f'regen_build_info{{ecosystem="madgroup",inputs_hash="{manifest["inputs_hash"]}",'
            f'version="{manifest["version"]}"}} 1.0') in metrics
    assert f'version = "{manifest["version"]}"' in (tmp_path / "src" / "pyproject.toml").read_text()

    for tool, args in [("turing.get_secret", {"name": "db-password"}), ("rogers.history", {"conversation_id": "x"})]:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}}
        refused = httpx.post(url + "/mcp", json=body, headers={"Accept": "application/json, text/event-stream"})
        assert refused.status_code == 401


def test_the_generated_readmes_test_command_works_as_written(tmp_path):
    """`## Test it` in the generated README, run word for word in a fresh copy from a clean shell."""
    from uv import find_uv_bin

    latest = versions(ECOSYSTEM)[-1]
    src = shutil.copytree(ECOSYSTEM / latest / "src", tmp_path / "src")
    readme = (src / "README.md").read_text()
    command = readme.split("## Test it", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert command.startswith("uv sync --locked") and "pytest" in command
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT", "PYTHONPATH"))}
    env["PATH"] = f"{Path(find_uv_bin()).parent}:{env['PATH']}"
    done = subprocess.run(["bash", "-c", command], cwd=src, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "error" not in done.stdout.splitlines()[-1]
