"""The offline reviewers on a copy of the archived madgroup 1.0.2: clean, then with one planted defect each."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from archive import ARCHIVE, NEWEST, PARENT

from generator.errors import UserError
from generator.review.deterministic import DEFAULT_EXCLUDE, run_check
from generator.review.models import Finding, Material, ReviewScope, Subject, VerdictAnswer
from generator.review.panel import DETERMINISTIC_KINDS
from generator.spec.load import load_spec
from generator.spec.model import PrincipleRule

REPO = Path(__file__).resolve().parents[1]
TURING = "src/madgroup/mads/turing.py"
GET_SECRET = "        return await self.use('secrets.get', name=name)\n"
SET_SECRET = "        return await self.use('secrets.set', name=name, value=value)\n"
LOGGER = "from ..kernel import Mad, tool\n"


@pytest.fixture(scope="module")
def spec():
    return load_spec(REPO / "spec")


@pytest.fixture
def artifact(tmp_path):
    return shutil.copytree(ARCHIVE / NEWEST, tmp_path / "1.0.2")


def subject(artifact: Path, spec, parent: Path | None = None) -> Subject:
    material = Material(
        ecosystem="madgroup", version="1.0.2", parent="1.0.1" if parent else None, requirements="", principles="",
        manifest={}, tests=json.loads((artifact / "tests.json").read_text()), changed=(),
        scope=ReviewScope(mode="full", baseline=None, reason="every file"),
    )
    return Subject(artifact=artifact, parent=parent, spec=spec, material=material)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    path.write_text(text.replace(old, new))


def line_of(path: Path, fragment: str) -> int:
    return next(n for n, text in enumerate(path.read_text().splitlines(), 1) if fragment in text)


def with_logger(artifact: Path) -> None:
    """Give turing.py a module logger, as a MAD that logs would have."""
    edit(artifact / TURING, LOGGER, LOGGER + "from ..kernel.logs import get as get_logger\n\nlog = get_logger('turing')\n")


def rules(answer: VerdictAnswer) -> list[str]:
    return [f.rule for f in answer.findings]


def only(answer: VerdictAnswer, rule: str) -> Finding:
    found = [f for f in answer.findings if f.rule == rule]
    assert len(found) == 1, answer.findings
    return found[0]


def blocking(answer: VerdictAnswer) -> list[Finding]:
    return [f for f in answer.findings if f.severity in ("critical", "major")]


# --- the clean artifact -------------------------------------------------------------------


@pytest.mark.parametrize("kind", DETERMINISTIC_KINDS)
def test_the_clean_archived_build_is_approved_by_every_check(artifact, spec, kind):
    answer = run_check(kind, subject(artifact, spec, parent=ARCHIVE / PARENT), {})
    assert answer.decision == "approve", answer.findings
    assert blocking(answer) == []


def test_the_tests_summary_says_what_passed_and_where(artifact, spec):
    answer = run_check("tests", subject(artifact, spec), {})
    passed = json.loads((artifact / "tests.json").read_text())["passed"]
    assert passed > 0 and answer.summary == f"{passed} tests passed in the sandbox (bubblewrap)"
    assert answer.findings == []


def test_answers_are_reproducible_and_name_no_absolute_path(artifact, spec):
    with_logger(artifact)
    edit(artifact / TURING, GET_SECRET, "        secret = await self.use('secrets.get', name=name)\n"
                                        "        print(secret)\n        return secret\n")
    (artifact / "src/madgroup/mads/broken.py").write_text("def broken(:\n")
    first = [run_check(kind, subject(artifact, spec), {}).model_dump_json() for kind in DETERMINISTIC_KINDS]
    again = [run_check(kind, subject(artifact, spec), {}).model_dump_json() for kind in DETERMINISTIC_KINDS]
    assert first == again
    assert not any(str(artifact.parent) in answer for answer in first)


# --- tests ---------------------------------------------------------------------------------


def _results(artifact: Path) -> dict:
    return json.loads((artifact / "tests.json").read_text())


def _write_results(artifact: Path, results: dict) -> None:
    (artifact / "tests.json").write_text(json.dumps(results))


def test_a_failing_test_is_critical_at_its_def(artifact, spec):
    results = _results(artifact)
    failing = next(t for t in results["tests"] if t["id"] == "tests.test_turing::test_rotate_secret")
    failing.update(outcome="failed", message="AssertionError: assert 1 == 2\nmore detail")
    results.update(passed=38, failed=1, exit_code=1)
    _write_results(artifact, results)
    answer = run_check("tests", subject(artifact, spec), {})
    assert answer.decision == "request_changes"
    finding = only(answer, "failing-test")
    assert (finding.severity, finding.file) == ("critical", "src/tests/test_turing.py")
    assert finding.line == line_of(artifact / "src/tests/test_turing.py", "def test_rotate_secret(")
    assert finding.message == "tests.test_turing::test_rotate_secret failed: AssertionError: assert 1 == 2"
    assert answer.summary.startswith("38 tests passed, 1 failed in the sandbox (bubblewrap); 1 finding: 1 critical failing-test")


def test_no_tests_is_critical(artifact, spec):
    results = _results(artifact)
    results.update(tests=[], passed=0, exit_code=5)
    _write_results(artifact, results)
    answer = run_check("tests", subject(artifact, spec), {})
    assert answer.decision == "request_changes"
    assert only(answer, "no-tests").severity == "critical"
    assert only(answer, "test-run-failed").file == "tests.json"


def test_missing_results_are_no_tests(artifact, spec):
    (artifact / "tests.json").write_text("{}")
    answer = run_check("tests", subject(artifact, spec), {})
    assert rules(answer) == ["no-tests"] and answer.decision == "request_changes"


def test_a_weak_sandbox_is_minor_unless_the_panel_requires_more(artifact, spec):
    results = _results(artifact)
    results["level"] = "unshare"
    _write_results(artifact, results)
    lenient = run_check("tests", subject(artifact, spec), {})
    assert lenient.decision == "approve" and only(lenient, "weak-sandbox").severity == "minor"
    strict = run_check("tests", subject(artifact, spec), {"require_level": "bubblewrap"})
    assert strict.decision == "request_changes" and only(strict, "weak-sandbox").severity == "major"


def test_a_skipped_test_is_information(artifact, spec):
    results = _results(artifact)
    first = results["tests"][0]
    first.update(outcome="skipped", message="needs a network")
    results.update(passed=results["passed"] - 1, skipped=1)
    _write_results(artifact, results)
    answer = run_check("tests", subject(artifact, spec), {})
    assert answer.decision == "approve"
    finding = only(answer, "skipped-test")
    module = first["id"].split("::")[0].removeprefix("tests.")
    assert (finding.severity, finding.file) == ("info", f"src/tests/{module}.py")


# --- static --------------------------------------------------------------------------------


@pytest.fixture
def own_facts_cache(tmp_path, monkeypatch):
    """A fresh facts cache, in memory and on disk, so a test sees what a first run and a second run do."""
    from generator.review import deterministic

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    deterministic._facts.cache_clear()
    yield tmp_path / "cache" / "regen" / "static-facts"
    deterministic._facts.cache_clear()


@pytest.fixture
def with_todays_kernel(tmp_path):
    """A build as one made today carries the core of the kernel, with the archived Turing beside it: small, so
    the cache tests parse it cold several times in seconds."""
    from generator.kernel_contract import kernel_files

    artifact = tmp_path / "small"
    for rel, data in kernel_files("madgroup", ()).items():
        (artifact / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (artifact / "src" / rel).write_bytes(data)
    (artifact / TURING).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ARCHIVE / NEWEST / TURING, artifact / TURING)
    shutil.copyfile(ARCHIVE / NEWEST / "tests.json", artifact / "tests.json")
    return artifact


def _leaky_turing(artifact: Path) -> None:
    edit(artifact / TURING, GET_SECRET, "        secret = await self.use('secrets.get', name=name)\n"
                                        "        print(secret)\n        return secret\n")


def test_a_second_run_judges_from_cached_facts_exactly_as_the_first(with_todays_kernel, spec, own_facts_cache):
    from generator.review import deterministic

    artifact = with_todays_kernel
    _leaky_turing(artifact)
    first = run_check("static", subject(artifact, spec), {})
    from generator.kernel.capabilities import PACKS
    from generator.kernel_contract import kernel_files

    regens = {hashlib.sha256(data).digest() for rel, data in kernel_files("madgroup", PACKS).items()
              if rel.endswith(".py")}
    carried = {hashlib.sha256(p.read_bytes()).digest() for p in (artifact / "src").rglob("*.py")}
    assert len(list(own_facts_cache.rglob("*.json"))) == len(regens & carried), "regen's kernel files' facts only"
    deterministic._facts.cache_clear()  # another process: only the disk is left
    second = run_check("static", subject(artifact, spec), {})
    assert second == first and only(second, "secret-in-log").line == line_of(artifact / TURING, "print(secret)")
    # Judged again under a principle the first run did not have: the cached facts hold what rules need.
    strict = spec.model_copy(update={"ecosystem": spec.ecosystem.model_copy(update={"principles": [
        *spec.ecosystem.principles, PrincipleRule(id="no-json", description="no json", forbid_imports=["json"])]})})
    kernel_json = [f for f in run_check("static", subject(artifact, strict), {}).findings if f.rule == "no-json"]
    assert {f.file for f in kernel_json} >= {"src/madgroup/kernel/bus.py", "src/madgroup/kernel/runtime.py"}


def test_a_damaged_or_unwritable_facts_cache_is_read_past(with_todays_kernel, spec, own_facts_cache):
    from generator.review import deterministic

    artifact = with_todays_kernel
    _leaky_turing(artifact)
    expected = run_check("static", subject(artifact, spec), {})
    for kept in own_facts_cache.rglob("*.json"):
        kept.write_text('{"imports": [["half')  # a run died mid-write, or a disk filled
    deterministic._facts.cache_clear()
    assert run_check("static", subject(artifact, spec), {}) == expected
    shutil.rmtree(own_facts_cache)
    own_facts_cache.parent.mkdir(parents=True, exist_ok=True)
    own_facts_cache.write_text("not a folder")  # nowhere to write: the review still judges, uncached
    deterministic._facts.cache_clear()
    assert run_check("static", subject(artifact, spec), {}) == expected


def test_facts_planted_in_the_cache_never_hide_a_generated_or_edited_files_findings(
        with_todays_kernel, spec, own_facts_cache):
    """Generated code (its tests run before the review, maybe with the user's home in reach) could write the
    cache: only regen's own kernel files, byte for byte, are ever read from it."""
    from generator.review import deterministic

    artifact = with_todays_kernel
    run_check("static", subject(artifact, spec), {})
    for kept in own_facts_cache.rglob("*.json"):  # every entry now says: nothing here
        kept.write_text(json.dumps({"imports": [], "calls": [], "leaks": []}))
    deterministic._facts.cache_clear()
    _leaky_turing(artifact)
    runtime = artifact / "src" / "madgroup" / "kernel" / "runtime.py"
    runtime.write_text(runtime.read_text() + "\n\ndef leak(secret):\n    print(secret)\n")
    found = {(f.file, f.rule) for f in run_check("static", subject(artifact, spec), {}).findings}
    assert {(TURING, "secret-in-log"), ("src/madgroup/kernel/runtime.py", "secret-in-log")} <= found


def test_logging_a_secret_value_read_from_turing_is_critical_at_its_line(artifact, spec):
    with_logger(artifact)
    edit(artifact / TURING, GET_SECRET, "        value = (await self.use('secrets.get', name=name))['value']\n"
                                        "        log.info('read %s', value)\n"
                                        "        return {'name': name, 'value': value}\n")
    answer = run_check("static", subject(artifact, spec), {})
    assert answer.decision == "request_changes"
    finding = only(answer, "secret-in-log")
    assert (finding.severity, finding.file) == ("critical", TURING)
    assert finding.line == line_of(artifact / TURING, "log.info('read %s', value)")
    assert finding.message == "log.info() writes value, which carries a secret's value"


def test_logging_the_value_a_secret_setter_receives_is_critical(artifact, spec):
    with_logger(artifact)
    edit(artifact / TURING, SET_SECRET, "        log.info('storing %s as %s', name, value)\n" + SET_SECRET)
    finding = only(run_check("static", subject(artifact, spec), {}), "secret-in-log")
    assert finding.line == line_of(artifact / TURING, "log.info('storing")


def test_printing_a_secret_is_critical(artifact, spec):
    edit(artifact / TURING, GET_SECRET, "        secret = await self.use('secrets.get', name=name)\n"
                                        "        print(secret)\n        return secret\n")
    answer = run_check("static", subject(artifact, spec), {})
    assert answer.decision == "request_changes"
    finding = only(answer, "secret-in-log")
    assert (finding.file, finding.line) == (TURING, line_of(artifact / TURING, "print(secret)"))
    assert answer.summary.endswith("1 finding: 1 critical secret-in-log")


def test_every_way_of_writing_a_secret_out_is_found(artifact, spec):
    with_logger(artifact)
    edit(artifact / TURING, LOGGER, "import logging\nimport sys\n\n" + LOGGER)
    leaks = [
        "log.info(f'read {secret[\"value\"]}')",
        "logging.getLogger(__name__).warning('got %s', secret)",
        "sys.stderr.write(str(secret))",
        "log.debug('read', extra={'value': secret['value']})",
        "print('{}'.format(secret.strip()))",
    ]
    edit(artifact / TURING, GET_SECRET, "        secret = await self.use('secrets.get', name=name)\n"
         + "".join(f"        {leak}\n" for leak in leaks) + "        return secret\n")
    answer = run_check("static", subject(artifact, spec), {})
    assert [(f.rule, f.file, f.line) for f in answer.findings] == [
        ("secret-in-log", TURING, line_of(artifact / TURING, leak)) for leak in leaks
    ]


def test_a_secrets_name_or_metadata_may_be_logged(artifact, spec):
    with_logger(artifact)
    edit(artifact / TURING, GET_SECRET, """\
        secret = await self.use('secrets.get', name=name)
        token_count = 3
        log.info('secret %s set', name)
        log.info('read %s', secret['name'])
        log.info('used %d tokens', token_count)
        log.info('%d characters', len(secret['value']))
        log.info('listed %s', await self.use('secrets.list'))
        print('read the secret: %s' % name)
        return secret
""")
    answer = run_check("static", subject(artifact, spec), {})
    assert answer.decision == "approve", answer.findings
    assert answer.findings == []


def test_import_pickle_breaks_the_no_pickle_principle(artifact, spec):
    edit(artifact / TURING, LOGGER, LOGGER + "import pickle\n")
    answer = run_check("static", subject(artifact, spec), {})
    assert answer.decision == "request_changes"
    finding = only(answer, "no-pickle")  # the principle reports it; forbidden-import does not repeat it
    assert (finding.severity, finding.file, finding.line) == ("major", TURING, line_of(artifact / TURING, "import pickle"))
    assert rules(answer) == ["no-pickle"]


def test_an_import_no_principle_covers_is_a_forbidden_import(artifact, spec):
    edit(artifact / TURING, LOGGER, LOGGER + "import ftplib\n")
    finding = only(run_check("static", subject(artifact, spec), {}), "forbidden-import")
    assert (finding.severity, finding.line) == ("major", line_of(artifact / TURING, "import ftplib"))


def test_the_panel_may_forbid_more_calls_and_exclude_files(artifact, spec):
    edit(artifact / TURING, GET_SECRET, "        os.remove('x')\n" + GET_SECRET)
    answer = run_check("static", subject(artifact, spec), {"forbid_calls": ["os.remove"]})
    assert only(answer, "forbidden-call").line == line_of(artifact / TURING, "os.remove('x')")
    excluded = run_check("static", subject(artifact, spec), {"forbid_calls": ["os.remove"],
                                                            "exclude": [*DEFAULT_EXCLUDE, "src/*/mads/*"]})
    assert excluded.decision == "approve"


def test_a_file_that_does_not_parse_is_critical(artifact, spec):
    (artifact / "src/madgroup/mads/broken.py").write_text('"""Broken."""\n\ndef broken(:\n    pass\n')
    answer = run_check("static", subject(artifact, spec), {})
    assert answer.decision == "request_changes"
    finding = only(answer, "syntax-error")
    assert (finding.severity, finding.file, finding.line) == ("critical", "src/madgroup/mads/broken.py", 3)


# --- dependencies ----------------------------------------------------------------------------


def test_an_unpinned_dependency_is_major_at_its_line(artifact, spec):
    pyproject = artifact / "src/pyproject.toml"
    edit(pyproject, '"httpx==0.28.1"', '"httpx>=0.28"')
    answer = run_check("dependencies", subject(artifact, spec), {})
    assert answer.decision == "request_changes"
    finding = only(answer, "unpinned-dependency")
    assert (finding.severity, finding.file, finding.line) == ("major", "src/pyproject.toml", line_of(pyproject, "httpx>=0.28"))
    assert "httpx==0.28.1" in finding.suggestion
    assert only(answer, "stale-lock").file == "src/uv.lock"  # the lock still says ==0.28.1


def test_a_dependency_the_spec_does_not_declare_is_major(artifact, spec):
    edit(artifact / "src/pyproject.toml", '    "httpx==0.28.1",\n', '    "requests==2.32.3",\n')
    answer = run_check("dependencies", subject(artifact, spec), {})
    assert only(answer, "undeclared-dependency").message == "runtime requirement 'requests==2.32.3' is not declared in the spec"
    assert "httpx==0.28.1" in only(answer, "missing-dependency").message


def test_a_git_sourced_package_is_major_at_its_lock_entry(artifact, spec):
    lock = artifact / "src/uv.lock"
    entry = 'name = "anyio"\nversion = "4.16.0"\nsource = { registry = "https://pypi.org/simple" }\n'
    edit(lock, entry, entry.replace('registry = "https://pypi.org/simple"', 'git = "https://github.com/agronholm/anyio?rev=4.16.0"'))
    answer = run_check("dependencies", subject(artifact, spec), {})
    assert answer.decision == "request_changes"
    finding = only(answer, "non-registry-source")
    assert (finding.severity, finding.file, finding.line) == ("major", "src/uv.lock", line_of(lock, 'name = "anyio"'))


def test_a_missing_lock_is_critical(artifact, spec):
    (artifact / "src/uv.lock").unlink()
    answer = run_check("dependencies", subject(artifact, spec), {})
    assert only(answer, "no-lock").severity == "critical"


def test_changes_against_the_parent_inform_but_do_not_block(artifact, spec, tmp_path):
    parent = shutil.copytree(ARCHIVE / NEWEST, tmp_path / "parent")
    lock = parent / "src/uv.lock"
    text = lock.read_text()
    start = text.index('[[package]]\nname = "attrs"')
    lock.write_text(text[:start] + text[text.index("[[package]]", start + 1):])  # attrs is new since the parent
    edit(lock, 'name = "idna"\nversion = "3.20"', 'name = "idna"\nversion = "3.10"')
    answer = run_check("dependencies", subject(artifact, spec, parent=parent), {})
    assert answer.decision == "approve"
    added, changed = only(answer, "dependency-added"), only(answer, "dependency-changed")
    assert (added.severity, added.file, added.line) == ("info", "src/uv.lock", line_of(artifact / "src/uv.lock", 'name = "attrs"'))
    assert changed.message == "idna moved from 3.10 to 3.20"
    assert answer.summary.endswith("2 findings: 1 info dependency-added, 1 info dependency-changed")


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, options, named", [
    ("static", {"forbid_import": ["x"]}, "'forbid_import'"),
    ("dependencies", {"strict": True}, "'strict'"),
    ("tests", {"require_level": "docker"}, "'require_level'"),
    ("static", {"exclude": "src/tests/**"}, "'exclude'"),
    ("lint", {}, "'lint'"),
])
def test_bad_options_are_user_errors_naming_the_key(artifact, spec, kind, options, named):
    with pytest.raises(UserError, match=named):
        run_check(kind, subject(artifact, spec), options)


