"""Turing's SecretsManager: AES-GCM at rest, per-MAD access control, append-only audit log.

- Key: env var `<NAME>_SECRETS_KEY` (base64 of 32 bytes) or `<state>/keys/secrets.key`
  (created 0600 on first start, directory 0700).
- Every encryption uses a fresh 96-bit nonce; the secret's name is the associated data,
  so a ciphertext copied under another name does not decrypt.
- Values are versioned: `set` and `rotate` both append a new version.
- The audit log (actor, on_behalf_of, action, name, ok, ts, detail) is append-only:
  SQLite triggers abort any UPDATE or DELETE.
- No value is ever logged, audited, or returned by `list`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .bus import now_iso
from .db import Database
from .errors import AccessDenied, InvalidArgument, KernelError, NotFound
from .logs import get as get_logger

log = get_logger("secrets")

SECRET_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_VALUE = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS secrets_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    actor TEXT NOT NULL,
    on_behalf_of TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL,
    name TEXT NOT NULL,
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS secrets_audit_no_update BEFORE UPDATE ON secrets_audit
BEGIN SELECT RAISE(ABORT, 'secrets_audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS secrets_audit_no_delete BEFORE DELETE ON secrets_audit
BEGIN SELECT RAISE(ABORT, 'secrets_audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS secrets_no_update BEFORE UPDATE ON secrets
BEGIN SELECT RAISE(ABORT, 'secret versions are immutable'); END;
"""


