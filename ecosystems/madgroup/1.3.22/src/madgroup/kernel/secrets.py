"""Turing's SecretsManager: AES-GCM at rest, per-MAD access control, key rotation, audited.

- Key: env var `<NAME>_SECRETS_KEY` (base64 of 32 bytes) or `<state>/keys/secrets.key`
  (created 0600 on first start, directory 0700).
- Every encryption uses a fresh 96-bit nonce; the secret's name is the associated data,
  so a ciphertext copied under another name does not decrypt.
- Values are versioned: `set` and `rotate` both append a new version. A version's identity
  (name, version, author, time) never changes; only re-encryption under a new key rewrites
  its nonce and ciphertext.
- Each ciphertext records the id of the key that sealed it (a fingerprint, not the key), and
  `secrets_keyring` records the key id the state is sealed under.
- Key rotation (`rotate_key`): the new key is first written to `keys/secrets.key.next`
  (0600, fsync), then every version of every secret is re-encrypted, the keyring updated and
  the rotation audited in ONE transaction, and only then is the next file renamed over
  `keys/secrets.key`. The keyring row is the commit marker: at start-up a leftover `.next`
  whose id the keyring holds is a rotation that committed (the rename is finished), any
  other is one that did not (the file is removed and the old key stays). A key from the
  environment cannot be replaced by the process: `python -m <pkg> secrets rotate-key`
  re-encrypts and hands the new key to the operator in `keys/secrets.key.new`.
- Every access is written to the ecosystem's hash-chained audit log as `secrets.<action>`.
- No value or key is ever logged, audited, or returned by `list` or `rotate_key`.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import fnmatch
import hashlib
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .audit import AuditLog
from .bus import now_iso
from .db import Database, fsync_dir, write_private
from .errors import AccessDenied, InvalidArgument, KernelError, NotFound
from .logs import get as get_logger

log = get_logger("secrets")

SECRET_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_VALUE = 64 * 1024
KEY_FILE = "secrets.key"
NEXT_KEY_FILE = "secrets.key.next"  # a rotation in progress
HANDOFF_KEY_FILE = "secrets.key.new"  # a rotated key for the operator to put in the environment
ROTATION_LOCK = "rotation.lock"  # held across a whole rotation, and by start-up recovery

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    key_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS secrets_keyring (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    key_id TEXT NOT NULL,
    rotated_at TEXT NOT NULL DEFAULT ''
);
"""

# Created after `key_id` exists (states from before key ids get the column added first).
# The trigger of earlier kernels forbade every UPDATE; this one lets a rotation re-seal a version.
_TRIGGERS = """
DROP TRIGGER IF EXISTS secrets_no_update;
CREATE TRIGGER IF NOT EXISTS secrets_reseal_only BEFORE UPDATE ON secrets
WHEN NEW.name IS NOT OLD.name OR NEW.version IS NOT OLD.version OR NEW.created_by IS NOT OLD.created_by
  OR NEW.created_at IS NOT OLD.created_at OR NEW.key_id IS OLD.key_id
BEGIN SELECT RAISE(ABORT, 'secret versions are immutable; only re-encryption under a new key may rewrite one'); END;
CREATE TRIGGER IF NOT EXISTS secrets_no_delete BEFORE DELETE ON secrets
BEGIN SELECT RAISE(ABORT, 'secret versions are immutable'); END;
"""


class KeyManagedExternally(KernelError):
    """The operation needs to replace a key the process does not own (it came from the environment)."""

    code = "failed_precondition"


def key_id(key: bytes) -> str:
    """A short public fingerprint naming a key (so a ciphertext can say which key sealed it)."""
    return hashlib.sha256(b"regen-secrets-key-id:" + key).hexdigest()[:16]


def _decode_key(data: bytes, source: str) -> bytes:
    try:
        key = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KernelError(f"{source} is not valid base64") from exc
    if len(key) != 32:
        raise KernelError(f"{source} must hold 32 bytes (base64), holds {len(key)}")
    return key


