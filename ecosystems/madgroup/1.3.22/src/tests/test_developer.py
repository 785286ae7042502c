"""End-to-end tests of Developer: every tool, called over MCP on a running ecosystem."""

from conftest import tool_for


def test_developer_is_a_role_spawned_never_served(eco):
    """developer is a role (lifecycle: ephemeral): listed with its cap, serving no tool; spawned by hopper."""
    listed = {m["name"]: m for m in eco.call(tool_for("ecosystem.mads"))}
    me = listed["developer"]
    assert (me["lifecycle"], me["tools"], me["max_instances"]) == ("ephemeral", [], 2)
    assert not [t for t in eco.list_tools() if t.startswith("developer.")]
    assert "developer" in listed["hopper"]["spawns"]
