from __future__ import annotations

import os
import stat
import subprocess
import sys


def _run(root, name, *args):
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-m", name, *args], env=env, capture_output=True, text=True, timeout=60)


def test_token_is_created_once_and_kept_private(tiny_ecosystem, tmp_path):
    root, name = tiny_ecosystem
    state = tmp_path / "state"
    first = _run(root, name, "token", "--state", str(state))
    assert first.returncode == 0, first.stderr
    path = first.stdout.strip()
    assert path == str((state / "client-token").resolve())
    token = open(path).read().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE((state / "tokens.json").stat().st_mode) == 0o600
    assert token not in (state / "tokens.json").read_text()
    second = _run(root, name, "token", "--state", str(state))
    assert second.stdout.strip() == path and open(path).read().strip() == token
    other = _run(root, name, "token", "--state", str(state), "--name", "ci")
    assert other.stdout.strip().endswith("client-token.ci")


def test_cli_usage_errors(tiny_ecosystem):
    root, name = tiny_ecosystem
    assert _run(root, name).returncode == 2
    assert _run(root, name, "serve").returncode == 2  # --state is required
    bad = _run(root, name, "token", "--state", "/tmp/x-kernel-test", "--name", "bad name")
    assert bad.returncode == 2 and "token names" in bad.stderr
