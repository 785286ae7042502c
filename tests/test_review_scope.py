"""What LLM reviewers see (the scope) and what a review is bound to, on the archived madgroup builds."""

from __future__ import annotations

import pytest
from review_helpers import REPO, scripted_reviewer, write_panel

from generator.artifact.manifest import Manifest
from generator.artifact.store import versions
from generator.errors import UserError
from generator.review.panel import DEFAULT_PANEL, load_panel
from generator.review.scope import choose, reviewed_hash

ARCHIVE = REPO / "ecosystems" / "madgroup"
NEWEST = versions(ARCHIVE)[-1]
PARENT = Manifest.read(ARCHIVE / NEWEST).parent


@pytest.fixture
def llm_panel(tmp_path):
    return load_panel(write_panel(tmp_path, {"alpha": scripted_reviewer("http://127.0.0.1:9/v1")}))


def test_parent_scope_diffs_against_the_parent(llm_panel):
    baseline, scope = choose("parent", llm_panel, ARCHIVE, PARENT)
    assert baseline == ARCHIVE / PARENT and scope.baseline == PARENT and scope.reason == f"the changes since the parent {PARENT}"


def test_full_scope_shows_every_file(llm_panel):
    baseline, scope = choose("full", llm_panel, ARCHIVE, PARENT)
    assert baseline is None and scope.reason.startswith("the whole tree, as asked")


def test_approved_scope_with_the_offline_panel_is_the_parent_it_approved():
    # The offline panel read the first build whole and every diff since: the chain anchors the parent.
    baseline, scope = choose("approved", load_panel(DEFAULT_PANEL), ARCHIVE, PARENT)
    assert baseline == ARCHIVE / PARENT and scope.baseline_root_hash == Manifest.read(ARCHIVE / PARENT).root_hash
    assert scope.reason == (f"the changes since {PARENT}, the newest ancestor whose whole code a panel with every "
                            "reviewer of offline has read and approved")


def test_approved_scope_shows_the_whole_tree_when_no_ancestor_passed_a_panel_this_strict(llm_panel):
    # Only the offline panel ever approved madgroup: no LLM has read its code, so an LLM panel reads all of it.
    baseline, scope = choose("approved", llm_panel, ARCHIVE, PARENT)
    assert baseline is None and scope.baseline is None
    assert scope.reason == "the whole tree: no ancestor's code was read and approved by a panel with every reviewer of test"


def _copy(tmp_path, *versions_):
    import shutil
    out = tmp_path / "madgroup"
    for version in versions_:
        shutil.copytree(ARCHIVE / version, out / version)
    return out


def test_an_ancestor_that_does_not_verify_is_not_a_baseline(tmp_path):
    grandparent = Manifest.read(ARCHIVE / PARENT).parent
    out = _copy(tmp_path, *versions(ARCHIVE))
    planted = out / PARENT / "src" / "madgroup" / "mads" / "rogers.py"
    planted.write_text(planted.read_text() + "\nEVIL = __import__('os').system\n")  # not re-signed
    baseline, scope = choose("approved", load_panel(DEFAULT_PANEL), out, PARENT)
    assert scope.baseline == grandparent  # the tampered parent's code is shown, against what was really read


def test_a_chain_of_diffs_is_only_as_good_as_its_first_tree(tmp_path):
    # Without the first build, nothing proves that a panel ever read the code the diffs start from.
    chain = []
    version = PARENT
    while version:
        chain.append(version)
        version = Manifest.read(ARCHIVE / version).parent
    out = _copy(tmp_path, *chain[:-1])  # every ancestor but the first build
    assert choose("approved", load_panel(DEFAULT_PANEL), out, PARENT)[0] is None


def test_an_ancestor_whose_reviewer_abstained_or_sat_elsewhere_does_not_count(tmp_path, llm_panel):
    from generator.review.models import Consensus, PanelReport, Round, Verdict
    from generator.review.scope import _as_strict

    def review(decision, definition=None):
        described = llm_panel.describe()
        if definition is not None:
            described["reviewers"]["alpha"] = definition
        verdict = Verdict(reviewer="alpha", kind="llm", round=1, decision=decision, summary="s", error=None
                          if decision != "abstain" else "no key")
        consensus = Consensus(rule="unanimous", outcome="approve", reason="r", arithmetic="a", approvals=1,
                              rejections=0, abstentions=0, quorum=1)
        return PanelReport(ecosystem="madgroup", version="1", parent=None, panel="test", panel_definition=described,
                           rounds=(Round(number=1, verdicts=(verdict,), consensus=consensus),), outcome="approve",
                           reason="r")

    assert _as_strict(review("approve"), llm_panel)
    assert not _as_strict(review("abstain"), llm_panel)
    other = {**llm_panel.describe()["reviewers"]["alpha"], "model": {"model": "openai/another"}}
    assert not _as_strict(review("approve", other), llm_panel)
    slower = {**llm_panel.describe()["reviewers"]["alpha"]}
    slower["model"] = {**slower["model"], "timeout_seconds": 600}
    assert _as_strict(review("approve", slower), llm_panel)  # a longer timeout reads the same code


def test_a_missing_parent_or_a_first_build_shows_everything(tmp_path, llm_panel):
    assert "is not beside this build" in choose("approved", llm_panel, tmp_path, PARENT)[1].reason
    assert choose("parent", llm_panel, ARCHIVE, None)[1].reason == "a first build: there is no earlier version"


def test_an_unknown_scope_is_a_usage_error(llm_panel):
    with pytest.raises(UserError, match="unknown review scope 'everything'; expected one of parent, approved, full"):
        choose("everything", llm_panel, ARCHIVE, PARENT)


def test_the_reviewed_hash_covers_src_and_tests_json_only():
    outputs = Manifest.read(ARCHIVE / NEWEST).outputs
    base = reviewed_hash(outputs)
    assert reviewed_hash({**outputs, "review.md": "x"}) == base
    assert reviewed_hash({**outputs, "tests.json": "x"}) != base
    assert reviewed_hash({**outputs, "src/madgroup/__init__.py": "x"}) != base
