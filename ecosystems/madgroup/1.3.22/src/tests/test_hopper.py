"""End-to-end tests of Hopper: every tool, called over MCP on a running ecosystem."""

import pytest
from harness import ToolCallError

pytestmark = pytest.mark.requirement('R18')


def _without_names(run: dict) -> list:
    return [(r["role"], r["state"], r["report"]) for r in [run["plan"], *run["reports"]]]


def test_run_task_plans_then_shares_the_parts_among_developers(eco):
    """hopper.run_task: a PM's plan, then one report per developer, all in the task's conversation."""
    run = eco.call("hopper.run_task", task="add a page that lists the archive", developers=3)
    assert run["done"] is True and run["plan"]["role"] == "pm" and run["plan"]["state"] == "reported"
    assert [r["role"] for r in run["reports"]] == ["developer"] * 3
    assert len({r["instance"] for r in [run["plan"], *run["reports"]]}) == 4, "every instance has a name of its own"
    assert {r["conversation_id"] for r in run["reports"]} == {run["conversation_id"]}
    assert [f"part {n} of 3" in r["report"] for n, r in enumerate(run["reports"], 1)] == [True] * 3


def test_run_task_gives_the_same_reports_every_time(eco):
    """With the offline echo model the run is deterministic: new instances, the same plan and reports."""
    first = eco.call("hopper.run_task", task="write the release notes", developers=2)
    second = eco.call("hopper.run_task", task="write the release notes", developers=2)
    assert first["conversation_id"] != second["conversation_id"]
    assert _without_names(first) == _without_names(second)


@pytest.mark.parametrize("args", [{"task": " ", "developers": 1}, {"task": "x", "developers": 0},
                                  {"task": "x", "developers": 6}])
def test_run_task_refuses_an_empty_task_or_a_team_size_out_of_range(eco, args):
    with pytest.raises(ToolCallError):
        eco.call("hopper.run_task", **args)