class KeySource:
    """Where the secrets key lives: the environment variable (operator's) or `<state>/keys/` (ours)."""

    def __init__(self, state_dir: Path, env_var: str, package: str):
        self.env_var, self.package, self.state_dir = env_var, package, Path(state_dir)
        self.keys_dir = self.state_dir / "keys"
        self.from_env = bool(os.environ.get(env_var, "").strip())
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)

    @property
    def description(self) -> str:
        return f"environment variable {self.env_var}" if self.from_env else f"key file {self.keys_dir / KEY_FILE}"

    def load(self) -> bytes:
        """The current key: from the environment when set, else the key file (created 0600 on first use)."""
        if self.from_env:
            return _decode_key(os.environ[self.env_var].strip().encode(), self.env_var)
        path = self.keys_dir / KEY_FILE
        if not path.exists():
            # "x": created only if absent; when another process wins the race, its key is read.
            with suppress(FileExistsError), open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as fh:
                fh.write(base64.b64encode(AESGCM.generate_key(bit_length=256)) + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(self.keys_dir)
        return _decode_key(path.read_bytes().strip(), f"key file {path}")

    def pending(self) -> bytes | None:
        """The key of a rotation that has not finished (crashed, or under way in another process)."""
        path = self.keys_dir / NEXT_KEY_FILE
        try:
            return _decode_key(path.read_bytes().strip(), f"key file {path}")
        except FileNotFoundError:
            return None

    def on_disk(self) -> list[bytes]:
        """Keys this process may pick up when another process rotated (key-file mode only)."""
        return [] if self.from_env else [key for key in (self.load(), self.pending()) if key]

    @contextmanager
    def rotation_lock(self) -> Iterator[None]:
        """Exclusive across processes on this state: two rotations (a server's and the command line's), or a
        rotation and another process's start-up recovery, would otherwise share `secrets.key.next`."""
        fd = os.open(self.keys_dir / ROTATION_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def stage(self, key: bytes) -> None:
        write_private(self.keys_dir / NEXT_KEY_FILE, base64.b64encode(key) + b"\n")

    def commit(self) -> Path:
        """The rotation committed: the next key becomes the key (or, from env, the operator's hand-off file)."""
        target = self.keys_dir / (HANDOFF_KEY_FILE if self.from_env else KEY_FILE)
        os.replace(self.keys_dir / NEXT_KEY_FILE, target)
        fsync_dir(self.keys_dir)
        return target

    def discard(self) -> None:
        (self.keys_dir / NEXT_KEY_FILE).unlink(missing_ok=True)
        fsync_dir(self.keys_dir)

    def env_rotation_help(self) -> str:
        return (
            f"the secrets key comes from the environment variable {self.env_var}, which this process cannot change. "
            f"To rotate it: stop the ecosystem, run `python -m {self.package} secrets rotate-key --state {self.state_dir}` "
            f"with {self.env_var} still set; it re-encrypts every secret and writes the new key to "
            f"{self.keys_dir / HANDOFF_KEY_FILE} (mode 0600). Set {self.env_var} to that file's contents, start the "
            "ecosystem, then delete the file"
        )


class SecretsManager:
    """Encrypted, versioned secrets with an access policy supplied by the runtime.

    `policy(caller)` returns (is_owner, readable_names). Owners (MADs owning the "secrets"
    capability family, i.e. Turing) may set, rotate, list, read, audit and rotate the key;
    other MADs may read only the names listed in their `secrets`.
    """

    def __init__(self, db: Database, keys: KeySource, policy, audit: AuditLog):
        self.db, self.keys, self._policy, self._audit = db, keys, policy, audit
        # principal -> the secret-name patterns calls made for it may touch (None: no limit); the gateway
        # sets it to its client registry's, since only it knows the clients.
        self.client_scope: Callable[[str], tuple[str, ...] | None] = lambda principal: None
        # Held while sealing or re-sealing, so no write in this process uses a key a rotation is retiring.
        self._lock = threading.RLock()
        db.script(_SCHEMA, part="secrets")
        if "key_id" not in db.table_shape("secrets"):  # a state from before key ids
            db.execute("ALTER TABLE secrets ADD COLUMN key_id TEXT NOT NULL DEFAULT ''")
        db.script(_TRIGGERS, part="secrets_triggers")
        self._finish_interrupted_rotation()
        key = keys.load()
        self._aeads: dict[str, AESGCM] = {key_id(key): AESGCM(key)}
        self._adopt(key_id(key))

    # ---- keys --------------------------------------------------------------------------------

    def _recorded_key_id(self, conn: sqlite3.Connection | None = None) -> str | None:
        """The key id the state is sealed under (inside `conn`'s transaction when given)."""
        sql = "SELECT key_id FROM secrets_keyring WHERE id = 1"
        row = conn.execute(sql).fetchone() if conn is not None else self.db.one(sql)
        return row["key_id"] if row else None

    def _finish_interrupted_rotation(self) -> None:
        if self.keys.pending() is None:
            return
        with self.keys.rotation_lock():  # waits for a rotation under way in another process to end
            nxt = self.keys.pending()
            if nxt is None:  # that rotation settled it
                return
            nid = key_id(nxt)
            if self._recorded_key_id() == nid:  # the re-encryption committed; only the rename is missing
                outcome = f"finished: key {nid} moved to {self.keys.commit().name}"
            else:  # it never committed: the old key still seals everything
                self.keys.discard()
                outcome = f"rolled back: key {nid} discarded"
            self._audit.append("kernel", "secrets.rotate_key.recovered", "*", True, outcome)
            log.warning("interrupted key rotation settled", extra={"key_id": nid, "outcome": outcome})

    def _adopt(self, kid: str) -> None:
        """Record the key id on first start (labelling older ciphertexts), and refuse a key that is not the state's."""
        with self.db.transaction() as conn:
            recorded = self._recorded_key_id(conn)
            if recorded is None:
                conn.execute("INSERT INTO secrets_keyring (id, key_id) VALUES (1, ?)", (kid,))
                conn.execute("UPDATE secrets SET key_id = ? WHERE key_id = ''", (kid,))
                recorded = kid
        if recorded != kid:
            hint = (f" If you ran `secrets rotate-key`, set {self.keys.env_var} to the contents of "
                    f"{self.keys.keys_dir / HANDOFF_KEY_FILE}." if self.keys.from_env else "")
            raise KernelError(
                f"the secrets in {self.db.path} are sealed under key {recorded}, but the {self.keys.description} "
                f"holds key {kid}.{hint}"
            )
        row = self.db.one("SELECT name, nonce, ciphertext FROM secrets LIMIT 1")
        if row is not None:
            try:
                self._open({**row, "key_id": kid})
            except InvalidTag:
                raise KernelError(f"the {self.keys.description} does not decrypt the secrets in {self.db.path}: "
                                  "it is not the key they were stored with") from None

    def _aead(self, kid: str) -> AESGCM:
        """The cipher for key `kid`; picks up a key another process rotated to (key-file mode)."""
        found = self._aeads.get(kid)
        if found is None:
            for key in self.keys.on_disk():
                if key_id(key) == kid:
                    found = self._aeads[kid] = AESGCM(key)
        if found is None:
            raise KernelError(f"this process does not hold key {kid}, which seals the stored secrets; it reads its key "
                              f"from the {self.keys.description}: restart it with the current key")
        return found

    # ---- internals ---------------------------------------------------------------------------

    def audit_entry(self, actor: str, action: str, name: str, ok: bool, detail: str = "", on_behalf_of: str = "") -> None:
        self._audit.append(actor, f"secrets.{action}", name, ok, detail, on_behalf_of)
        log.info("secret access", extra={"actor": actor, "action": action, "secret": name, "ok": ok, "detail": detail})

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not SECRET_NAME.match(name):
            raise InvalidArgument("secret names are 1-128 characters of letters, digits and _ . : -")

    def _in_scope(self, caller: str, action: str, name: str, on_behalf_of: str) -> None:
        """A call made for a client touches only the secrets its --secret patterns name (audited when refused)."""
        scope = self.client_scope(on_behalf_of) if on_behalf_of else None
        if scope is not None and not any(fnmatch.fnmatchcase(name, p) for p in scope):
            allowed = ", ".join(scope) or "none"
            raise self._refused(caller, action, name, f"outside the secrets {on_behalf_of} may touch ({allowed})",
                                on_behalf_of)

    def _refused(self, caller: str, action: str, name: str, why: str, on_behalf_of: str = "",
                 error: KernelError | None = None) -> KernelError:
        """Audit a refusal; returns the error to raise (by default AccessDenied, naming the rule)."""
        self.audit_entry(caller, action, name, False, why, on_behalf_of)
        return error or AccessDenied(f"{caller} may not {action} secret {name!r}: {why}")

    def _open(self, row: dict[str, Any]) -> bytes:
        """The plaintext of a stored version (its name is the associated data)."""
        return self._aead(row["key_id"]).decrypt(row["nonce"], row["ciphertext"], row["name"].encode("utf-8"))

    @staticmethod
    def _seal(aead: AESGCM, name: str, plain: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext) of `plain` stored as secret `name`: a fresh 96-bit nonce, the name as associated data."""
        nonce = os.urandom(12)
        return nonce, aead.encrypt(nonce, plain, name.encode("utf-8"))

    def _owner_only(self, caller: str, action: str, name: str, on_behalf_of: str, what: str) -> None:
        if not self._policy(caller)[0]:
            raise self._refused(caller, action, name, f"only the keeper of secrets may {what}", on_behalf_of)

    def _latest(self, name: str) -> dict[str, Any] | None:
        return self.db.one("SELECT * FROM secrets WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))

    def _write(self, caller: str, action: str, name: str, value: str, on_behalf_of: str, must_exist: bool) -> dict[str, Any]:
        self._check_name(name)
        self._owner_only(caller, action, name, on_behalf_of, "write them")
        self._in_scope(caller, action, name, on_behalf_of)
        if not isinstance(value, str) or not value:
            raise self._refused(caller, action, name, "empty value", on_behalf_of,
                                InvalidArgument("a secret value must be a non-empty string"))
        if len(value) > MAX_VALUE:
            raise self._refused(caller, action, name, "value too long", on_behalf_of,
                                InvalidArgument(f"a secret value must be at most {MAX_VALUE} characters"))
        with self._lock, self.db.transaction() as conn:
            (current,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM secrets WHERE name = ?",
                                      (name,)).fetchone()
            version = 0 if must_exist and not current else current + 1  # 0: nothing to rotate, nothing written
            if version:
                # Sealed inside the transaction under the key the state records, so a rotation
                # (here or in another process) can never leave this version under a retired key.
                kid = self._recorded_key_id(conn) or ""
                nonce, ciphertext = self._seal(self._aead(kid), name, value.encode("utf-8"))
                conn.execute("INSERT INTO secrets (name, version, nonce, ciphertext, created_by, created_at, key_id) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, version, nonce, ciphertext, caller, now_iso(), kid))
        if not version:
            raise self._refused(caller, action, name, "no such secret", on_behalf_of,
                                NotFound(f"no secret {name!r} to rotate; set it first"))
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
            raise self._refused(caller, "get", name, "not in its secrets list", on_behalf_of)
        self._in_scope(caller, "get", name, on_behalf_of)
        row = self._latest(name)
        if row is None:
            raise self._refused(caller, "get", name, "no such secret", on_behalf_of, NotFound(f"no secret {name!r}"))
        value = self._open(row).decode("utf-8")
        self.audit_entry(caller, "get", name, True, f"version {row['version']}", on_behalf_of)
        return {"name": name, "version": row["version"], "value": value}

    def read_internal(self, actor: str, name: str, purpose: str) -> str:
        """The kernel itself reading a secret (e.g. a model API key): audited, no ACL."""
        row = self._latest(name)
        if row is None:
            raise self._refused(actor, "use", name, f"no such secret ({purpose})", "",
                                NotFound(f"no secret {name!r} (needed for {purpose})"))
        self.audit_entry(actor, "use", name, True, purpose)
        return self._open(row).decode("utf-8")

    def list(self, caller: str, on_behalf_of: str = "") -> list[dict[str, Any]]:
        is_owner, readable = self._policy(caller)
        rows = self.db.query(
            "SELECT name, MAX(version) AS version, MAX(created_at) AS updated_at FROM secrets GROUP BY name ORDER BY name"
        )
        scope = self.client_scope(on_behalf_of) if on_behalf_of else None  # a client: only its --secret patterns
        rows = [r for r in rows if (is_owner or r["name"] in readable)
                and (scope is None or any(fnmatch.fnmatchcase(r["name"], p) for p in scope))]
        self.audit_entry(caller, "list", "*", True, f"{len(rows)} names", on_behalf_of)
        return [{"name": r["name"], "version": r["version"], "updated_at": r["updated_at"]} for r in rows]

    def audit(self, caller: str, limit: int = 50, on_behalf_of: str = "") -> list[dict[str, Any]]:
        """The newest `secrets.*` entries of the audit log, as {id, ts, actor, on_behalf_of, action, name, ok, detail}."""
        self._owner_only(caller, "audit", "*", on_behalf_of, "read the audit log")
        if not isinstance(limit, int) or limit < 1:
            raise InvalidArgument("limit must be a positive integer")
        return [
            {"id": r["id"], "ts": r["ts"], "actor": r["actor"], "on_behalf_of": r["on_behalf_of"],
             "action": r["action"].removeprefix("secrets."), "name": r["subject"], "ok": r["ok"], "detail": r["detail"]}
            for r in self._audit.recent(limit, action_prefix="secrets.")
        ]

    def rotate_key(self, caller: str, on_behalf_of: str = "", *, operator: bool = False) -> dict[str, Any]:
        """Re-encrypt every version of every secret under a fresh key; returns counts and the new key's id.

        `operator=True` is the command line's offline rotation, the only one allowed when the key
        comes from the environment: the new key is then left in `keys/secrets.key.new` for the operator.
        """
        if not operator:
            self._owner_only(caller, "rotate_key", "*", on_behalf_of, "rotate the key")
        if self.keys.from_env and not operator:
            raise self._refused(caller, "rotate_key", "*", "key comes from the environment", on_behalf_of,
                                KeyManagedExternally(self.keys.env_rotation_help()))
        with self._lock, self.keys.rotation_lock():
            new_key = AESGCM.generate_key(bit_length=256)
            new_id, new_aead = key_id(new_key), AESGCM(new_key)
            self.keys.stage(new_key)  # on disk before any ciphertext depends on it
            del new_key
            try:
                with self.db.transaction() as conn:
                    rows = conn.execute("SELECT name, version, nonce, ciphertext, key_id FROM secrets").fetchall()
                    for row in rows:
                        sealed = self._seal(new_aead, row["name"], self._open(row))
                        conn.execute("UPDATE secrets SET nonce = ?, ciphertext = ?, key_id = ? WHERE name = ? AND "
                                     "version = ?", (*sealed, new_id, row["name"], row["version"]))
                    conn.execute("UPDATE secrets_keyring SET key_id = ?, rotated_at = ? WHERE id = 1", (new_id, now_iso()))
                    names = len({row["name"] for row in rows})
                    detail = f"re-encrypted {len(rows)} versions of {names} secrets under key {new_id}"
                    self._audit.append_in(conn, caller, "secrets.rotate_key", "*", True, detail, on_behalf_of)
            except BaseException:
                self.keys.discard()
                raise
            # Committed: from here on only the new key opens the secrets.
            self._aeads = {new_id: new_aead}
            target = self.keys.commit()
        log.info("secrets key rotated", extra={"actor": caller, "versions": len(rows), "secrets": names, "key_id": new_id})
        result: dict[str, Any] = {"secrets": names, "versions": len(rows), "key_id": new_id}
        if self.keys.from_env:
            result["key_file"] = str(target)
        return result
