"""Working copies that keep the user's edits: `regen export` and `regen update`.

`export(artifact, DIR)` copies an archived build's `src/` into DIR and writes `DIR/.regen.json`,
the answers/lock file: which ecosystem and version DIR came from, that build's root hash, and the
sha256 of every file as exported. The user then edits DIR freely.

`update(DIR, ecosystems_dir, to)` moves DIR to another archived version without losing those edits,
as a 3-way merge (merge3, the merge of Bazaar/Breezy) per file:

- base   = the archived `src/` of the version in the lock file (checked against the lock's hashes
           and its own manifest, so the base is exactly what was exported);
- yours  = DIR as it is now (`.regen.json`, VCS folders, caches and virtualenvs left out);
- theirs = the archived `src/` of the target version (checked against its manifest).

Per path: untouched by you → theirs (new, changed and removed files alike); changed by you only →
yours; changed on both sides → merged, conflicts marked inline git-style
(`<<<<<<< yours` / `=======` / `>>>>>>> regen <version>`); binary or undecodable files, and files you
deleted that changed upstream, keep your side and get theirs beside them as `<path>.regen-<version>`.
Files are replaced one by one (temp file + os.replace) and the lock file is written last, listing
the new version's hashes as the next base: a merged file still differs from it, so the next update
still sees your edit as an edit. An update refuses to start while conflict markers or
`.regen-<version>` copies from the previous one are left.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import merge3
from pydantic import BaseModel, ConfigDict

from ..errors import UserError
from ..frozen import Frozen
from ..hashing import canonical_json, sha256_file, tree_hashes
from ..spec.model import IDENTIFIER
from .manifest import MANIFEST, Manifest, root_hash
from .store import VERSION, SymlinkOnTheWay, folders_for, versions

LOCK_NAME = ".regen.json"
LOCK_SCHEMA = 1
LATEST = "latest"
LOCK_NOTE = ("Written by regen export/update: do not edit. `regen update` compares this working copy "
             "with these hashes to find your edits.")
# Never part of a working copy's content: version control, virtualenvs and caches the user's own
# tools create in it. Skipped unless a generated file lives there.
IGNORED_DIRS = frozenset({
    ".git", ".hg", ".svn", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache",
    ".tox", ".nox", "node_modules",
})
TEMP_SUFFIX = ".regen-tmp"
START_MARKER = b"<<<<<<< "
NOT_A_FILE = "(not a regular file)"  # what `yours` records for a symlink or a special file

ConflictKind = Literal["content", "binary", "deleted-by-you", "deleted-upstream"]


class ExportResult(Frozen):
    ecosystem: str
    version: str
    target: Path
    files: int
    root_hash: str


class Conflict(BaseModel):
    """A path the update could not settle alone: what happened, and where theirs was put aside."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    kind: ConflictKind
    detail: str
    theirs_copy: str | None = None  # `<path>.regen-<version>`, when theirs was written beside yours

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" + (f" (theirs in {self.theirs_copy})" if self.theirs_copy else "")


class UpdateResult(Frozen):
    target: Path
    ecosystem: str
    from_version: str
    to_version: str
    dry_run: bool
    updated: tuple[str, ...]  # untouched by you, changed upstream: now the new version's
    added: tuple[str, ...]  # new upstream: written
    removed: tuple[str, ...]  # removed upstream, untouched by you: deleted
    kept_user_edits: tuple[str, ...]  # edited, added or deleted by you only: left as you have them
    merged_cleanly: tuple[str, ...]  # changed on both sides, merged without a conflict
    conflicts: tuple[Conflict, ...]

    @property
    def ok(self) -> bool:
        return not self.conflicts


