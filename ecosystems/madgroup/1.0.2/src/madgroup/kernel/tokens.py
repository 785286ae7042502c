"""Bearer tokens for MCP clients, kept as sha256 hashes in `<state>/tokens.json` (mode 0600).

The plaintext token is shown once by writing it to `<state>/client-token` (or
`<state>/client-token.<name>` for other names), mode 0600, for the operator to hand out.
Each token carries `allow`: fnmatch patterns over `<mad>.<tool>` names (default ["*"]).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets as _secrets
import time
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

TOKEN_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _write_private(path: Path, data: str) -> None:
    """Write atomically with mode 0600 (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def token_file(state_dir: Path, name: str = "default") -> Path:
    return Path(state_dir) / ("client-token" if name == "default" else f"client-token.{name}")


class TokenStore:
    def __init__(self, state_dir: str | os.PathLike[str]):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "tokens.json"
        self._cache: dict[str, Any] | None = None
        self._mtime: float = -1.0

    def _load(self) -> dict[str, Any]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {"tokens": {}}
        if self._cache is None or mtime != self._mtime:
            self._cache = json.loads(self.path.read_text(encoding="utf-8"))
            self._mtime = mtime
        return self._cache

    def ensure(self, name: str = "default", allow: list[str] | None = None) -> Path:
        """Create the token `name` on first call; later calls return the same file and do not rotate."""
        if not TOKEN_NAME.match(name):
            raise InvalidArgument("token names are 1-64 characters of letters, digits, _ and -")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        data = json.loads(json.dumps(self._load()))
        path = token_file(self.state_dir, name)
        entry = data["tokens"].get(name)
        if entry is not None and path.exists() and hmac.compare_digest(entry["sha256"], _hash(path.read_text().strip())):
            return path
        token = _secrets.token_urlsafe(32)
        data["tokens"][name] = {
            "sha256": _hash(token),
            "allow": list(allow) if allow else ["*"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_private(path, token + "\n")
        _write_private(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    def verify(self, token: str) -> str | None:
        """The name of the token, or None when it is not a valid token."""
        if not token:
            return None
        digest = _hash(token)
        found = None
        for name, entry in self._load().get("tokens", {}).items():
            if hmac.compare_digest(entry.get("sha256", ""), digest):
                found = name
        return found

    def allowed(self, name: str, tool: str) -> bool:
        entry = self._load().get("tokens", {}).get(name)
        if entry is None:
            return False
        return any(fnmatch.fnmatchcase(tool, pattern) for pattern in entry.get("allow", ["*"]))
