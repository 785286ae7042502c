"""End-to-end tests of Rogers: every tool, called over MCP on a running ecosystem."""

import uuid

import pytest

from conftest import tool_for

pytestmark = pytest.mark.requirement('R1')


def test_create_conversation(eco):
    """rogers.create_conversation: Create a conversation; returns its id, title and participants."""
    created = eco.call("rogers.create_conversation", title="planning", participants=["rogers"])
    assert created["id"] and created["title"] == "planning"
    assert "rogers" in created["participants"]


def test_post(eco, conversation):
    """rogers.post: Post a message to a conversation; returns the stored envelope."""
    posted = eco.call("rogers.post", conversation_id=conversation["id"], content="hello bus")
    assert posted["content"] == "hello bus"
    assert posted["conversation_id"] == conversation["id"] and posted["id"]


def test_history(eco, conversation):
    """rogers.history: The newest messages of a conversation, oldest first."""
    for n in range(3):
        eco.call(tool_for("conversations.post"), conversation_id=conversation["id"], content=f"message {n}")
    history = eco.call("rogers.history", conversation_id=conversation["id"], limit=2)
    assert [m["content"] for m in history] == ["message 1", "message 2"]


def test_search(eco):
    """rogers.search: Full-text search across every conversation."""
    created = eco.call(tool_for("conversations.create"), title="search target")
    word = "needle" + uuid.uuid4().hex[:8]
    eco.call(tool_for("conversations.post"), conversation_id=created["id"], content=f"the {word} is here")
    hits = eco.call("rogers.search", query=word)
    assert any(word in hit["content"] for hit in hits)


def test_list_conversations(eco):
    """rogers.list_conversations: The conversations on the bus, newest first."""
    created = eco.call(tool_for("conversations.create"), title="listed")
    assert created["id"] in [c["id"] for c in eco.call("rogers.list_conversations", limit=500)]


def test_summarise_counts_who_said_what_and_writes_a_summary(eco):
    """rogers.summarise: participants, counts and an Imperator-written summary."""
    created = eco.call("rogers.create_conversation", title="retro")
    for text in ["the deploy went well", "the tests were slow", "let us cache the venv"]:
        eco.call("rogers.post", conversation_id=created["id"], content=text)
    summary = eco.call("rogers.summarise", conversation_id=created["id"])
    assert summary["messages"] == 3
    assert sum(summary["participants"].values()) == 3
    assert summary["summary"].strip()
    assert summary["first_at"] <= summary["last_at"]


def test_summarise_of_an_empty_conversation_is_empty(eco):
    created = eco.call("rogers.create_conversation", title="quiet")
    assert eco.call("rogers.summarise", conversation_id=created["id"])["messages"] == 0
