from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import stat

import pytest

PLAINTEXT = "correct-horse-battery-staple-93817"


def _errors(runtime):
    return __import__(type(runtime).__module__.rsplit(".", 1)[0] + ".errors", fromlist=["x"])


def _grep_state(state_dir, needle: bytes) -> list[str]:
    hits = []
    for root, _, files in os.walk(state_dir):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                if needle in fh.read():
                    hits.append(path)
    return hits


def test_set_get_versions_and_no_plaintext_on_disk(runtime):
    use = runtime.use
    assert asyncio.run(use("secrets.set", caller="turing", name="db_password", value=PLAINTEXT)) == {
        "name": "db_password", "version": 1}
    assert asyncio.run(use("secrets.rotate", caller="turing", name="db_password", value=PLAINTEXT + "-v2")) == {
        "name": "db_password", "version": 2}
    got = asyncio.run(use("secrets.get", caller="turing", name="db_password"))
    assert got == {"name": "db_password", "version": 2, "value": PLAINTEXT + "-v2"}
    listed = asyncio.run(use("secrets.list", caller="turing"))
    assert [(s["name"], s["version"]) for s in listed] == [("db_password", 2)]
    assert all("value" not in s for s in listed)
    # ciphertext at rest, fresh nonce each time
    rows = runtime.db.query("SELECT nonce, ciphertext FROM secrets")
    assert len({r["nonce"] for r in rows}) == 2 and all(len(r["nonce"]) == 12 for r in rows)
    assert all(PLAINTEXT.encode() not in r["ciphertext"] for r in rows)
    runtime.db.execute("PRAGMA wal_checkpoint(FULL)")
    assert _grep_state(runtime.state_dir, PLAINTEXT.encode()) == []
    # nor is it in the audit log
    assert all(PLAINTEXT not in str(r) for r in runtime.db.query("SELECT * FROM audit_log"))


def test_key_file_created_0600_and_reused(runtime, eco_modules):
    key_path = runtime.state_dir / "keys" / "secrets.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert len(base64.b64decode(key_path.read_bytes().strip())) == 32
    asyncio.run(runtime.use("secrets.set", caller="turing", name="k", value="v1"))
    asyncio.run(runtime.stop())
    config, _, runtime_mod = eco_modules
    rt2 = runtime_mod.Runtime(config, runtime.state_dir)
    asyncio.run(rt2.start())
    try:
        assert asyncio.run(rt2.use("secrets.get", caller="turing", name="k"))["value"] == "v1"
    finally:
        asyncio.run(rt2.stop())


def test_key_from_environment(eco_modules, tmp_path, monkeypatch):
    config, _, runtime_mod = eco_modules
    key = os.urandom(32)
    monkeypatch.setenv(f"{config.name.upper()}_SECRETS_KEY", base64.b64encode(key).decode())
    rt = runtime_mod.Runtime(config, tmp_path / "s")
    asyncio.run(rt.start())
    try:
        assert not (tmp_path / "s" / "keys" / "secrets.key").exists()
        asyncio.run(rt.use("secrets.set", caller="turing", name="x", value="y"))
        assert asyncio.run(rt.use("secrets.get", caller="turing", name="x"))["value"] == "y"
    finally:
        asyncio.run(rt.stop())
    monkeypatch.setenv(f"{config.name.upper()}_SECRETS_KEY", "not-base64!!")
    with pytest.raises(Exception, match="SECRETS_KEY"):
        runtime_mod.Runtime(config, tmp_path / "s2")


def test_name_is_associated_data(runtime):
    asyncio.run(runtime.use("secrets.set", caller="turing", name="a", value="alpha"))
    asyncio.run(runtime.use("secrets.set", caller="turing", name="b", value="beta"))
    # copy a's ciphertext under b's name (as a new version): decryption must fail
    row = runtime.db.one("SELECT nonce, ciphertext, key_id FROM secrets WHERE name='a'")
    runtime.db.execute(
        "INSERT INTO secrets (name, version, nonce, ciphertext, created_by, created_at, key_id) VALUES ('b', 9, ?, ?, 'x', 'now', ?)",
        (row["nonce"], row["ciphertext"], row["key_id"]),
    )
    from cryptography.exceptions import InvalidTag

    with pytest.raises(InvalidTag):
        asyncio.run(runtime.use("secrets.get", caller="turing", name="b"))


