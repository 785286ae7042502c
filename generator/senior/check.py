"""Checks before disk: every answer is checked whole before any of it is written.

The same checks run for every model, the offline reference included: paths stay inside
the unit's part of the output tree, Python parses (libcst), every spec'd tool is there
with the spec'd signature, and the ecosystem's principle rules hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from .. import python_ast
from ..errors import AnswerRejected
from ..spec.model import MadSpec, PrincipleRule, Spec
from ..spec.plan import Plan, Unit
from .answer import Answer

MAX_FILE_BYTES = 512 * 1024


def path_problem(path: str) -> str | None:
    """Why `path` may not be written inside the output tree, or None when it may."""
    if not path or path != path.strip():
        return "empty path, or leading/trailing spaces"
    if "\\" in path or "\0" in path:
        return "backslashes and NUL bytes are not allowed in paths"
    pure = PurePosixPath(path)
    if pure.is_absolute():
        return "absolute paths are not allowed; paths are relative to the project root"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'..', '.' and empty segments are not allowed: the path must stay inside the tree"
    if any(p == ".git" for p in parts):
        return "nothing may be written under .git"
    return None


def answer(spec: Spec, plan: Plan, unit: Unit, answer: Answer) -> None:
    """Raise AnswerRejected listing every problem of `answer` for `unit`; return when all pass."""
    problems: list[str] = []
    seen: set[str] = set()
    modules: dict[str, MetadataWrapper] = {}  # one wrapper per module: it deep-copies the tree
    for f in answer.files:
        if (why := path_problem(f.path)) is not None:
            problems.append(f"{f.path}: {why}")
            continue
        if f.path in seen:
            problems.append(f"{f.path}: written twice in one answer")
        seen.add(f.path)
        if not unit.may_write(f.path):
            problems.append(f"{f.path}: outside unit {unit.name}, which owns {', '.join(unit.owns)}")
        if len(f.content.encode()) > MAX_FILE_BYTES:
            problems.append(f"{f.path}: {len(f.content.encode())} bytes, over the {MAX_FILE_BYTES} limit")
            continue
        if f.path.endswith(".py"):
            try:
                modules[f.path] = MetadataWrapper(cst.parse_module(f.content))
                # libcst parses some code CPython refuses (a late `from __future__`, `return` at
                # module level): compiling catches what the interpreter would.
                compile(f.content, f.path, "exec", dont_inherit=True)
            except cst.ParserSyntaxError as exc:
                problems.append(f"{f.path}:{exc.raw_line}: Python does not parse: {exc.message}")
                continue
            except SyntaxError as exc:
                problems.append(f"{f.path}:{exc.lineno or 0}: Python does not compile: {exc.msg}")
                continue
            problems += principle_problems(f.path, f.content, modules[f.path], [r for r in spec.ecosystem.principles if r.applies(f.path)])
    if unit.mad:
        mad = spec.mad(unit.mad)
        module_path = f"{plan.package}/mads/{mad.name}.py"
        if module_path not in seen:
            problems.append(f"{module_path}: missing; unit {unit.name} must write the MAD's module")
        elif module_path in modules:
            problems += [f"{module_path}:{p}" for p in tool_problems(mad, modules[module_path])]
    if problems:
        raise AnswerRejected(unit.name, problems)


# --- principle rules ------------------------------------------------------------------


def dotted_name(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        head = dotted_name(node.value)
        return f"{head}.{node.attr.value}" if head else None
    return None


class _Uses(cst.CSTVisitor):
    """Collects imported module names and called names, with their lines."""

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self) -> None:
        self.imports: list[tuple[str, int]] = []
        self.calls: list[tuple[str, int]] = []

    def _line(self, node: cst.CSTNode) -> int:
        return self.get_metadata(PositionProvider, node).start.line

    def visit_Import(self, node: cst.Import) -> None:
        for alias in node.names:
            if name := dotted_name(alias.name):
                self.imports.append((name, self._line(node)))

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        if node.relative or node.module is None:
            return
        module = dotted_name(node.module)
        self.imports.append((module, self._line(node)))
        if not isinstance(node.names, cst.ImportStar):
            for alias in node.names:
                self.imports.append((f"{module}.{dotted_name(alias.name)}", self._line(node)))

    def visit_Call(self, node: cst.Call) -> None:
        if name := dotted_name(node.func):
            self.calls.append((name, self._line(node)))


@dataclass(frozen=True)
class Violation:
    """One breach of a principle rule: the rule's id, the 1-based line, what the code does there."""

    rule: str
    line: int
    what: str


@dataclass(frozen=True)
class ModuleUses:
    """What a module imports and calls, with lines: all the principle rules look at, besides its text."""

    imports: tuple[tuple[str, int], ...]
    calls: tuple[tuple[str, int], ...]


