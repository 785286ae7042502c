"""Stage 2, plan: the graph of MADs, their start-up order, and the synthesis units.

A unit is one request to the senior model: one per MAD (its module and its tests) plus
the shared frame (package, ecosystem wiring, end-to-end tests, deploy scripts, docs).
Each unit owns a fixed set of output paths; an answer may write nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from ..errors import SpecError, SpecProblem
from ..frozen import Frozen
from .model import MadSpec, Spec

if TYPE_CHECKING:
    import networkx as nx

FRAME = "frame"


class Unit(Frozen):
    name: str
    kind: Literal["frame", "mad"]
    mad: str | None = None
    owns: tuple[str, ...]
    """Output paths (relative to src/) this unit writes; a trailing `/` owns a folder."""

    def may_write(self, path: str) -> bool:
        return any(path == own or (own.endswith("/") and path.startswith(own)) for own in self.owns)


class Plan(Frozen):
    ecosystem: str
    package: str
    startup_order: tuple[str, ...]
    units: tuple[Unit, ...]

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)


def dependency_graph(mads: Iterable[MadSpec]) -> nx.DiGraph:
    """An edge A -> B for every `talks_to: [B]` in A: A needs B running first."""
    import networkx as nx  # slow to import: only when a graph is needed

    graph = nx.DiGraph()
    for mad in mads:
        graph.add_node(mad.name)
        for other in mad.talks_to:
            graph.add_edge(mad.name, other)
    return graph


def make_plan(spec: Spec) -> Plan:
    """The start-up order (dependencies first, ties by name) and one unit per MAD plus the frame."""
    import networkx as nx

    graph = dependency_graph(spec.mads)
    try:
        order = tuple(nx.lexicographical_topological_sort(graph.reverse(copy=True)))
    except nx.NetworkXUnfeasible:
        # The loader reports cycles with file:line; this guards specs built in code.
        cycle = " -> ".join(edge[0] for edge in nx.find_cycle(graph))
        raise SpecError([SpecProblem("spec/mads", 0, f"dependency cycle: {cycle}")])
    package = spec.ecosystem.name
    mad_units = [
        Unit(
            name=f"mad:{name}",
            kind="mad",
            mad=name,
            owns=(f"{package}/mads/{name}.py", f"tests/test_{name}.py"),
        )
        for name in order
    ]
    frame = Unit(
        name=FRAME,
        kind="frame",
        owns=(
            "pyproject.toml",
            "README.md",
            "RUNBOOK.md",
            f"{package}/__init__.py",
            f"{package}/__main__.py",
            f"{package}/ecosystem.py",
            f"{package}/mads/__init__.py",
            "tests/conftest.py",
            "tests/test_ecosystem.py",
            "deploy/",
        ),
    )
    return Plan(ecosystem=spec.ecosystem.name, package=package, startup_order=order, units=(*mad_units, frame))
