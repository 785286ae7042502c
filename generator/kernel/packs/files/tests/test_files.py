"""The files pack as a rogue MAD would try it: every way out of the root is refused, audited, and leaves
everything outside the root (and, for a refusal, inside it too) exactly as it was.

The pack is built directly on a PackContext under tmp_path: <tmp>/state/files is the root, <tmp>/outside
holds what must never be read or changed, <tmp>/state/x is where `../x` would land.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pack_helpers import CALLER, SECRET, Recorder, outside, owner, refused, run, running, snapshot

from generator.kernel.errors import AccessDenied, InvalidArgument, KernelError, NotFound
from generator.kernel.packs import IMPL_ATTR, PackContext, load
from generator.kernel.packs.files import pack as files_module
from generator.kernel.packs.files.pack import TMP_PREFIX, FilesPack


@dataclass
class Env(Recorder):
    tmp: Path
    root: Path
    outside: Path

    def pack(self, **settings: Any) -> FilesPack:
        return FilesPack(self.context(self.root, settings))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp=tmp_path, root=tmp_path / "state" / "files", outside=outside(tmp_path, {"dir/secret.txt": SECRET}))


def room(pack: FilesPack, free: int) -> None:
    """The quota has exactly `free` bytes left: one byte more is refused, exactly `free` is accepted."""
    with pytest.raises(AccessDenied, match="quota_bytes"):
        run(pack.write(CALLER, "probe", "x" * (free + 1)))
    if free:
        run(pack.write(CALLER, "probe", "x" * free))
        run(pack.delete(CALLER, "probe"))


# ---- the ordinary path ---------------------------------------------------------------------------------


def test_capabilities_are_marked_and_loadable():
    marked = {getattr(v, IMPL_ATTR) for v in vars(FilesPack).values() if hasattr(v, IMPL_ATTR)}
    assert marked == {f"files.{op}" for op in ("write", "read", "list", "stat", "move", "delete")}
    assert load("files") is FilesPack


def test_root_is_created_private_and_must_not_be_a_link(env: Env, tmp_path: Path):
    env.pack()
    assert stat.S_IMODE(env.root.stat().st_mode) == 0o700
    linked = tmp_path / "linked-root"
    linked.symlink_to(env.outside, target_is_directory=True)
    with pytest.raises(KernelError, match="not a directory"):
        FilesPack(PackContext(ecosystem="eco", folder=linked))


@pytest.mark.parametrize("key,value", [("quota_bytes", 0), ("max_file_bytes", "big"), ("max_read_bytes", True)])
def test_bad_settings_are_refused(env: Env, key: str, value: Any):
    with pytest.raises(KernelError, match=f"files.{key}"):
        env.pack(**{key: value})


def test_write_read_stat_round_trip(env: Env):
    pack = env.pack()
    text = "héllo, wörld\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert run(pack.write(CALLER, "a/b/c.txt", text)) == {"path": "a/b/c.txt", "size": len(text.encode()), "sha256": digest}
    assert (env.root / "a" / "b" / "c.txt").read_bytes() == text.encode()
    assert stat.S_IMODE((env.root / "a" / "b" / "c.txt").stat().st_mode) == 0o600
    got = run(pack.read(CALLER, "a/b/c.txt"))
    assert got == {"path": "a/b/c.txt", "size": len(text.encode()), "sha256": digest, "content": text}
    st = run(pack.stat(CALLER, "a/b/c.txt"))
    assert (st["kind"], st["size"], st["sha256"]) == ("file", len(text.encode()), digest)
    assert run(pack.stat(CALLER, "a"))["kind"] == "dir" and "sha256" not in run(pack.stat(CALLER, "a"))
    for root in ("", "."):
        assert run(pack.stat(CALLER, root))["kind"] == "dir"
    # overwriting is allowed and replaces the content
    run(pack.write(CALLER, "a/b/c.txt", "second"))
    assert run(pack.read(CALLER, "a/b/c.txt"))["content"] == "second"


def test_base64_round_trip_of_binary_bytes(env: Env):
    pack = env.pack()
    blob = bytes(range(256)) * 3
    done = run(pack.write(CALLER, "bin/blob", base64.b64encode(blob).decode(), encoding="base64"))
    assert done["sha256"] == hashlib.sha256(blob).hexdigest() and done["size"] == len(blob)
    assert (env.root / "bin" / "blob").read_bytes() == blob
    got = run(pack.read(CALLER, "bin/blob", encoding="base64"))
    assert base64.b64decode(got["content"]) == blob and got["sha256"] == done["sha256"]
    with pytest.raises(InvalidArgument, match="base64"):
        run(pack.read(CALLER, "bin/blob"))  # not UTF-8: the message says how to read it
    with pytest.raises(InvalidArgument, match="not valid base64"):
        run(pack.write(CALLER, "bin/bad", "not base64!", encoding="base64"))
    with pytest.raises(InvalidArgument, match="encoding must be"):
        run(pack.write(CALLER, "bin/bad", "x", encoding="latin-1"))
    with pytest.raises(InvalidArgument, match="encoding must be"):
        run(pack.read(CALLER, "bin/blob", encoding="hex"))
    assert not (env.root / "bin" / "bad").exists()


def test_plain_bad_input_is_not_an_access_refusal(env: Env):
    pack = env.pack()
    run(pack.write(CALLER, "f.txt", "x"))
    (env.root / "d").mkdir()
    with pytest.raises(NotFound):
        run(pack.read(CALLER, "missing.txt"))
    with pytest.raises(NotFound):
        run(pack.stat(CALLER, "no/such/dir"))
    with pytest.raises(InvalidArgument, match="is a directory"):
        run(pack.read(CALLER, "d"))
    with pytest.raises(InvalidArgument, match="is a directory"):
        run(pack.write(CALLER, "d", "x"))
    with pytest.raises(InvalidArgument, match="is a file, not a directory"):
        run(pack.write(CALLER, "f.txt/x", "x"))
    with pytest.raises(InvalidArgument, match="reserved"):
        run(pack.write(CALLER, TMP_PREFIX + "mine", "x"))
    assert env.denials == []


# ---- escapes by spelling ---------------------------------------------------------------------------------


BAD_PATHS = ["../x", "a/../../x", "a\x00b", "a\\b", "a//b", "a/", "./a", "a/./b", ".."]


@pytest.mark.parametrize("bad", BAD_PATHS + ["ABSOLUTE"])
def test_escaping_paths_are_refused_and_touch_nothing(env: Env, bad: str):
    pack = env.pack()
    run(pack.write(CALLER, "a/inside.txt", "in"))
    if bad == "ABSOLUTE":
        bad = str(env.outside / "secret.txt")
    before = snapshot(env.tmp)
    shown = bad if bad.isprintable() else repr(bad)
    refused(env, "files.write", shown, pack.write(CALLER, bad, "pwned"))
    refused(env, "files.read", shown, pack.read(CALLER, bad))
    refused(env, "files.stat", shown, pack.stat(CALLER, bad))
    refused(env, "files.list", shown, pack.list(CALLER, bad))
    refused(env, "files.delete", shown, pack.delete(CALLER, bad))
    refused(env, "files.move", shown, pack.move(CALLER, bad, "a/landed.txt"))
    refused(env, "files.move", shown, pack.move(CALLER, "a/inside.txt", bad))
    assert snapshot(env.tmp) == before
    assert not (env.tmp / "state" / "x").exists() and not (env.root / "a" / "landed.txt").exists()


def test_etc_passwd_is_not_read(env: Env):
    pack = env.pack()
    refused(env, "files.read", "/etc/passwd", pack.read(CALLER, "/etc/passwd"))
    refused(env, "files.stat", "/etc/passwd", pack.stat(CALLER, "/etc/passwd"))
    why = env.denials[-1][3]
    assert "absolute" in why and "relative" in why  # says what is wrong and how to write it


def test_the_root_itself_is_never_deleted_written_or_moved(env: Env):
    pack = env.pack()
    run(pack.write(CALLER, "keep.txt", "k"))
    for root in ("", "."):
        refused(env, "files.delete", root, pack.delete(CALLER, root))
        refused(env, "files.write", root, pack.write(CALLER, root, "x"))
        refused(env, "files.move", root, pack.move(CALLER, root, "elsewhere"))
    assert env.root.is_dir() and (env.root / "keep.txt").read_text() == "k"


# ---- escapes through links -------------------------------------------------------------------------------


def test_symlink_to_an_outside_file(env: Env):
    pack = env.pack()
    (env.root / "link").symlink_to(env.outside / "secret.txt")
    before = snapshot(env.tmp)
    refused(env, "files.read", "link", pack.read(CALLER, "link"))
    refused(env, "files.read", "link", pack.read(CALLER, "link", encoding="base64"))
    refused(env, "files.write", "link", pack.write(CALLER, "link", "pwned"))
    refused(env, "files.stat", "link", pack.stat(CALLER, "link"))
    refused(env, "files.delete", "link", pack.delete(CALLER, "link"))
    refused(env, "files.move", "link", pack.move(CALLER, "link", "moved"))
    assert snapshot(env.tmp) == before
    assert "symbolic link" in env.denials[0][3]
    # listed, as a link, with nothing about its target
    assert run(pack.list(CALLER)) == [{"path": "link", "kind": "link", "size": 0,
                                       "modified_at": files_module._iso((env.root / "link").lstat())}]


def test_symlinked_directory_in_the_middle_of_a_path(env: Env):
    pack = env.pack()
    run(pack.write(CALLER, "x.txt", "x"))
    (env.root / "d").symlink_to(env.outside / "dir", target_is_directory=True)
    (env.root / "real").mkdir()
    (env.root / "real" / "deeper").symlink_to(env.outside, target_is_directory=True)
    before = snapshot(env.tmp)
    for path in ("d/secret.txt", "real/deeper/secret.txt", "real/deeper/dir/secret.txt"):
        refused(env, "files.read", path, pack.read(CALLER, path))
        refused(env, "files.write", path, pack.write(CALLER, path, "pwned"))
        refused(env, "files.stat", path, pack.stat(CALLER, path))
        refused(env, "files.delete", path, pack.delete(CALLER, path))
        refused(env, "files.move", path, pack.move(CALLER, path, "stolen.txt"))
    refused(env, "files.write", "d/new.txt", pack.write(CALLER, "d/new.txt", "pwned"))
    refused(env, "files.write", "d/sub/new.txt", pack.write(CALLER, "d/sub/new.txt", "pwned"))
    refused(env, "files.list", "d", pack.list(CALLER, "d"))
    refused(env, "files.move", "d/planted.txt", pack.move(CALLER, "x.txt", "d/planted.txt"))
    assert snapshot(env.tmp) == before


def test_symlink_swapped_in_for_a_directory_between_calls(env: Env):
    pack = env.pack()
    run(pack.write(CALLER, "d/f.txt", "mine"))
    assert run(pack.read(CALLER, "d/f.txt"))["content"] == "mine"
    (env.root / "d" / "f.txt").unlink()
    (env.root / "d").rmdir()
    (env.root / "d").symlink_to(env.outside / "dir", target_is_directory=True)
    before = snapshot(env.tmp)
    refused(env, "files.read", "d/secret.txt", pack.read(CALLER, "d/secret.txt"))
    refused(env, "files.write", "d/f.txt", pack.write(CALLER, "d/f.txt", "pwned"))
    refused(env, "files.list", "d", pack.list(CALLER, "d"))
    assert snapshot(env.tmp) == before


def test_file_swapped_for_a_symlink_after_the_check_is_not_followed(env: Env, monkeypatch: pytest.MonkeyPatch):
    """The lstat check passes, then the file becomes a link before the open: O_NOFOLLOW catches it."""
    pack = env.pack()
    run(pack.write(CALLER, "f.txt", "mine"))
    real_lstat = FilesPack._lstat

    def swapping(fd: int, name: str) -> os.stat_result | None:
        st = real_lstat(fd, name)
        if name == "f.txt":
            os.unlink(name, dir_fd=fd)
            os.symlink(env.outside / "secret.txt", name, dir_fd=fd)
        return st

    monkeypatch.setattr(FilesPack, "_lstat", staticmethod(swapping))
    why = refused(env, "files.read", "f.txt", pack.read(CALLER, "f.txt"))
    assert "symbolic link" in why  # refused at the open, not after opening the outside file
    assert (env.root / "f.txt").is_symlink()
    monkeypatch.setattr(FilesPack, "_lstat", staticmethod(real_lstat))
    (env.root / "f.txt").unlink()
    run(pack.write(CALLER, "f.txt", "mine"))
    monkeypatch.setattr(FilesPack, "_lstat", staticmethod(swapping))
    before = snapshot(env.outside)
    run(pack.write(CALLER, "f.txt", "replaced"))  # the rename replaces the link, it never writes through it
    assert snapshot(env.outside) == before
    assert not (env.root / "f.txt").is_symlink() and (env.root / "f.txt").read_text() == "replaced"


def test_hard_link_to_an_outside_file(env: Env):
    pack = env.pack()
    os.link(env.outside / "secret.txt", env.root / "hl")
    before = snapshot(env.tmp)
    for call, op in ((pack.read(CALLER, "hl"), "files.read"), (pack.write(CALLER, "hl", "pwned"), "files.write"),
                     (pack.stat(CALLER, "hl"), "files.stat"), (pack.move(CALLER, "hl", "moved"), "files.move")):
        why = refused(env, op, "hl", call)
        assert "hard links" in why
    assert snapshot(env.tmp) == before
    # deleting the name removes only the name: the outside file keeps its content
    assert run(pack.delete(CALLER, "hl")) == {"path": "hl", "deleted": True}
    assert (env.outside / "secret.txt").read_bytes() == SECRET and not (env.root / "hl").exists()


def test_fifo_is_neither_opened_nor_touched(env: Env):
    pack = env.pack()
    os.mkfifo(env.root / "p")
    before = snapshot(env.tmp)
    refused(env, "files.read", "p", pack.read(CALLER, "p"))  # would block forever if it were opened
    refused(env, "files.stat", "p", pack.stat(CALLER, "p"))
    refused(env, "files.write", "p", pack.write(CALLER, "p", "x"))
    refused(env, "files.delete", "p", pack.delete(CALLER, "p"))
    refused(env, "files.move", "p", pack.move(CALLER, "p", "q"))
    refused(env, "files.write", "p/x", pack.write(CALLER, "p/x", "x"))
    assert "FIFO" in env.denials[0][3]
    assert snapshot(env.tmp) == before
    assert run(pack.list(CALLER))[0]["kind"] == "other"


def test_move_out_of_the_root_and_onto_a_symlink(env: Env):
    pack = env.pack()
    run(pack.write(CALLER, "a.txt", "aaa"))
    run(pack.write(CALLER, "b.txt", "bbb"))
    (env.root / "l").symlink_to(env.outside / "secret.txt")
    (env.root / "ld").symlink_to(env.outside, target_is_directory=True)
    before = snapshot(env.tmp)
    refused(env, "files.move", "../a.txt", pack.move(CALLER, "a.txt", "../a.txt"))
    outside_target = str(env.outside / "a.txt")
    refused(env, "files.move", outside_target, pack.move(CALLER, "a.txt", outside_target))
    refused(env, "files.move", "l", pack.move(CALLER, "a.txt", "l"))
    refused(env, "files.move", "ld/a.txt", pack.move(CALLER, "a.txt", "ld/a.txt"))
    with pytest.raises(InvalidArgument, match="already exists"):
        run(pack.move(CALLER, "a.txt", "b.txt"))
    assert snapshot(env.tmp) == before
    moved = run(pack.move(CALLER, "a.txt", "new/dir/c.txt"))
    assert moved["path"] == "new/dir/c.txt" and moved["sha256"] == hashlib.sha256(b"aaa").hexdigest()
    assert not (env.root / "a.txt").exists() and (env.root / "new" / "dir" / "c.txt").read_text() == "aaa"
    with pytest.raises(InvalidArgument, match="inside it"):
        run(pack.move(CALLER, "new", "new/dir/inner"))
    assert run(pack.move(CALLER, "new", "renamed"))["kind"] == "dir"
    assert (env.root / "renamed" / "dir" / "c.txt").read_text() == "aaa"
    with pytest.raises(NotFound):
        run(pack.move(CALLER, "a.txt", "z.txt"))


def test_delete(env: Env):
    pack = env.pack()
    run(pack.write(CALLER, "d/f.txt", "x"))
    with pytest.raises(InvalidArgument, match="not empty"):
        run(pack.delete(CALLER, "d"))
    assert run(pack.delete(CALLER, "d/f.txt")) == {"path": "d/f.txt", "deleted": True}
    assert run(pack.delete(CALLER, "d")) == {"path": "d", "deleted": True}
    assert not (env.root / "d").exists()
    with pytest.raises(NotFound):
        run(pack.delete(CALLER, "d"))


# ---- limits ------------------------------------------------------------------------------------------------


def test_max_file_bytes_is_refused_before_anything_is_written(env: Env):
    pack = env.pack(max_file_bytes=10)
    before = snapshot(env.tmp)
    why = refused(env, "files.write", "big/x.txt", pack.write(CALLER, "big/x.txt", "y" * 11))
    assert "max_file_bytes" in why and "10" in why and "y" * 11 not in why
    assert snapshot(env.tmp) == before and not (env.root / "big").exists()
    run(pack.write(CALLER, "big/x.txt", "y" * 10))
    assert (env.root / "big" / "x.txt").read_text() == "y" * 10


def test_max_read_bytes(env: Env):
    env.root.mkdir(parents=True)
    (env.root / "six").write_bytes(b"123456")
    pack = env.pack(max_read_bytes=5)
    why = refused(env, "files.read", "six", pack.read(CALLER, "six"))
    assert "max_read_bytes" in why and "123456" not in why
    assert run(pack.stat(CALLER, "six"))["size"] == 6  # stat hashes in chunks, no limit
    (env.root / "five").write_bytes(b"12345")
    assert run(pack.read(CALLER, "five"))["content"] == "12345"


def test_quota_is_counted_at_start_and_kept_across_overwrite_delete_and_move(env: Env):
    (env.root / "old" / "deep").mkdir(parents=True)
    (env.root / "old" / "deep" / "thirty").write_bytes(b"3" * 30)
    big = env.outside / "big"
    big.write_bytes(b"b" * 500)
    (env.root / "link-to-big").symlink_to(big)  # a link's target is not ours: not counted
    (env.root / (TMP_PREFIX + "crash")).write_bytes(b"t" * 50)  # a crash's leftover: removed, not counted
    pack = env.pack(quota_bytes=100)
    assert not (env.root / (TMP_PREFIX + "crash")).exists()
    room(pack, 70)
    run(pack.write(CALLER, "seventy", "7" * 70))
    room(pack, 0)
    before = snapshot(env.tmp)
    why = refused(env, "files.write", "one", pack.write(CALLER, "one", "1"))
    assert "quota_bytes" in why and "100" in why
    refused(env, "files.write", "seventy", pack.write(CALLER, "seventy", "7" * 71))  # overwrite that grows
    assert snapshot(env.tmp) == before
    run(pack.write(CALLER, "seventy", "7" * 10))  # overwrite that shrinks frees the difference
    room(pack, 60)
    run(pack.move(CALLER, "seventy", "moved/ten"))  # a move changes nothing
    room(pack, 60)
    run(pack.delete(CALLER, "old/deep/thirty"))
    room(pack, 90)
    run(pack.delete(CALLER, "moved/ten"))
    room(pack, 100)


def test_a_failed_write_leaves_no_temp_file_and_the_old_content(env: Env, monkeypatch: pytest.MonkeyPatch):
    pack = env.pack(quota_bytes=100)
    run(pack.write(CALLER, "t.txt", "old"))

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files_module.os, "fsync", broken)
    with pytest.raises(KernelError, match="files.write failed: Input/output error"):
        run(pack.write(CALLER, "t.txt", "new content"))
    monkeypatch.undo()
    assert os.listdir(env.root) == ["t.txt"]
    assert (env.root / "t.txt").read_text() == "old"
    room(pack, 97)  # the failed write counted nothing


# ---- list ----------------------------------------------------------------------------------------------------


def test_list_is_sorted_limited_not_recursive_with_utc_times(env: Env):
    pack = env.pack()
    for path in ("b.txt", "a.txt", "c/d.txt", "A.txt"):
        run(pack.write(CALLER, path, path))
    when = 981173106  # 2001-02-03T04:05:06Z
    os.utime(env.root / "a.txt", ns=(when * 10**9 + 123456789, when * 10**9 + 123456789))
    listed = run(pack.list(CALLER))
    assert [(e["path"], e["kind"]) for e in listed] == [("A.txt", "file"), ("a.txt", "file"), ("b.txt", "file"),
                                                        ("c", "dir")]
    assert listed[1]["size"] == 5 and listed[1]["modified_at"] == "2001-02-03T04:05:06.123456Z"
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e["modified_at"]) for e in listed)
    assert run(pack.list(CALLER, ".")) == listed
    assert [e["path"] for e in run(pack.list(CALLER, "", limit=2))] == ["A.txt", "a.txt"]
    assert run(pack.list(CALLER, "c")) == [{"path": "c/d.txt", "kind": "file", "size": 7,
                                            "modified_at": files_module._iso((env.root / "c" / "d.txt").stat())}]
    for bad in (0, -1, True, "10"):
        with pytest.raises(InvalidArgument, match="limit"):
            run(pack.list(CALLER, "", limit=bad))
    with pytest.raises(InvalidArgument, match="is a file"):
        run(pack.list(CALLER, "a.txt"))
    with pytest.raises(NotFound):
        run(pack.list(CALLER, "nope"))


# ---- what the operator is told ---------------------------------------------------------------------------------


def test_audit_and_denied_records(env: Env):
    pack = env.pack()
    body = "confidential body"
    digest = hashlib.sha256(body.encode()).hexdigest()
    run(pack.write(CALLER, "r.txt", body))
    run(pack.read(CALLER, "r.txt"))
    run(pack.stat(CALLER, "r.txt"))
    run(pack.list(CALLER))
    run(pack.move(CALLER, "r.txt", "s.txt"))
    run(pack.delete(CALLER, "s.txt"))
    assert [a[:4] for a in env.audits] == [(CALLER, "files.write", "r.txt", True), (CALLER, "files.move", "r.txt", True),
                                           (CALLER, "files.delete", "s.txt", True)]
    assert env.audits[0][4] == f"{len(body)} bytes, sha256 {digest}"
    assert "s.txt" in env.audits[1][4] and digest in env.audits[1][4]
    assert all(body not in a[4] for a in env.audits)
    assert env.denials == []
    with pytest.raises(AccessDenied) as caught:
        run(pack.read("other-mad", "../r.txt"))
    assert env.denials == [("other-mad", "files.read", "../r.txt", env.denials[0][3])]
    assert caught.value is env.raised[0] and str(caught.value) == env.denials[0][3]
    assert len(env.audits) == 3  # a refusal is audited by `denied`, not as a success


# ---- the pack in a runtime: loaded for the MAD that owns the family, settings from the config ----


def test_a_mad_owning_files_uses_the_pack_through_the_runtime_and_others_are_refused(tmp_path, eco_modules):
    kernel = eco_modules[1]
    Horace = owner(kernel, "horace", "keeps the files", "files")

    async def main():
        async with running(eco_modules, tmp_path / "state", Horace,
                           pack_settings={"files": {"quota_bytes": 64, "max_file_bytes": 32}}) as runtime:
            assert set(runtime.packs) == {"files"}
            horace = runtime.mad("horace")
            written = await horace.use("files.write", path="notes/today.txt", content="hello")
            assert written == {"path": "notes/today.txt", "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
            assert (await horace.use("files.read", path="notes/today.txt"))["content"] == "hello"
            with pytest.raises(kernel.AccessDenied, match="max_file_bytes"):  # the config's setting, not the default
                await horace.use("files.write", path="big.txt", content="x" * 33)
            with pytest.raises(kernel.AccessDenied):
                await horace.use("files.read", path="../ecosystem.db")
            with pytest.raises(kernel.AccessDenied, match="may not use files.read"):
                await runtime.mad("rogers").use("files.read", path="notes/today.txt")
            return runtime.db.query("SELECT actor, action, ok FROM audit_log WHERE action LIKE 'files.%' OR subject LIKE 'files.%'"
                                    " ORDER BY id")

    rows = asyncio.run(main())
    assert (tmp_path / "state" / "files" / "notes" / "today.txt").read_text() == "hello"  # the root: <state>/files
    assert {"actor": "horace", "action": "files.write", "ok": 1} in rows
    assert [r for r in rows if r["ok"] == 0 and r["actor"] == "horace"] == [
        {"actor": "horace", "action": "files.write", "ok": 0}, {"actor": "horace", "action": "files.read", "ok": 0}]
    assert {"actor": "rogers", "action": "kernel.use", "ok": 0} in rows
