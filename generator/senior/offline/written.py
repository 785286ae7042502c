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
import builtins
import functools
import symtable
from collections.abc import Mapping
from pathlib import Path

import libcst as cst

from ... import python_ast
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


@functools.lru_cache(maxsize=4096)
def _tree(code: str) -> ast.Module:
    """The statement's code as an ast (each statement is looked at many times while a tool is lifted: parsed once)."""
    try:
        return python_ast.parse(code)
    except SyntaxError:
        return ast.Module(body=[], type_ignores=[])


def _ast(node: cst.CSTNode) -> ast.Module:
    return _tree(_code(node))


def _names_used(node: cst.CSTNode) -> set[str]:
    """Every bare name read in `node` (a superset is harmless: only module-level names are looked up)."""
    return {n.id for n in ast.walk(_ast(node)) if isinstance(n, ast.Name)}


def _self_attributes(node: cst.CSTNode, class_name: str = "") -> set[str]:
    """The attributes `node` reads of its class: `self.x`, `cls.x`, `ClassName.x`, and `@x.setter` of a property."""
    return {n.attr if n.value.id in ("self", "cls", class_name) else n.value.id for n in ast.walk(_ast(node))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and (n.value.id in ("self", "cls", class_name) or n.attr in ("setter", "deleter", "getter"))}


