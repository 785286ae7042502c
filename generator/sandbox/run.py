"""Stage 4, sandbox test: the generated ecosystem's own tests, fenced off from the network.

The ecosystem gets a fresh venv made by uv from its own `uv.lock` (outside the fence:
packages come from uv's cache or the index), then its tests run inside bubblewrap with
a private network namespace (only its own loopback), a read-only view of the system,
a scrubbed environment, a time limit and a memory limit. Where bubblewrap cannot run,
`unshare -n` is the fallback, then no fence at all with a loud warning; the level
reached is part of the result and of the manifest, never dropped silently.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field

from .. import cancel
from ..config import SandboxLevel, SandboxSettings
from ..errors import BuildFailed
from ..frozen import Frozen
from .reuse import recall, remember, run_key

LEVELS: tuple[SandboxLevel, ...] = ("bubblewrap", "unshare", "none")
MAX_PROCESSES = 512  # a fork bomb in generated tests stops here
Outcome = Literal["passed", "failed", "error", "skipped"]


class TestOutcome(Frozen):
    __test__ = False  # not a pytest class

    id: str
    outcome: Outcome
    message: str = ""
    requirements: tuple[str, ...] = Field(default=(), description="ids the test names with @pytest.mark.requirement")


class SandboxResult(Frozen):
    level: SandboxLevel
    passed: int
    failed: int
    errors: int
    skipped: int
    tests: tuple[TestOutcome, ...]
    exit_code: int
    output_tail: str = ""
    reused_from: str | None = Field(default=None, description="when this identical tree passed, if not run now")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.failed == 0 and self.errors == 0 and self.passed > 0

    def record(self) -> dict:
        """tests.json: the results without the run's raw output (paths and timings vary run to run)."""
        return self.model_dump(mode="json", exclude={"output_tail", "reused_from"})

    def proving(self, requirement: str) -> tuple[TestOutcome, ...]:
        """The tests that name `requirement`."""
        return tuple(t for t in self.tests if requirement in t.requirements)


