"""What a build is given, and what it gives back.

`BuildContext` holds the user's options and the seams of every outside effect (the senior,
the reviewers, the sandbox, the signing key, the screen): tests pass fakes here instead of
patching internals. `BuildResult` is what `regenerate` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..artifact.manifest import Manifest
from ..config import RunOptions, SandboxSettings
from ..frozen import Frozen
from ..progress import Reporter


def _run_tests(src: Path, settings: SandboxSettings, work: Path, level: str | None, warn: Callable[[str], None],
               reuse: bool = False):
    from ..sandbox.run import run_tests  # looked up at each call: a test may stand in a recorded run for it

    return run_tests(src, settings, work, level=level, warn=warn, reuse=reuse)


@dataclass(frozen=True)
class BuildContext:
    """One run of the compiler: the options, and a seam for each outside effect."""

    options: RunOptions
    report: Reporter = field(default_factory=Reporter)
    senior: object | None = None
    """Stands in for the senior model (a `ModelClient`); None: the pipeline's own."""
    reviewers: Mapping[str, object] | None = None
    """Stand in for LLM reviewers, by reviewer name."""
    sandbox: Callable = _run_tests
    """Runs the ecosystem's own tests: (src, settings, work, level, warn, reuse) -> SandboxResult; with `reuse`, a
    tree that already passed exactly so is not run again."""
    sandbox_level: str | None = None
    """Forces the isolation level (tests); None: the strongest available."""
    signing_key: object | None = None
    """Signs the artifact (a `SigningKey`); None: the configured key, else a development key."""


class BuildResult(Frozen):
    ecosystem: str
    version: str
    path: Path
    up_to_date: bool
    manifest: Manifest
