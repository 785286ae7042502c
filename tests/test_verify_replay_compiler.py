"""`nox -s verify` replays a version with the compiler of the commit that archived it when the compiler changed
since; a change to regen's own tests of the kernel packs (no build reads them) is no such change."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class Session:
    def __init__(self):
        self.said: list[str] = []

    def log(self, message: str) -> None:
        self.said.append(message)


def _git(*args: str) -> None:
    subprocess.run(["git", *args], check=True, capture_output=True)


@pytest.fixture
def archive(tmp_path, monkeypatch):
    """A repo with a compiler, a pack's tests and one archived manifest, committed; the cwd is the repo."""
    monkeypatch.chdir(tmp_path)
    for rel in ("generator/kernel/packs/files/pack.py", "generator/kernel/packs/files/tests/test_files.py",
                "generator/kernel/packs/conftest.py", "ecosystems/eco/1.0.0/manifest.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("# 1\n")
    _git("init", "-q")
    _git("add", ".")
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "archive 1.0.0")
    return tmp_path / "ecosystems/eco/1.0.0/manifest.json"


def _checkout(noxfile, manifest: Path) -> tuple[Path | None, list[str]]:
    session = Session()
    with contextlib.ExitStack() as stack:
        return noxfile._compiler_checkout(session, manifest, stack), session.said


@pytest.mark.parametrize("edited", ["generator/kernel/packs/files/tests/test_files.py",
                                    "generator/kernel/packs/conftest.py",
                                    "generator/kernel/packs/files/tests/test_new.py"])
def test_a_change_to_the_packs_tests_replays_with_this_tree(noxfile, archive, edited):
    Path(edited).write_text("# 2\n")
    assert _checkout(noxfile, archive) == (None, [])


def test_a_change_to_a_pack_replays_with_the_archiving_commit(noxfile, archive):
    Path("generator/kernel/packs/files/pack.py").write_text("# 2\n")
    folder, said = _checkout(noxfile, archive)
    assert folder is not None and "replaying with it" in said[0]
