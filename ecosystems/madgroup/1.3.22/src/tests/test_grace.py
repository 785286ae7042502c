"""End-to-end tests of Grace: every tool, called over MCP on a running ecosystem."""

import pytest

pytestmark = pytest.mark.requirement('R4')


def test_status(eco):
    """grace.status: Health of the ecosystem and of each MAD."""
    status = eco.call("grace.status")
    assert status["healthy"] is True
    assert {m["name"] for m in status["mads"]} >= {"grace"}


def test_list_mads(eco):
    """grace.list_mads: Every MAD with its role, level and tools."""
    mads = eco.call("grace.list_mads")
    assert "grace.list_mads" in [t for m in mads for t in m["tools"]]
