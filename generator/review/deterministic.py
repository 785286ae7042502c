"""The offline reviewers of a panel: checks that read the artifact and answer like any reviewer.

Each check returns a `VerdictAnswer` built the same way: `request_changes` when any finding
is critical or major, else `approve`. Findings name files relative to the artifact folder
(`src/madgroup/mads/turing.py`, `tests.json`) and are sorted by (file, line, rule), so the
same artifact always gives byte-identical answers: no timestamps, no absolute paths.

tests         the sandbox results in tests.json (`subject.material.tests`)
              failing-test (critical)    a failed or errored test, at its `def`
              no-tests (critical)        no test passed, or no readable results
              test-run-failed (critical) pytest exited non-zero with no failing test
              weak-sandbox (minor)       the tests ran under less than bubblewrap
              uncovered-requirement (major) a requirement of spec/requirements.md with an id that no
                                         passing test names (@pytest.mark.requirement), at its line
              unknown-requirement (minor) a test names an id requirements.md does not have
              skipped-test (info)        a skipped test
    options:  require_level = "bubblewrap" | "unshare" | "none" (default "none"): a sandbox
              weaker than this makes weak-sandbox major.

static        every *.py under src/, read with libcst
              syntax-error (critical)    the file does not parse or does not compile
              secret-in-log (critical)   print(), sys.stdout/stderr.write() or a logger call whose
                                         arguments carry a secret's value (not its name)
              <principle id> (major)     a principle rule of the spec is broken
              forbidden-import (major)   an import from `forbid_imports` no principle covers
              forbidden-call (major)     a call from `forbid_calls` no principle covers
    options:  forbid_imports (default pickle, marshal, shelve, subprocess, telnetlib, ftplib)
              forbid_calls (default eval, exec, os.system, os.popen)
              exclude: globs (fnmatch; `*` crosses folders) of artifact paths left out of the
              principle and forbidden-import/call rules, never out of syntax-error or
              secret-in-log; a given list replaces the default. Default
              ["src/tests/harness.py", "src/*/kernel/testing.py", "src/*/kernel/packs/charts/pack.py",
              "src/*/kernel/packs/charts.py"]: the test harness starts the server, and the
              charts pack its renderer, with subprocess (kernel/testing.py: the harness in an
              artifact built before it moved to the tests; packs/charts.py: in one built before
              each pack was a folder).
              Generated tests are not excluded: the pipeline's own checks hold them to the
              principles before they are written, and so does the review.
              A principle's own finding is not repeated as forbidden-import/-call.

dependencies  src/pyproject.toml and src/uv.lock against the spec (and the parent's lock)
              no-pyproject (critical)    pyproject.toml is missing or does not parse
              no-lock (critical)         uv.lock is missing or does not parse
              undeclared-dependency (major), missing-dependency (major), pin-mismatch (major):
                                         pyproject's requirements differ from the spec's
              unpinned-dependency (major) a requirement not pinned exactly with ==
              non-registry-source (major) a locked package from git, a URL or a path
              unhashed-package (major)   a locked package without hashes on every file
              stale-lock (major)         uv.lock was locked for other requirements
              dependency-added/-removed/-changed (info): locked packages against the parent's
    options:  none.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider
from pydantic import ValidationError

from ..errors import UserError
from ..kernel_contract import kernel_digests
from ..sandbox.run import LEVELS, SandboxResult
from ..senior import check as senior_check
from ..senior.check import ModuleUses, dotted_name, module_uses, principle_violations
from ..spec.model import PINNED_REQUIREMENT, PrincipleRule
from ..user_cache import entry, keep_entry, read_entry
from .models import BLOCKING, SEVERITIES, Finding, Subject, VerdictAnswer
from .panel import check_options

DEFAULT_FORBID_IMPORTS = ("pickle", "marshal", "shelve", "subprocess", "telnetlib", "ftplib")
DEFAULT_FORBID_CALLS = ("eval", "exec", "os.system", "os.popen")
# The test harness starts the server, and the charts pack its renderer, as processes of their own
# (sys.executable, never a shell): the only subprocess imports regen puts in an artifact. (kernel/testing.py and
# packs/charts.py: where an artifact built before the harness moved, or before packs were folders, has them.)
DEFAULT_EXCLUDE = ("src/tests/harness.py", "src/*/kernel/testing.py", "src/*/kernel/packs/charts/pack.py",
                   "src/*/kernel/packs/charts.py")


def run_check(kind: str, subject: Subject, options: dict) -> VerdictAnswer:
    """Run the deterministic check `kind` on `subject`; `options` come from the reviewer's TOML."""
    check_options(kind, options)
    facts, findings = _CHECKS[kind](subject, options)
    return _answer(facts, findings)


