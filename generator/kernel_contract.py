"""The kernel as the compiler sees it: read from its own sources, in this one place.

The kernel (`generator/kernel/`) is the runtime every ecosystem is built on. The compiler
needs five things of it and reads them here only: the files copied into each artifact, the
names a MAD class reserves, the tables the kernel creates, the API text the senior is
shown, and `api_hash`, the hash of that API. A unit is written against the API, not the
implementation: a change inside the kernel that keeps its API regenerates no unit (the
files are still copied fresh, and the sandbox still tests every build).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from . import python_ast
from .hashing import files_under, json_hash

KERNEL_DIR = Path(__file__).parent / "kernel"
# The test harness every artifact's tests use: regen's own file, copied with the kernel, but into the tests.
HARNESS = Path(__file__).parent / "harness.py"
HARNESS_PATH = "tests/harness.py"
# The kernel classes generated code programs against, by source file.
API_CLASSES = (("mad.py", "Mad"), ("packs/storage/pack.py", "TableStore"))
# What an ecosystem needs at run time whatever its packs, pinned: regen init's starter lists these. httpx is no
# longer the core's (the web and openai packs import it) but its generated tests use it.
RUNTIME_DEPENDENCIES = (
    "mcp==2.3.0",
    "cryptography==48.0.0",
    "uvicorn==0.54.0",
    "httpx==0.28.1",
    "prometheus-client==0.26.0",
)
TEST_DEPENDENCIES = ("pytest==9.0.3",)


def kernel_folder(package: str) -> str:
    """Where the kernel lands inside an artifact's src/: `<package>/kernel/`."""
    return f"{package}/kernel/"


PACKS_FOLDER = "packs/"


def packs_in(src_paths: Iterable[str]) -> set[str]:
    """The packs an artifact carries, read from its paths inside src/ (`<package>/kernel/packs/<name>/...`); the
    console too for a build from before the web console was a pack (its kernel had `grace.py`)."""
    found = set()
    for path in src_paths:
        rel = path.removeprefix(kernel_folder(path.split("/", 1)[0]))
        if rel == path:
            continue  # not the kernel's
        if rel.startswith(PACKS_FOLDER) and rel.count("/") > 1:
            found.add(rel.split("/")[1])
        elif rel == "grace.py":
            found.add("console")
    return found


def kernel_test_file(rel: str) -> bool:
    """Whether `rel` (a path inside generator/kernel/) is one of regen's tests of the kernel, not the kernel: a
    pack's tests (packs/<name>/tests/) or a conftest.py. Those stay in regen: never copied into an artifact,
    never scanned as kernel code, never an input of a build (a test-only change makes no new version)."""
    parts = rel.split("/")
    return "tests" in parts[:-1] or parts[-1] == "conftest.py"


def kernel_sources() -> dict[str, Path]:
    """The kernel's own files, core and every pack, by path inside generator/kernel/: no bytecode, no tests."""
    return {rel: path for rel, path in files_under(KERNEL_DIR, skip_bytecode=True).items()
            if not kernel_test_file(rel)}


def kernel_files(package: str, packs: Iterable[str] = ()) -> dict[str, bytes]:
    """The kernel's files as they go into src/, by path inside src/: the core, and of the packs' folders
    (kernel/packs/<name>/) only those in `packs`; an artifact carries no code, and no catalogue, of a pack it
    does not use, and no test of regen's. And the test harness, at `tests/harness.py`."""
    wanted = tuple(f"{PACKS_FOLDER}{name}/" for name in packs)
    return {kernel_folder(package) + rel: path.read_bytes()
            for rel, path in kernel_sources().items()
            if not rel.startswith(PACKS_FOLDER) or rel == f"{PACKS_FOLDER}__init__.py" or rel.startswith(wanted)
            } | {HARNESS_PATH: HARNESS.read_bytes()}


@functools.cache
def kernel_digests() -> frozenset[str]:
    """The sha256 of each Python file of this regen's kernel, core and packs, and of its test harness: an artifact
    carries them byte for byte, so a file with one of these digests is regen's own, not generated."""
    return frozenset(hashlib.sha256(path.read_bytes()).hexdigest()
                     for path in [*(p for rel, p in kernel_sources().items() if rel.endswith(".py")), HARNESS])


def pack_dependencies(packs: Iterable[str]) -> tuple[str, ...]:
    """The pinned packages the given capability packs need, beside RUNTIME_DEPENDENCIES."""
    from .kernel.capabilities import PACKS

    return tuple(sorted({dep for name in packs for dep in PACKS[name].dependencies}))


