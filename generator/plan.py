"""Stage 2, plan: the graph of MADs, their start-up order, and the synthesis units."""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx

from .spec import MadSpec


def dependency_graph(mads: Iterable[MadSpec]) -> nx.DiGraph:
    """An edge A -> B for every `talks_to: [B]` in A: A needs B running first."""
    graph = nx.DiGraph()
    for mad in mads:
        graph.add_node(mad.name)
        for other in mad.talks_to:
            graph.add_edge(mad.name, other)
    return graph
