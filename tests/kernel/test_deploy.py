"""Deploy as code: deploy/run.sh, the systemd unit and the Dockerfile as the generator renders them.

Each file is rendered from the real spec, then checked by the tool that runs it where this
machine has it (bash, shellcheck, systemd-analyze); the Dockerfile, with no Docker daemon here,
is parsed for the instructions that make it safe. run.sh also runs for real, against the newest
archived madgroup, to show it serves as the process a supervisor signals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from generator import harness
from generator.artifact.store import versions
from generator.harness import free_port
from generator.kernel.supervisor import SupervisionPolicy

REPO = Path(__file__).resolve().parents[2]
ARCHIVE = REPO / "ecosystems" / "madgroup"
UVICORN_GRACE_S = 5  # kernel/cli.py: uvicorn's timeout_graceful_shutdown, before the lifespan drains the bus


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> Path:
    """The frame unit of spec/ (README, RUNBOOK, deploy/...) rendered into a temp dir."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from generator.senior.offline import render_unit
    from generator.senior.synthesise import unit_spec
    from generator.spec.load import load_spec
    from generator.spec.plan import make_plan

    spec = load_spec(REPO / "spec")
    plan = make_plan(spec)
    out = tmp_path_factory.mktemp("frame")
    for file in render_unit(unit_spec(spec, plan, plan.unit("frame"))):
        (out / file["path"]).parent.mkdir(parents=True, exist_ok=True)
        (out / file["path"]).write_text(file["content"])
    (out / "deploy" / "run.sh").chmod(0o755)
    return out


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package: {'shellcheck' if name == 'shellcheck' else 'systemd'})")
    return path


# ---- run.sh ----------------------------------------------------------------------------------


