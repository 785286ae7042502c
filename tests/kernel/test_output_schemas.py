"""Every tool the gateway lists has an outputSchema, and what each call returns is true to it.

An MCP client validates a tool's structuredContent against its outputSchema, and the spec requires a
tool that publishes one to send the other. A tool bound to a kernel capability publishes the
capability's shape (`kernel/capabilities.py`); any other tool, what its return annotation says.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid

import pytest
from jsonschema.validators import validator_for

from generator import harness
from generator.kernel.capabilities import CAPABILITIES, available

# What the tiny ecosystem lacks for this test: a tool bound to the one capability it has none for, a tool
# written by hand returning a bare `dict` (as rogers.summarise does), and one with no return annotation.
EXTRA_TOOLS = {
    "mads/turing.py": '''
    @tool
    async def rotate(self) -> dict:
        """Re-encrypt every secret under a new key."""
        return await self.use("secrets.rotate_key")
''',
    "mads/rogers.py": '''
    @tool
    async def tally(self, conversation_id: str) -> dict:
        """Who said how much in a conversation."""
        history = await self.use("conversations.history", conversation_id=conversation_id, limit=100)
        said: dict = {}
        for message in history:
            said[message["sender"]] = said.get(message["sender"], 0) + 1
        return {"conversation_id": conversation_id, "messages": len(history), "senders": said}

    @tool
    async def shout(self, text: str):
        """The text, louder (no return annotation)."""
        return text.upper()
''',
}


@pytest.fixture(scope="module")
def served(tiny_ecosystem, tmp_path_factory):
    """The tiny ecosystem with EXTRA_TOOLS, served on 127.0.0.1."""
    src_root, src_name = tiny_ecosystem
    root = tmp_path_factory.mktemp("schemas")
    name = f"schemas_{uuid.uuid4().hex[:8]}"
    shutil.copytree(src_root / src_name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, extra in EXTRA_TOOLS.items():
        path = root / name / rel
        path.write_text(path.read_text().rstrip("\n") + "\n" + extra)
    config = root / name / "ecosystem.py"
    old = f'name="{src_name}"'
    assert old in config.read_text() and "capability_tools={" in config.read_text()
    config.write_text(config.read_text().replace(old, f'name="{name}"').replace(
        "capability_tools={", "capability_tools={'secrets.rotate_key': 'turing.rotate', "))
    with harness.running_ecosystem(name, tmp_path_factory.mktemp("schemas-state") / "state", cwd=root) as eco:
        yield eco


async def _call_every_tool(eco):
    """tools/list, then a successful call of every listed tool: ({name: Tool}, {name: CallToolResult})."""
    async with harness.mcp_client(eco.url, eco.token) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        results = {}

        async def call(tool, **args):
            results[tool] = await client.call_tool(tool, args)
            assert not results[tool].is_error, (tool, results[tool].content)
            return harness.result_value(results[tool])

        conversation = await call("rogers.create_conversation", title="schemas", participants=["turing"])
        await call("rogers.post", conversation_id=conversation["id"], content="hello schemas")
        await call("rogers.history", conversation_id=conversation["id"])
        await call("rogers.search", query="schemas")
        await call("rogers.list_conversations")
        await call("rogers.tally", conversation_id=conversation["id"])
        await call("rogers.shout", text="hi")
        await call("turing.set_secret", name="api_key", value="v1")
        await call("turing.get_secret", name="api_key")
        await call("turing.rotate_secret", name="api_key", value="v2")
        await call("turing.list_secrets")
        await call("turing.rotate")
        await call("turing.audit", limit=5)
        await call("fiedler.send", model="default", prompt="hello", max_tokens=8)
        await call("fiedler.models")
        await call("fiedler.budget")
        await call("grace.status")
        await call("grace.mads")
        await call("grace.chat", message="hello")
    return listed, results


def test_every_tool_returns_structured_content_true_to_its_output_schema(served):
    eco = served
    try:
        listed, results = asyncio.run(_call_every_tool(eco))
    except BaseExceptionGroup as group:  # the SDK's task groups wrap what the session raised
        raise group.exceptions[0] from group
    assert set(results) == set(listed), "call every listed tool (and only those)"
    assert [name for name, t in listed.items() if not t.output_schema] == []
    for name, tool in listed.items():
        schema, content = tool.output_schema, results[name].structured_content
        validator = validator_for(schema)
        validator.check_schema(schema)
        assert schema["type"] == "object" and isinstance(content, dict), name  # MCP: structuredContent is an object
        problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(schema).iter_errors(content)]
        assert problems == [], (name, content)

    # Every shape of the core's capabilities went out (this ecosystem uses no pack), and what came back fit it.
    published = {t.output_schema.get("title") for t in listed.values()}
    published |= {ref for t in listed.values() for ref in t.output_schema.get("$defs", {})}
    assert {c.shape.__name__ for c in available(()).values()} <= published
    # A bound tool publishes its capability's shape, defined once in capabilities.py ...
    shapes = {"rogers.create_conversation": "conversations.create", "grace.status": "ecosystem.status",
              "turing.rotate": "secrets.rotate_key", "turing.get_secret": "secrets.get", "fiedler.budget": "models.budget"}
    for tool, capability in shapes.items():
        assert listed[tool].output_schema == CAPABILITIES[capability].shape.model_json_schema(), tool
    # ... a list of it wrapped as the SDK wraps lists, whatever the tool's own annotation says
    history = listed["rogers.history"].output_schema
    assert history["required"] == ["result"] and history["properties"]["result"]["items"] == {"$ref": "#/$defs/Message"}
    assert set(history["$defs"]["Message"]["required"]) >= {"id", "sender", "conversation_id", "content", "created_at"}
    assert results["rogers.history"].structured_content["result"][0]["content"] == "hello schemas"
    # ... and the fields the kernel adds beyond the shape reach the client too.
    assert "message_count" in results["rogers.list_conversations"].structured_content["result"][0]
    assert "key_file" not in results["turing.rotate"].structured_content  # an absent optional field is not null
    # A tool written by hand gets what its annotation says: a bare `dict` is an object ...
    assert listed["rogers.tally"].output_schema["type"] == "object"
    assert results["rogers.tally"].structured_content == {
        "conversation_id": results["rogers.create_conversation"].structured_content["id"], "messages": 1,
        "senders": {"rogers": 1}}
    # ... and a result of no declared type is wrapped as a list is.
    assert listed["rogers.shout"].output_schema["required"] == ["result"]
    assert results["rogers.shout"].structured_content == {"result": "HI"}
