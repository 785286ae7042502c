"""The repo's archived builds, as tests use them: the newest version and its parent (names change as we rebuild)."""

import json
from pathlib import Path

from generator.artifact.store import versions

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "ecosystems" / "madgroup"
NEWEST = versions(ARCHIVE)[-1]
PARENT = json.loads((ARCHIVE / NEWEST / "manifest.json").read_text())["parent"]