def module_uses(wrapper: MetadataWrapper) -> ModuleUses:
    uses = _Uses()
    wrapper.visit(uses)
    return ModuleUses(tuple(uses.imports), tuple(uses.calls))


def principle_violations(source: str, uses: ModuleUses, rules: list[PrincipleRule]) -> list[Violation]:
    """Every breach of `rules` in one module, rule by rule: shared by the pre-disk check and the review."""
    found = []
    for rule in rules:
        for name, line in uses.imports:
            for banned in rule.forbid_imports:
                if name == banned or name.startswith(banned + "."):
                    found.append(Violation(rule.id, line, f"imports {name}"))
        for name, line in uses.calls:
            if name in rule.forbid_calls:
                found.append(Violation(rule.id, line, f"calls {name}()"))
        for pattern in rule.forbid_patterns:
            for number, text in enumerate(source.splitlines(), 1):
                if re.search(pattern, text):
                    found.append(Violation(rule.id, number, f"matches {pattern!r}"))
    return found


def principle_problems(path: str, source: str, wrapper: MetadataWrapper, rules: list[PrincipleRule]) -> list[str]:
    return [
        f"{path}:{v.line}: {v.what}, forbidden by principle {v.rule}"
        for v in principle_violations(source, module_uses(wrapper), rules)
    ]


# --- tool signatures --------------------------------------------------------------------


def _is_tool_decorator(decorator: cst.Decorator) -> bool:
    target = decorator.decorator
    if isinstance(target, cst.Call):
        target = target.func
    return (dotted_name(target) or "").split(".")[-1] == "tool"


def _code(node: cst.CSTNode | None) -> str | None:
    if node is None:
        return None
    return re.sub(r"\s+", "", cst.Module(body=[]).code_for_node(node))


def tool_problems(mad: MadSpec, wrapper: MetadataWrapper) -> list[str]:
    """Every difference between the spec'd tools of `mad` and the `@tool` methods of its class."""
    positions = wrapper.resolve(PositionProvider)
    classes = [n for n in wrapper.module.body if isinstance(n, cst.ClassDef) and n.name.value == mad.class_name]
    if not classes:
        return [f"1: no class {mad.class_name} for MAD {mad.name}"]
    cls = classes[0]
    found: dict[str, cst.FunctionDef] = {}
    for stmt in cls.body.body:
        if isinstance(stmt, cst.FunctionDef) and any(_is_tool_decorator(d) for d in stmt.decorators):
            found[stmt.name.value] = stmt
    line_of_class = positions[cls].start.line
    problems = [
        f"{line_of_class}: spec'd tool {tool.name} is missing from class {mad.class_name}"
        for tool in mad.tools
        if tool.name not in found
    ]
    spec_names = {t.name for t in mad.tools}
    problems += [
        f"{positions[fn].start.line}: @tool {name} is not in the spec of {mad.name}"
        for name, fn in found.items()
        if name not in spec_names
    ]
    for tool in mad.tools:
        fn = found.get(tool.name)
        if fn is None:
            continue
        line = positions[fn].start.line
        where = f"{line}: tool {mad.name}.{tool.name}"
        if fn.asynchronous is None:
            problems.append(f"{where} must be `async def`")
        params = list(fn.params.params)
        if not params or params[0].name.value != "self":
            problems.append(f"{where} must be a method taking self first")
            continue
        got = [p.name.value for p in params[1:]] + [p.name.value for p in fn.params.kwonly_params]
        want = list(tool.params)
        if got != want:
            problems.append(f"{where} has parameters ({', '.join(got)}), spec says ({', '.join(want)})")
            continue
        for p in params[1:] + list(fn.params.kwonly_params):
            spec_param = tool.params[p.name.value]
            annotation = _code(p.annotation.annotation) if p.annotation else None
            if annotation != spec_param.type:
                problems.append(f"{where}: parameter {p.name.value} is {annotation}, spec says {spec_param.type}")
            if spec_param.optional != (p.default is not None):
                expected = f"default {spec_param.default!r}" if spec_param.optional else "no default"
                problems.append(f"{where}: parameter {p.name.value} must have {expected}")
            elif p.default is not None:
                try:
                    value = python_ast.literal_eval(cst.Module(body=[]).code_for_node(p.default))
                except ValueError:
                    value = object()
                if value != spec_param.default:
                    problems.append(
                        f"{where}: parameter {p.name.value} defaults to "
                        f"{_code(p.default)}, spec says {spec_param.default!r}"
                    )
        returns = _code(fn.returns.annotation) if fn.returns else "None"
        if returns != tool.returns:
            problems.append(f"{where} returns {returns}, spec says {tool.returns}")
    return problems