def _strings(node: cst.CSTNode) -> set[str]:
    return {n.value for n in ast.walk(_ast(node)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _bound(statement: cst.CSTNode) -> set[str]:
    """The names a statement binds where it stands (a compound one, such as `try: import x` or `if ...:`, binds
    what its blocks bind; a function or class binds its own name, not what is inside it)."""
    return _ast_bound(_ast(statement).body)


def _ast_bound(body: list[ast.stmt]) -> set[str]:
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        else:  # if / try / with / for at the top level: what their blocks bind
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []) or []:
                    names |= _ast_bound(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return names


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


# Class attributes the templates write from the spec: a lifted tool never brings its own.
TEMPLATE_ATTRIBUTES = frozenset({"name", "role", "level", "lifecycle", "conversations", "talks_to", "secrets", "owns",
                                 "budget_tokens", "storage", "imperator_model", "imperator_prompt", "spawns",
                                 "max_instances", "task_timeout_s"})


def _member_names(statement: cst.CSTNode) -> set[str]:
    return _bound(statement) if not isinstance(statement, cst.FunctionDef) else {statement.name.value}


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
    members = list(classes[0].body.body)
    tools = {s.name.value for s in members if isinstance(s, cst.FunctionDef) and _is_tool(s)}
    if tool not in tools:
        raise LiftError(f"class {class_name} has no @tool method {tool}")
    # What the tool reaches of its class (self.x, cls.x, Class.x), transitively: methods (a property's getter and
    # setter alike), class attributes and nested classes; never another tool, nor what the template writes.
    wanted = {tool}
    queue = [tool]
    while queue:
        name = queue.pop()
        for member in members:
            if name in _member_names(member):
                reached = _self_attributes(member, class_name) | (_names_used(member) & _class_names(members))
                for attribute in sorted(reached - wanted - tools - TEMPLATE_ATTRIBUTES):
                    if any(attribute in _member_names(m) for m in members):
                        wanted.add(attribute)
                        queue.append(attribute)
    chosen = [m for m in members if _member_names(m) & wanted and not (_member_names(m) & TEMPLATE_ATTRIBUTES)]
    imports, helpers = _closure(module, chosen, skip={class_name})
    written_methods = tuple(_code(_clean(m)) for m in chosen)
    tests_module = _parse(tests_source, f"the tests of {mad}") if tests_source.strip() else cst.Module(body=[])
    constants = {name for s in tests_module.body if isinstance(s, cst.SimpleStatementLine)
                 for name in _bound(s) if qualified in _strings(s)}
    tests = [s for s in _test_definitions(tests_module) if s.name.value not in template_tests
             and (qualified in _strings(s) or _names_used(s) & constants)]
    written = WrittenTool(imports=tuple(imports), helpers=tuple(helpers), methods=written_methods,
                          **_tests_with_what_they_use(tests_module, tests))
    _require_whole(written, class_name)
    return written


def _test_definitions(tests_module: cst.Module) -> list[cst.FunctionDef | cst.ClassDef]:
    return [s for s in tests_module.body if isinstance(s, (cst.FunctionDef, cst.ClassDef))
            and s.name.value.startswith(("test", "Test"))]


def _tests_with_what_they_use(tests_module: cst.Module, tests: list[cst.CSTNode]) -> dict[str, tuple[str, ...]]:
    """`tests` with the imports, helpers and fixtures of their module that they use: WrittenTool's test fields."""
    fixtures = {p.name.value for t in tests if isinstance(t, cst.FunctionDef) for p in t.params.params}
    test_roots = [*tests, *(s for s in tests_module.body if isinstance(s, cst.FunctionDef) and s.name.value in fixtures)]
    test_imports, test_helpers = _closure(tests_module, test_roots, skip={t.name.value for t in tests})
    fixture_defs = [_code(_clean(s)) for s in tests_module.body
                    if isinstance(s, cst.FunctionDef) and s.name.value in fixtures and _code(_clean(s)) not in test_helpers]
    return {"test_imports": tuple(test_imports), "test_helpers": tuple([*test_helpers, *fixture_defs]),
            "tests": tuple(_code(_clean(t)) for t in tests)}


def _class_names(members: list[cst.CSTNode]) -> set[str]:
    return {name for m in members if not isinstance(m, cst.FunctionDef) for name in _member_names(m)}


def _require_whole(written: WrittenTool, class_name: str) -> None:
    """A LiftError naming every name the lifted code reads that nothing lifted (nor a builtin, nor the template)
    defines: a tool is carried whole or not at all."""
    body = "".join(f"    {line}\n" if line else "\n" for m in written.methods for line in m.splitlines())
    module = "\n".join([*written.imports, *written.helpers, f"class {class_name}(Mad):\n{body or '    pass'}"])
    missing = _free_names(module) - {"Mad", "tool", class_name}
    tests = "\n".join([*written.test_imports, *written.test_helpers, *written.tests])
    missing |= _free_names(tests)
    if missing:
        raise LiftError(f"its code reads {', '.join(sorted(missing))}, which its recorded module defines in a way "
                        "regen cannot take along")


def _free_names(code: str) -> set[str]:
    """Names `code` reads at module level or in its functions that it never binds, builtins aside."""
    try:
        table = symtable.symtable(code, "lifted", "exec")
    except SyntaxError as exc:
        raise LiftError(f"its code does not compile once lifted: line {exc.lineno}: {exc.msg}") from None
    bound = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    read: set[str] = set()
    pending = [table]
    while pending:
        scope = pending.pop()
        pending.extend(scope.get_children())
        for symbol in scope.get_symbols():
            if not symbol.is_referenced():
                continue
            if scope is table or symbol.is_global() or (scope.get_type() == "class" and not (
                    symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace())):
                read.add(symbol.get_name())
    return read - bound - set(dir(builtins))


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
        written[name] = WrittenTool(imports=tuple(imports), helpers=tuple(helpers), methods=(_code(_clean(functions[0])),),
                                    **_tests_with_what_they_use(tests_module, _test_definitions(tests_module)))
    return written


# --- splicing ------------------------------------------------------------------------------------------------


def _statements(code: str) -> list[cst.BaseStatement]:
    return list(cst.parse_module(code).body)


def _spaced(statements: list[cst.BaseStatement], blank_lines: int) -> list[cst.BaseStatement]:
    blank = cst.EmptyLine(indent=False)
    return [s.with_changes(leading_lines=[blank] * blank_lines + list(s.leading_lines)) for s in statements]


def _is_relative(statement: cst.BaseStatement) -> bool:
    return any(isinstance(s, cst.ImportFrom) and s.relative for s in statement.body)


class SpliceConflict(ValueError):
    """Two parts to be put in one file bind the same name with different code."""


def _owners(statements: list[cst.BaseStatement], owner: str) -> dict[str, tuple[str, str]]:
    return {name: (_code(_clean(s)), owner) for s in statements for name in _member_names(s)}


def _claim(taken: dict[str, tuple[str, str]], code: str, owner: str, where: str) -> bool:
    """Record that `owner` puts `code` into `where`; False when it is there already. A SpliceConflict when a name it
    binds is taken, by the template or another tool, with other code."""
    statements = _statements(code)
    if any(taken.get(name, ("", ""))[0] == code for s in statements for name in _member_names(s)):
        return False
    for statement in statements:
        for name in _member_names(statement):
            if name in taken and taken[name][1] != owner and taken[name][0] != code:
                raise SpliceConflict(f"{owner} and {taken[name][1]} both define {name} in {where}, differently")
    taken |= _owners(statements, owner)
    return True


def _insert_imports(module: cst.Module, imports: list[tuple[str, str]], where: str) -> cst.Module:
    """Add the import statements `module` does not have: absolute ones before its first relative import (a
    group of their own), relative ones after its last import."""
    taken = _owners([s for s in module.body if _is_import(s)], "the template")
    absolute, relative = [], []
    for owner, code in imports:
        if _claim(taken, code, owner, where):
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


def _insert_helpers(module: cst.Module, helpers: list[tuple[str, str]], before: int, where: str) -> cst.Module:
    taken = _owners(list(module.body), "the template")
    new = [s for owner, code in helpers if _claim(taken, code, owner, where) for s in _spaced(_statements(code), 2)]
    body = list(module.body)
    return module.with_changes(body=body[:before] + new + body[before:])


def _parts(written: Mapping[str, WrittenTool], field: str) -> list[tuple[str, str]]:
    return [(name, code) for name, w in written.items() for code in getattr(w, field)]


def splice_module(source: str, class_name: str, tool_order: list[str], written: Mapping[str, WrittenTool],
                  where: str = "the module") -> str:
    """The MAD's module with every written tool (by qualified name) put in: methods in the spec's order, helpers,
    imports; a SpliceConflict when two of them, or one and the template, define a name differently."""
    module = cst.parse_module(source)
    module = _insert_imports(module, _parts(written, "imports"), where)
    index = next(i for i, s in enumerate(module.body) if isinstance(s, cst.ClassDef) and s.name.value == class_name)
    module = _insert_helpers(module, _parts(written, "helpers"), index, where)
    index = next(i for i, s in enumerate(module.body) if isinstance(s, cst.ClassDef) and s.name.value == class_name)
    cls = module.body[index]
    members = list(cls.body.body)
    taken = _owners(members, "the template")
    for tool in tool_order:
        qualified = next((name for name in written if name.split(".", 1)[-1] == tool), None)
        if qualified is None:
            continue
        later = tool_order[tool_order.index(tool) + 1:]
        at = next((i for i, s in enumerate(members) if isinstance(s, cst.FunctionDef) and s.name.value in later),
                  len(members))
        new = [s for code in written[qualified].methods if _claim(taken, code, qualified, f"class {class_name}")
               for s in _spaced(_statements(code), 1)]
        members[at:at] = new
    cls = cls.with_changes(body=cls.body.with_changes(body=members))
    return module.with_changes(body=[*module.body[:index], cls, *module.body[index + 1:]]).code


def splice_tests(source: str, written: Mapping[str, WrittenTool], where: str = "the tests") -> str:
    """The MAD's test file with the tests of every written tool appended, their imports and helpers added."""
    module = cst.parse_module(source)
    module = _insert_imports(module, _parts(written, "test_imports"), where)
    module = _insert_helpers(module, _parts(written, "test_helpers"), len(module.body), where)
    taken = _owners(list(module.body), "the template")
    tests = [s for owner, code in _parts(written, "tests") if _claim(taken, code, owner, where)
             for s in _spaced(_statements(code), 2)]
    return module.with_changes(body=[*module.body, *tests]).code
