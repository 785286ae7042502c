"""The ecosystem the kernel benchmarks run: the newest archived madgroup, with this tree's kernel copied in."""

from __future__ import annotations

import shutil
from pathlib import Path

from generator.artifact.store import versions

REPO = Path(__file__).resolve().parents[1]
ECOSYSTEM = REPO / "ecosystems" / "madgroup"
PACKAGE = "madgroup"


def build(work: Path) -> Path:
    """The newest archived sources with today's kernel, under `work`; returns the src dir."""
    newest = versions(ECOSYSTEM)[-1]
    src = shutil.copytree(ECOSYSTEM / newest / "src", work / "src")
    shutil.rmtree(src / PACKAGE / "kernel")
    shutil.copytree(REPO / "generator" / "kernel", src / PACKAGE / "kernel", ignore=shutil.ignore_patterns("__pycache__"))
    return src
