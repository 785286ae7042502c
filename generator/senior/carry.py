"""Carried tools: how the offline senior keeps a model-written tool across spec changes.

The offline senior writes every tool bound to a kernel capability from its templates. A tool
no capability covers was written by a model once; while its *tool contract* holds, the offline
senior carries that code from the newest archived build that has it, instead of stopping:

    contract = the tool (name, parameters, return type, description)
             + the capabilities its MAD may call (and the tables and secrets they reach), the interfaces
      of the MADs it may ask
             + the principle rules that apply to its module or its tests
             + the kernel API it was written against

A contract is read from the prompt the senior was sent for the tool's unit, the same way for
the build at hand and for any archived build (whose transcript keeps its prompts): what the
model was shown is what it wrote the tool against. The tool's method and its tests are lifted
from the archived answer with libcst (offline/written.py) and spliced into the unit's answer;
the result goes through every check and the sandbox like any answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..artifact.manifest import CarriedTool
from ..errors import AnswerRejected, UserError
from ..frozen import Frozen
from ..hashing import json_hash, sha256_text
from ..kernel.capabilities import ALWAYS_GRANTED
from ..spec.model import PrincipleRule, Spec
from ..spec.plan import Plan
from . import check
from .answer import Answer
from .models import ModelClient, ModelReply, ModelRequest
from .offline import answer_for, render_unit, template_tests, unit_spec_of
from .offline.written import LiftError, SpliceConflict, WrittenTool, lift

_KERNEL_SECTION = re.compile(r"^# The kernel .*?$(?P<api>.*?)^The capabilities:$", re.M | re.S)
_CAPABILITY_LINE = re.compile(r"^- `(?P<name>[a-z_]+\.[a-z_]+)\(.*$", re.M)


class ToolContract(Frozen):
    """What a model-written tool was written against; equal contracts, the same tool fits."""

    tool: dict
    capabilities: dict[str, str]
    storage: tuple[dict, ...]
    secrets: tuple[str, ...]
    spawns: tuple[str, ...] = ()
    interfaces: tuple[dict, ...]
    rules: tuple[dict, ...]
    kernel_api: str

    @property
    def hash(self) -> str:
        return json_hash(self.model_dump(mode="json"))

    def changes_since(self, older: ToolContract) -> list[str]:
        """What differs from `older`, in words."""
        changed = [f"its {key} changed" for key in ("description", "params", "returns")
                   if self.tool.get(key) != older.tool.get(key)]
        for name in sorted(self.capabilities.keys() | older.capabilities.keys()):
            if name not in older.capabilities:
                changed.append(f"capability {name} granted")
            elif name not in self.capabilities:
                changed.append(f"capability {name} no longer granted")
            elif self.capabilities[name] != older.capabilities[name]:
                changed.append(f"capability {name} changed")
        changed += [f"its MAD's {key} changed" for key in ("storage", "secrets", "spawns")
                    if getattr(self, key) != getattr(older, key)]
        before = {i["name"]: i for i in older.interfaces}
        after = {i["name"]: i for i in self.interfaces}
        changed += [f"the interface of {name} {'added' if name not in before else 'removed' if name not in after else 'changed'}"
                    for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)]
        rules_before = {r["id"]: r for r in older.rules}
        rules_after = {r["id"]: r for r in self.rules}
        changed += [f"principle rule {rule} {'added' if rule not in rules_before else 'removed' if rule not in rules_after else 'changed'}"
                    for rule in sorted(rules_before.keys() | rules_after.keys()) if rules_before.get(rule) != rules_after.get(rule)]
        if self.kernel_api != older.kernel_api:
            changed.append("the kernel API changed")
        return changed or ["its contract changed"]


def unbound_tools(unit_spec: dict) -> list[str]:
    """The tools of a MAD unit that no capability covers: `<mad>.<tool>`, in spec order."""
    mad = unit_spec.get("mad")
    return [f"{mad['name']}.{t['name']}" for t in mad["tools"] if not t.get("builtin")] if mad else []


def contracts(messages: Iterable[dict[str, str]]) -> dict[str, ToolContract]:
    """The contract of every model-written tool of a unit, read from the prompt of its first request."""
    messages = list(messages)
    unit = unit_spec_of(messages)
    if not unbound_tools(unit):
        return {}
    system = "\n".join(m["content"] for m in messages if m.get("role") == "system")
    section = _KERNEL_SECTION.search(system)
    mad, package = unit["mad"], unit["package"]
    owns = {t["builtin"].split(".", 1)[0] for t in mad["tools"] if t.get("builtin")}
    lines = {m["name"]: m.group(0) for m in _CAPABILITY_LINE.finditer(section.string[section.end():] if section else "")}
    granted = {name: line for name, line in lines.items() if name.split(".", 1)[0] in owns or name in ALWAYS_GRANTED}
    paths = (f"{package}/mads/{mad['name']}.py", f"tests/test_{mad['name']}.py")
    rules = []
    for data in unit["ecosystem"].get("principles", []):
        rule = PrincipleRule.model_validate(data)
        if any(rule.applies(path) for path in paths):
            rules.append(rule.model_dump(mode="json"))
    common = {
        "capabilities": granted,
        "storage": tuple(mad.get("storage", [])),
        "secrets": tuple(mad.get("secrets", [])),
        "spawns": tuple(mad.get("spawns", [])),
        "interfaces": tuple(sorted(unit.get("interfaces", []), key=lambda i: i["name"])),
        "rules": tuple(sorted(rules, key=lambda r: r["id"])),
        "kernel_api": sha256_text(section.group("api") if section else ""),
    }
    return {f"{mad['name']}.{t['name']}": ToolContract(tool=t, **common) for t in mad["tools"] if not t.get("builtin")}


@dataclass(frozen=True)
class SourceUnit:
    """A unit as an archived build recorded it: its first prompt and its accepted answer."""

    build: str
    """`name@version` of the archived build."""
    messages: tuple[dict[str, str], ...]
    files: dict[str, str]
    answered_by: str
    written_by: dict[str, str]
    """For the tools that build itself carried: the model that wrote each one."""
    lock_inputs: dict[str, str]


class Carried(Frozen):
    """One tool the offline senior carries into this build, and where it came from."""

    unit: str
    source: str
    written_by: str
    contract: str
    written: WrittenTool
    changed_since: tuple[str, ...]

    def record(self) -> CarriedTool:
        """What the manifest records of it."""
        return CarriedTool(unit=self.unit, source=self.source, written_by=self.written_by, contract=self.contract,
                           method_sha256=sha256_text(self.written.code), tests_sha256=sha256_text(self.written.test_code),
                           changed_since=self.changed_since)


def find_carried(needs: dict[str, list[str]], requests: dict[str, ModelRequest], inputs: dict[str, dict[str, str]],
                 sources: Callable[[str], Iterable[SourceUnit]]) -> dict[str, Carried]:
    """For every tool in `needs` (unit -> `<mad>.<tool>`), the code to carry; a UserError naming each tool that
    cannot be carried (no archived build wrote it, its contract changed, its recorded code cannot be lifted)
    and why, before any work is done. `sources(unit)` yields the unit as archived builds recorded it, newest first."""
    carried: dict[str, Carried] = {}
    problems: list[str] = []
    skipped: list[str] = []
    for unit, tools in needs.items():
        current = contracts(requests[unit].messages)
        found: dict[str, tuple[SourceUnit, ToolContract]] = {}
        newest_seen: dict[str, tuple[SourceUnit, ToolContract]] = {}
        current_tests = template_tests(unit_spec_of(requests[unit].messages)["mad"])
        for source in sources(unit):
            try:
                recorded = contracts(source.messages)
            except (ValueError, KeyError, TypeError, AttributeError):  # a prompt this compiler cannot read
                skipped.append(f"{source.build}: its prompt of {unit} cannot be read; not drawn on")
                continue
            for tool in tools:
                if tool in found or tool not in recorded:
                    continue
                newest_seen.setdefault(tool, (source, recorded[tool]))
                if recorded[tool].hash == current[tool].hash:
                    found[tool] = (source, recorded[tool])
            if len(found) == len(tools):
                break
        for tool in tools:
            if tool not in found:
                if tool in newest_seen:
                    source, old = newest_seen[tool]
                    problems.append(f"{tool}: its contract changed since {source.build}, the newest build that has it: "
                                    + "; ".join(current[tool].changes_since(old)))
                else:
                    problems.append(f"{tool}: no archived build wrote it")
                continue
            source, contract = found[tool]
            try:
                written = _lift(tool, source, current_tests)
            except LiftError as exc:
                problems.append(f"{tool}: its recorded code in {source.build} cannot be carried: {exc}")
                continue
            changed = sorted(k.removeprefix("spec/") for k in inputs[unit].keys() | source.lock_inputs.keys()
                             if k != "request" and inputs[unit].get(k) != source.lock_inputs.get(k))
            carried[tool] = Carried(unit=unit, source=source.build, contract=contract.hash, written=written,
                                    written_by=source.written_by.get(tool, source.answered_by),
                                    changed_since=tuple(changed))
    if problems:
        raise _cannot_carry(problems, skipped)
    return carried


def _cannot_carry(problems: list[str], skipped: list[str] = ()) -> UserError:
    return UserError(
        "the offline senior (offline/reference) writes tools bound to a kernel capability (`builtin:`) and carries "
        "a model-written tool from an archived build while its contract (signature, description, what it may "
        "call, the rules that apply to it, the kernel API) is unchanged; these tools cannot be carried:\n"
        + "\n".join(f"  {p}" for p in problems) + "\n"
        + "".join(f"  ({s})\n" for s in skipped)
        + "Build with an LLM pipeline (--pipeline pipelines/frontier.toml) to have them written again, or rebuild a "
        "recorded build without keys (--replay ecosystems/<name>/<version>)."
    )


def by_unit(carried: dict[str, Carried]) -> dict[str, dict[str, WrittenTool]]:
    """Unit -> the code of each tool carried into it."""
    units: dict[str, dict[str, WrittenTool]] = {}
    for tool, c in carried.items():
        units.setdefault(c.unit, {})[tool] = c.written
    return units


def preflight(spec: Spec, plan: Plan, requests: dict[str, ModelRequest], carried: dict[str, Carried]) -> None:
    """Render every unit that carries tools and check it as any answer is checked, before any work: a UserError
    naming the tools of each unit whose answer would not pass (a conflict between them, a check that fails)."""
    problems = []
    for unit, written in by_unit(carried).items():
        names = ", ".join(f"{tool} (from {carried[tool].source})" for tool in written)
        try:
            files = render_unit(unit_spec_of(requests[unit].messages), written)
            check.answer(spec, plan, plan.unit(unit), Answer.model_validate({"files": files}))
        except SpliceConflict as exc:
            problems.append(f"{names}: {exc}")
        except AnswerRejected as exc:
            problems.append(f"{names}: with them, unit {unit} fails its checks:\n    " + "\n    ".join(exc.problems))
    if problems:
        raise _cannot_carry(problems)


def _lift(tool: str, source: SourceUnit, template: set[str]) -> WrittenTool:
    """The tool out of the source's answer; `template` names the tests today's templates write themselves."""
    unit = unit_spec_of(source.messages)
    mad, package = unit["mad"], unit["package"]
    module = source.files.get(f"{package}/mads/{mad['name']}.py")
    if module is None:
        raise LiftError(f"its answer has no {package}/mads/{mad['name']}.py")
    return lift(tool.split(".", 1)[1], mad["name"], mad["class_name"], module,
                source.files.get(f"tests/test_{mad['name']}.py", ""), template)


class CarryingSenior:
    """The offline senior for a build that carries tools: units with carried tools are rendered with them
    spliced in; every other request goes to the offline senior itself (through litellm, like any model)."""

    def __init__(self, offline: ModelClient, carried: dict[str, Carried]):
        self.offline = offline
        self.by_unit = by_unit(carried)

    def complete(self, request: ModelRequest) -> ModelReply:
        written = self.by_unit.get(request.unit)
        if written is None:
            return self.offline.complete(request)
        return ModelReply(content=answer_for(request.messages, written), model=request.model, finish_reason="stop")