# --- references: madgroup@1.0.2 ------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str]:
    """`name@version` (or `name@latest`, or a bare `name` for the latest) as (name, version)."""
    name, _, version = ref.strip().partition("@")
    version = version or LATEST
    if not re.fullmatch(IDENTIFIER, name) or not (version == LATEST or VERSION.match(version)):
        raise UserError(f"{ref!r} is not a build reference; expected NAME@VERSION, e.g. madgroup@1.0.2 "
                        "(or madgroup@latest)")
    return name, version


def resolve(ecosystems_dir: Path, ref: str) -> Path:
    """The archived build folder `ref` names, e.g. ecosystems/madgroup/1.0.2."""
    name, version = parse_ref(ref)
    folder = ecosystems_dir / name
    known = versions(folder)
    if not known:
        names = sorted(p.name for p in ecosystems_dir.iterdir() if p.is_dir() and versions(p)) if ecosystems_dir.is_dir() else []
        raise UserError(f"no archived ecosystem {name!r} in {ecosystems_dir}/; "
                        + (f"known: {', '.join(names)}" if names else "none has been built there yet (regen regenerate)"))
    if version == LATEST:
        version = known[-1]
    elif version not in known:
        raise UserError(f"{name} has no archived version {version} in {folder}/; archived: {', '.join(known)}")
    return folder / version


# --- archives --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Archive:
    """An archived build's `src/`, checked against its manifest."""

    path: Path
    ecosystem: str
    version: str
    root_hash: str
    hashes: dict[str, str]  # of src/, by relative path

    def read(self, rel: str) -> bytes:
        data = (self.path / "src" / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.hashes[rel]:
            raise UserError(f"{self.path}/src/{rel} changed while regen was reading it; run the command again")
        return data

    def mode(self, rel: str) -> int:
        return 0o755 if (self.path / "src" / rel).stat().st_mode & 0o111 else 0o644


def _load_archive(path: Path) -> _Archive:
    try:
        manifest = Manifest.read(path)
    except UserError as exc:
        raise UserError(f"{path} is not an archived build: {exc}") from None
    recorded = manifest.src_outputs
    on_disk = tree_hashes(path / "src") if (path / "src").is_dir() else {}
    differ = sorted(p for p in set(recorded) | set(on_disk) if recorded.get(p) != on_disk.get(p))
    if differ:
        raise UserError(f"{path}/src does not match its manifest ({len(differ)} file(s) differ, first src/{differ[0]}): "
                        f"the archive was changed after it was built; restore it (e.g. git checkout -- {path}) first")
    if manifest.root_hash != root_hash(manifest.outputs):
        raise UserError(f"{path / MANIFEST}: root_hash does not match its outputs; the manifest was edited")
    return _Archive(path=path, ecosystem=manifest.ecosystem, version=manifest.version, root_hash=manifest.root_hash,
                    hashes=recorded)


# --- export ----------------------------------------------------------------------------------


def export(artifact: Path, target: Path) -> ExportResult:
    """Copy `artifact/src` to `target` (absent or empty) with its `.regen.json`; all or nothing."""
    archive = _load_archive(artifact)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{target} exists and is not a folder; export to a new or empty folder")
    if target.is_dir() and any(target.iterdir()):
        raise UserError(f"{target} is not empty; export to a new or empty folder (to move a working copy to "
                        "another version, use regen update)")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".regen-export-", dir=target.parent))
    try:
        for rel in sorted(archive.hashes):
            _write_file(stage, rel, archive.read(rel), archive.mode(rel))
        _write_file(stage, LOCK_NAME, _lock_bytes(archive, pending=()), 0o644)
        os.chmod(stage, 0o755)
        if target.is_dir():
            target.rmdir()  # empty, checked above; rmdir refuses if that changed since
        os.rename(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(ecosystem=archive.ecosystem, version=archive.version, target=target,
                        files=len(archive.hashes), root_hash=archive.root_hash)


def _lock_bytes(archive: _Archive, pending: tuple[str, ...]) -> bytes:
    return canonical_json({
        "//": LOCK_NOTE,
        "schema": LOCK_SCHEMA,
        "ecosystem": archive.ecosystem,
        "version": archive.version,
        "root_hash": archive.root_hash,
        "files": dict(sorted(archive.hashes.items())),
        "pending": list(pending),
    }).encode()


def read_lock(target: Path) -> dict:
    path = target / LOCK_NAME
    if not path.is_file():
        raise UserError(f"{target} is not a working copy made by regen export: it has no {LOCK_NAME}")
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
        ok = (lock.get("schema") == LOCK_SCHEMA and re.fullmatch(IDENTIFIER, lock["ecosystem"])
              and VERSION.match(lock["version"]) and isinstance(lock["files"], dict) and isinstance(lock["root_hash"], str))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"{path} is damaged (it must not be edited); export the version again into a new folder "
                        "and copy your changes over")
    return lock