def run_uv(args: list[str], doing: str, timeout: int, env: dict[str, str] | None = None) -> None:
    """Run the uv that regen depends on; a failure is a BuildFailed that says what uv said."""
    from uv import find_uv_bin

    proc = subprocess.Popen([find_uv_bin(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    output, in_time = cancel.communicate(proc, timeout)
    if not in_time:
        raise BuildFailed(f"uv took longer than {timeout}s {doing}")
    if proc.returncode != 0:
        raise BuildFailed(f"uv failed {doing} (exit {proc.returncode}):\n{output.strip() or '(it printed nothing)'}")


def _runs(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def available_level() -> SandboxLevel:
    """The strongest isolation this machine allows, found by trying it."""
    if shutil.which("bwrap") and _runs(["bwrap", "--ro-bind", "/", "/", "--unshare-net", "true"]):
        return "bubblewrap"
    if shutil.which("unshare") and _runs(_unshare_prefix() + ["true"]):
        return "unshare"
    return "none"


def _unshare_prefix() -> list[str]:
    return ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])


# What of /etc a Python test run needs; the rest (shadow, gshadow, ssh host keys, sudoers,
# credentials of services) stays outside the fence.
ETC_ALLOWED = (
    "alternatives", "ca-certificates", "ca-certificates.conf", "gai.conf", "group", "host.conf", "hosts",
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "mime.types", "nsswitch.conf", "passwd",
    "protocols", "resolv.conf", "services", "ssl",
)


def fence(level: SandboxLevel, work: Path, python: Path, cwd: Path | None = None) -> list[str]:
    """The command prefix that runs a program inside the sandbox at `level`.

    bubblewrap: a read-only system (and only the harmless part of /etc), `work` writable,
    nothing else (no home, no /root), private network, PID, IPC, UTS and user namespaces,
    all capabilities dropped. unshare: only a private network namespace, loopback up.
    """
    if level == "unshare":
        return _unshare_prefix() + ["sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh"]
    if level == "none":
        return []
    argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-all", "--cap-drop", "ALL"]
    for folder in ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32"]:
        if os.path.exists(folder):
            argv += ["--ro-bind", folder, folder]
    for name in ETC_ALLOWED:
        if os.path.lexists(f"/etc/{name}"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    # The interpreter may live outside /usr (pyenv, uv-managed pythons): bind its prefix.
    prefixes = {sys.base_prefix, str(Path(os.path.realpath(python)).parent.parent)}
    for folder in sorted(prefixes):
        if not folder.startswith("/usr"):
            argv += ["--ro-bind", folder, folder]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", str(work), str(work)]
    return argv + ["--chdir", str(cwd or work), "--"]


def _limits(memory_mb: int) -> Callable[[], None]:
    def apply() -> None:
        os.setsid()
        limit = memory_mb * 1024 * 1024
        # The memory a process writes (heap and private writable mappings), not its address space: a V8
        # engine (the charts pack's renderer) reserves tens of GiB it never touches, which RLIMIT_AS refuses.
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))

    return apply


def _scrubbed_env(work: Path, venv: Path) -> dict[str, str]:
    return {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work / "home"),
        "TMPDIR": str(work / "tmp"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # Bytecode is written, once per run and only inside `work`: every server a test starts would
        # otherwise compile each module it imports again (seconds per start).
        "PYTHONPYCACHEPREFIX": str(work / "pycache"),
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
        "VIRTUAL_ENV": str(venv),
    }


LOCK_DRIFT = "needs to be updated, but `--locked` was provided"  # what uv says when uv.lock is stale


def make_venv(src: Path, venv: Path, timeout: int) -> None:
    """`uv sync --locked` into `venv`: exactly the artifact's lock, dev group included.

    `--locked` (not `--frozen`) makes uv first check that uv.lock still matches
    pyproject.toml; a stale lock is a BuildFailed that names the drift, never a venv
    quietly made from requirements the project no longer states.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT", "UV_FROZEN"))}
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    args = ["sync", "--locked", "--project", str(src), "--python", sys.executable, "--quiet"]
    try:
        run_uv(args, "making the sandbox venv", timeout, env)
    except BuildFailed as exc:
        said = " ".join(str(exc).partition(":\n")[2].split())  # uv wraps its messages to the terminal's width
        if LOCK_DRIFT not in said:
            raise
        uv_said = said.removeprefix("error: ").partition(" hint:")[0].rstrip(".")
        drift = lock_drift(src) or [f"the requirements differ in their markers or other details (uv: {uv_said})"]
        raise BuildFailed(f"uv.lock is out of date with pyproject.toml: {'; '.join(drift)}; relock with `uv lock`") from exc


def lock_drift(src: Path) -> list[str]:
    """How `src/pyproject.toml`'s requirements differ from those `src/uv.lock` was made for, by package name.

    A description for the user only: uv decides whether the lock is stale. Markers are
    not compared (uv rewrites them), so a drift in markers alone gives [].
    """
    import tomllib

    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.specifiers import SpecifierSet
        from packaging.utils import canonicalize_name

        pyproject = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8"))
        lock = tomllib.loads((src / "uv.lock").read_text(encoding="utf-8"))
    except (ImportError, OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    project = pyproject.get("project", {})
    name = canonicalize_name(project.get("name", ""))
    root = next((p for p in lock.get("package", []) if canonicalize_name(p.get("name", "")) == name), {})
    locked_meta = root.get("metadata", {})

    def stated(requirements: list) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for text in requirements:
            if isinstance(text, str):
                try:
                    req = Requirement(text)
                except InvalidRequirement:
                    continue
                found.setdefault(canonicalize_name(req.name), set()).add(str(req.specifier))
        return found

    def locked(entries: list) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for entry in entries:
            if isinstance(entry, dict) and "name" in entry:
                found.setdefault(canonicalize_name(entry["name"]), set()).add(str(SpecifierSet(entry.get("specifier", ""))))
        return found

    sections = [(
        "[project] dependencies",
        stated(project.get("dependencies", []) + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]),
        locked(locked_meta.get("requires-dist", [])),
    )]
    groups, locked_groups = pyproject.get("dependency-groups", {}), locked_meta.get("requires-dev", {})
    for group in sorted(set(groups) | set(locked_groups)):
        sections.append((f"dependency group {group}", stated(groups.get(group, [])), locked(locked_groups.get(group, []))))
    drift = []
    if project.get("requires-python") != lock.get("requires-python"):
        drift.append(f"requires-python is {project.get('requires-python')!r} in pyproject.toml, "
                     f"{lock.get('requires-python')!r} in uv.lock")
    for section, wanted, have in sections:
        for package in sorted(set(wanted) | set(have)):
            spec = ", ".join(sorted(wanted.get(package, ()))) or "any version"
            was = ", ".join(sorted(have.get(package, ()))) or "any version"
            if package not in have:
                drift.append(f"{section} requires {package} ({spec}), which uv.lock lacks")
            elif package not in wanted:
                drift.append(f"uv.lock still has {package} ({was}), which {section} no longer requires")
            elif wanted[package] != have[package]:
                drift.append(f"{section} requires {package} {spec}, uv.lock was made for {was}")
    return drift


def run_tests(
    src: Path,
    settings: SandboxSettings,
    work: Path,
    level: SandboxLevel | None = None,
    warn: Callable[[str], None] = lambda _: None,
    reuse: bool = False,
) -> SandboxResult:
    """Copy `src` to `work`, make its venv, run its tests fenced; never writes into `src`. With `reuse`, a tree
    that already passed exactly so is not run again (see reuse.py)."""
    level = level or available_level()
    if LEVELS.index(level) > LEVELS.index(settings.require):
        raise BuildFailed(
            f"the sandbox reached only '{level}' but the pipeline requires '{settings.require}': "
            "install bubblewrap (apt-get install -y bubblewrap) or lower [sandbox] require"
        )
    if level == "none":
        warn("NO SANDBOX: bubblewrap and `unshare -n` are unavailable; the tests run with full network access")
    key = run_key(src, settings, level) if reuse else None
    if key and (remembered := recall(key)):
        return remembered
    work = work.resolve()
    project = work / "src"
    venv = work / "venv"
    shutil.copytree(src, project)
    for folder in ("home", "tmp"):
        (work / folder).mkdir()
    make_venv(project, venv, settings.timeout_seconds)
    plugins = work / "plugins"  # regen's own pytest plugin: which requirements each test names
    plugins.mkdir()
    shutil.copyfile(Path(__file__).with_name("requirements_plugin.py"), plugins / "regen_requirements.py")
    junit = work / "junit.xml"
    # The venv's `pytest`, as the generated README's `uv run --locked pytest -q` runs it (not `python -m pytest`,
    # which would put the project on sys.path and hide a project that only works that way).
    pytest = [
        str(venv / "bin" / "pytest"), "-q", "-p", "no:cacheprovider", "-p", "regen_requirements",
        f"--junitxml={junit}", "tests",
    ]
    code, output = run_fenced(pytest, project, venv, work, level, settings, {"PYTHONPATH": str(plugins)})
    if code is None:
        raise BuildFailed(f"the ecosystem's tests ran over the {settings.timeout_seconds}s sandbox time limit")
    tests = _read_junit(junit) if junit.exists() else ()
    count = {o: sum(1 for t in tests if t.outcome == o) for o in ("passed", "failed", "error", "skipped")}
    result = SandboxResult(
        level=level,
        passed=count["passed"],
        failed=count["failed"],
        errors=count["error"],
        skipped=count["skipped"],
        tests=tests,
        exit_code=code,
        output_tail="\n".join(output.splitlines()[-60:]),
    )
    if key:
        remember(key, result)
    return result


def run_fenced(argv: list[str], cwd: Path, venv: Path, work: Path, level: SandboxLevel,
               settings: SandboxSettings, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run `argv` (with the venv's python) inside the fence, scrubbed and limited: (exit code, output);
    the code is None when it ran over the time limit and was killed."""
    proc = subprocess.Popen(
        fence(level, work, venv / "bin" / "python", cwd=cwd) + argv,
        cwd=cwd,
        env=_scrubbed_env(work, venv) | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_limits(settings.memory_mb),
    )
    output, in_time = cancel.communicate(proc, settings.timeout_seconds)  # a cancelled build kills it at once
    return (proc.returncode if in_time else None), output


def _read_junit(path: Path) -> tuple[TestOutcome, ...]:
    outcomes = []
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome: Outcome = "passed"
        message = ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:500]
        named = sorted({p.get("value", "") for p in case.iter("property") if p.get("name") == "requirement"} - {""})
        outcomes.append(TestOutcome(id=test_id, outcome=outcome, message=message, requirements=tuple(named)))
    return tuple(sorted(outcomes, key=lambda t: t.id))
