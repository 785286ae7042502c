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
