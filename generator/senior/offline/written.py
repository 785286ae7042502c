"""Tools written outside the templates: lifted from a model's answer, and spliced into the offline senior's.

A `WrittenTool` is one model-written tool with everything it needs to live in another answer
of the same unit: the `@tool` method, the private methods and module-level helpers it uses,
the imports those need, and the tests that exercise it (with their own helpers and imports).
`lift` takes it out of a MAD unit's answer with libcst; `splice` puts it into the module and
test file the offline reference rendered for the tools bound to kernel capabilities: the
method at its place in the spec's order, helpers beside it, imports among the imports, tests
at the end. Whatever is already there (an import, a helper of the same code) is not added twice.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import libcst as cst

from ...frozen import Frozen

TEMPLATE_IMPORTS = ("__future__",)  # the rendered module starts with these already


class WrittenTool(Frozen):
    """One tool written by a model, as code to splice; every part is whole statements, dedented."""

    imports: tuple[str, ...] = ()
    helpers: tuple[str, ...] = ()
    methods: tuple[str, ...]
    """The `@tool` method first, then the private methods of its class it calls."""
    test_imports: tuple[str, ...] = ()
    test_helpers: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()

    @property
    def code(self) -> str:
        """The tool's own code (imports, helpers, methods), as hashed into the manifest."""
        return "\n".join([*self.imports, *self.helpers, *self.methods])

    @property
    def test_code(self) -> str:
        return "\n".join([*self.test_imports, *self.test_helpers, *self.tests])


class LiftError(ValueError):
    """The recorded answer does not hold the tool in a form that can be lifted."""


_EMPTY = cst.Module(body=[])


def _code(node: cst.CSTNode) -> str:
    return _EMPTY.code_for_node(node).strip("\n") + "\n"


def _clean(node: cst.CSTNode) -> cst.CSTNode:
    """The node without the blank lines above it (comments above it stay)."""
    if hasattr(node, "leading_lines"):
        return node.with_changes(leading_lines=[line for line in node.leading_lines if line.comment is not None])
    return node


def _parse(source: str, where: str) -> cst.Module:
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise LiftError(f"{where} does not parse: line {exc.raw_line}: {exc.message}") from None


def _names_used(node: cst.CSTNode) -> set[str]:
    """Every bare name read in `node` (a superset is harmless: only module-level names are looked up)."""
    try:
        tree = ast.parse(_code(node))
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _self_attributes(node: cst.CSTNode) -> set[str]:
    try:
        tree = ast.parse(_code(node))
    except SyntaxError:
        return set()
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")}


def _strings(node: cst.CSTNode) -> set[str]:
    try:
        tree = ast.parse(_code(node))
    except SyntaxError:
        return set()
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _bound(statement: cst.CSTNode) -> set[str]:
    """The module-level names a top-level statement binds."""
    if isinstance(statement, (cst.FunctionDef, cst.ClassDef)):
        return {statement.name.value}
    if isinstance(statement, cst.SimpleStatementLine):
        names: set[str] = set()
        for small in statement.body:
            if isinstance(small, cst.Import):
                for alias in small.names:
                    target = alias.asname.name if alias.asname else alias.name
                    names.add(_EMPTY.code_for_node(target).split(".")[0])
            elif isinstance(small, cst.ImportFrom) and not isinstance(small.names, cst.ImportStar):
                for alias in small.names:
                    names.add(_EMPTY.code_for_node(alias.asname.name if alias.asname else alias.name))
            elif isinstance(small, (cst.Assign, cst.AnnAssign)):
                targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
                for target in targets:
                    names |= {n.value for n in _walk_names(target)}
        return names
    return set()


def _walk_names(node: cst.CSTNode) -> Iterable[cst.Name]:
    if isinstance(node, cst.Name):
        yield node
    for child in node.children:
        yield from _walk_names(child)


def _is_import(statement: cst.CSTNode) -> bool:
    return isinstance(statement, cst.SimpleStatementLine) and all(
        isinstance(s, (cst.Import, cst.ImportFrom)) for s in statement.body)


def _is_template_import(statement: cst.CSTNode) -> bool:
    """`from __future__ ...` and the kernel's own `Mad`/`tool`: the rendered module has them already."""
    small = statement.body[0]
    if isinstance(small, cst.ImportFrom) and small.module is not None:
        module = _EMPTY.code_for_node(small.module)
        if module in TEMPLATE_IMPORTS:
            return True
        if module.split(".")[-1] == "kernel" and not isinstance(small.names, cst.ImportStar):
            return {_EMPTY.code_for_node(a.name) for a in small.names} <= {"Mad", "tool"}
    return False


