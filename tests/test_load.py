"""The spec loader: a good spec loads and is hashed; every bad spec is a located problem.

Most bad specs live in `tests/bad_specs/` (see its README); the few that git cannot
hold well (a huge file, a symlink, a FIFO) are made here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

from generator.errors import SpecError, UserError
from generator.kernel_contract import kernel_sources, kernel_tables, reserved_names
from generator.spec.load import MAX_FILE_BYTES, load_spec

TESTS = Path(__file__).parent
GOOD_SPEC = TESTS / "good_spec"
BAD_SPECS = TESTS / "bad_specs"
CASES = sorted(p.name for p in BAD_SPECS.iterdir() if p.is_dir())
EXPECTED_LINE = re.compile(r"^(?P<file>[^:]+?)(?::(?P<line>\d+))?: (?P<message>.+)$")


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of the good spec at ./spec, with the working folder set to its parent."""
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(GOOD_SPEC, tmp_path / "spec"))


def problems_of(root: Path) -> list[tuple[str, int, str]]:
    with pytest.raises(SpecError) as caught:
        load_spec(root)
    return [(p.file, p.line, p.message) for p in caught.value.problems]


def assert_problems(root: Path, expected: list[str]) -> None:
    """Exactly the expected problems: same file and line, message containing the text."""
    found = problems_of(root)
    wanted = []
    for text in expected:
        match = EXPECTED_LINE.match(text)
        assert match, f"malformed expectation {text!r}"
        wanted.append((match["file"], int(match["line"] or 0), match["message"]))
    unmatched = list(found)
    for file, line, message in wanted:
        hit = next((p for p in unmatched if p[0] == file and p[1] == line and message in p[2]), None)
        assert hit, f"no problem {file}:{line}: {message!r}\nfound: {found}"
        unmatched.remove(hit)
    assert not unmatched, f"unexpected extra problems: {unmatched}"


# --- a good spec ---------------------------------------------------------------------


def test_good_spec_loads_and_hashes_every_file(spec: Path) -> None:
    (spec / "notes").mkdir()
    (spec / "notes" / "extra.txt").write_text("hashed too\n")

    loaded = load_spec("spec")

    assert loaded.root == "spec"
    assert [m.name for m in loaded.mads] == ["grace", "turing"]
    assert loaded.mad("turing").tools[0].builtin == "secrets.set"
    assert loaded.ecosystem.models["default"].provider == "echo"
    assert loaded.requirements.startswith("# Requirements")
    assert loaded.principles.startswith("# Principles")
    paths = [f.path for f in loaded.files]
    assert paths == sorted(paths) == [
        "ecosystem.yaml", "mads/grace.yaml", "mads/turing.yaml", "notes/extra.txt",
        "principles.md", "requirements.md",
    ]
    for entry in loaded.files:
        assert entry.sha256 == hashlib.sha256((spec / entry.path).read_bytes()).hexdigest()


def test_symlink_inside_the_spec_is_fine(spec: Path) -> None:
    (spec / "shared.md").write_text("# Principles\n\nShared.\n")
    (spec / "principles.md").unlink()
    (spec / "principles.md").symlink_to("shared.md")
    assert load_spec(spec).principles.startswith("# Principles\n\nShared.")


def test_the_console_is_a_deployment_pack_a_spec_names_under_packs(spec: Path) -> None:
    """Grace's web console comes into a build only by name, like redis and tracing; it takes no settings."""
    assert "console" not in load_spec(spec).packs  # not named: no web UI
    ecosystem = spec / "ecosystem.yaml"
    plain = ecosystem.read_text()
    ecosystem.write_text(plain + "packs:\n  console: {}\n")
    assert "console" in load_spec(spec).packs
    ecosystem.write_text(plain + "packs:\n  console:\n    port: 8080\n")
    line = len(plain.splitlines()) + 3
    assert_problems(spec, [f"spec/ecosystem.yaml:{line}: unknown setting 'port' of the 'console' pack; it takes none: "
                           "write `console: {}`"])


