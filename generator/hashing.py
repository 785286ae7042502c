"""Content hashes: one canonical JSON, one sha256 of it, one walk over a folder's files.

Everything regen records (manifests, request hashes, the build lock, the fingerprint) hashes
data through `json_hash`, and files through `sha256_file`, so the same content gives the same
digest wherever it is computed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def canonical_json(data: object) -> str:
    """Sorted keys, fixed indentation, final newline: the same data gives the same bytes."""
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_hash(data: object) -> str:
    """The content address of JSON-able data: sha256 of its canonical JSON."""
    return sha256_text(canonical_json(data))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def files_under(root: Path, *, skip_bytecode: bool = False) -> dict[str, Path]:
    """Every regular file under `root` (symlinks are never followed or listed), by sorted relative posix path.

    `skip_bytecode` leaves out `__pycache__/` and `.pyc` files: right for regen's own sources, which Python
    writes bytecode beside; wrong for an artifact, where any file that is there must be accounted for."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        if skip_bytecode and ("__pycache__" in path.parts or path.suffix == ".pyc"):
            continue
        found[path.relative_to(root).as_posix()] = path
    return found


def tree_hashes(root: Path, *, skip_bytecode: bool = False) -> dict[str, str]:
    """sha256 of every file under `root`, by relative posix path, sorted."""
    return {rel: sha256_file(path) for rel, path in files_under(root, skip_bytecode=skip_bytecode).items()}
