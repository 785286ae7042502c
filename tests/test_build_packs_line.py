"""The build summary's `packs` row: what the artifact carries, and what its parent had that it has lost.

An upgrade of regen can drop a pack the spec never named: builds before the console pack carried Grace's web
console in the core, so a spec rebuilt now without `console: {}` loses its web UI. The summary says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from generator.artifact.manifest import Manifest
from generator.build.summary import packs_line
from generator.kernel_contract import packs_in

ARCHIVE = Path(__file__).resolve().parents[1] / "ecosystems" / "madgroup"


def _manifest(version: str) -> Manifest:
    return Manifest.model_validate_json((ARCHIVE / version / "manifest.json").read_text(encoding="utf-8"))


def _with(manifest: Manifest, keep) -> Manifest:
    """A copy whose src/ files are only those `keep(path inside src/)` accepts."""
    outputs = {p: h for p, h in manifest.outputs.items() if not p.startswith("src/") or keep(p.removeprefix("src/"))}
    return manifest.model_copy(update={"outputs": outputs})


def test_packs_are_read_from_the_files_and_a_core_console_counts_as_one():
    assert packs_in(_manifest("1.3.10").src_outputs) >= {"console", "files", "redis", "tracing", "emads"}
    assert (ARCHIVE / "1.3.7" / "src" / "madgroup" / "kernel" / "grace.py").is_file()  # before the console pack
    assert "console" in packs_in(_manifest("1.3.7").src_outputs)
    assert packs_in(_manifest("1.0.0").src_outputs) == {"console"}  # 4 MADs, no pack, Grace in the core
    # Only the kernel's own folder counts: a MAD module or a generated file named like one does not.
    assert packs_in(["eco/mads/packs/files/x.py", "eco/packs/web/pack.py", "eco/grace.py", "eco/kernel/packs/__init__.py"]) == set()


def test_a_build_that_loses_a_pack_its_parent_had_says_which_and_how_to_keep_it():
    parent = _manifest("1.3.7")
    bare = _with(_manifest("1.3.10"), lambda p: "/kernel/packs/console/" not in p and "/kernel/packs/redis/" not in p)
    line = packs_line(bare, parent)
    assert line.startswith("charts, data, documents, emads, files, security, tracing, web")
    assert "dropped since 1.3.7: console, redis" in line and "`console: {}`" in line


@pytest.mark.parametrize("parent", [None, "1.3.10"])
def test_nothing_is_said_to_be_dropped_when_nothing_was(parent):
    line = packs_line(_manifest("1.3.10"), _manifest(parent) if parent else None)
    assert "dropped" not in line and "console" in line
