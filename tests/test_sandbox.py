"""The sandbox fence, proven without sending traffic anywhere but 127.0.0.1."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from archive import ARCHIVE, NEWEST

from generator.sandbox.run import available_level, fence

# The real interpreter, not the venv's symlink: the fence binds the interpreter's prefix.
PYTHON = Path(os.path.realpath(sys.executable))

PROBE = textwrap.dedent(
    """
    import socket, sys
    port = int(sys.argv[1])
    names = sorted(name for _, name in socket.if_nameindex())
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        reached = "reached"
    except OSError:
        reached = "refused"
    print(",".join(names), reached)
    """
)


def _unavailable(reason: str) -> None:
    """Skip where the fence cannot run; in CI, where .ci/run installed it, that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must prove the isolation, not skip it")
    pytest.skip(reason)


@pytest.fixture
def host_listener():
    """A TCP listener on the host's loopback, which the sandbox must not reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def _probe(level, tmp_path, port):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    argv = fence(level, tmp_path, PYTHON) + [str(PYTHON), str(script), str(port)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_without_a_fence_the_listener_is_reachable(tmp_path, host_listener):
    """Control: the probe itself works, so the fenced results below mean something."""
    interfaces, reached = _probe("none", tmp_path, host_listener)
    assert reached == "reached"


@pytest.mark.parametrize("level", ["bubblewrap", "unshare"])
def test_fenced_code_sees_only_its_own_loopback(level, tmp_path, host_listener):
    if level == "bubblewrap" and available_level() != "bubblewrap":
        _unavailable("bubblewrap cannot run here (apt-get install -y bubblewrap)")
    if level == "unshare" and available_level() == "none":
        _unavailable("unshare -n cannot run here")
    interfaces, reached = _probe(level, tmp_path, host_listener)
    assert interfaces == "lo"
    assert reached == "refused"


def test_bubblewrap_hides_the_home_folder(tmp_path):
    if available_level() != "bubblewrap":
        _unavailable("bubblewrap cannot run here (apt-get install -y bubblewrap)")
    argv = fence("bubblewrap", tmp_path, PYTHON) + ["ls", "/home", "/root/.ssh"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "No such file" in done.stderr


def test_a_pipeline_that_requires_bubblewrap_refuses_a_weaker_fence(tmp_path):
    from generator.config import SandboxSettings
    from generator.errors import BuildFailed
    from generator.sandbox.run import run_tests

    with pytest.raises(BuildFailed, match="requires 'bubblewrap'.*apt-get install -y bubblewrap"):
        run_tests(tmp_path, SandboxSettings(require="bubblewrap"), tmp_path / "work", level="unshare")
    assert not (tmp_path / "work").exists()


def test_running_without_a_fence_is_announced_loudly(tmp_path):
    from generator.config import SandboxSettings
    from generator.errors import BuildFailed
    from generator.sandbox.run import run_tests

    warnings = []
    (tmp_path / "src").mkdir()
    with pytest.raises(BuildFailed):  # an empty project has no lock: uv refuses, after the warning
        run_tests(tmp_path / "src", SandboxSettings(), tmp_path / "work", level="none", warn=warnings.append)
    assert warnings and "NO SANDBOX" in warnings[0]


def test_bubblewrap_shows_only_the_harmless_part_of_etc(tmp_path):
    if available_level() != "bubblewrap":
        _unavailable("bubblewrap cannot run here (apt-get install -y bubblewrap)")
    argv = fence("bubblewrap", tmp_path, PYTHON) + ["sh", "-c", "ls /etc; cat /etc/shadow"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert "passwd" in done.stdout.split() and "shadow" not in done.stdout.split()
    assert done.returncode != 0 and "No such file" in done.stderr


MADGROUP_SRC = ARCHIVE / NEWEST / "src"


def test_a_lock_in_step_with_its_pyproject_shows_no_drift():
    from generator.sandbox.run import lock_drift

    assert lock_drift(MADGROUP_SRC) == []


def test_a_lock_out_of_date_with_pyproject_fails_and_names_the_drift(tmp_path):
    from generator.errors import BuildFailed
    from generator.sandbox.run import make_venv

    src = tmp_path / "src"
    shutil.copytree(MADGROUP_SRC, src)
    pyproject = src / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"httpx==0.28.1",', '"httpx==0.28.1",\n    "six==1.17.0",'))
    with pytest.raises(BuildFailed) as failed:
        make_venv(src, tmp_path / "venv", timeout=120)
    assert str(failed.value) == (
        "uv.lock is out of date with pyproject.toml: [project] dependencies requires six (==1.17.0), "
        "which uv.lock lacks; relock with `uv lock`"
    )
    assert not list((tmp_path / "venv").glob("lib/python*/site-packages/mcp"))  # nothing installed from the stale lock


def test_the_memory_limit_stops_what_a_process_writes_not_what_it_reserves(tmp_path):
    """RLIMIT_DATA at `memory_mb`: a test that fills more memory fails, an engine reserving address space it
    never touches (V8's heap cage, the charts pack's renderer) starts."""
    from generator.sandbox.run import _limits

    script = tmp_path / "memory.py"
    script.write_text(textwrap.dedent(
        """
        import mmap, sys
        # 8 GiB of private address space, reserved and never written (prot 0: PROT_NONE)
        reserved = mmap.mmap(-1, 8 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=0)
        try:
            filled = bytearray(int(sys.argv[1]) << 20)
        except MemoryError:
            print("refused")
        else:
            print("filled")
        """))
    run = lambda mb: subprocess.run([str(PYTHON), str(script), str(mb)], capture_output=True, text=True,  # noqa: E731
                                    timeout=60, preexec_fn=_limits(256)).stdout.strip()
    assert run(64) == "filled"
    assert run(512) == "refused"


# --- a tree that passed is not run again ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    """The smallest project the sandbox runs as it runs an ecosystem: a locked dev group with pytest, one test."""
    from generator.sandbox.run import run_uv

    src = tmp_path_factory.mktemp("tiny") / "src"
    (src / "tests").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent(
        """
        [project]
        name = "tiny"
        version = "1.0.0"
        requires-python = ">=3.11"
        dependencies = []

        [dependency-groups]
        dev = ["pytest==9.0.3"]

        [tool.uv]
        package = false
        """))
    (src / "tests" / "test_tiny.py").write_text("def test_adds():\n    assert 1 + 1 == 2\n")
    run_uv(["lock", "--project", str(src), "--python", sys.executable, "--quiet"], "locking the tiny project", 300)
    return src


@pytest.fixture
def sandbox_runs(tmp_path, monkeypatch):
    """A fresh sandbox-runs cache, and a count of the runs that really happened."""
    from generator.sandbox import run

    if available_level() != "bubblewrap":
        _unavailable("bubblewrap cannot run here (apt-get install -y bubblewrap)")
    from uv import find_uv_bin

    # uv also keeps its cache under XDG_CACHE_HOME: keep using the machine's, packages are not fetched again
    uv_cache = subprocess.run([find_uv_bin(), "cache", "dir"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv("UV_CACHE_DIR", os.environ.get("UV_CACHE_DIR", uv_cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = []
    real = run.run_fenced
    monkeypatch.setattr(run, "run_fenced", lambda *args, **kwargs: runs.append(args[0]) or real(*args, **kwargs))
    return runs


def _tested(src, work, **kwargs):
    from generator.config import SandboxSettings
    from generator.sandbox.run import run_tests

    return run_tests(src, SandboxSettings(**kwargs.pop("settings", {})), work, level=kwargs.pop("level", "bubblewrap"),
                     reuse=kwargs.pop("reuse", True))


def test_a_tree_that_passed_is_not_run_again_and_reads_the_same(tiny_project, tmp_path, sandbox_runs):
    first = _tested(tiny_project, tmp_path / "w1")
    second = _tested(tiny_project, tmp_path / "w2")
    assert len(sandbox_runs) == 1 and not (tmp_path / "w2").exists()
    assert first.ok and first.reused_from is None and second.reused_from  # when it passed, for the user
    assert second.record() == first.record()  # tests.json is the same bytes: the artifact does not say how
    assert _tested(tiny_project, tmp_path / "w3", reuse=False).reused_from is None and len(sandbox_runs) == 2


def test_any_change_to_the_tree_or_the_way_it_runs_runs_it_again(tiny_project, tmp_path, sandbox_runs):
    _tested(tiny_project, tmp_path / "w1")
    edited = tmp_path / "edited"
    shutil.copytree(tiny_project, edited)
    (edited / "tests" / "test_tiny.py").write_text("def test_adds():\n    assert 1 + 1 == 2  # edited\n")
    assert _tested(edited, tmp_path / "w2").reused_from is None
    moded = tmp_path / "moded"
    shutil.copytree(tiny_project, moded)
    (moded / "tests" / "test_tiny.py").chmod(0o755)  # an executable bit is part of what was tested
    assert _tested(moded, tmp_path / "w3").reused_from is None
    assert _tested(tiny_project, tmp_path / "w4", settings={"memory_mb": 2048}).reused_from is None
    assert len(sandbox_runs) == 4


def test_a_failure_is_always_run_again_and_a_weaker_fence_is_never_remembered(tiny_project, tmp_path,
                                                                              sandbox_runs):
    failing = tmp_path / "failing"
    shutil.copytree(tiny_project, failing)
    (failing / "tests" / "test_tiny.py").write_text("def test_adds():\n    assert 1 + 1 == 3\n")
    assert _tested(failing, tmp_path / "w1").failed == 1
    assert _tested(failing, tmp_path / "w2").failed == 1  # a flaky failure gets its second chance
    # unshare leaves the home folder in the tests' reach: what they could plant is never trusted, so never kept
    assert _tested(tiny_project, tmp_path / "w3", level="unshare").ok
    assert _tested(tiny_project, tmp_path / "w4", level="unshare").reused_from is None
    assert len(sandbox_runs) == 4 and not list((tmp_path / "cache").rglob("*.json"))


def test_a_damaged_or_unwritable_cache_only_costs_a_run(tiny_project, tmp_path, sandbox_runs):
    _tested(tiny_project, tmp_path / "w1")
    kept = next((tmp_path / "cache").rglob("*.json"))
    kept.write_text('{"tested_at": "2026-12-06 10:00 UTC", "result": {"level": "bubblewrap"')
    assert _tested(tiny_project, tmp_path / "w2").ok and len(sandbox_runs) == 2  # run again, and kept again
    assert _tested(tiny_project, tmp_path / "w3").reused_from and len(sandbox_runs) == 2
    shutil.rmtree(tmp_path / "cache" / "regen")
    (tmp_path / "cache" / "regen").write_text("not a folder")
    assert _tested(tiny_project, tmp_path / "w4").ok and _tested(tiny_project, tmp_path / "w5").ok
    assert len(sandbox_runs) == 4


def test_a_build_reuses_a_tree_that_passed_unless_asked_for_fresh(tmp_path):
    from types import SimpleNamespace

    from generator.build import produce
    from generator.build.context import BuildContext
    from generator.config import RunOptions, SandboxSettings
    from generator.progress import Reporter
    from generator.sandbox.run import SandboxResult

    asked = []

    def sandbox(src, settings, work, level, warn, reuse=False):
        asked.append(reuse)
        return SandboxResult(level="bubblewrap", passed=1, failed=0, errors=0, skipped=0, tests=(), exit_code=0)

    (tmp_path / "src").mkdir()
    prepared = SimpleNamespace(pipeline=SimpleNamespace(sandbox=SandboxSettings()))
    for fresh in (False, True):
        options = RunOptions(spec_dir=tmp_path, pipeline_file=tmp_path / "p.toml", out_dir=tmp_path, fresh=fresh)
        produce.sandbox(BuildContext(options=options, report=Reporter(quiet=True), sandbox=sandbox), prepared,
                        tmp_path / "src")
    assert asked == [True, False]  # --fresh runs the tests even when this exact tree passed before


def test_the_gate_runs_the_tests_again_even_when_the_tree_passed_before(monkeypatch, tmp_path):
    """The gate's point is a second, independent run: a remembered pass (or one planted in the cache) never
    stands in for it."""
    from generator.config import SandboxSettings
    from generator.progress import Reporter
    from generator.review import gate
    from generator.sandbox.run import SandboxResult

    asked = []

    def run_tests(src, settings, work, level=None, warn=None, reuse=False):
        asked.append(reuse)
        return SandboxResult(level="bubblewrap", passed=1, failed=0, errors=0, skipped=0, tests=(), exit_code=0)

    monkeypatch.setattr(gate, "run_tests", run_tests)
    gate.sandbox_tests(tmp_path, SandboxSettings(), "bubblewrap", Reporter(quiet=True))
    assert asked == [False]