# --- update ----------------------------------------------------------------------------------


def update(target: Path, ecosystems_dir: Path, to_version: str, dry_run: bool = False) -> UpdateResult:
    """Move the working copy `target` to `to_version`, re-applying the user's edits (see the module doc)."""
    lock = read_lock(target)
    ecosystem, old = lock["ecosystem"], lock["version"]
    name, version = parse_ref(to_version if "@" in to_version else f"{ecosystem}@{to_version}")
    if name != ecosystem:
        raise UserError(f"{target} is a working copy of {ecosystem}, not of {name}")
    if old not in versions(ecosystems_dir / ecosystem):
        raise UserError(f"{ecosystem} {old}, the version {target} was exported from, is not archived in "
                        f"{ecosystems_dir / ecosystem}/ any more, so your edits cannot be told apart from it; "
                        "restore that version or pass the right archive folder")
    base = _load_archive(ecosystems_dir / ecosystem / old)
    if base.hashes != lock["files"] or base.root_hash != lock["root_hash"]:
        raise UserError(f"{base.path} is not the build {target} was exported from (its files or root hash differ "
                        f"from {LOCK_NAME}); restore that archive first")
    theirs = _load_archive(resolve(ecosystems_dir, f"{ecosystem}@{version}"))
    generated = set(base.hashes) | set(theirs.hashes)
    yours = _scan(target, _folders_of(generated))
    _refuse_unresolved(target, lock, base, yours)

    label = f"regen {theirs.version}"
    writes: dict[str, tuple[bytes, int]] = {}
    deletes: list[str] = []
    updated, added, removed, kept, merged = [], [], [], [], []
    conflicts: list[Conflict] = []

    def put_aside(rel: str) -> str:
        side, n = f"{rel}.regen-{theirs.version}", 0
        while side in yours or side in writes or side in generated:
            n += 1
            side = f"{rel}.regen-{theirs.version}.{n}"
        writes[side] = (theirs.read(rel), 0o644)
        return side

    for rel in sorted(generated | set(yours)):
        b, t, y = base.hashes.get(rel), theirs.hashes.get(rel), yours.get(rel)
        if y == b:  # untouched by the user: the new version wins, whatever it did
            if t == b:
                continue
            if t is None:
                deletes.append(rel)
                removed.append(rel)
            else:
                writes[rel] = (theirs.read(rel), theirs.mode(rel))
                (added if b is None else updated).append(rel)
        elif t == b:  # only the user changed it (edited, added or deleted)
            kept.append(rel)
        elif y == t:  # both made the same change
            continue
        elif y is None:
            side = put_aside(rel)
            conflicts.append(Conflict(path=rel, kind="deleted-by-you", theirs_copy=side,
                                      detail=f"you deleted it, {label} {'changed' if b else 'added'} it"))
        elif t is None:
            conflicts.append(Conflict(path=rel, kind="deleted-upstream",
                                      detail=f"you edited it, {label} removed it; yours is kept"))
        else:
            mine = None if y == NOT_A_FILE else (target / rel).read_bytes()
            result = None if mine is None else merge(base.read(rel) if b else b"", mine, theirs.read(rel), label)
            if result is None:
                side = put_aside(rel)
                why = "not a regular file" if mine is None else "not a text file"
                conflicts.append(Conflict(path=rel, kind="binary", theirs_copy=side,
                                          detail=f"changed on both sides and {why}; yours is kept"))
                continue
            data, regions = result
            writes[rel] = (data, stat.S_IMODE((target / rel).stat().st_mode))
            if regions:
                conflicts.append(Conflict(path=rel, kind="content",
                                          detail=f"{regions} conflicting region(s) marked inline"))
            else:
                merged.append(rel)

    _check_writable(target, [*writes, *deletes])  # read-only: a dry run reports it too
    if not dry_run:
        for rel, (data, mode) in sorted(writes.items()):
            _write_file(target, rel, data, mode)
        for rel in deletes:
            (target / rel).unlink(missing_ok=True)
            _prune_empty(target, rel)
        pending = tuple(sorted(c.theirs_copy for c in conflicts if c.theirs_copy))
        _write_file(target, LOCK_NAME, _lock_bytes(theirs, pending), 0o644)
    return UpdateResult(
        target=target, ecosystem=ecosystem, from_version=old, to_version=theirs.version, dry_run=dry_run,
        updated=tuple(updated), added=tuple(added), removed=tuple(removed), kept_user_edits=tuple(kept),
        merged_cleanly=tuple(merged), conflicts=tuple(conflicts),
    )


