"""The files pack: Horace's NAS gateway, one folder of files per ecosystem reached only by relative paths.

The folder (`PackContext.folder`, mode 0700) is the whole world of these capabilities. A caller names a
file by a relative POSIX path; the pack never turns that path into an absolute string and hands it to
the OS, because a path string is resolved again on every call and a symlink swapped in between a check
and a use would redirect it. Instead:

- A path is refused outright when it could mean anything but "this place under the root": `..` or `.`
  components, a leading `/`, NUL bytes, backslashes, empty components (`a//b`, `a/`).
- It is walked one component at a time from a descriptor of the root, each directory opened with
  `O_DIRECTORY | O_NOFOLLOW` relative to the previous one (openat), so no symlink anywhere on the path is
  ever followed, including one swapped in while we walk. A directory on another filesystem (a mount
  point) is refused too.
- The last component is acted on relative to its parent's descriptor: `open(O_NOFOLLOW)`, `stat(...,
  follow_symlinks=False)`, `mkdir`/`unlink`/`rmdir`/`rename` with `dir_fd`. A file is opened only after
  an lstat says it is a regular file (a FIFO would block, a device could act on open), with O_NONBLOCK
  and O_NOCTTY in case it was swapped meanwhile, and the opened inode is checked again with fstat.
- A regular file with more than one hard link is refused for read, write, stat and move: the other
  name may be outside the root, and a hard link cannot be told apart from the original. Deleting such
  a name is allowed (it removes only the name under the root, never the other file's content).
- Symlinks, FIFOs, sockets and devices found under the root are listed (kind "link" or "other", size
  0, nothing about a link's target) so the operator can see them, but every other capability refuses
  them, delete included.

Writes are atomic: a temp file `.files-tmp-<random>` is created next to the target (O_EXCL |
O_NOFOLLOW), written, fsynced, renamed over the target and the directory fsynced. A rename replaces the
directory entry, so overwriting never writes through whatever the old name pointed at. Names starting
with that prefix are reserved; leftovers of a crash are removed at start-up and never listed.

Limits come from the pack's settings: `quota_bytes` (the total size of all regular files under the
root), `max_file_bytes` (one write) and `max_read_bytes` (one read). A write that would pass a limit is
refused before anything is created. The usage is counted once at start (a walk that follows no link)
and kept up to date by write, delete and move under a lock; a file changed by someone else behind the
pack's back makes it drift until the next start.

Refusals of a guard (escapes, links, odd file types, limits) go through `context.denied`, which audits
them; bad input (a missing file, bad base64, a directory where a file is needed) is NotFound or
InvalidArgument. Messages name the path and the rule, never file contents.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...errors import InvalidArgument, KernelError, NotFound
from .. import Pack, PackContext, implements

DEFAULTS: dict[str, int] = {
    "quota_bytes": 1 << 30,  # 1 GiB
    "max_file_bytes": 64 << 20,  # 64 MiB
    "max_read_bytes": 16 << 20,  # 16 MiB
}
ENCODINGS = ("utf-8", "base64")
MAX_PATH = 4096
MAX_NAME = 255  # bytes, as the filesystem counts them
MAX_LIST = 100_000
TMP_PREFIX = ".files-tmp-"  # reserved: the pack's own temp files
_CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Refusal(Exception):
    """A guard said no; turned into `context.denied(...)` at the capability's edge (which audits it)."""

    def __init__(self, path: Any, why: str):
        super().__init__(why)
        self.path = path
        self.why = why


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def _iso(st: os.stat_result) -> str:
    """Modification time as ISO-8601 UTC with microseconds and Z (the kernel's `now_iso` format)."""
    seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos // 1000:06d}Z"


def _shown(path: Any) -> str:
    """The path as given, for the audit log: verbatim when printable and short, else its repr, cut."""
    if isinstance(path, str) and path.isprintable() and len(path) <= 512:
        return path
    text = repr(path)
    return text if len(text) <= 512 else text[:509] + "..."