def _closure(module: cst.Module, roots: list[cst.CSTNode], skip: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """The module-level imports and definitions `roots` use, transitively, in the module's own order."""
    top = [s for s in module.body]
    binds = {name: s for s in top for name in _bound(s)}
    wanted: set[int] = set()
    pending = [n for root in roots for n in _names_used(root)]
    while pending:
        name = pending.pop()
        statement = binds.get(name)
        if statement is None or id(statement) in wanted or name in skip:
            continue
        wanted.add(id(statement))
        if not _is_import(statement):
            pending.extend(_names_used(statement))
    imports = [_code(_clean(s)) for s in top if id(s) in wanted and _is_import(s) and not _is_template_import(s)]
    helpers = [_code(_clean(s)) for s in top if id(s) in wanted and not _is_import(s)]
    return imports, helpers


def _is_tool(fn: cst.FunctionDef) -> bool:
    for decorator in fn.decorators:
        target = decorator.decorator.func if isinstance(decorator.decorator, cst.Call) else decorator.decorator
        if _EMPTY.code_for_node(target).split(".")[-1] == "tool":
            return True
    return False


def lift(tool: str, mad: str, class_name: str, module_source: str, tests_source: str,
         template_tests: set[str] = frozenset()) -> WrittenTool:
    """`mad.tool` out of a MAD unit's module and test file; LiftError when it is not there whole.

    `template_tests` are the test functions the offline templates write themselves (for the tools
    bound to capabilities): a recorded test of that name is left to the template."""
    qualified = f"{mad}.{tool}"
    module = _parse(module_source, f"the module of {mad}")
    classes = [s for s in module.body if isinstance(s, cst.ClassDef) and s.name.value == class_name]
    if not classes:
        raise LiftError(f"the module of {mad} has no class {class_name}")
    members = {s.name.value: s for s in classes[0].body.body if isinstance(s, cst.FunctionDef)}
    method = members.get(tool)
    if method is None or not _is_tool(method):
        raise LiftError(f"class {class_name} has no @tool method {tool}")
    # Private methods of the class the tool calls (self._helper()), transitively; never another tool.
    methods, queue = [method], [method]
    while queue:
        for attribute in sorted(_self_attributes(queue.pop())):
            helper = members.get(attribute)
            if helper is not None and helper not in methods and not _is_tool(helper) and attribute.startswith("_"):
                methods.append(helper)
                queue.append(helper)
    imports, helpers = _closure(module, methods, skip={class_name})
    tests_module = _parse(tests_source, f"the tests of {mad}") if tests_source.strip() else cst.Module(body=[])
    constants = {name for s in tests_module.body if isinstance(s, cst.SimpleStatementLine)
                 for name in _bound(s) if qualified in _strings(s)}
    tests = [s for s in tests_module.body if isinstance(s, (cst.FunctionDef, cst.ClassDef))
             and s.name.value.startswith(("test", "Test")) and s.name.value not in template_tests
             and (qualified in _strings(s) or _names_used(s) & constants)]
    fixtures = {p.name.value for t in tests if isinstance(t, cst.FunctionDef) for p in t.params.params}
    test_roots = [*tests, *(s for s in tests_module.body if isinstance(s, cst.FunctionDef) and s.name.value in fixtures)]
    test_imports, test_helpers = _closure(tests_module, test_roots, skip={t.name.value for t in tests})
    fixture_defs = [_code(_clean(s)) for s in tests_module.body
                    if isinstance(s, cst.FunctionDef) and s.name.value in fixtures and _code(_clean(s)) not in test_helpers]
    return WrittenTool(
        imports=tuple(imports), helpers=tuple(helpers), methods=tuple(_code(_clean(m)) for m in methods),
        test_imports=tuple(test_imports), test_helpers=tuple([*test_helpers, *fixture_defs]),
        tests=tuple(_code(_clean(t)) for t in tests),
    )


def load_written(folder: Path) -> dict[str, WrittenTool]:
    """Written tools by `<mad>.<tool>`, from `folder/<mad>.<tool>.py` (imports, helpers, the `@tool` function)
    and `.test.py` beside it: how the scripted senior is given what a model would write."""
    written = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.endswith(".test.py"):
            continue
        name = path.name.removesuffix(".py")
        module = _parse(path.read_text(encoding="utf-8"), str(path))
        functions = [s for s in module.body if isinstance(s, cst.FunctionDef) and _is_tool(s)]
        if len(functions) != 1:
            raise LiftError(f"{path}: expected one @tool function, found {len(functions)}")
        imports, helpers = _closure(module, functions)
        tests_path = path.with_name(f"{name}.test.py")
        tests_module = _parse(tests_path.read_text(encoding="utf-8"), str(tests_path)) if tests_path.exists() \
            else cst.Module(body=[])
        tests = [s for s in tests_module.body if isinstance(s, (cst.FunctionDef, cst.ClassDef))
                 and s.name.value.startswith(("test", "Test"))]
        test_imports, test_helpers = _closure(tests_module, tests, skip={t.name.value for t in tests})
        written[name] = WrittenTool(imports=tuple(imports), helpers=tuple(helpers),
                                    methods=(_code(_clean(functions[0])),), test_imports=tuple(test_imports),
                                    test_helpers=tuple(test_helpers), tests=tuple(_code(_clean(t)) for t in tests))
    return written


# --- splicing ------------------------------------------------------------------------------------------------


def _statements(code: str) -> list[cst.BaseStatement]:
    return list(cst.parse_module(code).body)


def _spaced(statements: list[cst.BaseStatement], blank_lines: int) -> list[cst.BaseStatement]:
    blank = cst.EmptyLine(indent=False)
    return [s.with_changes(leading_lines=[blank] * blank_lines + list(s.leading_lines)) for s in statements]


def _is_relative(statement: cst.BaseStatement) -> bool:
    return any(isinstance(s, cst.ImportFrom) and s.relative for s in statement.body)


def _insert_imports(module: cst.Module, imports: list[str]) -> cst.Module:
    """Add the import statements `module` does not have: absolute ones before its first relative import (a
    group of their own), relative ones after its last import."""
    present = {_code(_clean(s)) for s in module.body if _is_import(s)}
    absolute, relative = [], []
    for code in imports:
        if code not in present:
            present.add(code)
            for statement in _statements(code):
                (relative if _is_relative(statement) else absolute).append(statement)
    body = list(module.body)
    if absolute:
        at = next((i for i, s in enumerate(body) if _is_import(s) and _is_relative(s)), None)
        if at is None:
            at = max((i + 1 for i, s in enumerate(body) if _is_import(s)), default=_after_docstring(body))
            group = _spaced(absolute[:1], 1) + absolute[1:] if at == _after_docstring(body) else absolute
        else:
            group = _spaced(absolute[:1], 1) + absolute[1:] if at and not _is_relative(body[at - 1]) else absolute
        body[at:at] = group
    if relative:
        at = max((i + 1 for i, s in enumerate(body) if _is_import(s)), default=_after_docstring(body))
        body[at:at] = relative
    return module.with_changes(body=body)


def _after_docstring(body: list[cst.BaseStatement]) -> int:
    docstring = body and isinstance(body[0], cst.SimpleStatementLine) and isinstance(body[0].body[0], cst.Expr) \
        and isinstance(body[0].body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    return 1 if docstring else 0


def _insert_helpers(module: cst.Module, helpers: list[str], before: int) -> cst.Module:
    present = {_code(_clean(s)) for s in module.body}
    new = [s for code in helpers if code not in present for s in _spaced(_statements(code), 2)]
    body = list(module.body)
    return module.with_changes(body=body[:before] + new + body[before:])


def splice_module(source: str, class_name: str, tool_order: list[str], written: Mapping[str, WrittenTool]) -> str:
    """The MAD's module with every written tool put in: methods in the spec's order, helpers, imports."""
    module = cst.parse_module(source)
    module = _insert_imports(module, [code for w in written.values() for code in w.imports])
    index = next(i for i, s in enumerate(module.body) if isinstance(s, cst.ClassDef) and s.name.value == class_name)
    module = _insert_helpers(module, [code for w in written.values() for code in w.helpers], index)
    index = next(i for i, s in enumerate(module.body) if isinstance(s, cst.ClassDef) and s.name.value == class_name)
    cls = module.body[index]
    members = list(cls.body.body)
    for tool in tool_order:
        if tool not in written:
            continue
        later = tool_order[tool_order.index(tool) + 1:]
        at = next((i for i, s in enumerate(members) if isinstance(s, cst.FunctionDef) and s.name.value in later),
                  len(members))
        present = {_code(_clean(s)) for s in members}
        new = [s for code in written[tool].methods if code not in present for s in _spaced(_statements(code), 1)]
        members[at:at] = new
    cls = cls.with_changes(body=cls.body.with_changes(body=members))
    return module.with_changes(body=[*module.body[:index], cls, *module.body[index + 1:]]).code


def splice_tests(source: str, written: Mapping[str, WrittenTool]) -> str:
    """The MAD's test file with the tests of every written tool appended, their imports and helpers added."""
    module = cst.parse_module(source)
    module = _insert_imports(module, [code for w in written.values() for code in w.test_imports])
    module = _insert_helpers(module, [code for w in written.values() for code in w.test_helpers], len(module.body))
    present = {_code(_clean(s)) for s in module.body}
    tests = [s for w in written.values() for code in w.tests if code not in present for s in _spaced(_statements(code), 2)]
    return module.with_changes(body=[*module.body, *tests]).code
