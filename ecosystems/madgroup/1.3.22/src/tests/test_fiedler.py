"""End-to-end tests of Fiedler: every tool, called over MCP on a running ecosystem."""

import pytest

from harness import ToolCallError

from conftest import TOOL_FOR

pytestmark = pytest.mark.requirement('R2')


def test_list_models(eco):
    """fiedler.list_models: The model aliases this ecosystem can call."""
    models = eco.call("fiedler.list_models")
    assert models, "at least one model alias"


def test_send(eco):
    """fiedler.send: Send a prompt to a model alias, charged to the caller's token budget."""
    alias = 'default'
    before = eco.call(TOOL_FOR["models.budget"]) if "models.budget" in TOOL_FOR else None
    answer = eco.call("fiedler.send", model=alias, prompt="say hello", max_tokens=16)
    assert answer["text"] and answer["total_tokens"] > 0
    if before is not None:
        after = eco.call(TOOL_FOR["models.budget"])
        spent = lambda b: sum(entry["spent"] for entry in b["clients"].values())  # noqa: E731
        assert spent(after) > spent(before)
    with pytest.raises(ToolCallError):
        eco.call("fiedler.send", model="no-such-model", prompt="x")


def test_budget(eco):
    """fiedler.budget: Token budgets, spent and remaining, per MAD and client."""
    budget = eco.call("fiedler.budget")
    assert "fiedler" in budget["mads"]


def test_compare_models_answers_from_every_alias(eco):
    """fiedler.compare_models: one entry per model alias, each with its answer."""
    aliases = [m["alias"] for m in eco.call("fiedler.list_models")]
    results = eco.call("fiedler.compare_models", prompt="name a colour", max_tokens=16)
    assert [r["model"] for r in results] == aliases
    assert all(r["ok"] and r["text"] and r["total_tokens"] > 0 for r in results)


def test_compare_models_reports_an_unknown_alias_without_failing_the_rest(eco):
    results = eco.call("fiedler.compare_models", prompt="hi", models=["default", "no-such-model"])
    assert [r["ok"] for r in results] == [True, False]
    assert "no-such-model" in results[1]["error"]
