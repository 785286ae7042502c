"""What reviewers see: the build's src/ as a diff against its parent, plus what it must do.

Review burden should shrink with the change: files identical to the parent's are counted,
not shown. Lockfiles are summarised (the dependencies reviewer reads them whole).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..hashing import tree_hashes
from ..spec.model import Spec
from .models import ChangedFile, Material

SUMMARISED = {"uv.lock": "lockfile: the dependencies reviewer checks every package, source and hash"}


def _text(path: Path) -> list[str] | None:
    try:
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _diff(rel: str, old: Path | None, new: Path | None) -> str:
    if rel in SUMMARISED:
        return f"({SUMMARISED[rel]})"
    before = _text(old) if old else []
    after = _text(new) if new else []
    if before is None or after is None:
        return "(binary file)"
    lines = difflib.unified_diff(before, after, f"a/src/{rel}" if old else "/dev/null",
                                 f"b/src/{rel}" if new else "/dev/null", n=3)
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


def changed_files(src: Path, parent_src: Path | None) -> tuple[tuple[ChangedFile, ...], int]:
    """Every file of `src` that differs from `parent_src` (all of them without a parent), and the count unchanged."""
    new = tree_hashes(src)
    old = tree_hashes(parent_src) if parent_src is not None else {}
    changed = []
    for rel in sorted(set(new) | set(old)):
        if new.get(rel) == old.get(rel):
            continue
        status = "added" if rel not in old else "removed" if rel not in new else "modified"
        diff = _diff(rel, parent_src / rel if rel in old and parent_src else None, src / rel if rel in new else None)
        changed.append(ChangedFile(path=f"src/{rel}", status=status, diff=diff))
    unchanged = sum(1 for rel in new if new[rel] == old.get(rel))
    return tuple(changed), unchanged


def material(spec: Spec, artifact: Path, parent: Path | None, manifest: dict, tests: dict) -> Material:
    """The review material of the build in `artifact` (its src/), against `parent` (its src/) if any."""
    changed, unchanged = changed_files(artifact / "src", parent / "src" if parent else None)
    return Material(
        ecosystem=spec.ecosystem.name,
        version=manifest.get("version", artifact.name),
        parent=manifest.get("parent"),
        requirements=spec.requirements,
        principles=spec.principles,
        manifest=manifest,
        tests=tests,
        changed=changed,
        unchanged=unchanged,
    )
