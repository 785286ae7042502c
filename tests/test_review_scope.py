"""What LLM reviewers see (the scope) and what a review is bound to, on the archived madgroup builds."""

from __future__ import annotations

import json

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
    baseline, scope = choose("parent", llm_panel, ARCHIVE, PARENT, None)
    assert baseline == ARCHIVE / PARENT and scope.baseline == PARENT and scope.reason == f"the changes since the parent {PARENT}"


def test_full_scope_shows_every_file(llm_panel):
    assert choose("full", llm_panel, ARCHIVE, PARENT, None) == (None, choose("full", llm_panel, ARCHIVE, PARENT, None)[1])
    assert choose("full", llm_panel, ARCHIVE, PARENT, None)[1].reason.startswith("the whole tree, as asked")


def test_approved_scope_with_the_offline_panel_is_the_parent_it_approved():
    baseline, scope = choose("approved", load_panel(DEFAULT_PANEL), ARCHIVE, PARENT, None)
    assert baseline == ARCHIVE / PARENT and scope.reason == (
        f"the changes since {PARENT}, the newest ancestor approved by a panel (offline) with every reviewer of offline")


def test_approved_scope_shows_the_whole_tree_when_no_ancestor_passed_a_panel_this_strict(llm_panel):
    # Only the offline panel ever approved madgroup: no LLM has read its code, so an LLM panel reads all of it.
    baseline, scope = choose("approved", llm_panel, ARCHIVE, PARENT, None)
    assert baseline is None and scope.baseline is None
    assert scope.reason == "the whole tree: no ancestor was approved by a panel with every reviewer of test"


def _gate_report(reports, version, panel, outcome="approve", root=None):
    folder = reports / "madgroup" / version
    folder.mkdir(parents=True)
    root = root or Manifest.read(ARCHIVE / version).root_hash
    (folder / "review.json").write_text(json.dumps({
        "outcome": outcome, "panel": "test", "panel_definition": panel.describe(),
        "bound": {"artifact_root_hash": root},
    }))


def test_an_approving_gate_report_bound_to_an_ancestor_makes_it_the_baseline(tmp_path, llm_panel):
    grandparent = Manifest.read(ARCHIVE / PARENT).parent
    _gate_report(tmp_path / "gate", grandparent, llm_panel)
    baseline, scope = choose("approved", llm_panel, ARCHIVE, PARENT, tmp_path / "gate")
    assert baseline == ARCHIVE / grandparent and scope.baseline == grandparent


@pytest.mark.parametrize("how", ["rejected", "bound elsewhere", "other reviewer"])
def test_a_gate_report_that_does_not_vouch_is_passed_over(tmp_path, llm_panel, how):
    other = load_panel(write_panel(tmp_path / "other", {"alpha": scripted_reviewer("http://127.0.0.1:9/v1",
                                                                                   model="openai/another")}))
    _gate_report(tmp_path / "gate", PARENT, other if how == "other reviewer" else llm_panel,
                 outcome="reject" if how == "rejected" else "approve",
                 root="0" * 64 if how == "bound elsewhere" else None)
    assert choose("approved", llm_panel, ARCHIVE, PARENT, tmp_path / "gate")[0] is None


def test_a_missing_parent_or_a_first_build_shows_everything(tmp_path, llm_panel):
    assert "is not beside this build" in choose("approved", llm_panel, tmp_path, PARENT, None)[1].reason
    assert choose("parent", llm_panel, ARCHIVE, None, None)[1].reason == "a first build: there is no earlier version"


def test_an_unknown_scope_is_a_usage_error(llm_panel):
    with pytest.raises(UserError, match="unknown review scope 'everything'; expected one of parent, approved, full"):
        choose("everything", llm_panel, ARCHIVE, PARENT, None)


def test_the_reviewed_hash_covers_src_and_tests_json_only():
    outputs = Manifest.read(ARCHIVE / NEWEST).outputs
    base = reviewed_hash(outputs)
    assert reviewed_hash({**outputs, "review.md": "x"}) == base
    assert reviewed_hash({**outputs, "tests.json": "x"}) != base
    assert reviewed_hash({**outputs, "src/madgroup/__init__.py": "x"}) != base
