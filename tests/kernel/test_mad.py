from __future__ import annotations

import asyncio

import pytest


def _errors(runtime):
    return __import__(type(runtime).__module__.rsplit(".", 1)[0] + ".errors", fromlist=["x"])


def test_handle_routes_tool_payloads_and_prose(runtime):
    grace = runtime.mad("grace")
    status = asyncio.run(grace.handle({"content": "", "payload": {"tool": "status", "args": {}}}))
    assert status["name"] == runtime.config.name and status["status"] == "ok"
    assert asyncio.run(grace.handle({"content": "how are you", "payload": {}})) == "[offline echo model] how are you"
    errors = _errors(runtime)
    with pytest.raises(errors.NotFound):
        asyncio.run(grace.handle({"payload": {"tool": "nope"}}))
    with pytest.raises(errors.InvalidArgument):
        asyncio.run(grace.handle({"payload": {"tool": "chat", "args": {"wrong": 1}}}))


def test_ask_goes_over_the_bus_and_respects_talks_to(runtime):
    errors = _errors(runtime)
    rogers = runtime.mad("rogers")
    mads = asyncio.run(runtime.mad("grace").ask("rogers", tool="list_conversations", args={"limit": 5}))
    assert isinstance(mads, list)
    with pytest.raises(errors.AccessDenied, match="does not talk to"):
        asyncio.run(rogers.ask("fiedler", "hello"))
    conv = runtime.bus.find_by_title("grace->rogers")
    kinds = [(e["sender"], e["kind"]) for e in runtime.bus.history(conv["id"])]
    assert kinds == [("grace", "request"), ("rogers", "reply")]
    req, rep = runtime.bus.history(conv["id"])
    assert rep["correlation_id"] == req["id"]


def test_storage_tables_created_and_scoped(runtime):
    tables = {r["name"] for r in runtime.db.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "turing_notes" in tables
    store = runtime.mad("turing").store
    rid = store.insert("notes", body="hello")
    assert store.select("notes", id=rid) == [{"id": rid, "body": "hello"}]
    assert store.update("notes", {"id": rid}, body="bye") == 1
    assert store.select("notes")[0]["body"] == "bye"
    errors = _errors(runtime)
    with pytest.raises(errors.InvalidArgument):
        store.insert("secrets", name="x")  # not its table
    with pytest.raises(errors.InvalidArgument):
        store.select("notes", **{"body; DROP": 1})
    assert store.delete("notes", id=rid) == 1


def test_status_and_mads(runtime):
    status = asyncio.run(runtime.use("ecosystem.status", caller="grace"))
    assert status["healthy"] is True
    assert [m["name"] for m in status["mads"]] == ["turing", "rogers", "fiedler", "grace"]
    states = {m["name"]: m["state"] for m in status["mads"]}
    assert states["grace"] == "running" and states["turing"] == "running"
    mads = asyncio.run(runtime.use("ecosystem.mads", caller="grace"))
    turing = mads[0]
    assert turing["role"] == "Secrets keeper <of the group>" and turing["level"] == "V1"
    assert "turing.set_secret" in turing["tools"]


def test_failed_mad_degrades_health(eco_modules, tmp_path):
    config, kernel, runtime_mod = eco_modules

    class Broken(kernel.Mad):
        name = "broken"
        role = "fails"

        async def on_start(self):
            raise RuntimeError("boom")

        @kernel.tool
        async def ping(self) -> str:
            """Ping."""
            return "pong"

    rt = runtime_mod.Runtime(config.model_copy(update={"mads": (*config.mads, Broken)}), tmp_path / "s")
    asyncio.run(rt.start())
    try:
        status = asyncio.run(rt.use("ecosystem.status", caller="grace"))
        assert status["status"] == "degraded"
        broken = next(m for m in status["mads"] if m["name"] == "broken")
        # the exception type is named, never its message (it may hold anything)
        assert "'broken' failed in 'on_start' (RuntimeError)" in broken["error"] and "boom" not in broken["error"]
        with pytest.raises(_errors(rt).KernelError, match="not running"):
            asyncio.run(rt.invoke_tool("broken", "ping", {}))
    finally:
        asyncio.run(rt.stop())


def test_tool_decorator_requires_async(eco_modules):
    _, kernel, _ = eco_modules
    with pytest.raises(TypeError):

        @kernel.tool
        def sync_tool(self):
            pass
