"""What LLM reviewers are shown, and what a review is bound to.

Scope. Review burden should shrink with the change, but only against code a panel has read:
    parent    the diff against the parent version
    approved  the diff against the newest ancestor whose code a panel at least this strict read
              and approved (default); the whole tree when there is none
    full      every file of src/
An ancestor counts only when all of this holds:
  - it verifies: its signature (by the key given with --trust, if any) and every file hash;
  - its own review.json belongs to it (bound to its src/ and tests.json) and approves;
  - every reviewer of this panel sat on that panel, defined alike (kind, focus, model, options,
    weight, rubric; not timeouts or endpoints) and approved in its final round: an abstainer did
    not read the code;
  - that panel's consensus rule is this one's, or unanimity with every reviewer voting;
  - that review read the whole tree, or the diff against an ancestor that itself counts: a chain
    of diffs is only as good as its first tree.
Reports of `regen gate` are not signed, so they do not count: a panel's approval of an archived
build counts from inside the artifact, where the signature covers it.

Binding. review.json records the hash of what the panel read (src/ and tests.json), the hash of
the panel's files and the scope, so `regen verify` can tell that a review belongs to its artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError

from ..artifact.manifest import Manifest, root_hash
from ..artifact.sign import verify_artifact
from ..errors import UserError
from ..hashing import json_hash, sha256_bytes
from .models import PanelReport, ReviewScope, ScopeMode
from .panel import Panel

SCOPES: tuple[ScopeMode, ...] = ("parent", "approved", "full")
# What makes two reviewers the same reviewer; timeouts, retries and endpoints do not change what it reads for.
_REVIEWER_KEYS = ("kind", "focus", "weight", "options", "rubric_sha256")


def reviewed_hash(outputs: Mapping[str, str]) -> str:
    """The root hash over what a panel reads of an artifact: src/ and tests.json, by artifact path."""
    return root_hash({path: digest for path, digest in outputs.items() if path.startswith("src/") or path == "tests.json"})


def panel_hash(panel: Panel) -> str:
    return json_hash({path: sha256_bytes(data) for path, data in panel.files.items()})


def _reviewer_key(definition: object) -> dict | None:
    if not isinstance(definition, dict):
        return None
    model = definition.get("model")
    return {k: definition.get(k) for k in _REVIEWER_KEYS} | {
        "model": model.get("model") if isinstance(model, dict) else None}


def _as_strict(review: PanelReport, panel: Panel) -> bool:
    """Did every reviewer of `panel` sit on the panel of `review`, defined alike, and approve in its final round,
    under a rule at least as strict?"""
    wanted = panel.describe()
    sat = review.panel_definition.get("reviewers")
    if not isinstance(sat, dict):
        return False
    final = {v.reviewer: v for v in review.final.verdicts}
    for name, definition in wanted["reviewers"].items():
        if _reviewer_key(sat.get(name)) != _reviewer_key(definition):
            return False
        if name not in final or final[name].decision != "approve":
            return False
    theirs, ours = review.panel_definition.get("consensus"), wanted["consensus"]
    unanimous = isinstance(theirs, dict) and theirs.get("rule") == "unanimous" and theirs.get("quorum") is None \
        and theirs.get("veto_on_critical", True)
    return theirs == ours or unanimous


def _approving_review(folder: Path, manifest: Manifest, panel: Panel, trust: Path | None) -> PanelReport | None:
    """The ancestor's own review when the ancestor verifies, the review belongs to it, approves and is as strict."""
    from .replay import review_problems  # replay builds on this module

    if not verify_artifact(folder, trust).ok:
        return None
    try:
        review = PanelReport.model_validate_json((folder / "review.json").read_bytes())
    except (OSError, ValidationError):
        return None
    if review_problems(review, manifest) or review.outcome != "approve":
        return None
    return review if _as_strict(review, panel) else None


def choose(mode: ScopeMode, panel: Panel, ecosystem_dir: Path, parent: str | None,
           trust: Path | None = None) -> tuple[Path | None, ReviewScope]:
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
        return ecosystem_dir / parent, ReviewScope(
            mode=mode, baseline=parent, baseline_root_hash=_root_hash_of(ecosystem_dir / parent),
            reason=f"the changes since the parent {parent}")
    chain = _ancestors(ecosystem_dir, parent)
    read: dict[str, bool] = {}  # version -> a panel this strict read all of its code, through its chain
    for version, manifest in reversed(chain):  # oldest first, so each anchor is known before it is needed
        review = _approving_review(ecosystem_dir / version, manifest, panel, trust)
        if review is None:
            read[version] = False
            continue
        scope = review.bound.scope if review.bound else None
        baseline = scope.baseline if scope else manifest.parent  # before bound reviews: the diff against the parent
        read[version] = baseline is None or read.get(baseline, False)
    for version, manifest in chain:  # newest first
        if read[version]:
            return ecosystem_dir / version, ReviewScope(
                mode=mode, baseline=version, baseline_root_hash=manifest.root_hash, reason=(
                    f"the changes since {version}, the newest ancestor whose whole code a panel with every reviewer "
                    f"of {panel.name} has read and approved"))
    return None, ReviewScope(mode=mode, baseline=None, reason=(
        f"the whole tree: no ancestor's code was read and approved by a panel with every reviewer of {panel.name}"))


def _ancestors(ecosystem_dir: Path, parent: str) -> list[tuple[str, Manifest]]:
    """The parent, its parent, ... while each is here with a readable manifest; newest first."""
    chain: list[tuple[str, Manifest]] = []
    version: str | None = parent
    while version is not None and version not in {v for v, _ in chain} and "/" not in version:
        folder = ecosystem_dir / version
        if not (folder / "src").is_dir():
            break
        try:
            manifest = Manifest.read(folder)
        except UserError:
            break
        chain.append((version, manifest))
        version = manifest.parent
    return chain


def _root_hash_of(folder: Path) -> str | None:
    try:
        return Manifest.read(folder).root_hash
    except UserError:
        return None
