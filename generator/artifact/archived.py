"""An archived version as a later build draws on it: to reuse a unit, or to carry a tool from it.

Nothing is taken from an archived build on trust: its manifest must match its signature, and its
transcript the hash the manifest recorded; a unit's answer must match the unit's lock. A build that
fails one of these is not drawn on, and the build that wanted it says why.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ..errors import AnswerRejected, UserError
from ..hashing import sha256_file, sha256_text
from ..senior.answer import parse_answer
from ..senior.carry import SourceUnit
from ..senior.models import ModelReply
from ..senior.transcript import TRANSCRIPT, TranscriptLine, accepted_answer, by_unit, read_transcript
from .manifest import Manifest
from .sign import verify_signature
from .store import versions


def transcript_problem(folder: Path, manifest: Manifest) -> str | None:
    """Why `folder`'s transcript cannot vouch for its build (it does not match the hash its manifest recorded)."""
    recorded = manifest.outputs.get(TRANSCRIPT)
    path = folder / TRANSCRIPT
    if recorded is None or not path.is_file() or sha256_file(path) != recorded:
        return f"{TRANSCRIPT}: does not match the hash the manifest recorded"
    return None


class ArchivedBuild:
    """One archived version, read lazily; `problem` says why it cannot be drawn on (None when it can)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.version = folder.name

    @cached_property
    def manifest(self) -> Manifest | None:
        try:
            return Manifest.read(self.folder)
        except UserError:
            return None

    @cached_property
    def problem(self) -> str | None:
        if self.manifest is None:
            return f"{self.folder}: its manifest.json cannot be read"
        signature = verify_signature(self.folder)
        # A version built before signing may be unsigned; a self-contained one (schema 2) never is.
        if not signature.ok and (signature.signed or self.manifest.schema_version >= 2):
            return f"{self.folder}: {signature.problem}"
        problem = transcript_problem(self.folder, self.manifest)
        return f"{self.folder}: {problem}" if problem else None

    @cached_property
    def lines(self) -> dict[str, list[TranscriptLine]]:
        """The transcript, by unit; empty when the build cannot be drawn on."""
        if self.problem is not None:
            return {}
        try:
            return by_unit(read_transcript(self.folder / TRANSCRIPT))
        except UserError:
            return {}

    def answer(self, unit: str) -> dict[str, str] | None:
        """The files of the unit's accepted answer, when the transcript has it and it matches the unit's lock."""
        text = accepted_answer(self.lines.get(unit, []))
        lock = self.manifest.lock.get(unit) if self.manifest else None
        if text is None or lock is None:
            return None
        try:
            answer = parse_answer(unit, ModelReply(content=text))
        except AnswerRejected:
            return None
        files = {f.path: f.content for f in answer.files}
        if {p: sha256_text(c) for p, c in files.items()} != lock.outputs:
            return None
        return dict(sorted(files.items()))

    def source(self, unit: str) -> SourceUnit | None:
        """The unit as this build recorded it, for carrying its tools; None when it has no answer of it."""
        files = self.answer(unit)
        if files is None:
            return None
        lines = self.lines[unit]
        manifest = self.manifest
        return SourceUnit(
            build=manifest.name, messages=lines[0].messages, files=files, answered_by=lines[-1].answered_by,
            written_by={tool: c.written_by for tool, c in manifest.carried.items() if c.unit == unit},
            lock_inputs=manifest.lock[unit].inputs,
        )


class Archive:
    """The archived versions of one ecosystem, newest first, each read at most once."""

    def __init__(self, ecosystem_dir: Path):
        self.builds = [ArchivedBuild(ecosystem_dir / v) for v in reversed(versions(ecosystem_dir))]

    def sources(self, unit: str):
        """The unit as each archived build recorded it, newest first (builds without it are passed over)."""
        for build in self.builds:
            source = build.source(unit)
            if source is not None:
                yield source

    def problems(self) -> list[str]:
        """Why builds that were looked at could not be drawn on."""
        return [b.problem for b in self.builds if "problem" in b.__dict__ and b.problem]
