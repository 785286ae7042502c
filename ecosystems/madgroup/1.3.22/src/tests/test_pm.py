"""End-to-end tests of Pm: every tool, called over MCP on a running ecosystem."""

from conftest import tool_for


def test_pm_is_a_role_spawned_never_served(eco):
    """pm is a role (lifecycle: ephemeral): listed with its cap, serving no tool; spawned by hopper."""
    listed = {m["name"]: m for m in eco.call(tool_for("ecosystem.mads"))}
    me = listed["pm"]
    assert (me["lifecycle"], me["tools"], me["max_instances"]) == ("ephemeral", [], 1)
    assert not [t for t in eco.list_tools() if t.startswith("pm.")]
    assert "pm" in listed["hopper"]["spawns"]
