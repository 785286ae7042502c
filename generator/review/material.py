"""What reviewers see: the build's src/ as a diff against the scope's baseline, plus what it must do.

Review burden should shrink with the change: files identical to the baseline's are counted,
not shown (review/scope.py picks the baseline). Lockfiles are summarised (the dependencies
reviewer reads them whole).
"""

from __future__ import annotations

from pathlib import Path

from ..artifact.history import changed_files
from ..spec.model import Spec
from .models import Material, ReviewScope


def material(spec: Spec, artifact: Path, baseline: Path | None, manifest: dict, tests: dict, scope: ReviewScope) -> Material:
    """The review material of the build in `artifact` (its src/), against `baseline` (its src/) if any."""
    changed, unchanged = changed_files(artifact / "src", baseline / "src" if baseline else None)
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
        scope=scope,
    )