def test_yaml_merge_keys_load_and_keep_lines(spec: Path) -> None:
    text = (spec / "mads/grace.yaml").read_text()
    text = text.replace("level: V1\n", "<<: *base\nlevle: V2\n")
    (spec / "mads/grace.yaml").write_text("base: &base {level: V1, lifecycle: persistent}\n" + text)
    # `base` and `levle` are both unknown keys: the merge itself is accepted.
    assert_problems(spec, [
        "spec/mads/grace.yaml:1: unknown key 'base' in MAD",
        "spec/mads/grace.yaml:5: unknown key 'levle' in MAD; expected one of: name, role, level",
    ])


# --- the corpus ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_bad_spec(case: str, spec: Path) -> None:
    folder = BAD_SPECS / case
    removals = folder / "remove.txt"
    for pattern in removals.read_text().split() if removals.exists() else []:
        for path in spec.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if (folder / "spec").is_dir():  # a case that only removes files has no overlay (git keeps no empty folders)
        shutil.copytree(folder / "spec", spec, dirs_exist_ok=True)

    assert_problems(spec, (folder / "expected.txt").read_text().splitlines())


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 20


# --- defects made here ---------------------------------------------------------------


def test_oversized_file_is_refused_before_parsing(spec: Path) -> None:
    (spec / "requirements.md").write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    assert_problems(spec, [
        f"spec/requirements.md: file is {MAX_FILE_BYTES + 1} bytes, over the limit of {MAX_FILE_BYTES} bytes",
    ])