def _answer(facts: str, findings: list[Finding]) -> VerdictAnswer:
    ordered = sorted(findings, key=lambda f: (f.file or "", f.line or 0, f.rule, f.message))
    blocking = any(f.severity in BLOCKING for f in ordered)
    summary = facts
    if ordered:
        counts = Counter((SEVERITIES.index(f.severity), f.severity, f.rule) for f in ordered)
        parts = [f"{n} {severity} {rule}" for (_, severity, rule), n in sorted(counts.items())]
        summary += f"; {len(ordered)} finding{'s' if len(ordered) > 1 else ''}: {', '.join(parts)}"
    return VerdictAnswer(decision="request_changes" if blocking else "approve", summary=summary, findings=ordered)


def _strings(kind: str, options: dict, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = options.get(key, default)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"option {key!r} of the {kind} check must be a list of strings, got {value!r}")
    return tuple(value)


def _line_of(text: str, pattern: str) -> int | None:
    """The 1-based line of the first match of `pattern` (multiline) in `text`."""
    match = re.search(pattern, text, re.MULTILINE)
    return text.count("\n", 0, match.start()) + 1 if match else None


# --- tests: the sandbox results ---------------------------------------------------------


def _locate_test(artifact: Path, test_id: str) -> tuple[str, int | None]:
    """`tests.test_grace::test_x[p]` -> (`src/tests/test_grace.py`, the line of `def test_x`)."""
    module, _, rest = test_id.partition("::")
    function = rest.split("::")[-1].split("[")[0]
    parts = module.split(".")
    # A test in a class has the class in its module part (tests.test_x.TestY): drop it to find the file.
    for end in range(len(parts), 0, -1):
        path = "src/" + "/".join(parts[:end]) + ".py"
        if (artifact / path).is_file():
            text = (artifact / path).read_text(encoding="utf-8", errors="replace")
            return path, _line_of(text, rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(function)}[ \t]*\(")
    return "src/" + module.replace(".", "/") + ".py", None


def _tests(subject: Subject, options: dict) -> tuple[str, list[Finding]]:
    require = options.get("require_level", "none")
    if require not in LEVELS:
        raise UserError(f"option 'require_level' of the tests check must be one of {', '.join(LEVELS)}, got {require!r}")
    try:
        result = SandboxResult.model_validate(subject.material.tests)
    except ValidationError as exc:
        problem = f"tests.json is missing or unreadable ({exc.error_count()} problems with its fields)"
        return "no sandbox results", [Finding(
            file="tests.json", severity="critical", rule="no-tests", message=problem,
            suggestion="Run the build's sandbox stage so tests.json records the ecosystem's own tests.",
        )]
    findings = []
    for test in result.tests:
        if test.outcome == "passed":
            continue
        file, line = _locate_test(subject.artifact, test.id)
        reason = test.message.strip().splitlines()[0] if test.message.strip() else ""
        if test.outcome == "skipped":
            findings.append(Finding(
                file=file, line=line, severity="info", rule="skipped-test",
                message=f"{test.id} was skipped" + (f": {reason}" if reason else ""),
                suggestion="Make the test run in the sandbox, or remove it if it tests nothing the spec asks for.",
            ))
            continue
        findings.append(Finding(
            file=file, line=line, severity="critical", rule="failing-test",
            message=f"{test.id} {'failed' if test.outcome == 'failed' else 'errored'}" + (f": {reason}" if reason else ""),
            suggestion=f"Fix the code until {test.id} passes in the sandbox; change the test only if it contradicts the spec.",
        ))
    if result.passed == 0:
        findings.append(Finding(
            file="tests.json", severity="critical", rule="no-tests", message="no test passed in the sandbox",
            suggestion="Write tests under src/tests/ that exercise every tool, and make them pass.",
        ))
    failing = result.failed or result.errors or any(f.rule == "failing-test" for f in findings)
    if result.exit_code != 0 and not failing:
        findings.append(Finding(
            file="tests.json", severity="critical", rule="test-run-failed",
            message=f"pytest exited with code {result.exit_code} but reported no failing test (see output_tail in tests.json)",
            suggestion="Fix what stops the test run itself: a collection error, a conftest crash, or a missing dependency.",
        ))
    if result.level != "bubblewrap":
        weaker = LEVELS.index(result.level) > LEVELS.index(require)
        findings.append(Finding(
            file="tests.json", severity="major" if weaker else "minor", rule="weak-sandbox",
            message=f"the tests ran in the '{result.level}' sandbox, not bubblewrap"
            + (f"; the panel requires '{require}'" if weaker else ""),
            suggestion="Install bubblewrap (apt-get install -y bubblewrap) on the build machine and rebuild.",
        ))
    findings += _requirement_findings(subject, result)
    counted = [f"{n} {label}" for n, label in
               ((result.failed, "failed"), (result.errors, "errors"), (result.skipped, "skipped")) if n]
    facts = f"{result.passed} tests passed" + "".join(f", {c}" for c in counted) + f" in the sandbox ({result.level})"
    return facts, findings


def _requirement_findings(subject: Subject, result: SandboxResult) -> list[Finding]:
    """A requirement no passing test names is a major finding at its line; a test naming an id that
    requirements.md does not have is a minor one at the test."""
    findings = []
    known = {r.id for r in subject.spec.requirement_items}
    for requirement in subject.spec.requirement_items:
        proofs = result.proving(requirement.id)
        if any(t.outcome == "passed" for t in proofs):
            continue
        named = (f"the tests that name it did not pass ({', '.join(t.id for t in proofs[:3])})" if proofs
                 else "no test names it")
        findings.append(Finding(
            file="spec/requirements.md", line=requirement.line, severity="major", rule="uncovered-requirement",
            message=f"requirement {requirement.id} is not proven by a passing test: {named}",
            suggestion=(f'Write a test that proves it, marked @pytest.mark.requirement("{requirement.id}"); with the '
                        f"offline senior, name {requirement.id} in the `requirements:` of the MAD whose tools prove it, "
                        "or in ecosystem.yaml's `acceptance:`, and its generated tests carry it."),
        ))
    for test in result.tests:
        for unknown in sorted(set(test.requirements) - known):
            file, line = _locate_test(subject.artifact, test.id)
            findings.append(Finding(
                file=file, line=line, severity="minor", rule="unknown-requirement",
                message=f"{test.id} names requirement {unknown!r}, which spec/requirements.md does not have",
                suggestion="Name an id of spec/requirements.md, or give the requirement that id.",
            ))
    return findings


# --- static: principles, forbidden imports and calls, secrets in logs -------------------

LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "log"})
# A logger's name ends in log/logger/logging: log, self.log, LOG, audit_logger, logging.
_LOGGER = re.compile(r"^_*(?:[a-z0-9]+_)*(?:log|logger|logging)$")
# Identifiers that hold a secret's value. Anchored at the end so that a secret's name or
# metadata (secret_name, api_key_secret_id, password_hash) and LLM tokens (token_count) are not.
_SECRET_VALUE = re.compile(
    r"(?:^|_)(?:secret|password|passwd|passphrase|credentials?|plaintext|bearer"
    r"|(?:api|secret|private|signing|encryption|access)_?key|(?:access|refresh|auth|bearer|session|api)_?token)(?:_value)?$"
)
# What a secret carries besides its value: reading these off a secret does not leak it.
_METADATA = re.compile(r"(?:^|_)(?:names?|ids?|versions?|at|ts|kind|type|len|length|size|count|ok|status)$")
# Functions whose result shows their arguments as they are. Any other function given a secret
# (len, a hash, a mask, an HTTP client) is not taken to return it.
_PASSES = frozenset({"str", "repr", "format", "join", "dumps", "pformat", "bytes", "bytearray", "dict", "list", "tuple",
                     "set", "sorted", "b64encode", "urlsafe_b64encode", "b32encode", "b16encode", "hexlify", "quote"})
