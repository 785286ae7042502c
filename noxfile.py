"""Sessions: `nox -s regenerate` builds spec/ into ecosystems/; `nox -s tests` runs the suite.

Every session installs the project from `uv.lock` exactly (`uv sync --frozen`), so what
runs here is what was locked.
"""

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import nox
from nox.command import CommandFailed

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["regenerate"]
nox.options.reuse_venv = "yes"


def _sync(session: nox.Session, *groups: str) -> None:
    # Bytecode compiled once at install: a user's first `regen` starts as fast as the next one.
    args = ["uv", "sync", "--frozen", "--no-default-groups", "--compile-bytecode"]
    for group in groups:
        args += ["--group", group]
    session.run_install(*args, env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location})


@nox.session
def regenerate(session: nox.Session) -> None:
    """Compile spec/ into ecosystems/<name>/<version>/ (offline default; pass a pipeline after --)."""
    _sync(session)
    session.run("regen", "regenerate", *session.posargs)


@nox.session
def scripted(session: nox.Session) -> None:
    """Build with the scripted senior on 127.0.0.1 (pipelines/scripted.toml): the HTTP path, no real model."""
    _sync(session)
    session.env["SCRIPTED_API_KEY"] = "scripted"
    session.run(
        "python", "-m", "generator.senior.scripted", "--reference", "--port", "8911", "--model", "scripted-senior",
        # --no-cache: the scripted answers follow pipelines/scripted/, which requests do not carry.
        "--", "regen", "regenerate", "--pipeline", "pipelines/scripted.toml", "--no-cache", *session.posargs,
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The compiler's test suite, including a full offline build in the sandbox."""
    # packs: the capability packs' libraries (DuckDB, trafilatura, ...), which the kernel's pack tests import.
    _sync(session, "dev", "packs")
    # A test module per worker (pytest-xdist): the module fixtures (built ecosystems, servers) are made once.
    # One worker more than cores: a build test keeps about one core busy, waiting the rest of the time on the
    # servers its sandboxed tests start and poll.
    workers = str((os.cpu_count() or 1) + 1)
    # --durations: the slowest tests named in every CI log, for when the suite nears its time limit.
    session.run("pytest", "--numprocesses", workers, "--dist", "loadfile", "--durations=25", *session.posargs)


def gate_exit(failed: CommandFailed) -> int | None:
    """The code `nox -s gate` exits with itself when `regen gate` failed so, or None to let nox fail
    the session as usual (nox then exits 1, whatever the command's exit code).

    Only 2, undecided, is kept: 1 (reject) is what nox says anyway, and any other code (a crash,
    130 interrupted) is a failed session like any other.
    """
    code = getattr(failed, "return_code", None)  # nox 2026.07 and later; before, only the reason says it
    if code is None:
        said = re.fullmatch(r"Returned code (-?\d+)", str(getattr(failed, "reason", None) or ""))
        code = int(said[1]) if said else None
    return 2 if code == 2 else None


@nox.session
def gate(session: nox.Session) -> None:
    """Judge the newest build with the pipeline's review panel: exit 0 approve, 1 reject, 2 undecided.

    `nox -s gate -- ecosystems/madgroup/1.0.3 --report DIR --pipeline pipelines/frontier.toml`
    `nox -s gate -- --sarif regen.sarif` also writes the findings as SARIF (CI: .github/workflows/regen.yml).

    nox exits 1 when any session fails, whatever its command's exit code; so that CI can tell a
    rejection from a panel that could not decide, an undecided gate ends nox at once with exit 2
    (nox prints no summary then, and sessions named after this one do not run).
    """
    _sync(session)
    try:
        session.run("regen", "gate", *session.posargs)
    except CommandFailed as failed:
        code = gate_exit(failed)
        if code is None:
            raise
        session.log(f"the gate is undecided: nox exits {code}")
        raise SystemExit(code) from None  # nox catches Exception in a session, not SystemExit


# What decides a replay besides the artifact itself: a version built by other compiler sources is
# replayed by the compiler of the commit that archived it.
COMPILER_PATHS = ("generator", "pipelines", "reviews")
# ...but not regen's own tests of the kernel packs, which no build reads (kernel_contract.kernel_test_file).
COMPILER_PATHSPECS = (*COMPILER_PATHS, ":(exclude,glob)generator/kernel/**/tests/**",
                      ":(exclude,glob)generator/kernel/**/conftest.py")


def _compiler_checkout(session: nox.Session, manifest: Path, stack: contextlib.ExitStack) -> Path | None:
    """A worktree of the commit that archived `manifest` (the last to touch it: archives are never edited)
    when its compiler differs from this one, else None."""
    git = shutil.which("git")
    if git is None or not Path(".git").exists():
        return None
    added = subprocess.run([git, "log", "-1", "--format=%H", "--", str(manifest)],
                           capture_output=True, text=True, check=True).stdout.strip()
    if not added:
        return None  # not committed yet: built by the compiler in this tree
    untracked = subprocess.run([git, "ls-files", "--others", "--exclude-standard", "--", *COMPILER_PATHSPECS],
                               capture_output=True, text=True, check=True).stdout.strip()
    if not untracked and subprocess.run([git, "diff", "--quiet", added, "--", *COMPILER_PATHSPECS]).returncode == 0:
        return None  # built by the compiler in this tree
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="regen-compiler-"))) / "tree"
    subprocess.run([git, "worktree", "add", "--detach", "--quiet", str(folder), added], check=True)
    stack.callback(subprocess.run, [git, "worktree", "remove", "--force", str(folder)], check=False)
    session.log(f"{manifest.parent}: built by the compiler of commit {added[:12]}; replaying with it")
    return folder


