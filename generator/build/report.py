"""report.html: one page that says what a version is, made from the artifact's own files.

    report_data(artifact, manifest, parent)  the one way a report's data is read: the artifact's spec
                                           copy (-> the plan's networkx graph), tests.json, review.json,
                                           the manifest (units, lock, carried) and the parent (the changes)
    render(data)                           ReportData -> the page: deterministic, self-contained

Two callers, equal bytes: the archive stage writes report.html into the staged artifact before the
manifest exists (it passes the manifest-to-be, whose outputs and root hash the report never reads),
so the signature covers it; `regen report` and `regen verify` render it again from the archived
folder. The page is one file: inline CSS, inline SVG, no script, no external resource (a strict
CSP says so to the browser), every value autoescaped; nothing in it is a clock's reading.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Literal

import jinja2
from pydantic import Field, ValidationError

from ..artifact.manifest import CarriedTool, Manifest
from ..errors import UserError
from ..frozen import Frozen
from ..render import environment

REPORT = "report.html"

Status = Literal["regenerated", "reused", "carried"]


class ReportNotMade(UserError):
    """A folder `regen report` cannot make a report of: missing, not an artifact, or missing what a report reads."""


class MadNode(Frozen):
    """One MAD of the graph: how this build made its unit, where it stands in the start-up order."""

    name: str
    role: str
    layer: int = Field(description="its generation in the start-up order: 0 needs no other MAD running first")
    status: Status
    why: str
    talks_to: tuple[str, ...]
    conversations: tuple[str, ...]


class UnitRow(Frozen):
    unit: str
    status: Status
    files: tuple[str, ...]
    rounds: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    elapsed_s: float | None
    models: tuple[str, ...]
    why: str


class TestRow(Frozen):
    id: str
    outcome: str
    requirements: tuple[str, ...]
    message: str


class ChangesSummary(Frozen):
    """`artifact.history.changes` against the parent, without the diffs."""

    old: str
    spec: dict[str, str]
    surface: tuple[str, ...]
    dependencies: dict[str, str]
    files: dict[str, str]
    unchanged_files: int


class ReportData(Frozen):
    """Everything report.html shows, read from an artifact folder (and its parent beside it)."""

    ecosystem: str
    version: str
    parent: str | None
    generator: str
    offline: bool
    senior: str
    bump_kind: str
    bump_reason: str
    startup_order: tuple[str, ...]
    mads: tuple[MadNode, ...]
    units: tuple[UnitRow, ...]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    sandbox: dict[str, int | str]
    tests: tuple[TestRow, ...]
    review_outcome: str
    review_reason: str
    review: dict | None = Field(description="review.json as written (a PanelReport); None when it cannot be read")
    carried: dict[str, CarriedTool]
    changes: ChangesSummary | None = Field(description="None for a first version")
    parent_missing: bool = Field(default=False, description="the parent is recorded but not beside the artifact")


# --- the data, read from an artifact ------------------------------------------------------------


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportNotMade(f"{path.parent}: not a whole artifact: it has no {path.name}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportNotMade(f"{path}: cannot be read: {exc}") from None


def _status(unit: str, manifest: Manifest) -> Status:
    lock = manifest.lock.get(unit)
    if lock is not None and lock.reused_from:
        return "reused"
    if any(c.unit == unit for c in manifest.carried.values()):
        return "carried"
    return "regenerated"


def _why(unit: str, status: str, manifest: Manifest) -> str:
    lock = manifest.lock.get(unit)
    if status == "reused":
        return f"reused from {lock.reused_from}"
    reason = (lock.regenerated_because if lock else None) or ("first build" if manifest.parent is None else "made again")
    carried = sorted((tool, c) for tool, c in manifest.carried.items() if c.unit == unit)
    if carried:
        reason += "; carried: " + "; ".join(f"{tool} from {c.source.split('@', 1)[-1]} (written by {c.written_by})"
                                           for tool, c in carried)
    return reason


def report_data(artifact: Path, manifest: Manifest, parent: Path | None) -> ReportData:
    """The report of the artifact in `artifact`, as `manifest` records it (at archive time: the manifest-to-be),
    with the changes since `parent` (the parent's archived folder; None for a first version or when it is not
    at hand, then `parent_missing` says so)."""
    import networkx as nx

    from ..artifact.history import Side, changes
    from ..errors import SpecError
    from ..spec.load import load_spec
    from ..spec.plan import dependency_graph

    try:
        spec = load_spec(artifact / "spec")
    except SpecError as exc:
        raise ReportNotMade(f"{artifact}/spec: this compiler cannot read the artifact's spec: {str(exc).splitlines()[0]}") from None
    graph = dependency_graph(spec.mads)
    layers = {name: i for i, names in enumerate(nx.topological_generations(graph.reverse(copy=True))) for name in names}
    units = {u.unit: u for u in manifest.units}
    mads = []
    for mad in sorted(spec.mads, key=lambda m: (layers[m.name], m.name)):
        status = _status(f"mad:{mad.name}", manifest)
        mads.append(MadNode(name=mad.name, role=mad.role, layer=layers[mad.name], status=status,
                            why=_why(f"mad:{mad.name}", status, manifest), talks_to=tuple(sorted(mad.talks_to)),
                            conversations=tuple(sorted(mad.conversations))))
    rows = []
    for name, u in units.items():
        status = _status(name, manifest)
        why = _why(name, status, manifest)
        rows.append(UnitRow(unit=name, status=status, files=u.files, rounds=u.rounds, prompt_tokens=u.prompt_tokens,
                            completion_tokens=u.completion_tokens, cost_usd=u.cost_usd, elapsed_s=u.elapsed_s,
                            models=u.answered_by, why=why))
    tests = _json(artifact / "tests.json")
    review = None
    if (artifact / "review.json").is_file():
        review = _json(artifact / "review.json")
    found = None
    missing = False
    if manifest.parent is not None:
        if parent is not None and (parent / "manifest.json").is_file():
            c = changes(parent, artifact, Side.of(manifest))
            found = ChangesSummary(old=c.old, spec=c.spec, surface=c.surface, dependencies=c.dependencies,
                                   files={f.path: f.status for f in c.files}, unchanged_files=c.unchanged_files)
        else:
            missing = True
    return ReportData(
        ecosystem=manifest.ecosystem, version=manifest.version, parent=manifest.parent,
        generator=f"{manifest.generator.name} {manifest.generator.version}", offline=manifest.offline,
        senior=manifest.pipeline.senior.model, bump_kind=manifest.bump.kind, bump_reason=manifest.bump.reason,
        startup_order=manifest.startup_order, mads=tuple(mads), units=tuple(rows),
        prompt_tokens=manifest.tokens.prompt, completion_tokens=manifest.tokens.completion, cost_usd=manifest.cost_usd,
        sandbox={"level": manifest.sandbox.level, "passed": manifest.sandbox.passed, "failed": manifest.sandbox.failed,
                 "errors": manifest.sandbox.errors, "skipped": manifest.sandbox.skipped},
        tests=tuple(TestRow(id=t.get("id", ""), outcome=t.get("outcome", ""), requirements=tuple(t.get("requirements", ())),
                            message=t.get("message", "")) for t in tests.get("tests", ())),
        review_outcome=manifest.review.outcome, review_reason=manifest.review.reason, review=review,
        carried=manifest.carried, changes=found, parent_missing=missing,
    )


def archived_report(artifact: Path) -> tuple[ReportData, str]:
    """The data and page of an archived artifact, its parent read from beside it (`ecosystems/<name>/<parent>`)."""
    if not artifact.exists():
        raise ReportNotMade(f"{artifact}: no such folder; pass an archived version such as ecosystems/madgroup/1.0.0")
    if not artifact.is_dir() or not (artifact / "manifest.json").is_file():
        raise ReportNotMade(f"{artifact}: not an artifact: it has no manifest.json; pass a folder such as "
                            "ecosystems/madgroup/1.0.0")
    manifest = Manifest.read(artifact)
    parent = artifact.parent / manifest.parent if manifest.parent else None
    data = report_data(artifact, manifest, parent)
    return data, render(data)


def write_report_of(artifact: Path, out: Path | None) -> tuple[str, bool | None]:
    """`regen report`: render the report of `artifact`; compare it with its report.html when it has one (`same`),
    and write it to `out` (by default, for a version without one, under .regen/report/). Never into an artifact."""
    data, page = archived_report(artifact)
    archived = artifact / REPORT
    same = archived.read_bytes() == page.encode("utf-8") if archived.is_file() else None
    if same is not None and data.parent_missing:
        said = f"{artifact}: its parent {data.parent} is not beside it, so the changes since it cannot be shown: " \
               "the report rendered again cannot match its report.html"
    elif same is True:
        said = f"{artifact}: report.html rendered again from the artifact: the same bytes"
    elif same is False:
        said = f"{artifact}: report.html DIFFERS from the report rendered again from the artifact (by this compiler)"
    else:
        said = f"{artifact}: archived without a report.html"
    if out is None and same is None:
        out = Path(".regen") / "report" / data.ecosystem / data.version / REPORT
    if out is not None:
        inside = next((folder for folder in [out.resolve().parent, *out.resolve().parents]
                       if (folder / "manifest.json").is_file()), None)
        if inside is not None:
            raise ReportNotMade(f"{out}: inside the artifact {inside}; archived versions are never written to: "
                                "pass --out a file elsewhere")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(page, encoding="utf-8")
        except OSError as exc:
            raise ReportNotMade(f"{out}: cannot write the report ({exc.strerror or exc})") from None
        said += f"; written to {out}"
    return said, same


def report_problem(artifact: Path, manifest: Manifest) -> tuple[str | None, str]:
    """For `regen verify`: (a problem, a note). An artifact whose manifest lists report.html must have the page this
    compiler renders from it; one archived before reports existed has none, and needs none."""
    if REPORT not in manifest.outputs:
        return None, "no report.html (archived before reports)"
    if manifest.parent and not (artifact.parent / manifest.parent / "manifest.json").is_file():
        return None, f"report.html not rendered again: its parent {manifest.parent} is not beside it (the changes need it)"
    try:
        _, page = archived_report(artifact)
    except UserError as exc:
        return f"{REPORT}: cannot be rendered again: {exc}", ""
    try:
        same = (artifact / REPORT).read_bytes() == page.encode("utf-8")
    except OSError as exc:
        return f"{REPORT}: cannot be read: {exc.strerror or exc}", ""
    if not same:
        return f"{REPORT}: differs from the report rendered again from the artifact", ""
    return None, "report.html rendered again: the same bytes"


# --- the page ------------------------------------------------------------------------------------

NODE_W, NODE_H = 148, 46
GAP_X, GAP_Y, ROW_GAP = 26, 64, 30
MARGIN = 24
COLUMNS = 4  # a layer wider than this wraps: the graph stays narrow enough to read on a phone
HUB_W, HUB_H = 120, 30
BUS = ("#0969da", "#1a7f37", "#bc4c00", "#8250df", "#bf3989", "#1b7c83")  # a colour per shared conversation
STATUS_WORDS = {"regenerated": "regenerated", "reused": "reused", "carried": "tools carried"}


def _slot_x(slot: int) -> int:
    return MARGIN + slot * (NODE_W + GAP_X)


def layout(mads: tuple[MadNode, ...]) -> dict:
    """Where every node, hub and edge goes: fixed sizes, on a grid of COLUMNS slots; rows by start-up layer (a
    wide layer wraps), names in order within a layer.

    `talks_to` is a solid arrow from a MAD to the one it needs running first (always in a row above). A conversation
    two or more MADs share is a hub in a row above the MADs, reached by a dashed line in its own colour that runs up
    the gutters between the columns (never across a MAD), so a conversation's members read as one bus."""
    members: dict[str, list[str]] = {}
    for m in mads:
        for c in m.conversations:
            members.setdefault(c, []).append(m.name)
    shared = sorted(c for c, names in members.items() if len(names) > 1)
    rows: list[list[MadNode]] = []
    for layer in sorted({m.layer for m in mads}):
        nodes = sorted((m for m in mads if m.layer == layer), key=lambda m: m.name)
        rows += [nodes[i:i + COLUMNS] for i in range(0, len(nodes), COLUMNS)]
    columns = max([len(r) for r in rows] + [1])
    width = max(2 * MARGIN + columns * NODE_W + (columns - 1) * GAP_X,
                2 * MARGIN + len(shared) * HUB_W + max(len(shared) - 1, 0) * GAP_X)
    y = MARGIN
    hubs = {}
    if shared:
        total = len(shared) * HUB_W + (len(shared) - 1) * GAP_X
        for i, c in enumerate(shared):
            hubs[c] = {"name": c, "x": (width - total) // 2 + i * (HUB_W + GAP_X), "y": y, "w": HUB_W, "h": HUB_H,
                       "members": members[c], "colour": BUS[i % len(BUS)], "index": i}
        y += HUB_H + GAP_Y
    nodes = {}
    previous_layer = None
    for row in rows:
        gap = 0 if previous_layer is None else ROW_GAP if row[0].layer == previous_layer else GAP_Y
        y += gap
        first = (columns - len(row)) // 2  # centred on the grid, so the gutters line up from row to row
        for i, m in enumerate(row):
            nodes[m.name] = {"mad": m, "x": _slot_x(first + i), "y": y, "slot": first + i,
                             "above": gap or GAP_Y}
        y += NODE_H
        previous_layer = row[0].layer
    height = y + MARGIN
    edges = []
    for m in mads:
        for other in m.talks_to:
            if other in nodes:
                edges.append({"kind": "talks_to", "source": m.name, "target": other, "colour": "#57606a",
                              "title": f"{m.name} talks to {other} (needs it running first)"})
    _route_talks(edges, nodes)
    for c, hub in hubs.items():
        for name in hub["members"]:
            edges.append({"kind": "conversation", "source": name, "target": c, "colour": hub["colour"],
                          "title": f"{name} joins the conversation {c}",
                          "d": _bus(nodes[name], hub, len(hubs), columns)})
    return {"width": width, "height": height, "nodes": [nodes[m.name] for m in mads if m.name in nodes],
            "hubs": list(hubs.values()), "edges": edges}


