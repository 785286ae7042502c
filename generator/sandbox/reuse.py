"""A sandbox run that passed, remembered by exactly what it ran: the same tree is not tested twice.

Builds are reproducible, so a rebuild into another folder, a replay, a build resumed after a kill or
the same spec built in a second checkout writes a byte-identical src/. Its tests run hermetically: a
fresh venv from the tree's own uv.lock, no network, a clean home and tmp. The same tree, run by the
same interpreter at the same isolation level and limits, by the same sandbox code, has already given
its answer; running it again costs the build its slowest minute.

What is kept, in `${XDG_CACHE_HOME:-~/.cache}/regen/sandbox-runs/`, and why only that:
- only runs that passed: a failure is always run again, so a flaky failure gets its second chance;
- only runs fenced by bubblewrap: at a weaker level the tests can reach this folder, and could plant
  a pass for a tree they have never seen;
- the key covers every byte and executable bit of the tree (a tree with a symlink is never kept),
  the interpreter, the level, the limits and the sandbox's own code.
`regen gate` never reads it: its point is to run the tests again. `--fresh` neither.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from ..config import SandboxLevel, SandboxSettings
from ..hashing import json_hash, tree_hashes
from ..user_cache import entry, keep_entry, read_entry

KIND = "sandbox-runs"
_SANDBOX_CODE = hashlib.sha256(b"".join(
    (Path(__file__).parent / name).read_bytes() for name in ("run.py", "requirements_plugin.py", "reuse.py")
)).hexdigest()


def run_key(src: Path, settings: SandboxSettings, level: SandboxLevel) -> str | None:
    """The content key of testing `src` this way, or None when such a run is never kept."""
    if level != "bubblewrap" or any(p.is_symlink() for p in src.rglob("*")):
        return None
    hashes = tree_hashes(src)
    executable = sorted(rel for rel in hashes if os.access(src / rel, os.X_OK))
    return json_hash({
        "tree": hashes, "executable": executable, "level": level, "settings": settings.model_dump(mode="json"),
        "python": sys.version, "machine": platform.machine(), "sandbox": _SANDBOX_CODE,
    })


def recall(key: str):
    """The remembered passing result for `key`, marked with when it ran, or None."""
    from .run import SandboxResult

    kept = read_entry(entry(KIND, key))
    try:
        result = SandboxResult.model_validate(kept["result"])
        return result.model_copy(update={"reused_from": str(kept["tested_at"])}) if result.ok else None
    except (KeyError, TypeError, ValidationError):
        return None


def remember(key: str, result) -> None:
    if result.ok:
        tested_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        keep_entry(entry(KIND, key), {"tested_at": tested_at, "result": result.model_dump(mode="json")})