def test_symlink_leaving_the_spec_is_refused(spec: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.md"
    outside.write_text("# Requirements\n")
    (spec / "requirements.md").unlink()
    (spec / "requirements.md").symlink_to(outside)
    (spec / "linked").symlink_to(tmp_path, target_is_directory=True)
    assert_problems(spec, [
        f"spec/requirements.md: symlink to {outside} leaves the spec folder",
        f"spec/linked: symlink to {tmp_path} leaves the spec folder",
    ])


def test_relative_symlink_escape_is_caught_after_resolving(spec: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.md").write_text("# Requirements\n")
    (spec / "requirements.md").unlink()
    (spec / "requirements.md").symlink_to("../secret.md")
    assert_problems(spec, ["spec/requirements.md: symlink to ../secret.md leaves the spec folder"])


def test_broken_symlink(spec: Path) -> None:
    (spec / "principles.md").unlink()
    (spec / "principles.md").symlink_to("nowhere.md")
    assert_problems(spec, ["spec/principles.md: broken symlink to nowhere.md"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_reading_it(spec: Path) -> None:
    os.mkfifo(spec / "pipe")  # reading it would block forever
    assert_problems(spec, ["spec/pipe: not a regular file"])


def test_mads_folder_leaving_the_spec_is_one_problem(spec: Path, tmp_path: Path) -> None:
    shutil.move(spec / "mads", tmp_path / "mads")
    (spec / "mads").symlink_to(tmp_path / "mads", target_is_directory=True)
    assert_problems(spec, [f"spec/mads: symlink to {tmp_path / 'mads'} leaves the spec folder"])


def test_cycle_through_a_duplicated_mad_name(spec: Path) -> None:
    text = (spec / "mads/turing.yaml").read_text().replace("talks_to: []", "talks_to: [grace]")
    (spec / "mads/alan.yaml").write_text(text)
    assert_problems(spec, [
        "spec/mads/alan.yaml:1: MAD name 'turing' does not match its file name 'alan.yaml'",
        "spec/mads/alan.yaml:1: duplicate MAD name 'turing' (first in spec/mads/turing.yaml:1)",
        "spec/mads/alan.yaml:6: dependency cycle: grace -> turing -> grace",
    ])


def test_alias_bomb_is_refused(spec: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (spec / "ecosystem.yaml").write_text("\n".join(lines) + "\n")
    assert_problems(spec, ["spec/ecosystem.yaml:1: document expands to more than 50000 values"])


def test_recursive_alias_is_refused(spec: Path) -> None:
    (spec / "ecosystem.yaml").write_text("name: &loop [a, *loop]\n")
    assert_problems(spec, ["spec/ecosystem.yaml:1: an alias refers to a value containing itself"])


@pytest.mark.parametrize("text", [
    "name: [unclosed\n",
    "\x00\n",
    "a: 1\n---\nb: 2\n",
    "a: *undefined\n",
    "? [a, b]\n: c\n",
    "<<: 5\n",
    "n: !!int abc\n",
    "n: !!timestamp soon\n",
    "n: !!bool maybe\n",
    "n: !!binary '@@@'\n",
    "[" * 5000 + "]" * 5000 + "\n",
    "n: " + "9" * 5000 + "\n",
    "\t- tab\n",
], ids=lambda t: repr(t[:20]))
def test_garbage_is_a_spec_error_never_a_crash(spec: Path, text: str) -> None:
    (spec / "ecosystem.yaml").write_text(text)
    found = problems_of(spec)
    assert found and all(file == "spec/ecosystem.yaml" for file, _, _ in found)


# --- reporting -----------------------------------------------------------------------


def test_every_problem_is_reported_at_once(spec: Path) -> None:
    (spec / "requirements.md").unlink()
    turing = spec / "mads/turing.yaml"
    turing.write_text(turing.read_text().replace("level: V1", "level: V9").replace("default", "fast"))
    grace = spec / "mads/grace.yaml"
    grace.write_text(grace.read_text().replace("talks_to: [turing]", "talks_to: [grace]"))

    with pytest.raises(SpecError) as caught:
        load_spec("spec")

    error = caught.value
    assert isinstance(error, UserError)
    # Sorted by file and line; the model alias is not checked in a MAD that failed to validate.
    assert str(error).splitlines() == [
        "spec/mads/grace.yaml:4: MAD 'grace' talks to itself; expected only other MADs in talks_to",
        "spec/mads/turing.yaml:3: 'level' must be one of 'V0', 'V1', 'V2', 'V3', 'V4' or 'V5', got 'V9'",
        "spec/requirements.md: missing required file; expected the ecosystem's requirements, in Markdown",
    ]


def test_paths_outside_the_working_folder_are_shown_as_given(spec: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (spec / "principles.md").unlink()
    [(file, line, message)] = problems_of(spec)
    assert (file, line) == (str(spec / "principles.md"), 0)
    assert message.startswith("missing required file")


def test_missing_spec_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert problems_of(Path("nope")) == [("nope", 0, "spec folder not found; expected a folder holding "
                                          "ecosystem.yaml, requirements.md, principles.md and mads/")]


# --- folders where files belong --------------------------------------------------------


@pytest.mark.parametrize("name", ["ecosystem.yaml", "requirements.md", "principles.md"])
def test_required_file_that_is_a_folder_is_named(spec: Path, name: str) -> None:
    (spec / name).unlink()
    (spec / name).mkdir()  # empty: git could not hold it as a corpus case
    assert_problems(spec, [f"spec/{name}: is a folder, not a file; expected a file holding"])


def test_mad_file_that_is_a_folder_is_named(spec: Path) -> None:
    (spec / "mads/grace.yaml").unlink()
    (spec / "mads/grace.yaml").mkdir()
    assert_problems(spec, ["spec/mads/grace.yaml: is a folder; expected only mads/<name>.yaml files"])


def test_required_file_that_is_a_symlink_loop_is_named(spec: Path) -> None:
    (spec / "principles.md").unlink()
    (spec / "principles.md").symlink_to(".", target_is_directory=True)
    assert_problems(spec, ["spec/principles.md: is a folder, not a file"])


def test_a_failed_load_always_says_why(spec: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Were a refusal ever to forget its problem, the user must still see one, never an empty error.
    monkeypatch.setattr("generator.spec.load._decode", lambda folder, rel, problems: None)
    [(file, line, message)] = problems_of(spec)
    assert (file, line) == ("spec", 0) and "no reason was recorded" in message


# --- names the kernel reserves, derived from its source ----------------------------------


def test_reserved_tool_names_follow_the_kernel_mad_class() -> None:
    from generator.kernel.mad import Mad

    reserved = reserved_names()
    assert {"use", "handle", "think", "ask", "call_tool", "health", "store", "tools", "on_start",
            "name", "role", "storage", "_kernel", "conversation_ids", "tool"} <= reserved
    # Every public name of the class, as Python sees it, is covered.
    assert {attr for attr in vars(Mad) if not attr.startswith("_")} <= reserved


def test_kernel_tables_follow_the_kernel_schemas() -> None:
    import importlib
    import sqlite3

    # Run every schema the kernel modules hold and list what SQLite really created.
    conn = sqlite3.connect(":memory:")
    # The kernel's own modules, not regen's tests of its packs (which need pytest's sys.path to import).
    for rel in sorted(rel for rel in kernel_sources() if rel.endswith(".py")):
        module = importlib.import_module(".".join(("generator", "kernel", *Path(rel).with_suffix("").parts))
                                         .removesuffix(".__init__"))
        for value in vars(module).values():
            if isinstance(value, str) and re.search(r"CREATE\s+(VIRTUAL\s+)?TABLE", value, re.IGNORECASE):
                try:
                    conn.executescript(value)
                except sqlite3.OperationalError:  # e.g. no FTS5 in this SQLite build
                    continue
    created = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                              "AND name NOT LIKE 'sqlite%'")}
    conn.close()
    assert {"conversations", "messages", "bus_deliveries", "secrets", "secrets_audit", "budgets", "model_calls"} <= created
    assert created <= set(kernel_tables())
    # written as f-strings too (`CREATE TABLE IF NOT EXISTS messages {_MESSAGES}`): still found
    assert {"messages", "bus_deliveries", "messages_relayout", "bus_deliveries_relayout"} <= set(kernel_tables())
    assert all(re.fullmatch(r"[A-Za-z_]\w*", name) for name in kernel_tables())


def test_a_table_of_a_duplicated_mad_is_not_also_a_collision(spec: Path) -> None:
    storage = "storage:\n  - name: keys\n    columns:\n      - {name: id, type: text}\n"
    turing = spec / "mads/turing.yaml"
    turing.write_text(turing.read_text() + storage)
    (spec / "mads/alan.yaml").write_text(turing.read_text())
    assert_problems(spec, [
        "spec/mads/alan.yaml:1: MAD name 'turing' does not match its file name 'alan.yaml'",
        "spec/mads/alan.yaml:1: duplicate MAD name 'turing'",
    ])


def test_softkeywords_and_defaults_of_the_right_type_load(spec: Path) -> None:
    grace = spec / "mads/grace.yaml"
    grace.write_text(grace.read_text().replace("name: greet", "name: match").replace(
        "      who: {type: str, default: world}\n",
        "      who: {type: str, default: world}\n"
        "      case: {type: float, default: 2}\n"
        "      ids: {type: 'list[int]', default: [1, 2]}\n"
        "      rows: {type: 'list[dict]', default: [{a: 1}]}\n"
        "      extra: {type: dict, default: {}}\n"
        "      nothing: {type: None, default: null}\n",
    ))
    tool = load_spec(spec).mad("grace").tools[0]
    assert tool.name == "match"
    assert {name: p.default for name, p in tool.params.items()} == {
        "who": "world", "case": 2, "ids": [1, 2], "rows": [{"a": 1}], "extra": {}, "nothing": None,
    }


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    ("mads/grace.yaml", "      who:", "      self:",
     "spec/mads/grace.yaml:13: parameter name 'self' is taken by the tool method itself"),
    ("ecosystem.yaml", 'python: "3.11"', 'python: "3.011"',
     "spec/ecosystem.yaml:3: python '3.011' is not a plain version; expected it like '3.11'"),
    ("ecosystem.yaml", 'python: "3.11"', 'python: "3.9"',
     "spec/ecosystem.yaml:3: python '3.9' is too old: the kernel needs Python 3.11 or newer"),
], ids=["self-param", "python-leading-zero", "python-3.9"])
def test_names_and_versions_generated_code_cannot_use(spec: Path, file: str, old: str, new: str,
                                                      expected: str) -> None:
    path = spec / file
    path.write_text(path.read_text().replace(old, new))
    assert_problems(spec, [expected])