def _bus(node: dict, hub: dict, hubs: int, columns: int) -> str:
    """Up from the MAD's top into the gap above it, along it to a gutter, up the gutter, along under the hubs."""
    shift = (hub["index"] - (hubs - 1) / 2) * 5  # side by side where two conversations share a gutter
    gutter = node["slot"] if node["slot"] < columns / 2 else node["slot"] + 1
    x = int(_slot_x(gutter) - GAP_X / 2 + shift)
    # From the corner on the gutter's side: the middle of the top is where talks_to arrows leave.
    start = int((node["x"] + 14 if gutter == node["slot"] else node["x"] + NODE_W - 14) + shift)
    gap_y = int(node["y"] - node["above"] / 2 + shift)
    bus_y = int(hub["y"] + hub["h"] + GAP_Y / 4 + shift)
    port = hub["x"] + hub["w"] // 2
    return f"M{start},{node['y']} V{gap_y} H{x} V{bus_y} H{port} V{hub['y'] + hub['h']}"


def _route_talks(edges: list[dict], nodes: dict) -> None:
    """Each arrow leaves the top of its MAD and ends under its target; ports spread along the sides."""
    out: dict[str, list[dict]] = {}
    into: dict[str, list[dict]] = {}
    for e in edges:
        out.setdefault(e["source"], []).append(e)
        into.setdefault(e["target"], []).append(e)
    for name, leaving in out.items():
        leaving.sort(key=lambda e: (nodes[e["target"]]["x"], nodes[e["target"]]["y"], e["target"]))
        for i, e in enumerate(leaving):
            e["x1"] = nodes[name]["x"] + NODE_W * (i + 1) // (len(leaving) + 1)
            e["y1"] = nodes[name]["y"]
    for target, arriving in into.items():
        arriving.sort(key=lambda e: (nodes[e["source"]]["x"], nodes[e["source"]]["y"], e["source"]))
        for i, e in enumerate(arriving):
            e["x2"] = nodes[target]["x"] + NODE_W * (i + 1) // (len(arriving) + 1)
            e["y2"] = nodes[target]["y"] + NODE_H + 6  # room for the arrow head
    for e in edges:
        mid = (e["y1"] + e["y2"]) // 2
        e["d"] = f"M{e['x1']},{e['y1']} C{e['x1']},{mid} {e['x2']},{mid} {e['x2']},{e['y2']}"


