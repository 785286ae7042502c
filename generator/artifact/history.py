"""What a user reads instead of a whole tree: the versions of an ecosystem, and what changed between two.

`regen versions <name>` lists every archived version with its bump and why; `regen diff A B`
shows spec changes, tool surface and storage schema changes, dependency changes and the
file diff, as text or JSON. The same `Changes` summary goes into each build's review report,
and reviewers read the file diff (`changed_files`) instead of the whole tree.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import UserError
from ..frozen import Frozen
from ..hashing import tree_hashes
from .manifest import Manifest, Storage
from .store import versions
from .surface import surface_changes, tables

SUMMARISED = {"uv.lock": "lockfile: the dependencies reviewer checks every package, source and hash"}


class ChangedFile(Frozen):
    """One file of the artifact's src/ that differs from the parent version's."""

    path: str
    status: Literal["added", "removed", "modified"]
    diff: str = Field(description="unified diff against the parent (the whole file when added)")


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


class VersionLine(Frozen):
    version: str
    parent: str | None
    bump: str
    reason: str
    offline: bool
    review: str
    units_reused: int
    units_synthesised: int
    tools_carried: int


class Side(Frozen):
    """What `changes` compares of a build: archived (`Side.of(manifest)`), or being built."""

    name: str
    spec_inputs: dict[str, str]
    surface: dict[str, dict]
    storage: Storage

    @classmethod
    def of(cls, manifest: Manifest) -> Side:
        return cls(name=manifest.name, spec_inputs=manifest.spec_inputs, storage=manifest.storage,
                   surface={k: v.model_dump(mode="json") for k, v in manifest.surface.items()})


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


def version_lines(ecosystem_dir: Path) -> list[VersionLine]:
    found = versions(ecosystem_dir)
    if not found:
        raise UserError(f"no archived versions in {ecosystem_dir}/; build one with `regen regenerate`")
    lines = []
    for version in found:
        m = Manifest.read(ecosystem_dir / version)
        reused = sum(1 for e in m.lock.values() if e.reused_from)
        lines.append(VersionLine(
            version=version, parent=m.parent, bump=m.bump.kind, reason=m.bump.reason, offline=m.offline,
            review=m.review.outcome, units_reused=reused, units_synthesised=(len(m.lock) - reused) or len(m.units),
            tools_carried=len(m.carried),
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


def changes(old: Path, new: Path, new_side: Side | None = None) -> Changes:
    """From build `old` to build `new` (a build being staged passes what it will record as `new_side`)."""
    a, b = Side.of(Manifest.read(old)), new_side or Side.of(Manifest.read(new))
    spec_a, spec_b = a.spec_inputs, b.spec_inputs
    spec = {k.removeprefix("spec/"): ("added" if k not in spec_a else "removed" if k not in spec_b else "modified")
            for k in sorted(spec_a.keys() | spec_b.keys()) if spec_a.get(k) != spec_b.get(k)}
    text_a, text_b = _spec_files(old), _spec_files(new)
    spec_diff = "".join(
        "".join(difflib.unified_diff(text_a.get(p, "").splitlines(True), text_b.get(p, "").splitlines(True),
                                     f"a/spec/{p}", f"b/spec/{p}"))
        for p in sorted(spec) if p in text_a or p in text_b
    )
    surface = surface_changes(a.surface, b.surface, tables(a.storage), tables(b.storage))
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
        old=a.name, new=b.name, spec=spec, spec_diff=spec_diff, surface=tuple(f"[{c.bump}] {c.what}" for c in surface),
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
