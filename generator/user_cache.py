"""regen's cache in the user's home: what costs time to derive and is the same in every project.

`${XDG_CACHE_HOME:-~/.cache}/regen/<kind>/`: the static review's parsed facts of regen's own kernel
files, and the sandbox runs of trees that passed. Entries are JSON files named by a content key, each
written whole or not at all, so concurrent builds can share them. Deleting the folder is always safe:
it only costs the next run the work again. A damaged entry reads as missing; a folder that cannot be
written is skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def user_cache(kind: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "regen" / kind


def entry(kind: str, key: str) -> Path:
    """Where the entry `key` (a hex digest) of `kind` is kept: fanned out by its first two characters."""
    return user_cache(kind) / key[:2] / f"{key}.json"


def read_entry(path: Path) -> Any | None:
    """The JSON kept at `path`, or None when it is missing or damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def keep_entry(path: Path, data: Any) -> None:
    """Keep `data` at `path` as JSON, whole or not at all."""
    write_whole(path, json.dumps(data))


def write_whole(path: Path, text: str) -> None:
    """Write a cache file whole or not at all (concurrent builds may read it at any moment); a read-only or full
    folder only costs the next run the work. The project's response cache writes its answers through it too."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False) as out:
            temporary = out.name
            out.write(text)
        os.replace(temporary, path)
    except OSError:
        if temporary:
            Path(temporary).unlink(missing_ok=True)
