"""`offline/reference`: the deterministic synthesiser behind the offline default pipeline.

It reads the unit's spec from the prompt (between `<unit-spec>` tags) and renders the
unit's files from the jinja2 templates beside this module. It can write every tool bound
to a kernel capability (`builtin:`); any other tool needs a real model, and it says so,
naming the tool. `provider.py` serves it to litellm as the custom provider `offline`.
"""

from __future__ import annotations

import re

from ..render import environment

UNIT_SPEC = re.compile(r"<unit-spec>\s*(\{.*\})\s*</unit-spec>", re.S)


def tuple_literal(items: list) -> str:
    """A Python tuple literal, one-element tuples included."""
    if not items:
        return "()"
    inner = ", ".join(repr(i) for i in items)
    return f"({inner},)" if len(items) == 1 else f"({inner})"


def render_unit(unit: dict) -> list[dict[str, str]]:
    """The files of one unit, rendered from its spec; raises ValueError for unbound tools."""
    env = environment("offline/templates")
    env.filters["tuple_literal"] = tuple_literal
    package = unit["package"]
    if unit["kind"] == "mad":
        mad = unit["mad"]
        unbound = [t["name"] for t in mad["tools"] if not t.get("builtin")]
        if unbound:
            names = ", ".join(f"{mad['name']}.{n}" for n in unbound)
            raise ValueError(
                f"the offline reference synthesiser cannot write tool(s) {names}: they are not "
                "bound to a kernel capability (no `builtin:`). Bind them, or build with an LLM "
                "pipeline, e.g. --pipeline pipelines/frontier.toml"
            )
        owns = sorted({t["builtin"].split(".")[0] for t in mad["tools"]})
        context = {"mad": mad, "owns": owns, "unit": unit, "package": package}
        outputs = {
            f"{package}/mads/{mad['name']}.py": "mad/module.py.j2",
            f"tests/test_{mad['name']}.py": "mad/test_mad.py.j2",
        }
    else:
        context = {"unit": unit, "package": package, "ecosystem": unit["ecosystem"], "mads": unit["mads"]}
        outputs = {
            path.replace("PACKAGE", package): f"frame/{template}"
            for path, template in FRAME_FILES.items()
        }
    return [
        {"path": path, "content": env.get_template(template).render(**context)}
        for path, template in sorted(outputs.items())
    ]


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
    "deploy/PACKAGE.service": "systemd.service.j2",
    "deploy/Dockerfile": "Dockerfile.j2",
}
