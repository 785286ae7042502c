"""End-to-end tests of Turing: every tool, called over MCP on a running ecosystem."""

import uuid

import pytest

from harness import ToolCallError

from conftest import tool_for

pytestmark = pytest.mark.requirement('R3')


def test_set_secret(eco):
    """turing.set_secret: Store a secret, encrypted at rest; returns its name and version, never the value."""
    saved = eco.call("turing.set_secret", name="set-test", value="v-" + uuid.uuid4().hex)
    assert saved == {"name": "set-test", "version": 1}


def test_get_secret(eco):
    """turing.get_secret: Read a secret's current value."""
    value = "v-" + uuid.uuid4().hex
    eco.call(tool_for("secrets.set"), name="get-test", value=value)
    assert eco.call("turing.get_secret", name="get-test")["value"] == value
    with pytest.raises(ToolCallError):
        eco.call("turing.get_secret", name="never-stored")


def test_list_secrets(eco):
    """turing.list_secrets: Names and versions of stored secrets, never their values."""
    eco.call(tool_for("secrets.set"), name="list-test", value="hidden-value")
    listed = eco.call("turing.list_secrets")
    assert "list-test" in [s["name"] for s in listed]
    assert "hidden-value" not in repr(listed)


def test_rotate_secret(eco):
    """turing.rotate_secret: Replace a secret's value with a new version."""
    eco.call(tool_for("secrets.set"), name="rotate-test", value="old")
    rotated = eco.call("turing.rotate_secret", name="rotate-test", value="new")
    assert rotated["version"] == 2
    assert eco.call(tool_for("secrets.get"), name="rotate-test")["value"] == "new"


def test_rotate(eco):
    """turing.rotate: Re-encrypt every secret under a new key; returns counts, never key material."""
    eco.call(tool_for("secrets.set"), name="rekey-test", value="kept")
    rotated = eco.call("turing.rotate")
    assert set(rotated) == {"secrets", "versions", "key_id"} and rotated["versions"] >= 1
    assert eco.call(tool_for("secrets.get"), name="rekey-test")["value"] == "kept"


def test_audit(eco):
    """turing.audit: The newest entries of the secrets audit log."""
    eco.call(tool_for("secrets.set"), name="audit-test", value="x")
    entries = eco.call("turing.audit", limit=500)
    assert any(e["name"] == "audit-test" for e in entries)
    assert "x" not in [e.get("value") for e in entries]
