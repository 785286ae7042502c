"""What a user reads instead of a whole tree: the versions of an ecosystem, and what changed between two.

`regen versions <name>` lists every archived version with its bump and why; `regen diff A B`
shows spec changes, tool surface and storage schema changes, dependency changes and the
file diff, as text or JSON. The same `Changes` summary goes into each build's review report.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path

from ..errors import UserError
from ..frozen import Frozen
from ..review.material import changed_files
from ..review.models import ChangedFile
from .store import versions
from .surface import surface_changes, tables


class VersionLine(Frozen):
    version: str
    parent: str | None
    bump: str
    reason: str
    offline: bool
    review: str
    units_reused: int
    units_synthesised: int


class Changes(Frozen):
    """Between two builds: everything but the file contents, which `files` lists with their diffs."""

    old: str
    new: str
    spec: dict[str, str]  # spec file -> added / removed / modified
    spec_diff: str
    surface: tuple[str, ...]  # "tool x added", "table t: column c dropped", ...
    dependencies: dict[str, str]  # package -> "added 1.2", "removed", "1.0 -> 1.1"
    files: tuple[ChangedFile, ...]
    unchanged_files: int

    def summary(self) -> dict:
        """The changes without the file diffs: for reports."""
        return self.model_dump(mode="json", exclude={"files", "spec_diff"}) | {
            "files": {f.path: f.status for f in self.files}
        }


def _manifest(artifact: Path) -> dict:
    try:
        return json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{artifact}: not an archived build ({exc})") from None


def version_lines(ecosystem_dir: Path) -> list[VersionLine]:
    found = versions(ecosystem_dir)
    if not found:
        raise UserError(f"no archived versions in {ecosystem_dir}/; build one with `regen regenerate`")
    lines = []
    for version in found:
        m = _manifest(ecosystem_dir / version)
        lock = m.get("lock", {})
        lines.append(VersionLine(
            version=version, parent=m.get("parent"), bump=m.get("bump", {}).get("kind", "?"),
            reason=m.get("bump", {}).get("reason", ""), offline=bool(m.get("offline")),
            review=m.get("review", {}).get("outcome", "not reviewed"),
            units_reused=sum(1 for e in lock.values() if e.get("reused_from")),
            units_synthesised=sum(1 for e in lock.values() if not e.get("reused_from")) or len(m.get("units", [])),
        ))
    return lines


def _packages(src: Path) -> dict[str, str]:
    try:
        lock = tomllib.loads((src / "uv.lock").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return {p["name"]: p.get("version", "") for p in lock.get("package", []) if "editable" not in p.get("source", {})
            and "virtual" not in p.get("source", {})}


def _spec_files(artifact: Path) -> dict[str, str]:
    folder = artifact / "spec"
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}


def changes(old: Path, new: Path, new_manifest: dict | None = None) -> Changes:
    """From build `old` to build `new` (a staged build passes its manifest-to-be as `new_manifest`)."""
    a, b = _manifest(old), new_manifest or _manifest(new)
    spec_a = {k: v for k, v in a.get("inputs", {}).items() if k.startswith("spec/")}
    spec_b = {k: v for k, v in b.get("inputs", {}).items() if k.startswith("spec/")}
    spec = {k.removeprefix("spec/"): ("added" if k not in spec_a else "removed" if k not in spec_b else "modified")
            for k in sorted(spec_a.keys() | spec_b.keys()) if spec_a.get(k) != spec_b.get(k)}
    text_a, text_b = _spec_files(old), _spec_files(new)
    spec_diff = "".join(
        "".join(difflib.unified_diff(text_a.get(p, "").splitlines(True), text_b.get(p, "").splitlines(True),
                                     f"a/spec/{p}", f"b/spec/{p}"))
        for p in sorted(spec) if p in text_a or p in text_b
    )
    surface = surface_changes(a.get("surface", {}), b.get("surface", {}),
                              tables(a.get("storage", {})), tables(b.get("storage", {})))
    pkgs_a, pkgs_b = _packages(old / "src"), _packages(new / "src")
    dependencies = {}
    for name in sorted(pkgs_a.keys() | pkgs_b.keys()):
        if name not in pkgs_a:
            dependencies[name] = f"added {pkgs_b[name]}"
        elif name not in pkgs_b:
            dependencies[name] = f"removed {pkgs_a[name]}"
        elif pkgs_a[name] != pkgs_b[name]:
            dependencies[name] = f"{pkgs_a[name]} -> {pkgs_b[name]}"
    files, unchanged = changed_files(new / "src", old / "src")
    return Changes(
        old=f"{a.get('ecosystem')}@{a.get('version')}", new=f"{b.get('ecosystem')}@{b.get('version')}",
        spec=spec, spec_diff=spec_diff, surface=tuple(f"[{c.bump}] {c.what}" for c in surface),
        dependencies=dependencies, files=files, unchanged_files=unchanged,
    )


def render_text(found: Changes, patch: bool) -> str:
    out = [f"{found.old} -> {found.new}", ""]
    sections = [
        ("spec", [f"  {status:<9} spec/{path}" for path, status in found.spec.items()]),
        ("tool surface and storage", [f"  {line}" for line in found.surface]),
        ("dependencies", [f"  {name}: {what}" for name, what in found.dependencies.items()]),
        ("files", [f"  {f.status:<9} {f.path}  (+{_count(f.diff, '+')} -{_count(f.diff, '-')})" for f in found.files]
         + [f"  ({found.unchanged_files} unchanged)"]),
    ]
    for title, lines in sections:
        out += [f"{title}:", *(lines or ["  (no change)"]), ""]
    if patch:
        out += [found.spec_diff, *(f.diff for f in found.files)]
    return "\n".join(out).rstrip() + "\n"


def _count(diff: str, sign: str) -> int:
    return sum(1 for line in diff.splitlines() if line.startswith(sign) and not line.startswith(sign * 3))
