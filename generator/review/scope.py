"""What LLM reviewers are shown, and what a review is bound to.

Scope. Review burden should shrink with the change, but only against code a panel has read:
    parent    the diff against the parent version
    approved  the diff against the newest ancestor that a panel at least this strict approved
              (default); the whole tree when none did
    full      every file of src/
A panel is at least this strict when every reviewer of this one sat on it, defined alike (same
kind, model, options and rubric). Approvals come from an ancestor's own review.json, and from
`regen gate` reports (`.regen/gate/<name>/<version>/review.json`) bound to that very artifact.

Binding. review.json records the hash of what the panel read (src/ and tests.json), the hash of
the panel's files and the scope, so `regen verify` can tell that a review belongs to its artifact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..artifact.manifest import Manifest, root_hash
from ..errors import UserError
from ..hashing import json_hash, sha256_bytes
from .models import ReviewScope, ScopeMode
from .panel import Panel

SCOPES: tuple[ScopeMode, ...] = ("parent", "approved", "full")


def reviewed_hash(outputs: Mapping[str, str]) -> str:
    """The root hash over what a panel reads of an artifact: src/ and tests.json, by artifact path."""
    return root_hash({path: digest for path, digest in outputs.items() if path.startswith("src/") or path == "tests.json"})


def panel_hash(panel: Panel) -> str:
    return json_hash({path: sha256_bytes(data) for path, data in panel.files.items()})


def _reviewers(panel_definition: dict) -> dict:
    return panel_definition.get("reviewers") or {}


def _approved_by_as_strict(review_file: Path, panel: Panel, root_hash_of: str | None) -> str | None:
    """The panel's name if `review_file` approves with every reviewer of `panel` on it (and, for a gate
    report, is bound to the artifact whose root hash is `root_hash_of`); else None."""
    try:
        review = json.loads(review_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(review, dict) or review.get("outcome") != "approve":
        return None
    if root_hash_of is not None and (review.get("bound") or {}).get("artifact_root_hash") != root_hash_of:
        return None
    sat = _reviewers(review.get("panel_definition") or {})
    wanted = _reviewers(panel.describe())
    if all(sat.get(name) == definition for name, definition in wanted.items()):
        return str(review.get("panel") or "?")
    return None


def choose(mode: ScopeMode, panel: Panel, ecosystem_dir: Path, parent: str | None,
           gate_reports: Path | None) -> tuple[Path | None, ReviewScope]:
    """The version to diff against (its folder) and the scope record; (None, full scope) for the whole tree."""
    if mode not in SCOPES:
        raise UserError(f"unknown review scope {mode!r}; expected one of {', '.join(SCOPES)}")
    if mode == "full":
        return None, ReviewScope(mode=mode, baseline=None, reason="the whole tree, as asked (--scope full)")
    if parent is None:
        return None, ReviewScope(mode=mode, baseline=None, reason="a first build: there is no earlier version")
    if not (ecosystem_dir / parent / "src").is_dir():
        return None, ReviewScope(mode=mode, baseline=None,
                                 reason=f"the parent {parent} is not beside this build, so nothing can be diffed")
    if mode == "parent":
        return ecosystem_dir / parent, ReviewScope(mode=mode, baseline=parent, reason=f"the changes since the parent {parent}")
    version: str | None = parent
    seen: set[str] = set()
    while version is not None and version not in seen:
        seen.add(version)
        folder = ecosystem_dir / version
        if not (folder / "src").is_dir():
            break
        try:
            manifest = Manifest.read(folder)
        except UserError:
            break
        gate_report = gate_reports / manifest.ecosystem / version / "review.json" if gate_reports else None
        by = _approved_by_as_strict(folder / "review.json", panel, None)
        if by is None and gate_report is not None:
            by = _approved_by_as_strict(gate_report, panel, manifest.root_hash)
        if by is not None:
            return folder, ReviewScope(mode=mode, baseline=version, reason=(
                f"the changes since {version}, the newest ancestor approved by a panel ({by}) with every reviewer "
                f"of {panel.name}"))
        version = manifest.parent
    return None, ReviewScope(mode=mode, baseline=None, reason=(
        f"the whole tree: no ancestor was approved by a panel with every reviewer of {panel.name}"))
