"""The archive on disk: versions, staging folders, and publishing a build so that it is complete or absent.

A build is staged in `ecosystems/<name>/.staging-<pid>-<random>/` on the same
filesystem, every file and folder is fsynced, and one `rename` makes it
`ecosystems/<name>/<version>/`. An existing version is never overwritten or changed;
a build killed at any moment leaves at most a hidden staging folder, removed by the
next run.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import BuildBusy, BuildFailed

VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
STAGING_PREFIX = ".staging-"
BUILD_LOCK = ".build.lock"


def versions(ecosystem_dir: Path) -> list[str]:
    """The archived versions of an ecosystem, oldest first (semver order)."""
    if not ecosystem_dir.is_dir():
        return []
    found = [p.name for p in ecosystem_dir.iterdir() if p.is_dir() and VERSION.match(p.name)]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def latest_manifest(ecosystem_dir: Path) -> dict | None:
    found = versions(ecosystem_dir)
    if not found:
        return None
    path = ecosystem_dir / found[-1] / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildFailed(f"{path}: the latest archived manifest cannot be read: {exc}")


def remove_stale_staging(ecosystem_dir: Path) -> list[Path]:
    """Remove staging folders left by builds that died; a live build's folder is kept."""
    removed = []
    if not ecosystem_dir.is_dir():
        return removed
    for path in ecosystem_dir.glob(STAGING_PREFIX + "*"):
        pid = path.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def build_lock(ecosystem_dir: Path) -> Iterator[None]:
    """One build of an ecosystem at a time, whoever starts it (the command line, an MCP client, another shell): a
    second is refused at once with BuildBusy, naming the holder. An flock, so a build that dies releases it; the file
    is removed when the build ends, and so are the folders it made, so a build that fails leaves nothing behind.
    Taken before anything else is written: the next build's sweep of stale staging folders must not see this one's."""
    made = [p for p in (ecosystem_dir, *ecosystem_dir.parents) if not p.exists()]
    ecosystem_dir.mkdir(parents=True, exist_ok=True)
    path = ecosystem_dir / BUILD_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a process that has not said which"
            os.close(fd)
            raise BuildBusy(f"another build of {ecosystem_dir.name} is running ({holder}): wait for it to finish, or "
                            "stop it, then build again") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the build before removed this file as we opened it: lock the one that is there now
    try:
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: whoever opened it before retries on a new file
        os.close(fd)
        for folder in made:  # innermost first; one that holds anything (a version) stays
            try:
                folder.rmdir()
            except OSError:
                break


@contextmanager
def staging(ecosystem_dir: Path) -> Iterator[Path]:
    """A fresh staging folder; removed if the build fails, left to `publish` if it succeeds."""
    ecosystem_dir.mkdir(parents=True, exist_ok=True)
    path = ecosystem_dir / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


class SymlinkOnTheWay(Exception):
    """A folder on the way to a file is a symlink: the path it names."""


def folders_for(root: Path, rel: str) -> Path:
    """Create the folders of `root/rel` one level at a time, refusing any symlink on the way before it can carry a
    write (or a mkdir) outside the tree; returns the file's folder."""
    folder = root
    for part in Path(rel).parent.parts:
        folder = folder / part
        if folder.is_symlink():
            raise SymlinkOnTheWay(folder)
        folder.mkdir(exist_ok=True)
    return folder


def write_tree(root: Path, files: dict[str, str | bytes], executable: frozenset[str] = frozenset()) -> None:
    """Write `files` (relative posix paths) under `root`; nothing may land outside it."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in sorted(files.items()):
        target = root / rel
        try:
            folders_for(root, rel)
        except SymlinkOnTheWay as exc:
            raise BuildFailed(f"{rel}: {exc} is a symlink, which could lead outside the output tree") from None
        data = content.encode("utf-8") if isinstance(content, str) else content
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(target, 0o755 if rel in executable else 0o644)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def normalise_modes(root: Path) -> None:
    """Folders 0755, files 0644 (0755 if executable): the same on every machine, whatever the umask."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


def publish(stage: Path, ecosystem_dir: Path, version: str) -> Path:
    """fsync the staged build and rename it into place; refuses to touch an existing version."""
    normalise_modes(stage)
    _fsync_tree(stage)
    final = ecosystem_dir / version
    with open(ecosystem_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            raise BuildFailed(f"{final} already exists; archived versions are never overwritten")
        os.rename(stage, final)
        fd = os.open(ecosystem_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return final