def _join(parts: tuple[str, ...]) -> str:
    return "/".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FilesPack(Pack):
    """The `files.*` capabilities over one root folder per ecosystem."""

    name = "files"

    def __init__(self, context: PackContext):
        super().__init__(context)
        self._limits = {key: self._setting(key) for key in DEFAULTS}
        folder = Path(context.folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._root_fd = os.open(folder, _DIR_FLAGS)  # the root itself must not be a link either
        except OSError as exc:
            raise KernelError(f"the files pack's folder {str(folder)!r} is not a directory ({exc.strerror}); "
                              "remove what is there and restart") from None
        os.fchmod(self._root_fd, 0o700)
        self._root_dev = os.fstat(self._root_fd).st_dev
        self._lock = threading.Lock()  # write, move and delete: the usage must match what is on disk
        self._used = self._scan()

    def _setting(self, key: str) -> int:
        value = self.context.settings.get(key, DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise KernelError(f"pack setting files.{key} must be a positive whole number of bytes, not {value!r} "
                              f"(default {DEFAULTS[key]})")
        return value

    async def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # ---- paths -------------------------------------------------------------------------------------

    def _parts(self, given: Any, *, root_ok: bool) -> tuple[str, ...]:
        """The components of a caller's path, or a refusal when it could name anything outside the root."""
        if not isinstance(given, str):
            raise InvalidArgument(f"a path must be a string, not {type(given).__name__}")
        if given in ("", "."):
            if root_ok:
                return ()
            raise _Refusal(given, f"path {given!r} is the files root itself, which this operation never acts on; "
                                  "name a file or directory inside it, e.g. 'reports/q1.txt'")
        if len(given) > MAX_PATH:
            raise InvalidArgument(f"a path is at most {MAX_PATH} characters; this one has {len(given)}")
        if "\x00" in given:
            raise _Refusal(given, f"path {given!r} contains a NUL byte; remove it")
        if "\\" in given:
            raise _Refusal(given, f"path {given!r} contains a backslash; paths are POSIX, separate components with '/'")
        if given.startswith("/"):
            raise _Refusal(given, f"path {given!r} is absolute; paths are relative to the files root, "
                                  "e.g. 'reports/q1.txt'")
        parts = tuple(given.split("/"))
        for part in parts:
            if part == "":
                raise _Refusal(given, f"path {given!r} has an empty component ('//' or a trailing '/'); "
                                      "write it as 'a/b'")
            if part in (".", ".."):
                raise _Refusal(given, f"path {given!r} has a {part!r} component; paths name a place inside the "
                                      "files root directly, e.g. 'a/b' rather than 'a/./b' or 'a/../b'")
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
                raise InvalidArgument(f"path {given!r} contains a control character; use printable names")
            try:
                size = len(part.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidArgument(f"path {given!r} is not valid Unicode text (a lone surrogate)") from None
            if size > MAX_NAME:
                raise InvalidArgument(f"a path component is at most {MAX_NAME} bytes; {part[:40]!r}... has {size}")
            if part.startswith(TMP_PREFIX):
                raise InvalidArgument(f"names starting with {TMP_PREFIX!r} are reserved for the pack's temp files; "
                                      "choose another name")
        return parts

    def _step(self, given: str, where: tuple[str, ...], fd: int, name: str, create: bool) -> int:
        """Open directory `name` under `fd` without following a link (mkdir it first when `create`)."""
        try:
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise NotFound(f"directory {_join(where)!r} does not exist (in path {given!r})") from None
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
                os.fsync(fd)
            except FileExistsError:
                pass  # made meanwhile: opening it below checks what it is
            return self._step(given, where, fd, name, create=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            kind = self._kind_at(fd, name)
            if kind == "file":
                raise InvalidArgument(f"{_join(where)!r} is a file, not a directory (in path {given!r})") from None
            if kind is None:
                raise NotFound(f"directory {_join(where)!r} does not exist (in path {given!r})") from None
            raise self._odd(given, _join(where), kind) from None
        if os.fstat(nfd).st_dev != self._root_dev:
            os.close(nfd)
            raise _Refusal(given, f"{_join(where)!r} is a mount point of another filesystem; the files pack stays "
                                  "on the root's filesystem (unmount it or move the data into the root)")
        return nfd

    def _open_dir(self, given: str, parts: tuple[str, ...], *, create: bool = False) -> int:
        """A descriptor of the directory at `parts` (() is the root), walked component by component."""
        fd = os.dup(self._root_fd)
        try:
            for i, name in enumerate(parts):
                nfd = self._step(given, parts[: i + 1], fd, name, create)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_dir_if_any(self, given: str, parts: tuple[str, ...]) -> int | None:
        """Like `_open_dir`, but None when a directory on the way is missing (a write will create it)."""
        try:
            return self._open_dir(given, parts)
        except NotFound:
            return None

    @staticmethod
    def _kind_at(fd: int, name: str) -> str | None:
        st = FilesPack._lstat(fd, name)
        return None if st is None else _kind(st.st_mode)

    @staticmethod
    def _lstat(fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def _odd(given: str, where: str, kind: str) -> _Refusal:
        if kind == "link":
            return _Refusal(given, f"{where!r} is a symbolic link; the files pack never follows links (one could "
                                   "point outside its root): use the real path")
        return _Refusal(given, f"{where!r} is not a regular file or directory (a FIFO, socket or device); "
                               "the files pack only handles files and directories")

    def _check_file(self, given: str, where: str, st: os.stat_result) -> None:
        """Refuse what read/write/stat/move may not touch as a file: links, odd types, hard-linked files."""
        kind = _kind(st.st_mode)
        if kind == "dir":
            raise InvalidArgument(f"{where!r} is a directory, not a file")
        if kind != "file":
            raise self._odd(given, where, kind)
        if st.st_nlink > 1:
            raise _Refusal(given, f"{where!r} has {st.st_nlink} hard links; another name of the same file may be "
                                  "outside the root, so it is neither read nor changed (copy it to a fresh file)")

    def _open_file(self, given: str, parent: int, name: str, where: str) -> tuple[int, os.stat_result]:
        """Open a regular file for reading: lstat first (never open a FIFO or device), then recheck the inode."""
        st = self._lstat(parent, name)
        if st is None:
            raise NotFound(f"{where!r} does not exist")
        self._check_file(given, where, st)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise NotFound(f"{where!r} does not exist") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._odd(given, where, "link") from None
            raise
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise _Refusal(given, f"{where!r} was replaced while being opened; retry")
            self._check_file(given, where, now)
        except BaseException:
            os.close(fd)
            raise
        return fd, now

    @staticmethod
    def _hash(fd: int) -> str:
        digest = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
        return digest.hexdigest()

    def _describe(self, given: str, parts: tuple[str, ...], parent: int) -> dict[str, Any]:
        """What `files.stat` answers for `parts` (a file's sha256 included), its parent already open."""
        where = _join(parts)
        st = self._lstat(parent, parts[-1])
        if st is None:
            raise NotFound(f"{where!r} does not exist")
        kind = _kind(st.st_mode)
        if kind == "dir":
            return {"path": where, "kind": "dir", "size": 0, "modified_at": _iso(st)}
        fd, st = self._open_file(given, parent, parts[-1], where)
        try:
            digest = self._hash(fd)
        finally:
            os.close(fd)
        return {"path": where, "kind": "file", "size": st.st_size, "modified_at": _iso(st), "sha256": digest}

    # ---- usage -------------------------------------------------------------------------------------

    def _scan(self) -> int:
        """Bytes of all regular files under the root, following no link and crossing no mount; removes
        temp files a crash left behind."""
        total = 0
        pending: list[tuple[str, ...]] = [()]
        while pending:
            parts = pending.pop()
            try:
                fd = self._open_dir("", parts)
            except (KernelError, _Refusal, OSError):
                continue  # vanished, or not ours to count
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            pending.append(parts + (entry.name,))
                        elif stat.S_ISREG(st.st_mode):
                            if entry.name.startswith(TMP_PREFIX):
                                os.unlink(entry.name, dir_fd=fd)
                            else:
                                total += st.st_size
            finally:
                os.close(fd)
        return total

    # ---- content -----------------------------------------------------------------------------------

    @staticmethod
    def _check_encoding(encoding: Any) -> None:
        if encoding not in ENCODINGS:
            raise InvalidArgument(f"encoding must be 'utf-8' (text) or 'base64' (binary), not {encoding!r}")

    @classmethod
    def _to_bytes(cls, content: Any, encoding: Any) -> bytes:
        cls._check_encoding(encoding)
        if not isinstance(content, str):
            raise InvalidArgument(f"content must be a string (text, or base64 for binary), not {type(content).__name__}")
        if encoding == "base64":
            try:
                return base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument("content is not valid base64 (standard alphabet, padded); encode the bytes "
                                      "with base64 or send text with encoding='utf-8'") from None
        try:
            return content.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument("content has characters UTF-8 cannot encode (lone surrogates); send binary data "
                                  "base64-encoded with encoding='base64'") from None

    # ---- edges -------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self, caller: str, op: str) -> Iterator[None]:
        """Turn a guard's refusal into the audited AccessDenied, and an OS error into a plain KernelError."""
        try:
            yield
        except _Refusal as refusal:
            raise self.context.denied(caller, op, _shown(refusal.path), refusal.why) from None
        except KernelError:
            raise
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise KernelError(f"{op} failed: {reason}") from None

    # ---- capabilities ------------------------------------------------------------------------------

    @implements("files.write")
    async def write(self, caller: str, path: str, content: str, encoding: str = "utf-8") -> dict:
        """Create or replace a file atomically, creating missing parent directories."""
        op = "files.write"
        with self._guard(caller, op):
            parts = self._parts(path, root_ok=False)
            data = self._to_bytes(content, encoding)
            where, name = _join(parts), parts[-1]
            limit = self._limits["max_file_bytes"]
            if len(data) > limit:
                raise _Refusal(path, f"{len(data)} bytes for {where!r} is more than one file may hold ({limit} bytes, "
                                     "setting files.max_file_bytes); write less or raise the setting")
            with self._lock:
                parent = self._open_dir_if_any(path, parts[:-1])
                try:
                    old = 0
                    st = None if parent is None else self._lstat(parent, name)
                    if st is not None:
                        self._check_file(path, where, st)
                        old = st.st_size
                    used = self._used - old + len(data)
                    quota = self._limits["quota_bytes"]
                    if len(data) > old and used > quota:
                        raise _Refusal(path, f"writing {len(data)} bytes to {where!r} would bring the files root to "
                                             f"{used} bytes, over its quota of {quota} (setting files.quota_bytes); "
                                             "delete files or raise the setting")
                    if parent is None:
                        parent = self._open_dir(path, parts[:-1], create=True)
                    self._replace(parent, name, where, data)
                finally:
                    if parent is not None:
                        os.close(parent)
                self._used = used
            digest = hashlib.sha256(data).hexdigest()
            self.context.audit(caller, op, where, True, f"{len(data)} bytes, sha256 {digest}")
            return {"path": where, "size": len(data), "sha256": digest}

    def _replace(self, parent: int, name: str, where: str, data: bytes) -> None:
        """Temp file beside the target, written and fsynced, renamed over it, the directory fsynced."""
        tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=parent)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except IsADirectoryError:
                raise InvalidArgument(f"{where!r} is a directory, not a file") from None
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=parent)
            except FileNotFoundError:
                pass
            raise
        os.fsync(parent)

    @implements("files.read")
    async def read(self, caller: str, path: str, encoding: str = "utf-8") -> dict:
        """A file's content, as text ('utf-8') or base64 ('base64')."""
        op = "files.read"
        with self._guard(caller, op):
            parts = self._parts(path, root_ok=False)
            self._check_encoding(encoding)
            where = _join(parts)
            limit = self._limits["max_read_bytes"]
            parent = self._open_dir(path, parts[:-1])
            try:
                fd, st = self._open_file(path, parent, parts[-1], where)
            finally:
                os.close(parent)
            try:
                data = b""
                if st.st_size <= limit:  # read one byte past the limit: the file may grow meanwhile
                    chunks, got = [], 0
                    while got <= limit and (chunk := os.read(fd, min(_CHUNK, limit + 1 - got))):
                        chunks.append(chunk)
                        got += len(chunk)
                    data = b"".join(chunks)
            finally:
                os.close(fd)
            size = max(st.st_size, len(data))
            if size > limit:
                raise _Refusal(path, f"{where!r} holds {size} bytes, more than one read returns ({limit} bytes, "
                                     "setting files.max_read_bytes); raise the setting to read it")
            if encoding == "base64":
                text = base64.b64encode(data).decode("ascii")
            else:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidArgument(f"{where!r} is not valid UTF-8 text; read it with encoding='base64'") from None
            return {"path": where, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "content": text}

    @implements("files.list")
    async def list(self, caller: str, path: str = "", limit: int = 1000) -> list[dict]:
        """One directory's entries, sorted by path, not recursive. Links and special files are listed with
        kind "link" or "other" (size 0, nothing about a link's target) and cannot be opened."""
        op = "files.list"
        with self._guard(caller, op):
            parts = self._parts(path, root_ok=True)
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
                raise InvalidArgument(f"limit must be a whole number from 1 to {MAX_LIST}, not {limit!r}")
            fd = self._open_dir(path, parts)
            found = []
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.name.startswith(TMP_PREFIX):
                            continue  # a write under way (or a crash's leftover, removed at start)
                        try:
                            entry.name.encode("utf-8")
                            st = entry.stat(follow_symlinks=False)
                        except (UnicodeEncodeError, FileNotFoundError):
                            continue  # a name no caller could spell back, or gone meanwhile
                        kind = _kind(st.st_mode)
                        found.append({"path": _join(parts + (entry.name,)), "kind": kind,
                                      "size": st.st_size if kind == "file" else 0, "modified_at": _iso(st)})
            finally:
                os.close(fd)
            found.sort(key=lambda item: item["path"])
            return found[:limit]

    @implements("files.stat")
    async def stat(self, caller: str, path: str) -> dict:
        """Kind, size and modification time of a file or directory; a file's sha256 too."""
        op = "files.stat"
        with self._guard(caller, op):
            parts = self._parts(path, root_ok=True)
            if not parts:
                return {"path": "", "kind": "dir", "size": 0, "modified_at": _iso(os.fstat(self._root_fd))}
            parent = self._open_dir(path, parts[:-1])
            try:
                return self._describe(path, parts, parent)
            finally:
                os.close(parent)

    @implements("files.move")
    async def move(self, caller: str, source: str, destination: str) -> dict:
        """Rename a file or directory inside the root, creating the destination's missing parents; never
        overwrites. Answers the destination's stat."""
        op = "files.move"
        with self._guard(caller, op):
            src = self._parts(source, root_ok=False)
            dst = self._parts(destination, root_ok=False)
            src_where, dst_where = _join(src), _join(dst)
            if dst[: len(src)] == src:
                raise InvalidArgument(f"cannot move {src_where!r} to {dst_where!r}, which is itself or inside it")
            with self._lock:
                sp = self._open_dir(source, src[:-1])
                dp: int | None = None
                try:
                    st = self._lstat(sp, src[-1])
                    if st is None:
                        raise NotFound(f"{src_where!r} does not exist")
                    if _kind(st.st_mode) != "dir":
                        self._check_file(source, src_where, st)
                    dp = self._open_dir_if_any(destination, dst[:-1])
                    there = None if dp is None else self._lstat(dp, dst[-1])
                    if there is not None:
                        if _kind(there.st_mode) in ("link", "other"):
                            raise self._odd(destination, dst_where, _kind(there.st_mode))
                        raise InvalidArgument(f"{dst_where!r} already exists; files.move never overwrites: delete it "
                                              "first or choose another name")
                    if dp is None:
                        dp = self._open_dir(destination, dst[:-1], create=True)
                    # The residual race: a name created at the destination by someone else between the check
                    # above and this rename is replaced (stdlib has no RENAME_NOREPLACE); it stays in the root.
                    os.rename(src[-1], dst[-1], src_dir_fd=sp, dst_dir_fd=dp)
                    os.fsync(dp)
                    os.fsync(sp)
                    result = self._describe(destination, dst, dp)
                finally:
                    os.close(sp)
                    if dp is not None:
                        os.close(dp)
            detail = (f"to {dst_where}: {result['size']} bytes, sha256 {result['sha256']}" if result["kind"] == "file"
                      else f"to {dst_where}: directory")
            self.context.audit(caller, op, src_where, True, detail)
            return result

    @implements("files.delete")
    async def delete(self, caller: str, path: str) -> dict:
        """Delete a file, or a directory when it is empty; never the root."""
        op = "files.delete"
        with self._guard(caller, op):
            parts = self._parts(path, root_ok=False)
            where, name = _join(parts), parts[-1]
            with self._lock:
                parent = self._open_dir(path, parts[:-1])
                try:
                    st = self._lstat(parent, name)
                    if st is None:
                        raise NotFound(f"{where!r} does not exist")
                    kind = _kind(st.st_mode)
                    if kind == "dir":
                        try:
                            os.rmdir(name, dir_fd=parent)
                        except OSError as exc:
                            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                                raise
                            raise InvalidArgument(f"directory {where!r} is not empty; delete what it holds first") from None
                        detail = "empty directory"
                    elif kind == "file":
                        os.unlink(name, dir_fd=parent)  # a hard-linked name: only this name goes
                        self._used = max(0, self._used - st.st_size)
                        detail = f"file of {st.st_size} bytes"
                    else:
                        raise self._odd(path, where, kind)
                    os.fsync(parent)
                finally:
                    os.close(parent)
            self.context.audit(caller, op, where, True, detail)
            return {"path": where, "deleted": True}