# A secret reader's last name segment: get_secret, secrets.get, read_secret, load_secret...
_READS = re.compile(r"get|read|load|fetch|reveal|value|decrypt")
_SECRET_WORD = re.compile(r"secret|password|passwd|credential|api_?key")
# A capability named in a string, as MADs call the kernel: self.use('secrets.get', ...).
_CAPABILITY = re.compile(r"^[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+$")


def _snake(identifier: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", identifier).lower()


def _holds_secret(identifier: str) -> bool:
    return bool(_SECRET_VALUE.search(_snake(identifier)))


def _reads_secret_name(dotted: str) -> bool:
    last = _snake(dotted.rsplit(".", 1)[-1])
    if _METADATA.search(last):
        return False
    return "decrypt" in dotted.lower() or ("secret" in dotted.lower() and bool(_READS.search(last)))


def _reads_secret(call: cst.Call) -> bool:
    """A call that returns a secret value: `get_secret(..)`, `self.secrets.get(..)`, `decrypt(..)`,
    or a capability call naming one, like `self.use('secrets.get', ...)`."""
    if (callee := dotted_name(call.func)) and _reads_secret_name(callee):
        return True
    first = call.args[0].value if call.args and call.args[0].keyword is None else None
    capability = first.evaluated_value if isinstance(first, cst.SimpleString) else None
    return isinstance(capability, str) and bool(_CAPABILITY.match(capability)) and _reads_secret_name(capability)


class _Carrier(cst.CSTVisitor):
    """Finds the first part of an expression that carries a secret value, given the tainted names."""

    def __init__(self, tainted: frozenset[str]) -> None:
        self.tainted = tainted
        self.found: cst.CSTNode | None = None

    def on_visit(self, node: cst.CSTNode) -> bool:
        return self.found is None and super().on_visit(node)

    def visit_Name(self, node: cst.Name) -> None:
        if node.value in self.tainted or _holds_secret(node.value):
            self.found = node

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        attr = node.attr.value
        if _holds_secret(attr):
            self.found = node
        elif not _METADATA.search(_snake(attr)):  # secret.name is the name; secret.value is not
            node.value.visit(self)
        return False

    def visit_Subscript(self, node: cst.Subscript) -> bool:
        index = node.slice[0].slice if len(node.slice) == 1 else None
        key = index.value.evaluated_value if isinstance(index, cst.Index) and isinstance(index.value, cst.SimpleString) else None
        if isinstance(key, str) and _holds_secret(key):
            self.found = node
        elif not (isinstance(key, str) and _METADATA.search(_snake(key))):
            node.value.visit(self)  # the index itself is a lookup key, never shown
        return False

    def visit_Call(self, node: cst.Call) -> bool:
        if _reads_secret(node):
            self.found = node
            return False
        if isinstance(node.func, cst.Attribute):
            node.func.value.visit(self)  # a method of a secret (secret.strip()) returns it still
        function = node.func.attr.value if isinstance(node.func, cst.Attribute) else dotted_name(node.func)
        if function in _PASSES:
            for arg in node.args:
                arg.value.visit(self)  # arg.keyword is a parameter name, not a value
        return False

    def visit_Comparison(self, node: cst.Comparison) -> bool:
        return False  # a comparison shows a bool, not the value

    def visit_Lambda(self, node: cst.Lambda) -> bool:
        return False


def _sink(call: cst.Call) -> str | None:
    """How `call` writes out its arguments (print(), log.info(), ...), or None when it does not."""
    callee = dotted_name(call.func)
    if callee in ("print", "sys.stdout.write", "sys.stderr.write"):
        return f"{callee}()"
    if not isinstance(call.func, cst.Attribute) or call.func.attr.value not in LOG_METHODS:
        return None
    receiver = call.func.value
    if isinstance(receiver, cst.Call):  # logging.getLogger(__name__).info(...)
        factory = (dotted_name(receiver.func) or "").rsplit(".", 1)[-1]
        return f"{factory}(...).{call.func.attr.value}()" if factory in ("getLogger", "get_logger") else None
    name = dotted_name(receiver)
    return f"{callee}()" if name and _LOGGER.match(_snake(name.rsplit(".", 1)[-1])) else None


class _SecretLogs(cst.CSTVisitor):
    """Output calls whose arguments carry a secret value, with lines.

    Taint is per function, in source order: a name assigned from a secret reader (or from
    anything carrying a secret) carries it from then on; a function that writes a secret
    (set_secret, rotate_password) gets its `value` parameters tainted.
    """

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self) -> None:
        self.scopes: list[set[str]] = [set()]
        self.leaks: list[tuple[int, str, str]] = []  # line, sink, the carrying code

    def _carrier(self, node: cst.BaseExpression) -> cst.CSTNode | None:
        carrier = _Carrier(frozenset(self.scopes[-1]))
        node.visit(carrier)
        return carrier.found

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        scope = set(self.scopes[-1])  # closures see the enclosing function's names
        if _SECRET_WORD.search(node.name.value.lower()):
            params = [*node.params.posonly_params, *node.params.params, *node.params.kwonly_params]
            scope |= {p.name.value for p in params if re.search(r"(?:^|_)value$", p.name.value)}
        self.scopes.append(scope)

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        self.scopes.pop()

    def _taint(self, targets: list[cst.BaseExpression], value: cst.BaseExpression | None) -> None:
        if value is None:
            return
        carries = self._carrier(value) is not None
        for target in targets:
            for name in _names(target):
                # Rebinding a name to a clean value (secret = secret['name']) clears it.
                (self.scopes[-1].add if carries else self.scopes[-1].discard)(name)

    def leave_Assign(self, original_node: cst.Assign) -> None:
        self._taint([t.target for t in original_node.targets], original_node.value)

    def leave_AnnAssign(self, original_node: cst.AnnAssign) -> None:
        self._taint([original_node.target], original_node.value)

    def leave_AugAssign(self, original_node: cst.AugAssign) -> None:
        if self._carrier(original_node.value) is not None:  # x += secret taints x; x += 1 leaves it as it was
            self._taint([original_node.target], original_node.value)

    def visit_Call(self, node: cst.Call) -> None:
        if (sink := _sink(node)) is None:
            return
        for arg in node.args:
            if (carrier := self._carrier(arg.value)) is not None:
                line = self.get_metadata(PositionProvider, node).start.line
                code = " ".join(cst.Module(body=[]).code_for_node(carrier).split())
                self.leaks.append((line, sink, code if len(code) <= 80 else code[:77] + "..."))
                return