def load_or_create_key(state_dir: Path, env_var: str) -> bytes:
    """The 32-byte AES key: from `env_var` (base64) when set, else the key file (created 0600)."""
    raw = os.environ.get(env_var, "").strip()
    if raw:
        return _decode_key(raw.encode(), env_var)
    keys_dir = Path(state_dir) / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    path = keys_dir / "secrets.key"
    if not path.exists():
        key = AESGCM.generate_key(bit_length=256)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process won the race; read theirs
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(base64.b64encode(key) + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
    return _decode_key(path.read_bytes().strip(), f"key file {path}")


def _decode_key(data: bytes, source: str) -> bytes:
    try:
        key = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KernelError(f"{source} is not valid base64") from exc
    if len(key) != 32:
        raise KernelError(f"{source} must hold 32 bytes (base64), holds {len(key)}")
    return key


class SecretsManager:
    """Encrypted, versioned secrets with an access policy supplied by the runtime.

    `policy(caller)` returns (is_owner, readable_names). Owners (MADs owning the "secrets"
    capability family, i.e. Turing) may set, rotate, list, read and audit everything;
    other MADs may read only the names listed in their `secrets`.
    """

    def __init__(self, db: Database, key: bytes, policy):
        self.db = db
        self._aead = AESGCM(key)
        self._policy = policy
        db.script(_SCHEMA)

    # ---- internals ---------------------------------------------------------------------------

    def audit_entry(self, actor: str, action: str, name: str, ok: bool, detail: str = "", on_behalf_of: str = "") -> None:
        self.db.execute(
            "INSERT INTO secrets_audit (ts, actor, on_behalf_of, action, name, ok, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now_iso(), actor, on_behalf_of, action, name, 1 if ok else 0, detail[:500]),
        )
        log.info("secret access", extra={"actor": actor, "action": action, "secret": name, "ok": ok, "detail": detail})

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not SECRET_NAME.match(name):
            raise InvalidArgument("secret names are 1-128 characters of letters, digits and _ . : -")

    def _deny(self, caller: str, action: str, name: str, why: str, on_behalf_of: str) -> AccessDenied:
        self.audit_entry(caller, action, name, False, why, on_behalf_of)
        return AccessDenied(f"{caller} may not {action} secret {name!r}: {why}")

    def _encrypt(self, name: str, value: str) -> tuple[bytes, bytes]:
        nonce = os.urandom(12)
        return nonce, self._aead.encrypt(nonce, value.encode("utf-8"), name.encode("utf-8"))

    def _decrypt(self, name: str, nonce: bytes, ciphertext: bytes) -> str:
        return self._aead.decrypt(nonce, ciphertext, name.encode("utf-8")).decode("utf-8")

    def _latest(self, name: str) -> dict[str, Any] | None:
        return self.db.one("SELECT * FROM secrets WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))

    def _write(self, caller: str, action: str, name: str, value: str, on_behalf_of: str, must_exist: bool) -> dict[str, Any]:
        self._check_name(name)
        is_owner, _ = self._policy(caller)
        if not is_owner:
            raise self._deny(caller, action, name, "only the keeper of secrets may write them", on_behalf_of)
        if not isinstance(value, str) or not value:
            self.audit_entry(caller, action, name, False, "empty value", on_behalf_of)
            raise InvalidArgument("a secret value must be a non-empty string")
        if len(value) > MAX_VALUE:
            self.audit_entry(caller, action, name, False, "value too long", on_behalf_of)
            raise InvalidArgument(f"a secret value must be at most {MAX_VALUE} characters")
        nonce, ciphertext = self._encrypt(name, value)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT MAX(version) AS v FROM secrets WHERE name = ?", (name,)).fetchone()
            current = row["v"] if row and row["v"] is not None else 0
            if must_exist and current == 0:
                version = 0
            else:
                version = current + 1
                conn.execute(
                    "INSERT INTO secrets (name, version, nonce, ciphertext, created_by, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, version, nonce, ciphertext, caller, now_iso()),
                )
        if version == 0:
            self.audit_entry(caller, action, name, False, "no such secret", on_behalf_of)
            raise NotFound(f"no secret {name!r} to rotate; set it first")
        self.audit_entry(caller, action, name, True, f"version {version}", on_behalf_of)
        return {"name": name, "version": version}

    # ---- the capability surface --------------------------------------------------------------

    def set(self, caller: str, name: str, value: str, on_behalf_of: str = "") -> dict[str, Any]:
        return self._write(caller, "set", name, value, on_behalf_of, must_exist=False)

    def rotate(self, caller: str, name: str, value: str, on_behalf_of: str = "") -> dict[str, Any]:
        return self._write(caller, "rotate", name, value, on_behalf_of, must_exist=True)

    def get(self, caller: str, name: str, on_behalf_of: str = "") -> dict[str, Any]:
        self._check_name(name)
        is_owner, readable = self._policy(caller)
        if not (is_owner or name in readable):
            raise self._deny(caller, "get", name, "not in its secrets list", on_behalf_of)
        row = self._latest(name)
        if row is None:
            self.audit_entry(caller, "get", name, False, "no such secret", on_behalf_of)
            raise NotFound(f"no secret {name!r}")
        value = self._decrypt(name, row["nonce"], row["ciphertext"])
        self.audit_entry(caller, "get", name, True, f"version {row['version']}", on_behalf_of)
        return {"name": name, "version": row["version"], "value": value}

    def read_internal(self, actor: str, name: str, purpose: str) -> str:
        """The kernel itself reading a secret (e.g. a model API key): audited, no ACL."""
        row = self._latest(name)
        if row is None:
            self.audit_entry(actor, "use", name, False, f"no such secret ({purpose})")
            raise NotFound(f"no secret {name!r} (needed for {purpose})")
        self.audit_entry(actor, "use", name, True, purpose)
        return self._decrypt(name, row["nonce"], row["ciphertext"])

    def list(self, caller: str, on_behalf_of: str = "") -> list[dict[str, Any]]:
        is_owner, readable = self._policy(caller)
        rows = self.db.query(
            "SELECT name, MAX(version) AS version, MAX(created_at) AS updated_at FROM secrets GROUP BY name ORDER BY name"
        )
        if not is_owner:
            rows = [r for r in rows if r["name"] in readable]
        self.audit_entry(caller, "list", "*", True, f"{len(rows)} names", on_behalf_of)
        return [{"name": r["name"], "version": r["version"], "updated_at": r["updated_at"]} for r in rows]

    def audit(self, caller: str, limit: int = 50, on_behalf_of: str = "") -> list[dict[str, Any]]:
        is_owner, _ = self._policy(caller)
        if not is_owner:
            raise self._deny(caller, "audit", "*", "only the keeper of secrets may read the audit log", on_behalf_of)
        if not isinstance(limit, int) or limit < 1:
            raise InvalidArgument("limit must be a positive integer")
        rows = self.db.query("SELECT * FROM secrets_audit ORDER BY id DESC LIMIT ?", (min(limit, 1000),))
        for r in rows:
            r["ok"] = bool(r["ok"])
        return rows
