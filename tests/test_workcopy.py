"""Working copies: export an archived build, edit it, update it to a new version without losing the edits."""

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from archive import ARCHIVE, NEWEST, PARENT

from generator.artifact.workcopy import LOCK_NAME, describe, export, merge, parse_ref, resolve, update
from generator.errors import UserError
from generator.hashing import canonical_json, tree_hashes

REPO = Path(__file__).resolve().parents[1]
TURING = "madgroup/mads/turing.py"
FIRST_LINE = b'"""Turing: Secrets keeper.'  # the module docstring's first line starts so
TOOL_DOC = b"'Names and versions of stored secrets, never their values.'"


def make_version(ecosystems: Path, parent: str, version: str, changes: dict[str, bytes | None]) -> Path:
    """An archived build `version` of madgroup: `parent`'s src/ with `changes` (None deletes), and a
    manifest whose outputs match it."""
    folder = ecosystems / "madgroup" / version
    shutil.copytree(ecosystems / "madgroup" / parent / "src", folder / "src")
    for rel, data in changes.items():
        path = folder / "src" / rel
        if data is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    manifest = json.loads((ecosystems / "madgroup" / parent / "manifest.json").read_text())
    outputs = {f"src/{rel}": digest for rel, digest in tree_hashes(folder / "src").items()}
    manifest |= {"version": version, "parent": parent, "outputs": outputs,
                 "root_hash": hashlib.sha256(canonical_json(outputs).encode()).hexdigest()}
    (folder / "manifest.json").write_text(canonical_json(manifest))
    return folder


@pytest.fixture
def ecosystems(tmp_path):
    """A copy of the archived madgroup 1.0.2, and a 1.1.0 that changes Turing's docstring (not its
    tools), the README, removes the systemd unit and adds a file."""
    root = tmp_path / "ecosystems"
    (root / "madgroup").mkdir(parents=True)
    shutil.copytree(ARCHIVE / NEWEST / "src", root / "madgroup" / "1.0.2" / "src")
    manifest = json.loads((ARCHIVE / NEWEST / "manifest.json").read_text())  # the newest build, as version 1.0.2
    (root / "madgroup" / "1.0.2" / "manifest.json").write_text(json.dumps(manifest | {"version": "1.0.2"}))
    turing = (root / "madgroup" / "1.0.2" / "src" / TURING).read_bytes()
    assert turing.startswith(FIRST_LINE) and TOOL_DOC in turing
    make_version(root, "1.0.2", "1.1.0", {
        TURING: turing.replace(FIRST_LINE, b'"""Turing (1.1): Secrets keeper.'),
        "README.md": b"# madgroup 1.1\n",
        "deploy/madgroup.service": None,
        "docs/NOTES.md": b"new in 1.1\n",
    })
    return root


@pytest.fixture
def copy(ecosystems, tmp_path):
    target = tmp_path / "work"
    export(ecosystems / "madgroup" / "1.0.2", target)
    return target


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- references --------------------------------------------------------------------------------


def test_parse_and_resolve_references(ecosystems):
    assert parse_ref("madgroup@1.0.2") == ("madgroup", "1.0.2")
    assert parse_ref("madgroup") == ("madgroup", "latest")
    assert resolve(ecosystems, "madgroup@latest") == ecosystems / "madgroup" / "1.1.0"
    assert resolve(ecosystems, "madgroup@1.0.2") == ecosystems / "madgroup" / "1.0.2"
    with pytest.raises(UserError, match="NAME@VERSION"):
        parse_ref("madgroup@1.0")
    with pytest.raises(UserError, match="archived: 1.0.2, 1.1.0"):
        resolve(ecosystems, "madgroup@9.9.9")
    with pytest.raises(UserError, match="known: madgroup"):
        resolve(ecosystems, "nosuch@1.0.0")


# --- export ------------------------------------------------------------------------------------


def test_export_writes_the_files_and_the_lock(ecosystems, tmp_path):
    target = tmp_path / "out"
    target.mkdir()  # an empty folder is fine
    result = export(ecosystems / "madgroup" / "1.0.2", target)
    archived = tree_hashes(ecosystems / "madgroup" / "1.0.2" / "src")
    assert {k: v for k, v in tree_hashes(target).items() if k != LOCK_NAME} == archived
    lock = json.loads((target / LOCK_NAME).read_text())
    manifest = json.loads((ecosystems / "madgroup" / "1.0.2" / "manifest.json").read_text())
    assert (lock["ecosystem"], lock["version"], lock["root_hash"]) == ("madgroup", "1.0.2", manifest["root_hash"])
    assert lock["files"] == archived and "do not edit" in lock["//"]
    assert (target / LOCK_NAME).read_text() == canonical_json(lock)
    assert (result.files, result.version) == (len(archived), "1.0.2")
    assert os.stat(target / "deploy" / "run.sh").st_mode & stat.S_IXUSR
    assert not os.stat(target / "README.md").st_mode & stat.S_IXUSR
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".regen-export-")] == []