def _names(target: cst.BaseExpression) -> list[str]:
    """The plain names bound by an assignment target (a, or a, b = ...)."""
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        return [n for element in target.elements for n in _names(element.value)]
    return []


def _beyond_principles(names: tuple[str, ...], rules: list[PrincipleRule]) -> list[str]:
    """The names no principle already forbids: one problem is reported once, by its principle."""
    banned = [b for rule in rules for b in rule.forbid_imports]
    return [n for n in names if not any(n == b or n.startswith(b + ".") for b in banned)]


@dataclass(frozen=True)
class _FileFacts:
    """What the static check needs of one file, whatever the rules: its imports and calls, its secret leaks."""

    uses: ModuleUses
    leaks: tuple[tuple[int, str, str], ...]  # (line, sink, carrier)


# Facts are kept under the code that derived them: another regen or libcst never reads this one's.
_CHECKER = hashlib.sha256(b"".join(Path(m).read_bytes() for m in (__file__, senior_check.__file__))
                          + version("libcst").encode()).hexdigest()


def _cached_facts_path(source: str) -> Path | None:
    """Where the facts of `source` are kept on disk, or None for a file that is not one of regen's own kernel
    files: only those are read from the cache. A generated file (or test) that planted facts for itself there
    would otherwise hide its own findings; the kernel's are regen's, and the same in every build."""
    digest = hashlib.sha256(source.encode()).hexdigest()
    if digest not in kernel_digests():
        return None
    return entry("static-facts", hashlib.sha256(f"{_CHECKER}\0{digest}".encode()).hexdigest())