def test_access_control(runtime):
    errors = _errors(runtime)
    asyncio.run(runtime.use("secrets.set", caller="turing", name="db_password", value="pw"))
    asyncio.run(runtime.use("secrets.set", caller="turing", name="other", value="nope"))
    # rogers lists db_password in its `secrets`
    assert asyncio.run(runtime.use("secrets.get", caller="rogers", name="db_password"))["value"] == "pw"
    with pytest.raises(errors.AccessDenied):
        asyncio.run(runtime.use("secrets.get", caller="rogers", name="other"))
    with pytest.raises(errors.AccessDenied):
        asyncio.run(runtime.use("secrets.get", caller="fiedler", name="db_password"))
    with pytest.raises(errors.AccessDenied):
        asyncio.run(runtime.use("secrets.set", caller="rogers", name="db_password", value="hijack"))
    with pytest.raises(errors.AccessDenied):
        asyncio.run(runtime.use("secrets.audit", caller="rogers"))
    assert [s["name"] for s in asyncio.run(runtime.use("secrets.list", caller="rogers"))] == ["db_password"]
    with pytest.raises(errors.NotFound):
        asyncio.run(runtime.use("secrets.rotate", caller="turing", name="missing", value="x"))
    with pytest.raises(errors.InvalidArgument):
        asyncio.run(runtime.use("secrets.set", caller="turing", name="bad name!", value="x"))
    audit = asyncio.run(runtime.use("secrets.audit", caller="turing", limit=100))
    denied = [(a["actor"], a["action"], a["name"]) for a in audit if not a["ok"]]
    assert ("rogers", "get", "other") in denied
    assert ("fiedler", "get", "db_password") in denied
    # writing is not a secret reader's capability at all: refused (and audited) by the kernel before the manager
    kernel_denied = [(a["actor"], a["subject"]) for a in runtime.audit.recent(100, action_prefix="kernel.use")]
    assert ("rogers", "secrets.set") in kernel_denied and ("rogers", "secrets.audit") in kernel_denied
    assert all(set(a) >= {"actor", "action", "name", "ok", "ts"} for a in audit)
    assert asyncio.run(runtime.use("secrets.get", caller="turing", name="db_password"))["value"] == "pw"


def test_audit_log_is_append_only(runtime):
    asyncio.run(runtime.use("secrets.set", caller="turing", name="n", value="v"))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        runtime.db.execute("UPDATE audit_log SET ok = 0")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        runtime.db.execute("DELETE FROM audit_log")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        runtime.db.execute("UPDATE secrets SET ciphertext = x'00'")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        runtime.db.execute("DELETE FROM secrets")
    assert runtime.db.one("SELECT COUNT(*) AS n FROM audit_log WHERE action = 'secrets.set'")["n"] >= 1


def test_bus_redacts_secret_values_between_mads(runtime):
    """Rogers asks Turing (its talks_to) for a secret over the bus: the reply envelope is redacted at rest."""
    asyncio.run(runtime.use("secrets.set", caller="turing", name="db_password", value=PLAINTEXT))
    result = asyncio.run(runtime.mad("rogers").ask("turing", tool="get_secret", args={"name": "db_password"}))
    assert result["value"] == PLAINTEXT
    rows = runtime.db.query("SELECT * FROM messages")
    kinds = [r["kind"] for r in rows]
    assert "request" in kinds and "reply" in kinds
    assert all(PLAINTEXT not in (r["content"] + r["payload"]) for r in rows)


def test_the_database_is_readable_by_its_owner_only(tmp_path):
    from generator.kernel.db import Database

    db = Database(tmp_path / "state" / "ecosystem.db")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    for path in (tmp_path / "state").iterdir():
        assert path.stat().st_mode & 0o077 == 0, f"{path.name} is readable by others"
    db.close()