def test_run_sh_is_valid_bash_and_passes_shellcheck(frame):
    script = frame / "deploy" / "run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    checked = subprocess.run([_tool("shellcheck"), "--severity=style", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_run_sh_refuses_a_lock_that_does_not_match_pyproject(frame, tmp_path):
    """`uv sync --locked`: sources whose pyproject.toml and uv.lock disagree never start."""
    from uv import find_uv_bin

    src = shutil.copytree(ARCHIVE / versions(ARCHIVE)[-1] / "src", tmp_path / "src")
    shutil.copy2(frame / "deploy" / "run.sh", src / "deploy" / "run.sh")
    pyproject = src / "pyproject.toml"
    pyproject.write_text(re.sub(r'\n\s*"httpx==[^"]+",', "", pyproject.read_text(), count=1))
    env = dict(os.environ, PATH=f"{Path(find_uv_bin()).parent}:{os.environ['PATH']}", UV_OFFLINE="1",
               VENV=str(tmp_path / "venv"), STATE=str(tmp_path / "state"), PORT=str(free_port()))
    proc = subprocess.Popen(["deploy/run.sh"], cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:  # without --locked it would have started serving: stop it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode != 0
    assert "needs to be updated, but `--locked` was provided" in " ".join(stderr.split())  # uv wraps to the terminal width
    assert not (tmp_path / "state").exists()


@pytest.mark.slow
def test_run_sh_serves_as_the_signalled_process_and_its_check_probes_health(frame, tmp_path):
    """The newest archived madgroup started by today's run.sh: the server is run.sh's own pid (exec), so
    SIGTERM to that pid is a graceful stop (exit 0); `run.sh --check` tells healthy from not."""
    from uv import find_uv_bin

    src = shutil.copytree(ARCHIVE / versions(ARCHIVE)[-1] / "src", tmp_path / "src")
    shutil.copy2(frame / "deploy" / "run.sh", src / "deploy" / "run.sh")
    port = str(free_port())
    env = dict(os.environ, PATH=f"{Path(find_uv_bin()).parent}:{os.environ['PATH']}",
               VENV=str(tmp_path / "venv"), STATE=str(tmp_path / "state"), PORT=port)
    env.pop("VIRTUAL_ENV", None)
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(["deploy/run.sh"], cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        check = subprocess.run(["deploy/run.sh", "--check", "--wait", "180"], cwd=src, env=env, capture_output=True,
                               text=True, timeout=240)
        assert check.returncode == 0, check.stderr + (tmp_path / "run.log").read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[:5] == [str(tmp_path / "venv" / "bin" / "python").encode(), b"-m", b"madgroup", b"serve", b"--host"]
        proc.send_signal(signal.SIGTERM)  # the pid alone, as systemd (KillMode=mixed) and docker stop do
        assert proc.wait(60) == 0, (tmp_path / "run.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    down = subprocess.run(["deploy/run.sh", "--check"], cwd=src, env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "is not healthy" in down.stderr


def test_run_sh_check_waits_for_health_and_probes_a_wildcard_bind_on_loopback(frame, tiny_ecosystem, tmp_path):

    root, name = tiny_ecosystem
    env = dict(os.environ, VENV=str(tmp_path / "no-venv-yet"))  # a first start still building it: python3 probes
    with harness.running_ecosystem(name, tmp_path / "state", cwd=root) as eco:
        for host in ("127.0.0.1", "0.0.0.0"):
            up = subprocess.run([str(frame / "deploy" / "run.sh"), "--check", "--host", host, "--port", str(eco.port)],
                                env=env, capture_output=True, text=True, timeout=30)
            assert up.returncode == 0, up.stderr
        port = eco.port
    started = time.monotonic()
    down = subprocess.run([str(frame / "deploy" / "run.sh"), "--check", "--port", str(port), "--wait", "1"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and f"http://127.0.0.1:{port}/healthz is not healthy" in down.stderr
    assert time.monotonic() - started >= 1  # it retried for the whole --wait


# ---- systemd ---------------------------------------------------------------------------------


def _unit(frame: Path) -> dict[str, list[str]]:
    """Directive -> its values (in order) over every section of the rendered unit."""
    found: dict[str, list[str]] = {}
    for line in (frame / "deploy" / "madgroup.service").read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, val = line.partition("=")
            found.setdefault(key, []).append(val)
    return found


def test_systemd_unit_is_hardened_and_stops_gracefully(frame):
    unit = _unit(frame)
    for key, val in {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "StateDirectory": "madgroup", "StateDirectoryMode": "0700", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "KillSignal": "SIGTERM", "KillMode": "mixed",
        "Type": "exec", "UMask": "0077",
    }.items():
        assert unit.get(key) == [val], (key, unit.get(key))
    assert re.fullmatch(r"\d+[MG]", unit["MemoryMax"][0])
    assert unit["ExecStart"] == ["/opt/madgroup/deploy/run.sh"]
    assert unit["ExecStartPost"][0].startswith("/opt/madgroup/deploy/run.sh --check --wait ")
    # SIGKILL must not cut the drain short: uvicorn's grace, then the bus drain, then some room.
    assert int(unit["TimeoutStopSec"][0]) >= UVICORN_GRACE_S + SupervisionPolicy().drain_timeout_s + 10
    # The health probe's wait fits in the start timeout.
    assert int(unit["ExecStartPost"][0].split()[-1]) < int(unit["TimeoutStartSec"][0])
    # Secrets are never written into the unit (world-readable): an env file holds them.
    assert not any(k == "Environment" and "KEY" in v for k, vs in unit.items() for v in vs)


def test_systemd_analyze_verifies_the_unit_and_rates_it_well_sandboxed(frame, tmp_path):
    analyze = _tool("systemd-analyze")
    # verify checks that ExecStart exists: point /opt/madgroup at the rendered tree.
    unit = tmp_path / "madgroup.service"
    unit.write_text((frame / "deploy" / "madgroup.service").read_text().replace("/opt/madgroup", str(frame)))
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    # Exposure 0 (locked down) .. 10 (unsandboxed); --threshold is in tenths. At most 2.0 ("OK").
    rated = subprocess.run([analyze, "security", "--offline=true", "--threshold=20", str(unit)], capture_output=True, text=True)
    assert rated.returncode == 0, rated.stdout[-2000:] + rated.stderr


# ---- Dockerfile ------------------------------------------------------------------------------


def _dockerfile(frame: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = (frame / "deploy" / "Dockerfile").read_text()
    lines = [line for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_builds_from_the_lock_runs_unprivileged_and_checks_health(frame):
    steps = _dockerfile(frame)
    kinds = [k for k, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    sync = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "uv sync --locked --no-dev" in a)
    lock_copy = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and "uv.lock" in a)
    assert lock_copy < sync < kinds.index("USER")
    user = steps[kinds.index("USER")][1]
    assert user not in ("root", "0") and user.isdigit(), "a numeric non-root USER (runAsNonRoot can check it)"
    assert kinds.index("USER") < kinds.index("CMD")
    env_after_sync = " ".join(a for k, a in steps[sync:] if k == "ENV")
    assert "UV_OFFLINE=1" in env_after_sync, "the container must not download anything at start"
    health = steps[kinds.index("HEALTHCHECK")][1]
    assert json.loads(health.split("CMD", 1)[1]) == ["deploy/run.sh", "--check", "--host", "0.0.0.0", "--port", "8000"]
    assert ("STOPSIGNAL", "SIGTERM") in steps
    cmd = json.loads(steps[kinds.index("CMD")][1])  # exec form: the signal reaches run.sh, which execs the server
    assert cmd[0] == "deploy/run.sh" and cmd[cmd.index("--state") + 1] == "/state"