@functools.cache
def pack_settings(name: str) -> dict[str, type]:
    """The settings pack `name` takes, with the type of each default: the keys of the `DEFAULTS` dict its
    implementation (packs/<name>/pack.py) defines, read from its source (the compiler never imports a pack's
    implementation: its libraries may not be installed)."""
    tree = python_ast.parse((KERNEL_DIR / PACKS_FOLDER / name / "pack.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id == "DEFAULTS" and isinstance(node.value, ast.Dict):
            return {key.value: _literal_type(value) for key, value in zip(node.value.keys, node.value.values, strict=True)
                    if isinstance(key, ast.Constant) and isinstance(key.value, str)}
    return {}


def _literal_type(node: ast.expr) -> type:
    """The type of a default as written: a constant's, int for integer arithmetic (64 << 20), list or dict."""
    if isinstance(node, ast.Constant):
        return type(node.value)
    if isinstance(node, ast.BinOp):
        return int
    return {ast.List: list, ast.Tuple: list, ast.Dict: dict}.get(type(node), object)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """`- `async def name(args) -> returns`: the docstring's first paragraph`, as the senior's prompt lists it."""
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    doc = (ast.get_docstring(node) or "").strip().split("\n\n")[0].replace("\n", " ")
    return f"- `{prefix} {node.name}({ast.unparse(node.args)}){returns}`" + (f": {doc}" if doc else "")


def _class_api(cls: ast.ClassDef) -> list[str]:
    """A class's first docstring line, then its public methods."""
    return [f"`{cls.name}`: {(ast.get_docstring(cls) or '').splitlines()[0]}"] + [
        _signature(node) for node in cls.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_")]


@functools.cache
def api_text() -> str:
    """The public API generated code is written against, as the senior's prompt shows it: the kernel's MAD-facing
    classes, then the test harness every artifact's tests import (its public functions and classes)."""
    lines = []
    for filename, class_name in API_CLASSES:
        tree = python_ast.parse((KERNEL_DIR / filename).read_text(encoding="utf-8"))
        lines += _class_api(next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name))
    lines += ["", f"The test harness (`{HARNESS_PATH}`, already present: do not write it; tests import it as "
              "`harness`, e.g. `from harness import running_ecosystem`):", ""]
    for node in python_ast.parse(HARNESS.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            lines += _class_api(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            lines.append(_signature(node))
    return "\n".join(lines)


@functools.cache
def api_hash(packs: frozenset[str] = frozenset()) -> str:
    """What a unit was written against: the API text, the capability catalogue of the core and of the given
    packs (a pack another spec uses changes nothing here), the grants and reserved names."""
    from .kernel.capabilities import ALWAYS_GRANTED, available

    catalogue = {name: {"summary": c.summary, "returns": c.returns,
                        "params": [[p.name, p.type, p.required, repr(p.default)] for p in c.params]}
                 for name, c in sorted(available(packs).items())}
    return json_hash({"api": api_text(), "capabilities": catalogue, "always_granted": sorted(ALWAYS_GRANTED),
                      "reserved": sorted(reserved_names())})


@functools.cache
def reserved_names() -> frozenset[str]:
    """Every name a tool method would override or shadow in a generated MAD class.

    That is each name bound in the body of `class Mad` (methods, properties, class
    attributes), each `self.<name>` the class assigns, and the public names mad.py
    defines at module level (generated modules import `tool` from it).
    """
    tree = python_ast.parse((KERNEL_DIR / "mad.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    mad_class = None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Mad":
            mad_class = node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            names.add(node.name)
    if mad_class is None:
        raise RuntimeError(f"{KERNEL_DIR / 'mad.py'} defines no class Mad; the kernel is broken")
    for node in mad_class.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    for node in ast.walk(mad_class):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names.update(target.attr for target in targets if isinstance(target, ast.Attribute)
                     and isinstance(target.value, ast.Name) and target.value.id == "self")
    return frozenset(names)


_CREATE_TABLE = re.compile(
    r"CREATE\s+(?P<virtual>VIRTUAL\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:\w+\.)?(?P<name>[A-Za-z_]\w*)"
    # a column list follows (or an f-string's {columns}), or a module: not prose
    r"(?:\s+USING\s+(?P<module>\w+)|(?=\s*[({]))",
    re.IGNORECASE,
)
# The tables SQLite itself creates for an FTS5 virtual table `t`: t_data, t_idx, ...
_FTS5_SHADOWS = ("data", "idx", "content", "docsize", "config")


@functools.cache
def kernel_tables() -> dict[str, str]:
    """SQL table name -> the kernel file creating it (with the shadow tables of FTS5 ones)."""
    tables: dict[str, str] = {}
    for rel, path in kernel_sources().items():
        if not rel.endswith(".py"):
            continue
        for match in _CREATE_TABLE.finditer(path.read_text(encoding="utf-8")):
            name, where = match["name"], f"kernel/{rel}"
            tables.setdefault(name, where)
            if match["virtual"] and (match["module"] or "").lower() == "fts5":
                for suffix in _FTS5_SHADOWS:
                    tables.setdefault(f"{name}_{suffix}", where)
    return tables
