"""The command line as a user meets it: fast help, clear errors, exit codes."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGEN = [sys.executable, "-m", "generator.cli"]


def regen(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(REGEN + list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_does_not_import_litellm():
    """`regen --help` must be instant: litellm takes seconds to import, so it is never loaded for it."""
    probe = (
        "import sys; sys.argv = ['regen', '--help']\n"
        "import generator.cli\n"
        "try:\n    generator.cli.main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('litellm', 'mcp', 'libcst', 'networkx') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "regenerate" in done.stdout and "HEAVY []" in done.stdout


def test_check_accepts_the_repo_spec():
    done = regen("check")
    assert done.returncode == 0
    assert re.search(r"ok — ecosystem madgroup, \d+ MADs", done.stdout)


def test_a_bad_spec_is_file_line_and_exit_2_never_a_traceback(tmp_path):
    spec = tmp_path / "spec"
    shutil.copytree(REPO / "spec", spec)
    path = spec / "mads" / "turing.yaml"
    path.write_text(path.read_text().replace("level: V1", "level: V7"))
    for command in ("check", "plan", "regenerate"):
        done = regen(command, "--spec", str(spec), cwd=tmp_path)
        assert done.returncode == 2, command
        assert "spec/mads/turing.yaml:3: 'level' must be one of" in done.stderr
        assert "Traceback" not in done.stderr


def test_plan_shows_the_start_up_order_and_units():
    done = regen("plan")
    assert done.returncode == 0
    # Dependencies first (Grace talks to Rogers, Fiedler and Turing; Fiedler to Rogers and Turing), ties by name.
    assert re.search(r"start-up order: .*\bturing -> rogers -> fiedler -> grace\n", done.stdout), done.stdout
    assert "mad:turing" in done.stdout and "frame" in done.stdout


def test_a_missing_pipeline_file_names_the_fix(tmp_path):
    done = regen("regenerate", "--pipeline", str(tmp_path / "nope.toml"), "--out", str(tmp_path))
    assert done.returncode == 2
    assert "pipeline file not found" in done.stderr and "Traceback" not in done.stderr


def test_usage_errors_exit_2():
    assert regen().returncode == 2
    assert regen("frobnicate").returncode == 2