@functools.lru_cache(maxsize=512)
def _facts(source: str, path: str) -> _FileFacts:
    """The facts of a file, read once per process; a kernel file's are kept on disk by content (a gate, a test
    run, the next build judge the same kernel files again and again). A file that does not parse raises, and is
    never kept."""
    cached = _cached_facts_path(source)
    if cached is None:
        return _read_facts(source, path)
    data = read_entry(cached)
    try:
        return _FileFacts(ModuleUses(tuple(map(tuple, data["imports"])), tuple(map(tuple, data["calls"]))),
                          tuple(map(tuple, data["leaks"])))
    except (KeyError, TypeError):
        pass
    facts = _read_facts(source, path)
    keep_entry(cached, {"imports": facts.uses.imports, "calls": facts.uses.calls, "leaks": facts.leaks})
    return facts


def _read_facts(source: str, path: str) -> _FileFacts:
    """Parse a file as the static check reads it. CPython compiles it first: it refuses what libcst accepts (a
    late `from __future__`), and places errors better."""
    compile(source, path, "exec", dont_inherit=True)
    wrapper = MetadataWrapper(cst.parse_module(source), unsafe_skip_copy=True)  # read only: no copy
    logs = _SecretLogs()
    wrapper.visit(logs)
    return _FileFacts(module_uses(wrapper), tuple(logs.leaks))


def _python_files(artifact: Path) -> list[str]:
    src = artifact / "src"
    files = (p.relative_to(artifact).as_posix() for p in src.rglob("*.py") if p.is_file())
    return sorted(f for f in files if not any(part.startswith(".") or part == "__pycache__" for part in f.split("/")))


