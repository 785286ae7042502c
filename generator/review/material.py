"""What reviewers see: the build's src/ as a diff against its parent, plus what it must do.

Review burden should shrink with the change: files identical to the parent's are counted,
not shown. Lockfiles are summarised (the dependencies reviewer reads them whole).
"""

from __future__ import annotations

from pathlib import Path

from ..artifact.history import changed_files
from ..spec.model import Spec
from .models import Material


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
