"""The one jinja2 set-up shared by prompts and the offline reference templates."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jinja2

HERE = Path(__file__).parent


def python_string(text: str) -> str:
    """A Python literal for `text`: triple-quoted when that reads better and is safe."""
    if "\n" in text and '"""' not in text and "\\" not in text and not text.endswith('"'):
        return '"""' + text + '"""'
    return repr(text)


def python_literal(value: object) -> str:
    """repr() for the JSON-like values specs hold (str, int, float, bool, None, list, dict)."""
    return repr(value)


@cache
def environment(folder: str, html: bool = False) -> jinja2.Environment:
    """A strict environment over a template folder of this package (e.g. "prompts"); `html` escapes every value
    (the pages: review.html, report.html)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / folder),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=html,
    )
    env.filters["pyrepr"] = python_literal
    env.filters["pystr"] = python_string
    # JSON strings are valid TOML basic strings; jinja's own tojson escapes for HTML.
    env.filters["tomlstr"] = lambda v: json.dumps(v, ensure_ascii=False)
    env.globals["tool_hints"] = _tool_hints
    return env


def _tool_hints(tool: dict) -> dict[str, bool]:
    """A spec'd tool's MCP annotations (its unit-spec JSON): the bound capability's, then the spec's own hints."""
    from .kernel.capabilities import tool_hints

    names = {"read_only": "readOnlyHint", "destructive": "destructiveHint", "idempotent": "idempotentHint"}
    spec = {names[k]: v for k, v in (tool.get("hints") or {}).items() if v is not None}
    return {**(tool_hints(tool["builtin"]) if tool.get("builtin") else {}), **spec}