def _static(subject: Subject, options: dict) -> tuple[str, list[Finding]]:
    principles = subject.spec.ecosystem.principles
    extra_imports = _beyond_principles(_strings("static", options, "forbid_imports", DEFAULT_FORBID_IMPORTS), principles)
    extra_calls = [c for c in _strings("static", options, "forbid_calls", DEFAULT_FORBID_CALLS)
                   if not any(c in rule.forbid_calls for rule in principles)]
    exclude = _strings("static", options, "exclude", DEFAULT_EXCLUDE)
    # The panel's own lists run through the principle machinery as two more rules.
    panel_rules = [
        PrincipleRule(id="forbidden-import", description="the review panel forbids it", forbid_imports=extra_imports),
        PrincipleRule(id="forbidden-call", description="the review panel forbids it", forbid_calls=extra_calls),
    ]
    descriptions = {rule.id: rule.description for rule in principles}
    files = _python_files(subject.artifact)
    findings: dict[tuple[str, int, str], Finding] = {}  # one finding per file, line and rule

    def add(finding: Finding) -> None:
        findings.setdefault((finding.file or "", finding.line or 0, finding.rule), finding)

    for path in files:
        try:
            source = (subject.artifact / path).read_text(encoding="utf-8")
            facts = _facts(source, path)
        except (UnicodeDecodeError, ValueError, SyntaxError, cst.ParserSyntaxError) as exc:
            add(_syntax_finding(path, exc))
            continue
        for line, sink, carrier in facts.leaks:
            add(Finding(
                file=path, line=line, severity="critical", rule="secret-in-log",
                message=f"{sink} writes {carrier}, which carries a secret's value",
                suggestion="Log the secret's name, version or outcome instead; never its value, even in part.",
            ))
        if any(fnmatch.fnmatchcase(path, glob) for glob in exclude):
            continue
        for v in principle_violations(source, facts.uses, [r for r in principles if r.applies(path)] + panel_rules):
            if v.rule in descriptions:
                message = f"{v.what}, forbidden by principle {v.rule}"
                suggestion = f"Rewrite this line without it; the principle says: {descriptions[v.rule]}"
            else:
                message = f"{v.what}, which the review panel forbids"
                suggestion = ("Remove it: keep state as JSON or in SQLite, and reach processes and the network "
                              "only through kernel capabilities.")
            add(Finding(file=path, line=v.line, severity="major", rule=v.rule, message=message, suggestion=suggestion))
    facts = f"{len(files)} Python files checked for {len(principles)} principles, forbidden imports and calls, and secrets in logs"
    return facts, list(findings.values())


def _syntax_finding(path: str, exc: Exception) -> Finding:
    if isinstance(exc, cst.ParserSyntaxError):
        line, why = exc.raw_line, f"does not parse: {exc.message}"
    elif isinstance(exc, SyntaxError):
        line, why = exc.lineno, f"does not compile: {exc.msg}"
    elif isinstance(exc, UnicodeDecodeError):
        line, why = None, "is not UTF-8"
    else:  # compile() refuses NUL bytes with a ValueError
        line, why = None, f"does not compile: {exc}"
    return Finding(
        file=path, line=line if line and line >= 1 else None, severity="critical", rule="syntax-error",
        message=f"{path} {why}", suggestion="Fix the syntax so the module imports; run `python -m py_compile` on it.",
    )


# --- dependencies: pyproject.toml and uv.lock -------------------------------------------

# A PEP 508 requirement in parts: name, extras, what follows (a specifier or `@ url`), marker.
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[(?P<extras>[^\]]*)\])?\s*(?P<rest>[^;]*?)\s*(?:;.*)?$"
)


