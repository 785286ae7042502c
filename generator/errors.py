"""Regen's errors, under one root; only the CLI turns them into a message and an exit code.

    RegenError
     ├── UserError            exit 2: something the user can fix (an option, a file, a key)
     │    └── SpecError       a spec that does not load or validate: every problem, file:line
     ├── BuildFailed          exit 1: the run itself failed, nothing was archived
     │    ├── AnswerRejected        an answer that failed its checks (goes back to the senior)
     │    ├── OverBudget            the next model call could cross a budget of the run
     │    └── RepairFromReviewFailed  a repair the review asked for failed
     ├── ArtifactRefused      exit 1: an artifact that does not verify (tampered, unsigned) is not judged
     └── ReviewUndecided      exit 2: the review panel could not decide; nothing ships

None is shown as a traceback unless `--debug` is given.
"""

from __future__ import annotations

from dataclasses import dataclass


class RegenError(Exception):
    """The root of every error regen reports; `exit_code` is what the CLI exits with."""

    exit_code = 1
    prefix = "regen: "


class UserError(RegenError):
    """Something the user can fix: a bad spec, a bad option, a missing file. Exit code 2."""

    exit_code = 2
    prefix = ""


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


class BuildFailed(RegenError):
    """The run itself failed (checks, sandbox tests, a model error). Exit code 1."""

    prefix = "regen: build failed: "


class AnswerRejected(BuildFailed):
    """An answer that cannot be used as it is: the problems go back to the senior in a repair round."""

    def __init__(self, unit: str, problems: list[str]):
        self.unit = unit
        self.problems = problems
        super().__init__(f"unit {unit}: the answer was rejected:\n  " + "\n  ".join(problems))


class OverBudget(BuildFailed):
    """The next model call could cross a budget (of the run, a unit or the review); it is not made."""


class RepairFromReviewFailed(BuildFailed):
    """A repair the panel asked for failed; `review` is the review that asked for it (a review.models.PanelReport,
    not imported here: the errors sit below every module that raises them)."""

    def __init__(self, message: str, review: object):
        super().__init__(message)
        self.review = review


class ArtifactRefused(RegenError):
    """`regen gate` refuses an artifact whose signature or file hashes do not hold: nothing is judged. Exit code 1."""

    exit_code = 1


class ReviewUndecided(RegenError):
    """The review panel could not decide (abstentions below quorum): nothing ships. Exit code 2."""

    exit_code = 2
    prefix = "regen: undecided: "


class BuildBusy(UserError):
    """Another build of the same ecosystem holds its build lock (a CLI run or an MCP tool call). Exit code 2."""


class BuildCancelled(BaseException):
    """The build was cancelled from outside (an MCP client's cancellation): nothing was archived. Raised at the next
    stage, unit or sandbox poll; a BaseException like KeyboardInterrupt, so no `except Exception` on the way keeps
    the build going."""

    exit_code = 130
