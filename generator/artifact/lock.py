"""The build lock: per synthesis unit, the hashes of what it was made from and of what it made.

Like a `dvc.lock`, it lets the next build redo only what changed. A unit is synthesised
again when its inputs differ from the parent's lock, or when a unit it depends on is
(a MAD's dependants, on the `talks_to` graph, and the frame, which wires every MAD);
every other unit is taken from the parent version, at 0 tokens.

A unit's inputs are what its answer was written from: its prompt (which carries the spec it
sees, the principles and the kernel's API), the repair prompts, the checks, the kernel API
(not the kernel's implementation: a stylesheet edit in Grace regenerates nothing), the
model and its parameters, and, for the offline senior, its templates.
"""

from __future__ import annotations

from ..config import Pipeline
from ..hashing import json_hash, sha256_text
from ..kernel_contract import api_hash
from ..senior.models import ModelRequest
from ..spec.model import Spec
from ..spec.plan import Plan, Unit, dependency_graph
from .manifest import UnitLock

PROMPTS = "generator/senior/prompts/"
CHECKS = "generator/senior/check.py"
OFFLINE = "generator/senior/offline/"


def subtree_hash(compiler: dict[str, str], prefix: str) -> str:
    """One hash for the files of the compiler under `prefix` (its sources are hashed once per build)."""
    return json_hash({k: v for k, v in compiler.items() if k.startswith(prefix)})


def unit_inputs(spec: Spec, plan: Plan, pipeline: Pipeline, unit: Unit, request: ModelRequest,
                compiler: dict[str, str]) -> dict[str, str]:
    """What the unit's answer depends on, hashed; `compiler` is every compiler file's sha256 (`generator/...`)."""
    by_path = {f.path: f.sha256 for f in spec.files}
    shared = ("ecosystem.yaml", "requirements.md", "principles.md")
    mads = [unit.mad] if unit.mad else [m.name for m in spec.mads]
    inputs = {f"spec/{p}": by_path[p] for p in shared if p in by_path}
    inputs |= {f"spec/mads/{m}.yaml": by_path[f"mads/{m}.yaml"] for m in mads if f"mads/{m}.yaml" in by_path}
    inputs |= {
        "request": request.hash,
        "prompts": subtree_hash(compiler, PROMPTS),
        "checks": compiler[CHECKS],
        "kernel_api": api_hash(spec.packs),
        "model": json_hash(pipeline.senior.model_dump(mode="json", exclude={"timeout_seconds", "max_retries",
                                                                            "backoff_seconds"})),
        "repair_rounds": str(pipeline.repair_rounds),
    }
    if pipeline.senior.is_offline:  # its answers follow its templates, which no request carries
        inputs["offline"] = subtree_hash(compiler, OFFLINE)
    return dict(sorted(inputs.items()))


def to_regenerate(spec: Spec, plan: Plan, inputs: dict[str, dict[str, str]], parent: dict[str, UnitLock] | None) -> dict[str, str]:
    """Unit -> why it must be synthesised again; units not named are reused from the parent."""
    if parent is None:
        return {u.name: "no parent build to reuse" for u in plan.units}
    why: dict[str, str] = {}
    for unit in plan.units:
        before = parent.get(unit.name)
        if before is None:
            why[unit.name] = "new unit"
        elif changed := sorted(k for k in inputs[unit.name].keys() | before.inputs.keys()
                               if inputs[unit.name].get(k) != before.inputs.get(k)):
            why[unit.name] = "inputs changed: " + ", ".join(changed)
    import networkx as nx  # only when there is a parent to compare with: it takes a while to import

    graph = dependency_graph(spec.mads)
    for unit in plan.units:
        if unit.name in why:
            continue
        if unit.mad:
            changed_deps = sorted(d for d in nx.descendants(graph, unit.mad) if f"mad:{d}" in why)
            if changed_deps:
                why[unit.name] = "depends on " + ", ".join(f"mad:{d}" for d in changed_deps)
        elif changed_mads := sorted(u for u in why if u.startswith("mad:")):
            why[unit.name] = "wires every MAD; changed: " + ", ".join(changed_mads)
    return dict(sorted(why.items()))


def unit_locks(files_by_unit: dict[str, dict[str, str]], inputs: dict[str, dict[str, str]], why: dict[str, str],
               reused: dict[str, str]) -> dict[str, UnitLock]:
    """The manifest's `lock`: per unit, inputs, outputs (sha256 of each file) and why it was (re)made."""
    return {
        unit: UnitLock(
            inputs=inputs[unit],
            outputs={p: sha256_text(c) for p, c in sorted(files.items())},
            reused_from=reused.get(unit),
            regenerated_because=why.get(unit),
        )
        for unit, files in sorted(files_by_unit.items())
    }