class _Matcher(difflib.SequenceMatcher):
    """difflib without the "popular line" heuristic, which mismatches long files (a lock file's repeats)."""

    def __init__(self, isjunk=None, a=(), b=()):
        super().__init__(isjunk, a, b, autojunk=False)


def merge(base: bytes, yours: bytes, theirs: bytes, label: str) -> tuple[bytes, int] | None:
    """3-way merge of text files with merge3: (the result, the number of conflicts marked), or
    None when one side is not UTF-8 text."""
    if not all(_is_text(x) for x in (base, yours, theirs)):
        return None
    m = merge3.Merge3(base.splitlines(True), yours.splitlines(True), theirs.splitlines(True), sequence_matcher=_Matcher)
    newline = b"\r\n" if yours.count(b"\r\n") * 2 > yours.count(b"\n") else b"\n"
    out: list[bytes] = []
    conflicts = 0

    def end_line() -> None:  # a side without a final newline must not swallow the marker after it
        if out and not out[-1].endswith((b"\n", b"\r")):
            out.append(newline)

    for region in m.reprocess_merge_regions(m.merge_regions()):
        kind = region[0]
        if kind == "unchanged":
            out += m.base[region[1]:region[2]]
        elif kind in ("a", "same"):
            out += m.a[region[1]:region[2]]
        elif kind == "b":
            out += m.b[region[1]:region[2]]
        else:  # conflict
            conflicts += 1
            _, _, _, ia, amatch, ib, bmatch = region
            end_line()
            out.append(START_MARKER + b"yours" + newline)
            out += m.a[ia:amatch]
            end_line()
            out.append(b"=======" + newline)
            out += m.b[ib:bmatch]
            end_line()
            out.append(b">>>>>>> " + label.encode() + newline)
    return b"".join(out), conflicts


def _is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _folders_of(paths: set[str]) -> set[str]:
    return {parent.as_posix() for rel in paths for parent in Path(rel).parents if parent.as_posix() != "."}


