"""Key rotation: every version of every secret re-encrypted under a new key in one transaction,
the key file replaced only after it committed, a half-done rotation finished or rolled back at
start-up, and the key itself never in a log, the database, a tool result or the audit log.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import logging
import os
import signal
import stat
import subprocess
import sys

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VALUES = {("db_password", 1): "pw-one-41873", ("db_password", 2): "pw-two-55120", ("api_key", 1): "sk-live-90331"}


@pytest.fixture
def kit(eco_modules, monkeypatch):
    config, kernel, runtime_mod = eco_modules
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    secrets_mod = importlib.import_module(kernel.__name__ + ".secrets")
    cli = importlib.import_module(kernel.__name__ + ".cli")
    logs_mod = importlib.import_module(kernel.__name__ + ".logs")
    return config, kernel, runtime_mod, secrets_mod, cli, logs_mod


def _seeded(kit, state):
    """A started runtime holding VALUES (two secrets, three versions)."""
    config, _, runtime_mod, *_ = kit
    rt = runtime_mod.Runtime(config, state)
    asyncio.run(rt.start())
    asyncio.run(rt.use("secrets.set", caller="turing", name="db_password", value=VALUES["db_password", 1]))
    asyncio.run(rt.use("secrets.rotate", caller="turing", name="db_password", value=VALUES["db_password", 2]))
    asyncio.run(rt.use("secrets.set", caller="turing", name="api_key", value=VALUES["api_key", 1]))
    return rt


def _key_file(state) -> bytes:
    return base64.b64decode((state / "keys" / "secrets.key").read_bytes().strip())


def _rows(state) -> list[dict]:
    import sqlite3

    conn = sqlite3.connect(state / "ecosystem.db")
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM secrets ORDER BY name, version")]
    conn.close()
    return rows


def _opens(key: bytes, row: dict) -> str:
    return AESGCM(key).decrypt(row["nonce"], row["ciphertext"], row["name"].encode()).decode()


def _all_files(state) -> bytes:
    blob = b""
    for root, _, files in os.walk(state):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                blob += fh.read()
    return blob


def _key_forms(key: bytes) -> list[bytes]:
    return [key, base64.b64encode(key), key.hex().encode(), base64.urlsafe_b64encode(key)]


def test_rotation_re_encrypts_every_version_and_retires_the_old_key(kit, tmp_path):
    _, _, runtime_mod, secrets_mod, _, logs_mod = kit
    state = tmp_path / "state"
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(logs_mod.JsonFormatter().format(record))  # type: ignore[method-assign]
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        rt = _seeded(kit, state)
        old_key = _key_file(state)
        result = asyncio.run(rt.use("secrets.rotate_key", caller="turing"))
        new_key = _key_file(state)
        assert new_key != old_key and len(new_key) == 32
        assert result == {"secrets": 2, "versions": 3, "key_id": secrets_mod.key_id(new_key)}
        assert stat.S_IMODE((state / "keys" / "secrets.key").stat().st_mode) == 0o600
        assert sorted(p.name for p in (state / "keys").iterdir()) == ["rotation.lock", "secrets.key"]
        # every version, not only the newest, is sealed under the new key and no longer under the old one
        rows = _rows(state)
        assert {(r["name"], r["version"]): _opens(new_key, r) for r in rows} == VALUES
        assert {r["key_id"] for r in rows} == {result["key_id"]}
        for row in rows:
            with pytest.raises(InvalidTag):
                _opens(old_key, row)
        assert asyncio.run(rt.use("secrets.get", caller="rogers", name="db_password"))["value"] == VALUES["db_password", 2]
        audit = asyncio.run(rt.use("secrets.audit", caller="turing", limit=10))
        assert any(a["action"] == "rotate_key" and a["ok"] and "3 versions of 2 secrets" in a["detail"] for a in audit)
        entries = rt.audit.recent(1000)
        asyncio.run(rt.stop())
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)

    # a restart reads them with the key file alone
    rt = runtime_mod.Runtime(kit[0], state)
    asyncio.run(rt.start())
    assert asyncio.run(rt.use("secrets.get", caller="turing", name="api_key"))["value"] == VALUES["api_key", 1]
    asyncio.run(rt.stop())

    logs = "\n".join(records)
    assert "secrets key rotated" in logs
    database = b"".join((state / name).read_bytes() for name in os.listdir(state) if name.startswith("ecosystem.db"))
    for key in (old_key, new_key):
        for form in _key_forms(key):
            assert form.decode("latin-1") not in logs
            assert form not in database
            assert form.decode("latin-1") not in repr(result) + repr(entries)
    for value in VALUES.values():
        assert value not in logs and value.encode() not in _all_files(state)


def test_only_the_keeper_of_secrets_may_rotate_the_key(kit, tmp_path):
    _, kernel, *_ = kit
    rt = _seeded(kit, tmp_path / "state")
    key = _key_file(tmp_path / "state")
    with pytest.raises(kernel.AccessDenied):
        asyncio.run(rt.use("secrets.rotate_key", caller="rogers"))
    assert _key_file(tmp_path / "state") == key
    asyncio.run(rt.stop())


def test_a_key_from_the_environment_is_rotated_by_the_operator(kit, tmp_path, monkeypatch, capsys):
    config, kernel, runtime_mod, secrets_mod, cli, _ = kit
    env = f"{config.env_prefix}_SECRETS_KEY"
    old_key = AESGCM.generate_key(bit_length=256)
    monkeypatch.setenv(env, base64.b64encode(old_key).decode())
    state = tmp_path / "state"
    rt = _seeded(kit, state)
    with pytest.raises(kernel.KernelError, match=rf"environment variable {env}.*secrets rotate-key --state"):
        asyncio.run(rt.use("secrets.rotate_key", caller="turing"))
    assert any(a["action"] == "rotate_key" and not a["ok"] for a in asyncio.run(rt.use("secrets.audit", caller="turing")))
    asyncio.run(rt.stop())

    assert cli.main(config, ["secrets", "rotate-key", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    handoff = state / "keys" / "secrets.key.new"
    assert str(handoff) in out and f"Set {env} to its contents" in out
    assert stat.S_IMODE(handoff.stat().st_mode) == 0o600
    new_key = base64.b64decode(handoff.read_bytes().strip())
    for form in _key_forms(new_key):
        assert form.decode("latin-1") not in out
    assert {(r["name"], r["version"]): _opens(new_key, r) for r in _rows(state)} == VALUES

    # the old key in the environment is refused with the way out; the new one works
    with pytest.raises(kernel.KernelError, match="secrets.key.new"):
        runtime_mod.Runtime(config, state)
    monkeypatch.setenv(env, handoff.read_text().strip())
    rt = runtime_mod.Runtime(config, state)
    asyncio.run(rt.start())
    assert asyncio.run(rt.use("secrets.get", caller="turing", name="db_password"))["value"] == VALUES["db_password", 2]
    asyncio.run(rt.stop())


def test_a_running_server_follows_a_rotation_made_by_the_command_line(kit, tmp_path, capsys):
    config, _, _, _, cli, _ = kit
    state = tmp_path / "state"
    rt = _seeded(kit, state)
    assert cli.main(config, ["secrets", "rotate-key", "--state", str(state)]) == 0
    assert "now holds it" in capsys.readouterr().out
    assert asyncio.run(rt.use("secrets.get", caller="turing", name="api_key"))["value"] == VALUES["api_key", 1]
    asyncio.run(rt.use("secrets.set", caller="turing", name="late", value="after-rotation"))
    rows = {r["name"]: r for r in _rows(state)}
    assert _opens(_key_file(state), rows["late"]) == "after-rotation"  # sealed under the new key, not the stale one
    asyncio.run(rt.stop())


CHILD = """
import asyncio, importlib, os, signal, sys
name, state, point = sys.argv[1:]
config = importlib.import_module(name + ".ecosystem").CONFIG
runtime_mod = importlib.import_module(name + ".kernel.runtime")
keys = importlib.import_module(name + ".kernel.secrets").KeySource
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "staged":  # the new key is on disk, nothing re-encrypted yet
    stage = keys.stage
    keys.stage = lambda self, key: (stage(self, key), die())
