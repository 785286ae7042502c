"""`offline/reference`: the deterministic synthesiser behind the offline default pipeline.

It reads the unit's spec from the prompt (between `<unit-spec>` tags) and renders the
unit's files from the jinja2 templates beside this module. It can write every tool bound
to a kernel capability (`builtin:`); any other tool needs a real model, and it says so,
naming the tool. `provider.py` serves it to litellm as the custom provider `offline`.

The same renderer serves two callers that have tools a model wrote (see `written.py`): the
offline senior carrying a tool from an archived build (senior/carry.py), and the scripted
senior (`generator.senior.scripted --reference`), which takes them from a folder of written
tools (`<mad>.<tool>.py`, tests in `<mad>.<tool>.test.py`) to stand in for a real model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from ...render import environment
from .written import WrittenTool, splice_module, splice_tests

UNIT_SPEC = re.compile(r"<unit-spec>\s*(\{.*\})\s*</unit-spec>", re.S)


def tuple_literal(items: list) -> str:
    """A Python tuple literal, one-element tuples included."""
    if not items:
        return "()"
    inner = ", ".join(repr(i) for i in items)
    return f"({inner},)" if len(items) == 1 else f"({inner})"


def template_tests(mad: dict) -> set[str]:
    """The test functions the templates write for a MAD: one per tool bound to a capability."""
    return {f"test_{t['name']}" for t in mad["tools"] if t.get("builtin")}


def render_unit(unit: dict, written: Mapping[str, WrittenTool] | None = None) -> list[dict[str, str]]:
    """The files of one unit, rendered from its spec, with `written` tools (`<mad>.<tool>` -> code) spliced into
    a MAD's module and tests; raises ValueError for a tool no capability covers and nothing was written for."""
    written = written or {}
    env = environment("senior/offline/templates")
    env.filters["tuple_literal"] = tuple_literal
    package = unit["package"]
    if unit["kind"] == "mad":
        mad = unit["mad"]
        unbound = [t["name"] for t in mad["tools"] if not t.get("builtin") and f"{mad['name']}.{t['name']}" not in written]
        if unbound:
            names = ", ".join(f"{mad['name']}.{n}" for n in unbound)
            raise ValueError(
                f"the offline reference synthesiser cannot write tool(s) {names}: they are not "
                "bound to a kernel capability (no `builtin:`). Bind them, or build with an LLM "
                "pipeline, e.g. --pipeline pipelines/frontier.toml"
            )
        owns = sorted({t["builtin"].split(".")[0] for t in mad["tools"] if t.get("builtin")})
        # The capabilities whose tests live in a pack's own case file (mad/cases/<pack>.py.j2).
        pack_caps = [t["builtin"] for t in mad["tools"] if t.get("builtin") and t["builtin"].split(".")[0] in CASE_PACKS]
        context = {"mad": mad, "owns": owns, "unit": unit, "package": package, "pack_caps": pack_caps}
        module = env.get_template("mad/module.py.j2").render(**context)
        tests = env.get_template("mad/test_mad.py.j2").render(**context)
        mine = {f"{mad['name']}.{t['name']}": written[f"{mad['name']}.{t['name']}"] for t in mad["tools"]
                if not t.get("builtin")}
        if mine:
            module_path, tests_path = f"{package}/mads/{mad['name']}.py", f"tests/test_{mad['name']}.py"
            module = splice_module(module, mad["class_name"], [t["name"] for t in mad["tools"]], mine, module_path)
            tests = splice_tests(tests, mine, tests_path)
        return [
            {"path": f"{package}/mads/{mad['name']}.py", "content": module},
            {"path": f"tests/test_{mad['name']}.py", "content": tests},
        ]
    context = {"unit": unit, "package": package, "ecosystem": unit["ecosystem"], "mads": unit["mads"]}
    outputs = {path.replace("PACKAGE", package): f"frame/{template}" for path, template in FRAME_FILES.items()
               if set(ONLY_WITH_PACK.get(path, ())) <= set(unit["ecosystem"].get("packs", {}))}
    return [
        {"path": path, "content": env.get_template(template).render(**context)}
        for path, template in sorted(outputs.items())
    ]


def answer_for(messages: list[dict[str, str]] | tuple[dict[str, str], ...],
               written: Mapping[str, WrittenTool] | None = None) -> str:
    """The offline senior's answer to a unit's prompt, as the JSON text any model answers with."""
    return json.dumps({"files": render_unit(unit_spec_of(messages), written)}, sort_keys=True, ensure_ascii=False)


def unit_spec_of(messages: list[dict[str, str]] | tuple[dict[str, str], ...]) -> dict:
    """The unit's spec, from the `<unit-spec>` block of a prompt's user messages; ValueError without one."""
    prompt = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
    match = UNIT_SPEC.search(prompt)
    if match is None:
        raise ValueError("the prompt has no <unit-spec> block; offline/reference only writes units")
    return json.loads(match.group(1))


# Packs whose tools' end-to-end tests are written in a case file of their own, by capability.
CASE_PACKS = frozenset(p.name.removesuffix(".py.j2") for p in (Path(__file__).parent / "templates" / "mad" / "cases").glob("*.py.j2"))

FRAME_FILES = {
    "pyproject.toml": "pyproject.toml.j2",
    "README.md": "README.md.j2",
    "RUNBOOK.md": "RUNBOOK.md.j2",
    "PACKAGE/__init__.py": "package_init.py.j2",
    "PACKAGE/__main__.py": "main.py.j2",
    "PACKAGE/ecosystem.py": "ecosystem.py.j2",
    "PACKAGE/mads/__init__.py": "mads_init.py.j2",
    "tests/conftest.py": "conftest.py.j2",
    "tests/test_ecosystem.py": "test_ecosystem.py.j2",
    "deploy/run.sh": "run.sh.j2",
    "deploy/failover.sh": "failover.sh.j2",
    "deploy/upgrade.sh": "upgrade.sh.j2",
    "deploy/PACKAGE.service": "systemd.service.j2",
    "deploy/Dockerfile": "Dockerfile.j2",
}
# The failover script drives the Redis bus: only a build whose spec names the redis pack has one. The blue/green
# upgrade script runs two versions at once on one shared database, so on a shared bus too (the local bus is one
# process's): only a build with both packs has one.
ONLY_WITH_PACK = {"deploy/failover.sh": ("redis",), "deploy/upgrade.sh": ("postgres", "redis")}
