"""Units taken whole from the parent version: its answer, checked against its lock, and the exchanges it came from.

The exchanges travel with the unit into the new transcript (marked `reused_from`), so the new
version replays alone; a unit the parent's transcript does not hold (a parent built before
versions were self-contained) is synthesised again instead, and the summary says why.
"""

from __future__ import annotations

from ..artifact.archived import ArchivedBuild
from ..senior.models import ModelRequest
from ..senior.synthesise import UnitOutcome, reused


def reuse_from_parent(parent: ArchivedBuild, units: list[str], requests: dict[str, ModelRequest]
                      ) -> tuple[dict[str, UnitOutcome], dict[str, str]]:
    """The parent's outcome of each unit in `units`, and (unit -> why) for those that cannot be taken."""
    taken: dict[str, UnitOutcome] = {}
    instead: dict[str, str] = {}
    for unit in units:
        if parent.problem is not None:
            instead[unit] = f"{parent.version} cannot be drawn on ({parent.problem})"
        elif not parent.lines.get(unit):
            instead[unit] = f"{parent.version}'s transcript holds no exchange of it (built before versions were self-contained)"
        elif (files := parent.answer(unit)) is None:
            instead[unit] = f"{parent.version}'s answer of it differs from its lock"
        else:
            exchanges = tuple(line.exchange(parent.version) for line in parent.lines[unit])
            taken[unit] = reused(requests[unit], files, parent.version, exchanges)
    return taken, instead