def test_export_of_the_real_archive(tmp_path):
    result = export(ARCHIVE / PARENT, tmp_path / "w")
    assert result.ecosystem == "madgroup" and (tmp_path / "w" / "madgroup" / "mads" / "turing.py").is_file()


def test_export_refuses_a_non_empty_target_and_a_tampered_archive(ecosystems, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        export(ecosystems / "madgroup" / "1.0.2", target)
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
    (ecosystems / "madgroup" / "1.1.0" / "src" / "README.md").write_text("tampered\n")
    with pytest.raises(UserError, match="does not match its manifest"):
        export(ecosystems / "madgroup" / "1.1.0", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


# --- update ------------------------------------------------------------------------------------


def test_an_edit_survives_an_upstream_change_elsewhere_in_the_same_file(ecosystems, copy):
    path = copy / TURING
    path.write_bytes(path.read_bytes().replace(TOOL_DOC, b"'Names and versions, never values (my wording).'"))
    result = update(copy, ecosystems, "1.1.0")
    merged = path.read_bytes()
    assert merged.startswith(b'"""Turing (1.1): Secrets keeper.'), "the upstream change is in"
    assert b"(my wording)" in merged and TOOL_DOC not in merged, "and so is the user's"
    assert result.merged_cleanly == (TURING,) and result.conflicts == () and result.ok
    lock = json.loads((copy / LOCK_NAME).read_text())
    assert lock["version"] == "1.1.0"
    assert lock["files"] == tree_hashes(ecosystems / "madgroup" / "1.1.0" / "src"), "the new base is theirs"
    # The next update still sees the edit as the user's: kept, not overwritten.
    make_version(ecosystems, "1.1.0", "1.2.0", {"README.md": b"# madgroup 1.2\n"})
    again = update(copy, ecosystems, "latest")
    assert TURING in again.kept_user_edits and b"(my wording)" in path.read_bytes()
    assert again.to_version == "1.2.0" and (copy / "README.md").read_bytes() == b"# madgroup 1.2\n"


def test_both_sides_changing_the_same_lines_is_a_conflict_marked_inline(ecosystems, copy):
    path = copy / TURING
    path.write_bytes(path.read_bytes().replace(FIRST_LINE, b'"""Turing, my edition: Secrets keeper.'))
    result = update(copy, ecosystems, "1.1.0")
    assert [(c.path, c.kind) for c in result.conflicts] == [(TURING, "content")] and not result.ok
    text = path.read_text()
    assert ('<<<<<<< yours\n"""Turing, my edition: Secrets keeper.' in text
            and '=======\n"""Turing (1.1): Secrets keeper.' in text and ">>>>>>> regen 1.1.0\n" in text)
    assert "CONFLICT (content) madgroup/mads/turing.py" in describe(result)
    # The rest of the update happened all the same.
    assert (copy / "README.md").read_bytes() == b"# madgroup 1.1\n"
    # The next update refuses while the markers are there, and goes once they are resolved.
    make_version(ecosystems, "1.1.0", "1.2.0", {"README.md": b"# madgroup 1.2\n"})
    before = snapshot(copy)
    with pytest.raises(UserError, match=r"unresolved conflicts.*madgroup/mads/turing\.py"):
        update(copy, ecosystems, "1.2.0")
    with pytest.raises(UserError, match="unresolved conflicts"):
        update(copy, ecosystems, "1.2.0", dry_run=True)
    assert snapshot(copy) == before
    lines = text.splitlines(keepends=True)
    start, mid, end = (next(i for i, line in enumerate(lines) if line.startswith(m)) for m in ("<<<<<<<", "=======", ">>>>>>>"))
    path.write_text("".join(lines[:start] + lines[start + 1:mid] + lines[end + 1:]))  # keep mine
    result = update(copy, ecosystems, "1.2.0")
    assert result.ok and TURING in result.kept_user_edits
    assert path.read_text().startswith('"""Turing, my edition: Secrets keeper.')


def test_untouched_files_follow_upstream_and_user_files_stay(ecosystems, copy):
    (copy / "notes.txt").write_text("my notes\n")
    (copy / "RUNBOOK.md").write_text("my runbook\n")  # edited by the user, unchanged upstream
    (copy / ".git").mkdir()  # the user's own tools: never part of the comparison
    (copy / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    result = update(copy, ecosystems, "1.1.0")
    assert result.updated == ("README.md", TURING)
    assert (copy / "README.md").read_bytes() == b"# madgroup 1.1\n"
    assert result.removed == ("deploy/madgroup.service",) and not (copy / "deploy" / "madgroup.service").exists()
    assert result.added == ("docs/NOTES.md",) and (copy / "docs" / "NOTES.md").read_bytes() == b"new in 1.1\n"
    assert result.kept_user_edits == ("RUNBOOK.md", "notes.txt")
    assert (copy / "notes.txt").read_text() == "my notes\n" and (copy / "RUNBOOK.md").read_text() == "my runbook\n"
    assert (copy / ".git" / "HEAD").is_file()
    assert os.stat(copy / "deploy" / "run.sh").st_mode & stat.S_IXUSR
    assert not list(copy.rglob("*.regen-tmp"))


def test_a_dry_run_writes_nothing(ecosystems, copy):
    path = copy / TURING
    path.write_bytes(path.read_bytes().replace(FIRST_LINE, b'"""Turing, my edition: Secrets keeper.'))
    (copy / "notes.txt").write_text("my notes\n")
    before = snapshot(copy)
    result = update(copy, ecosystems, "1.1.0", dry_run=True)
    assert snapshot(copy) == before
    assert result.dry_run and result.updated == ("README.md",) and [c.path for c in result.conflicts] == [TURING]
    assert "nothing written (dry run)" in describe(result)
    # ...and the same computation, done for real, gives the same answer.
    assert update(copy, ecosystems, "1.1.0").model_copy(update={"dry_run": True}) == result


def test_a_deleted_file_changed_upstream_and_a_binary_conflict_keep_yours_and_set_theirs_aside(ecosystems, copy):
    (copy / TURING).unlink()
    (copy / "README.md").write_bytes(b"\x00binary readme")
    result = update(copy, ecosystems, "1.1.0")
    kinds = {c.path: (c.kind, c.theirs_copy) for c in result.conflicts}
    assert kinds == {TURING: ("deleted-by-you", f"{TURING}.regen-1.1.0"), "README.md": ("binary", "README.md.regen-1.1.0")}
    assert not (copy / TURING).exists()
    assert (copy / f"{TURING}.regen-1.1.0").read_bytes().startswith(b'"""Turing (1.1)')
    assert (copy / "README.md").read_bytes() == b"\x00binary readme"
    assert (copy / "README.md.regen-1.1.0").read_bytes() == b"# madgroup 1.1\n"
    # The set-aside copies block the next update until they are dealt with.
    make_version(ecosystems, "1.1.0", "1.2.0", {"RUNBOOK.md": b"runbook 1.2\n"})
    with pytest.raises(UserError, match=r"set aside.*README\.md\.regen-1\.1\.0"):
        update(copy, ecosystems, "1.2.0")
    (copy / "README.md.regen-1.1.0").unlink()
    (copy / f"{TURING}.regen-1.1.0").unlink()
    result = update(copy, ecosystems, "1.2.0")
    assert result.ok and set(result.kept_user_edits) == {"README.md", TURING}
    assert not (copy / TURING).exists(), "still deleted: the user's choice"


def test_update_refuses_a_changed_base_or_a_foreign_folder(ecosystems, copy, tmp_path):
    with pytest.raises(UserError, match="not a working copy"):
        update(tmp_path, ecosystems, "1.1.0")
    with pytest.raises(UserError, match="no archived version 2.0.0"):
        update(copy, ecosystems, "2.0.0")
    with pytest.raises(UserError, match="working copy of madgroup, not of other"):
        update(copy, ecosystems, "other@1.0.0")
    (ecosystems / "madgroup" / "1.0.2" / "src" / "README.md").write_text("tampered\n")
    with pytest.raises(UserError, match="does not match its manifest"):
        update(copy, ecosystems, "1.1.0")


def test_merge_handles_a_missing_final_newline_and_refuses_binary():
    data, conflicts = merge(b"a\nb", b"a\nmine", b"a\ntheirs", "regen 2.0.0")
    assert conflicts == 1
    assert data == b"a\n<<<<<<< yours\nmine\n=======\ntheirs\n>>>>>>> regen 2.0.0\n"
    assert merge(b"a\n", b"\x00", b"b\n", "x") is None
    assert merge(b"1\n2\n3\n4\n", b"one\n2\n3\n4\n", b"1\n2\n3\nfour\n", "x") == (b"one\n2\n3\nfour\n", 0)


def test_a_file_both_sides_added_is_merged_and_a_blocked_path_changes_nothing(ecosystems, copy):
    (copy / "docs").mkdir()
    (copy / "docs" / "NOTES.md").write_bytes(b"my notes\n")
    result = update(copy, ecosystems, "1.1.0", dry_run=True)
    assert [(c.path, c.kind) for c in result.conflicts] == [("docs/NOTES.md", "content")]
    shutil.rmtree(copy / "docs")
    (copy / "docs").write_text("a file where upstream adds a folder\n")
    before = snapshot(copy)
    with pytest.raises(UserError, match=r"nothing was changed.*docs/NOTES\.md"):
        update(copy, ecosystems, "1.1.0")
    assert snapshot(copy) == before
