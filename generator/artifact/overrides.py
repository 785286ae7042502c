"""Pinned overrides: files in the spec that replace (or add) generated files on every build.

An edit that must survive every regeneration lives in the spec, not in a working copy:
`spec/overrides/<path>` replaces `src/<path>` of every build, byte for byte. For example
`spec/overrides/madgroup/mads/turing.py` pins Turing's module, `spec/overrides/deploy/extra.conf`
adds a file the build does not produce (allowed, and reported separately as an addition).

Refused, with a UserError naming the file: symlinks (files or folders), anything that is not a
regular file, files over 512 KiB, paths that are absolute or hold `..`/`.`/empty parts or
backslashes, the kernel (`<package>/kernel/`, copied from regen itself, the same in every build),
the test harness (`tests/harness.py`, likewise), `uv.lock` (written by `uv lock` after the files; pin
versions in ecosystem.yaml) and `.regen.json` (a working copy's lock file).

How the pipeline records them:

- `write_src` applies them last, after synthesis and the kernel, before `uv lock`:
  `files, pinned = apply_overrides({**synthesis.files, **kernel_files(package)}, overrides)`, so the
  sandbox tests and the review see the build as shipped; a verify rebuild applies them the same way.
- The manifest records `"overrides": {path: sha256}` (`override_hashes`), paths inside src/; the
  files also appear in `"outputs"` as usual, so `root_hash` covers them.
- They are inputs of the build fingerprint: `load_spec` reads every file under the spec folder,
  `overrides/` included, so each one is in `Spec.files` and so in the fingerprint as
  `spec/overrides/<path>`. Changing, adding or removing one makes the last build out of date and
  rebuilds.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ..errors import SpecError, SpecProblem, UserError
from ..kernel_contract import HARNESS_PATH

FOLDER = "overrides"
MAX_OVERRIDE_BYTES = 512 * 1024
RESERVED = {
    "uv.lock": "uv.lock is written by `uv lock` after the files; pin dependency versions in ecosystem.yaml instead",
    ".regen.json": ".regen.json is a working copy's lock file, not part of a build",
}


def path_problem(rel: str, package: str | None = None) -> str | None:
    """Why `rel` (a path inside src/) cannot be overridden, or None when it can."""
    if not rel or "\\" in rel or "\0" in rel or rel.startswith("/"):
        return "not a relative path inside src/"
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "the path must not hold empty, '.' or '..' parts (it would leave src/)"
    if rel in RESERVED:
        return RESERVED[rel]
    if rel == HARNESS_PATH:
        return f"{HARNESS_PATH} is regen's test harness, copied into every build unchanged; it cannot be overridden"
    if len(parts) >= 2 and parts[1] == "kernel" and (package is None or parts[0] == package):
        return (f"{parts[0]}/kernel/ is regen's kernel, copied into every build unchanged; it cannot be "
                "overridden (change the MAD or the frame instead)")
    return None


def load_overrides(spec_dir: Path, package: str | None = None) -> dict[str, bytes]:
    """The files under `spec_dir/overrides/`, by path inside src/. `package` (the ecosystem's
    package, `Plan.package`) names the kernel folder; without it, any `<x>/kernel/` is refused."""
    root = spec_dir / FOLDER
    if not os.path.lexists(root):
        return {}
    if root.is_symlink() or not root.is_dir():
        raise SpecError([SpecProblem(str(root), 0, "must be a folder (not a symlink or a file) holding files "
                                     "laid out as in src/")])
    found: dict[str, bytes] = {}
    problems: list[SpecProblem] = []
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are listed, never entered
        here = Path(dirpath)
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                problems.append(SpecProblem(str(here / name), 0, "is a symlink; overrides must be plain files "
                                            "inside the spec folder"))
        dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink())
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if (message := _file_problem(path, rel, package)) is not None:
                problems.append(SpecProblem(str(path), 0, message))
                continue
            data = path.read_bytes()
            if len(data) > MAX_OVERRIDE_BYTES:  # it grew since the stat
                problems.append(SpecProblem(str(path), 0, _size_message(len(data))))
                continue
            found[rel] = data
    if problems:
        raise SpecError(problems)
    return dict(sorted(found.items()))


def _file_problem(path: Path, rel: str, package: str | None) -> str | None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not UTF-8"
    if path.is_symlink():
        return "is a symlink; overrides must be plain files inside the spec folder"
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot read the file: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > MAX_OVERRIDE_BYTES:
        return _size_message(info.st_size)
    return path_problem(rel, package)


def _size_message(size: int) -> str:
    return f"file is {size} bytes, over the limit of {MAX_OVERRIDE_BYTES} bytes (512 KiB) for an override"


def apply_overrides(
    files: Mapping[str, str | bytes], overrides: Mapping[str, bytes], package: str | None = None,
) -> tuple[dict[str, str | bytes], list[str]]:
    """`files` with every override put in (replacing or adding), and the overridden paths, sorted."""
    bad = [f"{rel}: {problem}" for rel in sorted(overrides) if (problem := path_problem(rel, package)) is not None]
    if bad:
        raise UserError("overrides that cannot be applied: " + "; ".join(bad))
    return {**files, **overrides}, sorted(overrides)


def override_additions(files: Mapping[str, str | bytes], overrides: Mapping[str, bytes]) -> list[str]:
    """The overrides of files the build does not produce: additions, worth telling the user about."""
    return sorted(rel for rel in overrides if rel not in files)


def override_hashes(overrides: Mapping[str, bytes]) -> dict[str, str]:
    """What the manifest records under "overrides": {path inside src/: sha256}."""
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(overrides.items())}
