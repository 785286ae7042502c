"""Requirement ids: requirements.md parsed by id, and what MADs and acceptance areas say they prove.

The corpus in `tests/bad_specs/` holds one case per kind of problem (requirement_*, acceptance_*);
these tests cover the parser itself and the loader's checks in more shapes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from generator.errors import SpecError
from generator.spec.load import load_spec
from generator.spec.model import ACCEPTANCE_AREAS, Requirement
from generator.spec.requirements import parse_requirements
from generator.spec.starter import init

TESTS = Path(__file__).parent
REPO = TESTS.parent
GOOD_SPEC = TESTS / "good_spec"


def ids(text: str) -> list[str]:
    parsed = parse_requirements(text)
    assert not parsed.problems, parsed.problems
    return [r.id for r in parsed.requirements]


def problems(text: str) -> list[tuple[int, str]]:
    return list(parse_requirements(text).problems)


# --- the parser: both forms, headings, text extent ---------------------------------------


def test_numbered_ids_after_list_and_heading_markers():
    text = "# Reqs\n\nR1. One.\n- R2. Two.\n* R3. Three.\n## R4. Four\nR12. Twelve.\n"
    parsed = parse_requirements(text)
    assert parsed.problems == ()
    assert [(r.id, r.line, r.text) for r in parsed.requirements] == [
        ("R1", 3, "One."), ("R2", 4, "Two."), ("R3", 5, "Three."), ("R4", 6, "Four"), ("R12", 7, "Twelve."),
    ]


def test_slug_ids_end_a_line_or_heading():
    text = ("# Reqs\n\n## Conversations persist {#conversations-persist}\n\nBody.\n\n"
            "- Secrets are sealed {#secrets-2}\n")
    parsed = parse_requirements(text)
    assert parsed.problems == ()
    assert parsed.requirements == (
        Requirement(id="conversations-persist", text="Conversations persist\n\nBody.", line=3),
        Requirement(id="secrets-2", text="Secrets are sealed", line=7),
    )


def test_text_runs_to_the_next_requirement_without_trailing_blank_lines_and_dedented():
    text = ("R1. **Conversations.** Any MAD can open one,\n"
            "   post to it and read it.\n"
            "\n"
            "   - a list of its own\n"
            "\n\n"
            "R2. Secrets.\n\n\n")
    first, second = parse_requirements(text).requirements
    assert first.text == "**Conversations.** Any MAD can open one,\npost to it and read it.\n\n- a list of its own"
    assert second.text == "Secrets." and second.line == 7


def test_a_heading_that_is_no_requirement_ends_one_and_a_heading_requirement_keeps_its_sub_headings():
    text = ("# Requirements\n\n"
            "## R1. Storage\n\nBody.\n\n### Details\n\nMore.\n\n"  # R1 keeps its ### section
            "## Notes\n\nNot a requirement.\n\n"
            "R2. Last.\n\n# Appendix\n\nNot either.\n")
    first, second = parse_requirements(text).requirements
    assert first.text == "Storage\n\nBody.\n\n### Details\n\nMore."
    assert second.text == "Last."


def test_heading_closing_hashes_are_not_text():
    [only] = parse_requirements("## Secrets are sealed ## {#sealed}\n").requirements
    assert (only.id, only.text) == ("sealed", "Secrets are sealed")


def test_an_id_alone_on_its_line_takes_the_lines_below():
    [only] = parse_requirements("R1.\n   Everything is logged.\n").requirements
    assert only.text == "Everything is logged."


def test_nothing_in_fenced_code_is_a_requirement():
    text = "R1. Example:\n\n```\nR2. not an id\n3. nor this\n{#nor-this}\n```\n\nStill R1.\n"
    [only] = parse_requirements(text).requirements
    assert problems(text) == []
    assert only.text == "Example:\n\n```\nR2. not an id\n3. nor this\n{#nor-this}\n```\n\nStill R1."


def test_a_file_without_ids_has_no_requirements_and_no_problems():
    old = "# Requirements\n\n1. **One.** Something.\n2. **Two.** Something else.\n"
    assert parse_requirements(old).requirements == ()
    assert problems(old) == []


@pytest.mark.parametrize("line", ["Requirements. They are many.", "R2D2 is a droid.", "Rogers keeps them.",
                                  "The id R1. is mid-line.", "See `{#not-an-id}` here."])
def test_prose_is_no_attempt_at_an_id(line):
    assert ids(f"R1. First.\n\n{line}\n") == ["R1"]


@pytest.mark.parametrize("line, token", [
    ("R01. Leading zero.", "'R01.'"),
    ("R1a. Letter.", "'R1a.'"),
    ("R. No number.", "'R.'"),
    ("r1. Lower case.", "'r1.'"),
    ("R1: Colon.", "'R1:'"),
    ("R1) Parenthesis.", "'R1)'"),
    ("R1.2 Sub-number.", "'R1.2'"),
    ("R1 No dot.", "'R1'"),
    ("- R01. In a list.", "'R01.'"),
    ("## R0. Zero", "'R0.'"),
    ("**R1.** Bold.", "'**R1.**'"),
    ("## Bad {#Bad Slug}", "'{#Bad Slug}'"),
    ("## Empty {#}", "'{#}'"),
    ("Digit first {#1st}", "'{#1st}'"),
    ("Underscore {#a_b}", "'{#a_b}'"),
])
def test_malformed_ids_are_named_at_their_line(line, token):
    [(number, message)] = problems(f"# Reqs\n\n{line}\n")
    assert number == 3
    assert message.startswith(f"malformed requirement id {token}; expected ")


def test_bold_ids_are_told_to_be_plain():
    [(_, message)] = problems("**R1.** Bold.\n")
    assert message.endswith("write it plain, not in bold or italics")


def test_duplicates_name_the_first_line_across_forms_and_two_ids_on_a_line_are_refused():
    text = "R1. One.\n## Two {#two}\nR1. Again.\nThree {#two}\nR3. Four {#four}\n"
    assert problems(text) == [
        (3, "duplicate requirement id 'R1' (first at line 1); expected each id once"),
        (4, "duplicate requirement id 'two' (first at line 2); expected each id once"),
        (5, "two ids for one requirement, 'R3' and '{#four}'; expected one of them"),
    ]


def test_numbered_items_among_ids_need_one_but_not_in_heading_bodies_or_sections_without_ids():
    text = ("# Requirements\n\n"
            "1. Before the ids, in the same section.\n"
            "R2. Has one.\n"
            "3. Forgot it.\n"
            "3) Forgot it too.\n"
            "   4. Indented: part of the requirement above.\n"
            "## R5. A heading requirement\n\n"
            "1. Its own steps.\n"
            "2. More steps.\n\n"
            "## Notes\n\n"
            "1. A note, not a requirement.\n")
    found = problems(text)
    assert [line for line, _ in found] == [3, 5, 6]
    assert all(m.startswith("requirement without an id: a numbered item among requirements that have ids")
               for _, m in found)
    assert [r.id for r in parse_requirements(text).requirements] == ["R2", "R5"]


def test_a_malformed_id_is_enough_to_ask_its_siblings_for_ids():
    assert [line for line, _ in problems("R01. Bad.\n2. Plain.\n")] == [1, 2]


# --- the spec: loading, references, helpers ------------------------------------------------


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copytree(GOOD_SPEC, tmp_path / "spec"))


def _problems(root: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(root)
    return [str(p) for p in caught.value.problems]


def test_the_good_spec_has_requirements_by_id_and_what_proves_them(spec):
    loaded = load_spec(spec)
    assert [(r.id, r.line) for r in loaded.requirement_items] == [("R1", 5), ("R2", 6)]
    assert loaded.requirement("R2").text == "People are greeted by name."
    assert loaded.requirements.startswith("# Requirements\n")  # the text as written, unchanged
    assert loaded.mad("turing").requirements == ["R1"] and loaded.mad("grace").requirements == []
    assert loaded.ecosystem.acceptance == {"secrets_at_rest": ["R1"], "tools": ["R2"]}
    assert loaded.requirement_references() == {"R1": ("mad:turing", "acceptance:secrets_at_rest"),
                                               "R2": ("acceptance:tools",)}
    assert loaded.unreferenced_requirements() == ()
    with pytest.raises(KeyError):
        loaded.requirement("R9")


def test_a_requirement_nothing_names_is_no_error_and_is_listed(spec):
    with (spec / "requirements.md").open("a") as f:
        f.write("R3. People can say goodbye.\n\n## Greetings are short {#short-greetings}\n")
    loaded = load_spec(spec)
    assert [r.id for r in loaded.unreferenced_requirements()] == ["R3", "short-greetings"]
    assert loaded.requirement_references()["R3"] == ()


def test_an_old_spec_without_ids_loads_with_none(spec):
    (spec / "requirements.md").write_text("# Requirements\n\n1. Keep secrets.\n2. Greet people.\n")
    turing = spec / "mads/turing.yaml"
    turing.write_text(turing.read_text().replace("requirements: [R1]\n", ""))
    eco = spec / "ecosystem.yaml"
    eco.write_text(eco.read_text().split("# Requirements (ids")[0])
    loaded = load_spec(spec)
    assert loaded.requirement_items == () and loaded.unreferenced_requirements() == ()
    assert loaded.ecosystem.acceptance == {}


def test_references_to_a_file_without_ids_say_how_to_give_them(spec):
    (spec / "requirements.md").write_text("# Requirements\n\nKeep secrets.\n")
    found = _problems(spec)
    assert "spec/mads/turing.yaml:21: requirement 'R1' is not an id of requirements.md, which gives none; " \
           "expected requirements.md to mark it with 'R<number>.' starting a line" in found[-1]
    assert len(found) == 3  # the MAD's R1, and the acceptance areas' R1 and R2


def test_every_reference_is_located_at_its_own_entry(spec):
    turing = spec / "mads/turing.yaml"
    turing.write_text(turing.read_text().replace("requirements: [R1]\n",
                                                 "requirements:\n  - R1\n  - R1.\n  - greeted\n"))
    eco = spec / "ecosystem.yaml"
    eco.write_text(eco.read_text().replace("  tools: [R2]\n", "  tools:\n    - R2\n    - '#short'\n    - '2'\n"))
    (spec / "requirements.md").write_text((spec / "requirements.md").read_text()
                                          + "\n## Short greetings {#short}\n")
    assert _problems(spec) == [
        "spec/ecosystem.yaml:14: requirement '#short' is not an id of requirements.md; "
        "expected one of: R1, R2, short; did you mean 'short'?",
        "spec/ecosystem.yaml:15: requirement '2' is not an id of requirements.md; "
        "expected one of: R1, R2, short; did you mean 'R2'?",
        "spec/mads/turing.yaml:23: requirement 'R1.' is not an id of requirements.md; "
        "expected one of: R1, R2, short; did you mean 'R1'?",
        "spec/mads/turing.yaml:24: requirement 'greeted' is not an id of requirements.md; "
        "expected one of: R1, R2, short",
    ]


def test_requirement_problems_come_with_every_other_problem(spec):
    (spec / "requirements.md").write_text("R1. One.\nR1. Two.\nR02. Three.\n")
    grace = spec / "mads/grace.yaml"
    grace.write_text(grace.read_text().replace("level: V1", "level: V9"))
    eco = spec / "ecosystem.yaml"
    eco.write_text(eco.read_text().replace("tools: [R2]", "tools: [R2]\n  webui: [R1]"))
    assert _problems(spec) == [
        "spec/ecosystem.yaml:13: unknown acceptance area 'webui'; expected one of: "
        + ", ".join(ACCEPTANCE_AREAS) + "; did you mean 'web'?",
        "spec/mads/grace.yaml:3: 'level' must be one of 'V0', 'V1', 'V2', 'V3', 'V4' or 'V5', got 'V9'",
        "spec/requirements.md:2: duplicate requirement id 'R1' (first at line 1); expected each id once",
        "spec/requirements.md:3: malformed requirement id 'R02.'; expected 'R' and a number without leading "
        "zeros, then '.' and a space, like 'R1.' or 'R12.'",
    ]


@pytest.mark.parametrize("yaml_text, expected", [
    ("requirements: R1\n", "'requirements' must be a list, got 'R1'"),
    ("requirements: [1]\n", "'requirements' entry 1 must be a string, got the number 1; quote it"),
])
def test_a_mad_requirements_list_is_a_list_of_ids(spec, yaml_text, expected):
    turing = spec / "mads/turing.yaml"
    turing.write_text(turing.read_text().replace("requirements: [R1]\n", yaml_text))
    [found] = _problems(spec)
    assert found.startswith(f"spec/mads/turing.yaml:21: {expected}")


def test_acceptance_is_a_mapping_of_lists(spec):
    eco = spec / "ecosystem.yaml"
    eco.write_text(eco.read_text().replace("  tools: [R2]\n", "  tools: R2\n"))
    assert _problems(spec) == ["spec/ecosystem.yaml:12: 'tools' must be a list, got 'R2'"]


def test_the_areas_are_the_kernels_fixed_vocabulary():
    assert list(ACCEPTANCE_AREAS) == ["tools", "web", "gateway", "persistence", "secrets_at_rest", "clients",
                                      "privilege", "durability", "isolation", "audit", "observability"]


def test_a_spec_without_them_dumps_as_before(spec):
    # The unit prompts carry the MAD and ecosystem as JSON: a spec without these keys asks what it asked before.
    loaded = load_spec(spec)
    assert "requirements" not in loaded.mad("grace").model_dump(mode="json")
    assert loaded.mad("turing").model_dump(mode="json")["requirements"] == ["R1"]
    eco = spec / "ecosystem.yaml"
    eco.write_text(eco.read_text().split("# Requirements (ids")[0])
    assert "acceptance" not in load_spec(spec).ecosystem.model_dump(mode="json")


# --- the specs regen ships ----------------------------------------------------------------


def test_madgroup_names_what_proves_each_of_its_eighteen_requirements():
    spec = load_spec(REPO / "spec")
    assert [r.id for r in spec.requirement_items] == [f"R{n}" for n in range(1, 19)]
    assert spec.requirement("R7").text.startswith("**Least privilege.**")
    assert {m.name: m.requirements for m in spec.mads} == {
        "fiedler": ["R2"], "grace": ["R4"], "horace": ["R12"], "rogers": ["R1"], "turing": ["R3"], "dewey": ["R13"],
        "marco": ["R14"], "gates": ["R15"], "stallman": ["R15"], "playfair": ["R16"], "mcnamara": ["R17"],
        "hopper": ["R18"], "pm": [], "developer": []}
    assert spec.ecosystem.acceptance == {
        "tools": ["R4"], "web": ["R4"], "gateway": ["R4", "R6"], "persistence": ["R1", "R5"],
        "secrets_at_rest": ["R3"], "clients": ["R6"], "privilege": ["R7"], "durability": ["R8"],
        "isolation": ["R9"], "audit": ["R3", "R10"], "observability": ["R11"],
    }
    assert spec.unreferenced_requirements() == ()


def test_the_starter_gives_ids_names_them_and_checks_clean(tmp_path):
    init(tmp_path / "mine")
    checked = subprocess.run([sys.executable, "-m", "generator.cli", "check", "--spec", str(tmp_path / "mine")],
                             capture_output=True, text=True, cwd=REPO)
    assert checked.returncode == 0, checked.stderr
    spec = load_spec(tmp_path / "mine")
    assert [r.id for r in spec.requirement_items] == ["R1", "R2", "R3"]
    assert {m.name: m.requirements for m in spec.mads} == {"desk": ["R1"], "vault": ["R2"]}
    assert spec.ecosystem.acceptance and spec.unreferenced_requirements() == ()
    # The README's loop appends an old-style numbered item: it is part of the last (heading) requirement.
    with (tmp_path / "mine" / "requirements.md").open("a") as f:
        f.write("4. **Audit.** Every secret read is recorded.\n")
    assert load_spec(tmp_path / "mine").requirement("R3").text.endswith("4. **Audit.** Every secret read is recorded.")


def test_check_reports_a_bad_id_with_file_and_line(spec):
    (spec / "requirements.md").write_text("# Requirements\n\nR1. One.\nR2. Two.\nR2. Again.\n")
    done = subprocess.run([sys.executable, "-m", "generator.cli", "check", "--spec", "spec"],
                          capture_output=True, text=True, cwd=spec.parent,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.strip() == ("spec/requirements.md:5: duplicate requirement id 'R2' (first at line 4); "
                                   "expected each id once")


def test_lines_are_counted_as_editors_count_them():
    text = "Intro with a form feed \f here.\r\nR1. One.\r\n\r\nR2. Two.\u2028still two.\n"
    assert [(r.id, r.line, r.text) for r in parse_requirements(text).requirements] == [
        ("R1", 2, "One."), ("R2", 4, "Two.\u2028still two."),
    ]