@nox.session
def verify(session: nox.Session) -> None:
    """`regen verify` every archived version (signature, hashes, SBOM, byte-for-byte replay); with diffoscope
    installed, the replayed src/ is also compared with the archived one by diffoscope. A version archived by
    an older compiler is replayed by that compiler, checked out from the commit that archived it."""
    _sync(session)
    diffoscope = shutil.which("diffoscope")
    if diffoscope is None:
        session.log("diffoscope is not installed: verifying with regen alone (apt-get install diffoscope adds it)")
    manifests = sorted(Path("ecosystems").glob("*/*/manifest.json"),
                       key=lambda m: (m.parent.parent.name, tuple(int(x) for x in m.parent.name.split("."))))
    for manifest in manifests:
        artifact = manifest.parent.resolve()
        with contextlib.ExitStack() as stack:
            kept = stack.enter_context(tempfile.TemporaryDirectory(prefix="regen-verify-"))
            compiler = _compiler_checkout(session, manifest, stack)
            command = ["verify", str(artifact), *(["--keep", kept] if diffoscope else []), *session.posargs]
            if compiler is None:
                session.run("regen", *command)
            else:  # that commit's `generator` package first on the path, run from its tree
                with session.chdir(compiler):
                    session.run("python", "-c", "import sys; from generator.cli import main; sys.exit(main(sys.argv[1:]))",
                                *command, env={"PYTHONPATH": str(compiler)})
            if diffoscope:
                # File times differ by nature (the archive was written earlier); contents and modes must not.
                session.run(diffoscope, "--exclude-directory-metadata=yes", str(artifact / "src"), str(Path(kept) / "src"),
                            external=True)


@nox.session
def screenshot(session: nox.Session) -> None:
    """docs/report.png: an archived version's report.html in headless Chromium (Debian's) at 1280 px, its first
    screen. `nox -s screenshot` takes the newest madgroup version; `nox -s screenshot -- ARTIFACT [--out FILE]`."""
    _sync(session, "dev")
    args = list(session.posargs)
    if not args or args[0].startswith("-"):
        newest = max(Path("ecosystems/madgroup").glob("*/manifest.json"),
                     key=lambda m: tuple(int(x) for x in m.parent.name.split(".")))
        args.insert(0, str(newest.parent))
    session.run("python", "benchmarks/report_screenshot.py", *args, "--viewport-only")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, measured side by side in one run; results in benchmarks/results/<name>.json."""
    # The kernel benchmarks need the ecosystem's runtime dependencies (redis, prometheus-client); the no-op
    # build is measured beside dvc's, which the bench group pins.
    _sync(session, "dev", "bench", "packs")
    session.run("python", "benchmarks/cli_startup.py")
    session.run("python", "benchmarks/noop_regenerate.py")
    session.run("python", "benchmarks/pipeline_overhead.py")
    session.run("python", "benchmarks/panel_wall.py")
    session.run("python", "benchmarks/bus_hop.py")
    session.run("python", "benchmarks/gateway_calls.py")
    session.run("python", "benchmarks/startup_memory.py")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the compiler, its tests and benchmarks."""
    _sync(session, "dev")
    session.run("ruff", "check", "generator", "tests", "benchmarks", "noxfile.py")
