"""`offline/reference`: the deterministic synthesiser behind the offline default pipeline.

It reads the unit's spec from the prompt (between `<unit-spec>` tags) and renders the
unit's files from the jinja2 templates beside this module. It can write every tool bound
to a kernel capability (`builtin:`); any other tool needs a real model, and it says so,
naming the tool. `provider.py` serves it to litellm as the custom provider `offline`.

The scripted senior (`generator.senior.scripted --reference`) renders the same way, and takes
the tools a model would write from a folder of written tools (`<mad>.<tool>.py`, with
its tests in `<mad>.<tool>.test.py`), standing in for a real model where none is reachable.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from ...render import environment

UNIT_SPEC = re.compile(r"<unit-spec>\s*(\{.*\})\s*</unit-spec>", re.S)


def tuple_literal(items: list) -> str:
    """A Python tuple literal, one-element tuples included."""
    if not items:
        return "()"
    inner = ", ".join(repr(i) for i in items)
    return f"({inner},)" if len(items) == 1 else f"({inner})"


class WrittenTool(NamedTuple):
    """A tool written outside the templates: its method and its tests, each with its imports."""

    imports: tuple[str, ...]
    method: str
    test_imports: tuple[str, ...]
    tests: str


def _split_imports(source: str) -> tuple[tuple[str, ...], str]:
    """The top-level import lines of `source`, and the rest of it."""
    tree = ast.parse(source)
    lines = source.splitlines()
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    taken = {i for n in imports for i in range(n.lineno - 1, n.end_lineno)}
    rest = "\n".join(line for i, line in enumerate(lines) if i not in taken).strip("\n")
    return tuple(ast.get_source_segment(source, n) for n in imports), rest + "\n"


def load_written(folder: Path) -> dict[str, WrittenTool]:
    """Written tools by `<mad>.<tool>`, from `folder/<mad>.<tool>.py` and `.test.py`."""
    written = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.endswith(".test.py"):
            continue
        name = path.name.removesuffix(".py")
        imports, method = _split_imports(path.read_text(encoding="utf-8"))
        tests_path = path.with_name(f"{name}.test.py")
        test_imports, tests = _split_imports(tests_path.read_text(encoding="utf-8")) if tests_path.exists() else ((), "")
        written[name] = WrittenTool(imports, method, test_imports, tests)
    return written


def render_unit(unit: dict, written: Mapping[str, WrittenTool] | None = None) -> list[dict[str, str]]:
    """The files of one unit, rendered from its spec; raises ValueError for a tool it cannot write."""
    written = written or {}
    env = environment("senior/offline/templates")
    env.filters["tuple_literal"] = tuple_literal
    env.filters["indent4"] = lambda text: "\n".join(("    " + line) if line else "" for line in text.splitlines())
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
        mine = {t["name"]: written[f"{mad['name']}.{t['name']}"] for t in mad["tools"] if not t.get("builtin")}
        owns = sorted({t["builtin"].split(".")[0] for t in mad["tools"] if t.get("builtin")})
        context = {
            "mad": mad, "owns": owns, "unit": unit, "package": package, "written": mine,
            "extra_imports": sorted({i for w in mine.values() for i in w.imports}),
            "extra_test_imports": sorted({i for w in mine.values() for i in w.test_imports}),
        }
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
    "deploy/failover.sh": "failover.sh.j2",
    "deploy/PACKAGE.service": "systemd.service.j2",
    "deploy/Dockerfile": "Dockerfile.j2",
}