def _int(n: int) -> str:
    return f"{n:,}"


def _usd(x: float) -> str:
    return f"${x:.4f}"


def _seconds(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def render(data: ReportData) -> str:
    """report.html of `data`: the same data gives the same bytes."""
    from ..review.models import PanelReport
    from ..review.report import _view as review_view

    review = None
    if data.review is not None:
        try:
            review = review_view(PanelReport.model_validate(data.review))
        except ValidationError:
            review = None
    counts = {}
    for t in data.tests:
        counts[t.outcome] = counts.get(t.outcome, 0) + 1
    elapsed = [u.elapsed_s for u in data.units if u.elapsed_s is not None]
    view = {
        "d": data,
        "graph": layout(data.mads),
        "node_w": NODE_W, "node_h": NODE_H,
        "status_words": STATUS_WORDS,
        "statuses": {s: sum(1 for m in data.mads if m.status == s) for s in STATUS_WORDS},
        "review": review,
        "tests_failed": any(t.outcome in ("failed", "error") for t in data.tests),
        "total_elapsed": _seconds(round(sum(elapsed), 2)) if elapsed else "—",
        "requirements_covered": sum(1 for r in (review or {}).get("requirements", []) if r["covered"]),
    }
    return _environment().get_template("report.html.j2").render(**view)


@cache
def _environment() -> jinja2.Environment:
    env = environment("build/templates", html=True)  # every value is escaped; the template marks nothing safe
    env.filters["int"] = _int
    env.filters["usd"] = _usd
    env.filters["seconds"] = _seconds
    return env