def _scan(root: Path, generated_folders: set[str]) -> dict[str, str]:
    """sha256 of the user's files by relative path; symlinks and special files are not read."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into symlinked folders
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            rel = (here / name).relative_to(root).as_posix()
            if (here / name).is_symlink():
                found[rel] = NOT_A_FILE
            elif name not in IGNORED_DIRS or rel in generated_folders:
                kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if rel == LOCK_NAME or (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
                continue
            mode = path.lstat().st_mode
            found[rel] = sha256_file(path) if stat.S_ISREG(mode) else NOT_A_FILE
    return found


def _refuse_unresolved(target: Path, lock: dict, base: _Archive, yours: dict[str, str]) -> None:
    """Conflict markers or set-aside copies left by the last update must be dealt with first."""
    marked = []
    for rel, digest in sorted(yours.items()):
        if digest == NOT_A_FILE or digest == base.hashes.get(rel):
            continue
        data = (target / rel).read_bytes()
        if START_MARKER not in data:
            continue
        known = set(re.findall(rb"^<<<<<<< .*$", base.read(rel), re.M)) if rel in base.hashes else set()
        if set(re.findall(rb"^<<<<<<< .*$", data, re.M)) - known:
            marked.append(rel)
    left = [rel for rel in lock.get("pending", []) if isinstance(rel, str) and rel in yours]
    if marked or left:
        parts = []
        if marked:
            parts.append("conflict markers (<<<<<<< / ======= / >>>>>>>) in " + ", ".join(marked))
        if left:
            parts.append("the new version's copies set aside beside conflicting files: " + ", ".join(left))
        raise UserError(f"{target} still has unresolved conflicts from the last update: {'; and '.join(parts)}. "
                        "Resolve them first: edit out the markers, and merge and delete each .regen-<version> copy")


def _check_writable(root: Path, paths: list[str]) -> None:
    """Before changing anything: no write may pass through a symlink or land on a folder."""
    problems = []
    for rel in sorted(paths):
        folder = root
        for part in Path(rel).parent.parts:
            folder = folder / part
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                problems.append(f"{rel} ({folder.relative_to(root)} is a symlink or a file)")
                break
        else:
            if (root / rel).is_dir() and not (root / rel).is_symlink():
                problems.append(f"{rel} (a folder is in its place)")
    if problems:
        raise UserError(f"cannot update {root}: nothing was changed, but these paths are blocked: {', '.join(problems)}")


def _write_file(root: Path, rel: str, data: bytes, mode: int) -> None:
    """Replace `root/rel` atomically (temp file in the same folder, fsync, rename)."""
    try:
        folder = folders_for(root, rel)
    except SymlinkOnTheWay as exc:
        raise UserError(f"{rel}: {exc} is a symlink; regen does not write through symlinks") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(rel).name}.", suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, root / rel)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prune_empty(root: Path, rel: str) -> None:
    for parent in Path(rel).parents:
        if parent.as_posix() == ".":
            return
        try:
            (root / parent).rmdir()
        except OSError:  # not empty (or gone): stop
            return


# --- what the CLI prints ---------------------------------------------------------------------


def describe(result: UpdateResult) -> str:
    """The update's report for people: one line per path that changed or needs attention."""
    head = "would update" if result.dry_run else "updated"
    if result.from_version == result.to_version:
        head += " (same version: only checked)"
    lines = [f"{result.target}: {head} {result.ecosystem} {result.from_version} -> {result.to_version}"]
    for title, paths in (
        ("new version's file", result.updated), ("added", result.added), ("removed", result.removed),
        ("your edit kept", result.kept_user_edits), ("merged", result.merged_cleanly),
    ):
        lines += [f"  {title:<19} {p}" for p in paths]
    lines += [f"  CONFLICT ({c.kind}) {c}" for c in result.conflicts]
    counts = (f"{len(result.updated)} updated, {len(result.added)} added, {len(result.removed)} removed, "
              f"{len(result.kept_user_edits)} kept, {len(result.merged_cleanly)} merged, {len(result.conflicts)} conflict(s)")
    lines.append(counts + ("; nothing written (dry run)" if result.dry_run else ""))
    if result.conflicts and not result.dry_run:
        lines.append("Resolve the conflicts (edit out the <<<<<<< / ======= / >>>>>>> markers; merge and delete each "
                     ".regen-<version> copy) before the next update.")
    return "\n".join(lines)