elif point == "mid-transaction":  # killed while re-encrypting the second version
    urandom, calls = os.urandom, []
    os.urandom = lambda n: (calls.append(n), die() if len(calls) == 2 else None, urandom(n))[2]
elif point == "committed":  # the re-encryption committed, the key file not yet replaced
    keys.commit = die
rt = runtime_mod.Runtime(config, state)
asyncio.run(rt.start())
asyncio.run(rt.use("secrets.rotate_key", caller="turing"))
print("not killed")
"""


@pytest.mark.parametrize(("point", "outcome"), [("staged", "rolled back"), ("mid-transaction", "rolled back"),
                                                 ("committed", "finished")])
def test_a_rotation_killed_half_way_is_rolled_back_or_finished_at_start(kit, tiny_ecosystem, tmp_path, point, outcome):
    config, _, runtime_mod, secrets_mod, *_ = kit
    root, name = tiny_ecosystem
    state = tmp_path / "state"
    asyncio.run(_seeded(kit, state).stop())
    old_key = _key_file(state)
    env = {k: v for k, v in os.environ.items() if k != f"{config.env_prefix}_SECRETS_KEY"}
    env["PYTHONPATH"] = str(root)
    child = subprocess.run([sys.executable, "-c", CHILD, name, str(state), point], env=env, capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert (state / "keys" / "secrets.key.next").exists()

    rt = runtime_mod.Runtime(config, state)
    asyncio.run(rt.start())
    try:
        assert not (state / "keys" / "secrets.key.next").exists()
        for (secret, version), value in VALUES.items():
            if version == max(v for (s, v) in VALUES if s == secret):
                assert asyncio.run(rt.use("secrets.get", caller="turing", name=secret))["value"] == value
        key = _key_file(state)
        assert (key == old_key) is (outcome == "rolled back")
        assert {(r["name"], r["version"]): _opens(key, r) for r in _rows(state)} == VALUES
        assert {r["key_id"] for r in _rows(state)} == {secrets_mod.key_id(key)}
        recovered = [e["detail"] for e in rt.audit.recent(20) if e["action"] == "secrets.rotate_key.recovered"]
        assert len(recovered) == 1 and recovered[0].startswith(outcome)
        assert rt.audit.verify() == []
    finally:
        asyncio.run(rt.stop())


def test_a_state_sealed_under_another_key_is_refused_at_start(kit, tmp_path):
    config, kernel, runtime_mod, *_ = kit
    state = tmp_path / "state"
    asyncio.run(_seeded(kit, state).stop())
    (state / "keys" / "secrets.key").write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    with pytest.raises(kernel.KernelError, match="sealed under key"):
        runtime_mod.Runtime(config, state)
