"""The two error families (see STYLE.md): the user's mistake, and the run's failure.

Only the CLI turns them into a message and an exit code: `UserError` exits 2,
`BuildFailed` exits 1. Neither is shown as a traceback unless `--debug` is given.
"""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """Something the user can fix: a bad spec, a bad option, a missing file. Exit code 2."""


@dataclass(frozen=True)
class SpecProblem:
    """One problem in a spec file, located by file and line (1-based; 0 when unknown)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


class SpecError(UserError):
    """A spec that does not load or validate; carries every problem found, in file order."""

    def __init__(self, problems: list[SpecProblem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))


class BuildFailed(Exception):
    """The run itself failed (checks, sandbox tests, a model error). Exit code 1."""


class ReviewUndecided(Exception):
    """The review panel could not decide (abstentions below quorum): nothing ships. Exit code 2."""
