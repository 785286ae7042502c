from collections import Counter


@tool
async def summarise(self, conversation_id: str, max_messages: int = 50) -> dict:
    """Summarise a conversation: who said how much, when, and a summary by Rogers' Imperator."""
    history = await self.use("conversations.history", conversation_id=conversation_id, limit=max_messages)
    if not history:
        return {"conversation_id": conversation_id, "messages": 0, "participants": {}, "summary": ""}
    said = "\n".join(f"{m['sender']}: {m['content']}" for m in history)
    summary = await self.think(f"Summarise this conversation in at most three sentences:\n{said}", max_tokens=200)
    return {
        "conversation_id": conversation_id,
        "messages": len(history),
        "participants": dict(sorted(Counter(m["sender"] for m in history).items())),
        "first_at": history[0]["created_at"],
        "last_at": history[-1]["created_at"],
        "summary": summary,
    }
