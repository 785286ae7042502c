"""Stage 3, synthesise: one model request per unit, every answer parsed and checked.

The prompts are jinja2 templates in `generator/prompts/`. The unit's spec travels in
the prompt as JSON between `<unit-spec>` tags, which is all any model, the offline
reference included, gets to know about the unit.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from . import check
from .config import SeniorModel
from .kernel.capabilities import CAPABILITIES
from .llm import Answer, ModelClient, ModelRequest, Transcript, parse_answer
from .plan import Plan, Unit
from .render import environment
from .spec import MadSpec, Spec, Tool

UNIT_SPEC_OPEN, UNIT_SPEC_CLOSE = "<unit-spec>", "</unit-spec>"


class UnitResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: str
    request_hash: str
    files: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class Synthesis(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    files: dict[str, str]
    """Every synthesised file, by its path relative to src/."""
    units: tuple[UnitResult, ...]


def _tool_json(tool: Tool) -> dict:
    # Parameters as a list: their order is the signature's, and JSON objects get sorted.
    # A parameter carries "default" only when it has one: absence means required.
    data = tool.model_dump(mode="json", exclude={"params"})
    data["params"] = [
        {"name": name} | p.model_dump(mode="json", exclude=set() if p.optional else {"default"})
        for name, p in tool.params.items()
    ]
    return data


def _mad_json(mad: MadSpec) -> dict:
    return mad.model_dump(mode="json", exclude={"tools"}) | {
        "class_name": mad.class_name,
        "tools": [_tool_json(t) for t in mad.tools],
    }


def unit_spec(spec: Spec, plan: Plan, unit: Unit) -> dict:
    """What a model needs to know to write `unit`: its MAD, every MAD's interface, settings."""
    interfaces = [
        {
            "name": m.name,
            "class_name": m.class_name,
            "role": m.role,
            "tools": [_tool_json(t) for t in m.tools],
        }
        for m in (spec.mad(n) for n in plan.startup_order)
    ]
    data = {
        "unit": unit.name,
        "kind": unit.kind,
        "package": plan.package,
        "owns": list(unit.owns),
        "startup_order": list(plan.startup_order),
        "ecosystem": spec.ecosystem.model_dump(mode="json"),
        "interfaces": interfaces,
    }
    if unit.mad:
        data["mad"] = _mad_json(spec.mad(unit.mad))
    else:
        data["mads"] = [_mad_json(spec.mad(n)) for n in plan.startup_order]
    return data


def prompt_messages(spec: Spec, plan: Plan, unit: Unit) -> list[dict[str, str]]:
    env = environment("prompts")
    system = env.get_template("system.md.j2").render(
        requirements=spec.requirements.strip(),
        principles=spec.principles.strip(),
        rules=spec.ecosystem.principles,
        package=plan.package,
        capabilities=list(CAPABILITIES.values()),
        answer_schema=json.dumps(Answer.model_json_schema(), sort_keys=True),
    )
    user = env.get_template("unit.md.j2").render(
        unit=unit,
        package=plan.package,
        startup_order=plan.startup_order,
        unit_spec=json.dumps(unit_spec(spec, plan, unit), sort_keys=True, indent=1),
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def synthesise(
    spec: Spec,
    plan: Plan,
    senior: SeniorModel,
    client: ModelClient,
    transcript: Transcript,
    on_unit: Callable[[int, Unit], None] = lambda index, unit: None,
) -> Synthesis:
    """Ask the senior for every unit, in plan order; any bad answer stops the run."""
    files: dict[str, str] = {}
    results = []
    for index, unit in enumerate(plan.units):
        on_unit(index, unit)
        request = ModelRequest.for_unit(unit.name, senior, prompt_messages(spec, plan, unit))
        reply = client.complete(request)
        transcript.record(request, reply)
        answer = parse_answer(unit.name, reply)
        check.answer(spec, plan, unit, answer)
        for f in answer.files:
            files[f.path] = f.content
        result = UnitResult(
            unit=unit.name,
            request_hash=request.hash,
            files=tuple(sorted(f.path for f in answer.files)),
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            cost_usd=reply.cost_usd,
        )
        results.append(result)
    return Synthesis(files=dict(sorted(files.items())), units=tuple(results))