# --- requirements: each one proven by a passing test that names it -----------------------------


def test_every_requirement_of_the_newest_build_is_named_by_a_passing_test(artifact, spec):
    results = _results(artifact)
    named = {r for t in results["tests"] if t["outcome"] == "passed" for r in t["requirements"]}
    assert {r.id for r in spec.requirement_items} <= named


def test_a_requirement_whose_only_tests_fail_or_that_no_test_names_is_major_at_its_line(artifact, spec):
    results = _results(artifact)
    r9 = spec.requirement("R9")
    for test in results["tests"]:
        if "R9" in test["requirements"]:
            test.update(outcome="failed", message="boom")
        test["requirements"] = [r for r in test["requirements"] if r != "R11"]
    _write_results(artifact, results)
    answer = run_check("tests", subject(artifact, spec), {})
    uncovered = {f.message.split()[1]: f for f in answer.findings if f.rule == "uncovered-requirement"}
    assert set(uncovered) == {"R9", "R11"}
    assert (uncovered["R9"].file, uncovered["R9"].line, uncovered["R9"].severity) == ("spec/requirements.md", r9.line, "major")
    assert "the tests that name it did not pass (tests.test_ecosystem::" in uncovered["R9"].message
    assert uncovered["R11"].message == "requirement R11 is not proven by a passing test: no test names it"
    assert "`acceptance:`" in uncovered["R11"].suggestion