def _normal(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class _Requirement:
    raw: str
    name: str  # normalised
    extras: tuple[str, ...]
    specifier: tuple[str, ...]  # its clauses, sorted, spaces removed: ('==1.0',)

    @property
    def shown(self) -> str:
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"{self.name}{extras}{','.join(self.specifier)}"


def _requirement(raw: str) -> _Requirement:
    match = _REQUIREMENT.match(raw)
    if match is None:  # not even a name: keep it whole so it is reported, never dropped
        return _Requirement(raw, raw.strip(), (), ())
    extras = tuple(sorted(_normal(e) for e in (match["extras"] or "").split(",") if e.strip()))
    return _Requirement(raw, _normal(match["name"]), extras, _specifier(match["rest"]))


def _specifier(text: str) -> tuple[str, ...]:
    return tuple(sorted(c for c in re.sub(r"\s+", "", text).split(",") if c))


def _locked(entry: dict) -> _Requirement:
    """A requirement as uv.lock records it under requires-dist."""
    extras = tuple(sorted(_normal(e) for e in entry.get("extras", [])))
    name = _normal(str(entry.get("name", "")))
    return _Requirement(name, name, extras, _specifier(str(entry.get("specifier", ""))))


def _read_toml(path: Path, rule: str, what: str) -> tuple[str, dict[str, Any]] | Finding:
    """The text and data of a TOML file of src/, or the critical finding that it has none."""
    file = f"src/{path.name}"
    if not path.is_file():
        return Finding(file=file, severity="critical", rule=rule, message=f"{file} is missing",
                       suggestion=f"Generate {what} and archive it with the build.")
    text = path.read_text(encoding="utf-8")
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return Finding(file=file, severity="critical", rule=rule, message=f"{file} does not parse: {exc}",
                       suggestion=f"Regenerate {what}; do not edit it by hand.")


def _lock_versions(lock: dict, project: str) -> dict[str, str]:
    """Every locked package but the project itself, by normalised name: its versions."""
    versions: dict[str, set[str]] = {}
    for pkg in lock.get("package", []):
        name = _normal(str(pkg.get("name", "")))
        if name != project:
            versions.setdefault(name, set()).add(str(pkg.get("version", "")))
    return {name: ", ".join(sorted(v)) for name, v in versions.items()}


def _dependencies(subject: Subject, options: dict) -> tuple[str, list[Finding]]:
    src = subject.artifact / "src"
    read = _read_toml(src / "pyproject.toml", "no-pyproject", "pyproject.toml")
    if isinstance(read, Finding):
        return "no readable src/pyproject.toml", [read]
    py_text, pyproject = read
    project = pyproject.get("project", {})
    project_name = _normal(str(project.get("name", "")))
    groups = {
        "runtime": ([_requirement(r) for r in project.get("dependencies", [])], subject.spec.ecosystem.dependencies, "dependencies"),
        "dev": ([_requirement(r) for r in pyproject.get("dependency-groups", {}).get("dev", []) if isinstance(r, str)],
                subject.spec.ecosystem.dev_dependencies, "dev"),
    }
    findings: list[Finding] = []

    def at_pyproject(req: _Requirement) -> int | None:
        return _line_of(py_text, r"[\"']" + re.escape(req.raw) + r"[\"']")

    for label, (actual, spec_list, key) in groups.items():
        declared = {r.name: r for r in map(_requirement, spec_list)}
        present = {r.name for r in actual}
        for req in actual:
            line = at_pyproject(req)
            if not PINNED_REQUIREMENT.match(req.raw.strip()):
                if req.name in declared:
                    pin = f"Require exactly {declared[req.name].raw!r}, as the spec declares."
                else:
                    pin = "Pin it with == to one version, and declare it in spec/ecosystem.yaml."
                findings.append(Finding(
                    file="src/pyproject.toml", line=line, severity="major", rule="unpinned-dependency",
                    message=f"{label} requirement {req.raw!r} is not pinned exactly with ==", suggestion=pin,
                ))
            if req.name not in declared:
                findings.append(Finding(
                    file="src/pyproject.toml", line=line, severity="major", rule="undeclared-dependency",
                    message=f"{label} requirement {req.raw!r} is not declared in the spec",
                    suggestion=f"Remove it, or declare it pinned under {'dev_' if label == 'dev' else ''}dependencies "
                    "in spec/ecosystem.yaml first.",
                ))
            elif (req.extras, req.specifier) != (declared[req.name].extras, declared[req.name].specifier):
                findings.append(Finding(
                    file="src/pyproject.toml", line=line, severity="major", rule="pin-mismatch",
                    message=f"{label} requirement {req.raw!r} differs from the spec's {declared[req.name].raw!r}",
                    suggestion=f"Require exactly {declared[req.name].raw!r}, as the spec declares.",
                ))
        for name, req in declared.items():
            if name not in present:
                findings.append(Finding(
                    file="src/pyproject.toml", line=_line_of(py_text, rf"^\s*{key}\s*="), severity="major",
                    rule="missing-dependency", message=f"the spec's {label} dependency {req.raw!r} is not in pyproject.toml",
                    suggestion=f"Add {req.raw!r} to the {label} requirements and lock again (uv lock).",
                ))
    runtime, dev = len(groups["runtime"][0]), len(groups["dev"][0])
    read = _read_toml(src / "uv.lock", "no-lock", "uv.lock (uv lock)")
    if isinstance(read, Finding):
        return f"{runtime} runtime and {dev} dev requirements, no readable uv.lock", [*findings, read]
    lock_text, lock = read
    own = None
    for pkg in lock.get("package", []):
        name = _normal(str(pkg.get("name", "")))
        source: dict = pkg.get("source", {})
        line = _line_of(lock_text, rf'^name = "{re.escape(str(pkg.get("name", "")))}"\s*$')
        where = f"{name} {pkg.get('version', '?')}"
        if name == project_name and ("virtual" in source or "editable" in source):
            own = (pkg, line)
        elif "registry" not in source:
            kind, value = next(iter(sorted(source.items())), ("no source", ""))
            findings.append(Finding(
                file="src/uv.lock", line=line, severity="major", rule="non-registry-source",
                message=f"{where} is locked from {kind} {value}".rstrip(),
                suggestion=f"Depend on a released version of {name} from the package index, pinned with ==, and lock again.",
            ))
        else:
            files = ([pkg["sdist"]] if "sdist" in pkg else []) + list(pkg.get("wheels", []))
            if not files or not all(isinstance(f, dict) and f.get("hash") for f in files):
                findings.append(Finding(
                    file="src/uv.lock", line=line, severity="major", rule="unhashed-package",
                    message=f"{where} has {'no files' if not files else 'files without a hash'} in uv.lock",
                    suggestion="Lock again with uv from the package index so every sdist and wheel carries its sha256.",
                ))
    findings += _stale(own, project_name, groups["runtime"][0], groups["dev"][0], lock_text)
    versions = _lock_versions(lock, project_name)
    parent_note = ""
    if subject.parent is not None:
        # A parent without a readable lock has nothing to compare with; its own review said so.
        parent = _read_toml(subject.parent / "src" / "uv.lock", "no-lock", "uv.lock")
        if not isinstance(parent, Finding):
            findings += _changes(_lock_versions(parent[1], project_name), versions, lock_text)
            parent_note = ", compared with the parent's lock"
    return f"{runtime} runtime and {dev} dev requirements, {len(versions)} locked packages{parent_note}", findings


def _stale(own: tuple[dict, int | None] | None, project: str, runtime: list[_Requirement], dev: list[_Requirement],
           lock_text: str) -> list[Finding]:
    """The lock's record of the project's requirements against pyproject.toml's (markers aside)."""
    suggestion = "Run `uv lock` in src/ so uv.lock matches pyproject.toml, and archive the new lock."
    if own is None:
        return [Finding(file="src/uv.lock", severity="major", rule="stale-lock",
                        message=f"uv.lock has no entry for the project {project}", suggestion=suggestion)]
    pkg, line = own
    metadata = pkg.get("metadata", {})
    findings = []
    for label, wanted, locked, where in (
        ("runtime", runtime, metadata.get("requires-dist", []), r"^requires-dist\s*="),
        ("dev", dev, metadata.get("requires-dev", {}).get("dev", []), r"^\[package\.metadata\.requires-dev\]"),
    ):
        asked = {r.shown for r in wanted}
        recorded = {_locked(entry).shown for entry in locked}
        if asked == recorded:
            continue
        parts = []
        if only := sorted(asked - recorded):
            parts.append(f"only in pyproject.toml: {', '.join(only)}")
        if only := sorted(recorded - asked):
            parts.append(f"only in uv.lock: {', '.join(only)}")
        findings.append(Finding(
            file="src/uv.lock", line=_line_of(lock_text, where) or line,
            severity="major", rule="stale-lock",
            message=f"uv.lock was locked for other {label} requirements ({'; '.join(parts)})", suggestion=suggestion,
        ))
    return findings


def _changes(before: dict[str, str], after: dict[str, str], lock_text: str) -> list[Finding]:
    """Locked packages added, removed or moved to another version since the parent: for reviewers to weigh."""
    findings = []
    for name in sorted(before.keys() | after.keys()):
        line = _line_of(lock_text, rf'^name = "{re.escape(name)}"\s*$')
        if name not in before:
            rule, message = "dependency-added", f"{name} {after[name]} is new since the parent"
        elif name not in after:
            rule, message, line = "dependency-removed", f"{name} {before[name]} is no longer locked", None
        elif before[name] != after[name]:
            rule, message = "dependency-changed", f"{name} moved from {before[name]} to {after[name]}"
        else:
            continue
        findings.append(Finding(file="src/uv.lock", line=line, severity="info", rule=rule, message=message,
                                suggestion="Check that the change is intended and that its release notes raise no concern."))
    return findings


_CHECKS: dict[str, Callable[[Subject, dict], tuple[str, list[Finding]]]] = {
    "tests": _tests,
    "static": _static,
    "dependencies": _dependencies,
}
