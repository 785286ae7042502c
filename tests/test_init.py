"""`regen init`: a new user's first spec, accepted by `regen check`, built offline at once; refusals change nothing."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from generator.artifact.manifest import Manifest
from generator.build.context import BuildContext
from generator.build.pipeline import regenerate
from generator.config import RunOptions
from generator.errors import UserError
from generator.kernel.capabilities import PACKS
from generator.progress import Reporter
from generator.spec.load import load_spec
from generator.spec.starter import FILES, init

REPO = Path(__file__).resolve().parents[1]
REGEN = [sys.executable, "-m", "generator.cli"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_init_writes_a_spec_check_accepts_with_two_mads_one_talking_to_the_other(tmp_path):
    done = subprocess.run(REGEN + ["init", str(tmp_path / "my-notes")], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ecosystem my_notes" in done.stdout and "regen regenerate --spec" in done.stdout
    checked = subprocess.run(REGEN + ["check", "--spec", str(tmp_path / "my-notes")], capture_output=True, text=True)
    assert checked.returncode == 0 and "2 MADs" in checked.stdout
    spec = load_spec(tmp_path / "my-notes")
    assert spec.ecosystem.name == "my_notes"
    talks = {m.name: m.talks_to for m in spec.mads}
    assert talks == {"desk": ["vault"], "vault": []}
    assert all(t.builtin for m in spec.mads for t in m.tools), "every tool bound to a capability: the offline default builds it"
    assert sorted(_tree(tmp_path / "my-notes")) == sorted(FILES)


def test_init_takes_a_name(tmp_path):
    init(tmp_path / "whatever", name="ledger")
    assert load_spec(tmp_path / "whatever").ecosystem.name == "ledger"


@pytest.mark.parametrize(("name", "why"), [("Ledger", "is not an ecosystem name"), ("2x", "is not an ecosystem name"),
                                         ("a-b", "is not an ecosystem name"), ("class", "is a Python keyword"),
                                         ("email", "standard library"), ("harness", "the artifact's tests"),
                                         ("mcp", "a library the kernel imports")])
def test_a_name_that_cannot_be_a_package_is_refused(tmp_path, name, why):
    """The name is the Python package's: one that is no identifier, a keyword, or shadows (or is shadowed by) a
    module the ecosystem or its tests import would build an ecosystem that cannot start or be tested."""
    with pytest.raises(UserError, match=why):
        init(tmp_path / "spec", name=name)
    assert not (tmp_path / "spec").exists()


def test_a_folder_name_that_cannot_be_a_package_asks_for_a_name(tmp_path):
    with pytest.raises(UserError, match=r"'email' is also a module of Python's standard library.*made from the "
                                        r"folder's name 'email'.*--name notes"):
        init(tmp_path / "email")
    assert not (tmp_path / "email").exists()


def test_init_refuses_a_folder_holding_a_spec_and_changes_nothing(tmp_path):
    init(tmp_path / "spec")
    (tmp_path / "spec" / "requirements.md").write_text("my own requirements\n")
    before = _tree(tmp_path / "spec")
    done = subprocess.run(REGEN + ["init", str(tmp_path / "spec")], capture_output=True, text=True)
    assert done.returncode == 2 and "already holds a spec" in done.stderr and "--force" in done.stderr
    assert "Traceback" not in done.stderr
    assert _tree(tmp_path / "spec") == before


def test_init_refuses_a_folder_that_is_not_empty_and_a_file_path(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n")
    with pytest.raises(UserError, match=r"is not empty \(todo.txt\); nothing was changed"):
        init(tmp_path / "notes")
    assert _tree(tmp_path / "notes") == {"todo.txt": b"keep me\n"}
    (tmp_path / "file.yaml").write_text("x: 1\n")
    done = subprocess.run(REGEN + ["init", str(tmp_path / "file.yaml")], capture_output=True, text=True)
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr
    assert (tmp_path / "file.yaml").read_text() == "x: 1\n"


def test_force_writes_the_starter_over_its_own_files_and_keeps_the_others(tmp_path):
    init(tmp_path / "spec")
    (tmp_path / "spec" / "requirements.md").write_text("mine\n")
    (tmp_path / "spec" / "notes.txt").write_text("keep me\n")
    init(tmp_path / "spec", force=True)
    assert (tmp_path / "spec" / "requirements.md").read_text() != "mine\n"
    assert (tmp_path / "spec" / "notes.txt").read_text() == "keep me\n"


@pytest.mark.slow
def test_the_new_users_loop_init_regenerate_edit_regenerate_diff(tmp_path):
    """The README's loop, on the offline default: init → regenerate → edit → regenerate → diff."""
    init(tmp_path / "spec", name="notes")
    out = tmp_path / "ecosystems"
    options = RunOptions(spec_dir=tmp_path / "spec", pipeline_file=REPO / "pipelines" / "offline.toml", out_dir=out)
    first = regenerate(BuildContext(options=options, report=Reporter(quiet=True)))
    assert first.version == "1.0.0" and first.manifest.sandbox.failed == 0 and first.manifest.sandbox.passed > 10
    # The starter binds no capability pack and names no deployment pack: its artifact carries no pack code and
    # none of the packs' libraries (but opentelemetry-api, which mcp itself requires).
    src = first.path / "src"
    assert sorted(p.name for p in (src / "notes" / "kernel" / "packs").iterdir() if p.suffix == ".py") == ["__init__.py"]
    locked = {package["name"] for package in tomllib.loads((src / "uv.lock").read_text())["package"]}
    pack_libraries = {dep.split("==")[0] for info in PACKS.values() for dep in info.dependencies} - {"opentelemetry-api"}
    assert {"redis", "opentelemetry-sdk", "duckdb"} <= pack_libraries
    assert pack_libraries and not locked & pack_libraries, locked & pack_libraries
    # Nothing changed: the answer takes no model, reviewer, sandbox, signature or template, nor their imports.
    probe = ("import sys; from generator.cli import main; code = main(sys.argv[1:]); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('litellm', 'jinja2', 'networkx', 'libcst', 'cryptography') or m.startswith(("
             "'generator.review.run', 'generator.review.llm', 'generator.review.deterministic', "
             "'generator.sandbox', 'generator.artifact.sign', 'generator.senior', 'generator.render'))))")
    # Run where a new user keeps their spec, outside regen's checkout: the offline pipeline is regen's own.
    noop = subprocess.run([sys.executable, "-c", probe, "regenerate", "--spec", "spec", "--out", "ecosystems"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert noop.returncode == 0 and "Up to date: notes 1.0.0" in noop.stderr, noop.stderr
    assert noop.stdout.strip() == "[]"
    # The edits a new user makes: a requirement, and the web console the starter's ecosystem.yaml shows how to add.
    with (tmp_path / "spec" / "requirements.md").open("a") as f:
        f.write("4. **Audit.** Every secret read is recorded.\n")
    ecosystem_yaml = tmp_path / "spec" / "ecosystem.yaml"
    starter_lines = ecosystem_yaml.read_text()
    assert "# packs:\n#   console: {}\n" in starter_lines
    ecosystem_yaml.write_text(starter_lines.replace("# packs:\n#   console: {}\n", "packs:\n  console: {}\n"))
    second = regenerate(BuildContext(options=options, report=Reporter(quiet=True)))
    assert second.version == "1.0.1" and Manifest.read(second.path).parent == "1.0.0"
    # Its sandbox ran the console's own acceptance tests (sign-in, CSRF, escaping) against the served build.
    assert second.manifest.sandbox.failed == 0 and second.manifest.sandbox.passed > first.manifest.sandbox.passed
    assert (second.path / "src" / "notes" / "kernel" / "packs" / "console" / "pack.py").is_file()
    assert "Open <http://127.0.0.1:8000/> for the web UI" in (second.path / "src" / "README.md").read_text()
    diff = subprocess.run(REGEN + ["diff", "notes@1.0.0", "notes@latest", "--out", str(out)], capture_output=True,
                          text=True, cwd=REPO)
    assert diff.returncode == 0, diff.stderr
    assert "modified  spec/requirements.md" in diff.stdout and "modified  spec/ecosystem.yaml" in diff.stdout
    assert "src/notes/kernel/packs/console/pack.py" in diff.stdout


def test_init_under_a_file_or_over_a_starter_path_that_is_in_the_way_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x\n")
    with pytest.raises(UserError, match="is a file, so .* cannot be made"):
        init(tmp_path / "afile" / "spec")
    init(tmp_path / "spec")
    (tmp_path / "spec" / "mads" / "desk.yaml").unlink()
    (tmp_path / "spec" / "mads" / "desk.yaml").mkdir()
    (tmp_path / "spec" / "requirements.md").write_text("mine\n")
    with pytest.raises(UserError, match=r"desk.yaml is in the way of the starter's mads/desk.yaml; nothing was changed"):
        init(tmp_path / "spec", force=True)
    assert (tmp_path / "spec" / "requirements.md").read_text() == "mine\n"


def test_the_starter_spec_names_no_path_of_this_machine(tmp_path):
    init(tmp_path / "spec")
    assert not [rel for rel, data in _tree(tmp_path / "spec").items() if str(tmp_path).encode() in data]