def test_a_test_naming_an_unknown_requirement_is_minor_at_the_test(artifact, spec):
    results = _results(artifact)
    test = next(t for t in results["tests"] if t["id"] == "tests.test_turing::test_rotate_secret")
    test["requirements"] = [*test["requirements"], "R99"]
    _write_results(artifact, results)
    answer = run_check("tests", subject(artifact, spec), {})
    unknown = only(answer, "unknown-requirement")
    assert (unknown.severity, unknown.file) == ("minor", "src/tests/test_turing.py")
    assert unknown.message == "tests.test_turing::test_rotate_secret names requirement 'R99', which spec/requirements.md does not have"


def test_an_uncovered_requirement_goes_to_the_units_whose_tests_are_to_prove_it(spec):
    from generator.build.judge import findings_by_unit
    from generator.review.models import Verdict
    from generator.spec.plan import make_plan

    def uncovered(requirement_id):
        return Finding(file="spec/requirements.md", line=spec.requirement(requirement_id).line, severity="major",
                       rule="uncovered-requirement", message=f"requirement {requirement_id} is not proven")

    verdict = Verdict(reviewer="tests", kind="tests", round=1, decision="request_changes", summary="s",
                      findings=(uncovered("R1"), uncovered("R9")))
    routed = findings_by_unit(make_plan(spec), (verdict,), ARCHIVE / NEWEST, spec)
    assert set(routed) == {"mad:rogers", "frame"}  # R1 is Rogers's; R9 an acceptance area of the frame's tests
    assert "requirement R1 is not proven" in routed["mad:rogers"][0]
