"""The build lock: per synthesis unit, the hashes of what it was made from and of what it made.

Like a `dvc.lock`, it lets the next build redo only what changed. A unit is synthesised
again when its inputs differ from the parent's lock, or when a unit it depends on is
(a MAD's dependants, on the `talks_to` graph, and the frame, which wires every MAD);
every other unit is copied byte for byte from the parent version, at 0 tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import networkx as nx
from pydantic import BaseModel, ConfigDict

from ..config import Pipeline
from ..hashing import sha256_file
from ..senior.models import ModelRequest
from ..senior.synthesise import UnitOutcome
from ..senior.synthesise import reused as reused_outcome
from ..spec.model import Spec
from ..spec.plan import Plan, Unit, dependency_graph

GENERATOR = Path(__file__).parents[1]


class UnitLock(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: dict[str, str]
    outputs: dict[str, str]
    reused_from: str | None = None
    regenerated_because: str | None = None


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + sha256_file(path).encode() + b"\0")
    return digest.hexdigest()


def _json_hash(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def unit_inputs(spec: Spec, plan: Plan, pipeline: Pipeline, unit: Unit, request: ModelRequest) -> dict[str, str]:
    """What the unit's answer depends on, hashed: its prompt (which carries the spec it sees, the
    principles and the kernel's API), the templates of repairs, the checks, the kernel, the model."""
    by_path = {f.path: f.sha256 for f in spec.files}
    shared = ("ecosystem.yaml", "requirements.md", "principles.md")
    mads = [unit.mad] if unit.mad else [m.name for m in spec.mads]
    inputs = {f"spec/{p}": by_path[p] for p in shared if p in by_path}
    inputs |= {f"spec/mads/{m}.yaml": by_path[f"mads/{m}.yaml"] for m in mads if f"mads/{m}.yaml" in by_path}
    inputs |= {
        "request": request.hash,
        "prompts": _tree_hash(GENERATOR / "senior" / "prompts"),
        "checks": sha256_file(GENERATOR / "senior" / "check.py"),
        "kernel": _tree_hash(GENERATOR / "kernel"),
        "model": _json_hash(pipeline.senior.model_dump(mode="json", exclude={"timeout_seconds", "max_retries",
                                                                              "backoff_seconds"})),
        "repair_rounds": str(pipeline.repair_rounds),
    }
    if pipeline.senior.is_offline:  # its answers follow its templates, which no request carries
        inputs["offline"] = _tree_hash(GENERATOR / "senior" / "offline")
    return dict(sorted(inputs.items()))


def to_regenerate(spec: Spec, plan: Plan, inputs: dict[str, dict[str, str]], parent: dict[str, dict] | None) -> dict[str, str]:
    """Unit -> why it must be synthesised again; units not named are reused from the parent."""
    if parent is None:
        return {u.name: "no parent build to reuse" for u in plan.units}
    why: dict[str, str] = {}
    for unit in plan.units:
        before = parent.get(unit.name)
        if before is None:
            why[unit.name] = "new unit"
        elif changed := sorted(k for k in inputs[unit.name].keys() | before["inputs"].keys()
                               if inputs[unit.name].get(k) != before["inputs"].get(k)):
            why[unit.name] = "inputs changed: " + ", ".join(changed)
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


def reuse_from_parent(
    parent_src: Path, version: str, parent_lock: dict[str, dict], units: list[str], requests: dict[str, ModelRequest],
) -> tuple[dict[str, UnitOutcome], dict[str, str]]:
    """The parent's files of each unit to reuse, checked against its lock; a unit whose files are
    missing or changed since is regenerated instead (unit -> why)."""
    reused, instead = {}, {}
    for unit in units:
        outputs = parent_lock[unit]["outputs"]
        files = {}
        for path, digest in outputs.items():
            file = parent_src / path
            if not file.is_file() or sha256_file(file) != digest:
                instead[unit] = f"{version}'s {path} differs from its lock"
                break
            files[path] = file.read_text(encoding="utf-8")
        else:
            reused[unit] = reused_outcome(requests[unit], files, version)
    return reused, instead


def unit_locks(synthesis_units: dict[str, dict[str, str]], inputs: dict[str, dict[str, str]], why: dict[str, str],
               reused: dict[str, str]) -> dict[str, dict]:
    """The manifest's `lock`: per unit, inputs, outputs (sha256 of each file) and why it was (re)made."""
    return {
        unit: UnitLock(
            inputs=inputs[unit],
            outputs={p: hashlib.sha256(c.encode("utf-8")).hexdigest() for p, c in sorted(files.items())},
            reused_from=reused.get(unit),
            regenerated_because=why.get(unit),
        ).model_dump(mode="json")
        for unit, files in sorted(synthesis_units.items())
    }
