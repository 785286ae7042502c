"""The repo's spec (spec/), copied for a test, whole or cut down.

Most build tests need a real spec but not the whole roster: the tests that build again and again (a
killed build, a repair round, a review, every wire format) build the seed's core MADs, which use no
capability pack, so their cost does not grow with the roster. One build of the whole spec
(test_regenerate's `built`) and `nox -s regenerate` cover the rest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from generator.spec.requirements import parse_requirements

REPO = Path(__file__).resolve().parents[1]
CORE_MADS = ("rogers", "fiedler", "turing", "grace")


def repo_spec(folder: Path, mads: tuple[str, ...] | None = None, *, builtin_only: bool = False) -> Path:
    """A copy of spec/ at `folder`: only the MADs in `mads` (all when None), talking only to each other, and
    without the requirements only the dropped MADs named (nothing could prove them); with `builtin_only`,
    without the tools only a model can write (the offline senior then writes all of it), and without the
    requirements of a MAD left with no tool."""
    shutil.copytree(REPO / "spec", folder)
    dropped: set[str] = set()
    kept: set[str] = set()
    for path in sorted((folder / "mads").glob("*.yaml")):
        mad = yaml.safe_load(path.read_text())
        if mads is not None and mad["name"] not in mads:
            dropped.update(mad.get("requirements", []))
            path.unlink()
            continue
        if builtin_only and mad.get("tools"):
            mad["tools"] = [t for t in mad["tools"] if t.get("builtin")]
            if not mad["tools"]:  # every tool was a model's (Hopper's run_task): nothing left proves its requirements
                dropped.update(mad.pop("requirements", []))
        kept.update(mad.get("requirements", []))
        mad["talks_to"] = [m for m in mad.get("talks_to", []) if mads is None or m in mads]
        path.write_text(yaml.safe_dump(mad, sort_keys=False))
    if unproven := dropped - kept:
        _drop_requirements(folder / "requirements.md", unproven)
    return folder


def _drop_requirements(path: Path, ids: set[str]) -> None:
    """requirements.md without the items of these ids (an item runs to the next item or heading)."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    items = parse_requirements(text).requirements
    bounds = sorted({r.line for r in items} | {n for n, line in enumerate(lines, 1) if line.startswith("#")})
    cut: set[int] = set()
    for item in items:
        if item.id in ids:
            cut.update(range(item.line, min([n for n in bounds if n > item.line] + [len(lines) + 1])))
    path.write_text("".join(line for n, line in enumerate(lines, 1) if n not in cut))


def builtin_only_spec(folder: Path, mads: tuple[str, ...] | None = None) -> Path:
    """`repo_spec` without the tools only a model can write."""
    return repo_spec(folder, mads, builtin_only=True)
