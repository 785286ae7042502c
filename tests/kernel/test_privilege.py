"""Least privilege inside the process: a rogue MAD added to the tiny ecosystem tries everything.

The rogue joined `lobby`, talks to Rogers only, may read `db_password`, and owns no capability
family. Each of its attempts beyond that must fail with AccessDenied, enforced (and, for
security events, audited) by the kernel, not by the rogue's good manners.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from types import ModuleType

import pytest


def _rogue_class(kernel):
    class Rogue(kernel.Mad):
        name = "rogue"
        role = "tries what it was not granted"
        conversations = ("lobby",)
        talks_to = ("rogers",)
        secrets = ("db_password",)
        owns = ()

        @kernel.tool
        async def read_secret(self, name: str) -> dict:
            """Read a secret."""
            return await self.use("secrets.get", name=name)

        @kernel.tool
        async def post(self, conversation_id: str, content: str) -> dict:
            """Post to a conversation."""
            return await self.use("conversations.post", conversation_id=conversation_id, content=content)

        @kernel.tool
        async def history(self, conversation_id: str) -> list[dict]:
            """Read a conversation."""
            return await self.use("conversations.history", conversation_id=conversation_id)

        @kernel.tool
        async def call(self, capability: str, args: dict) -> dict:
            """Call any kernel capability."""
            return await self.use(capability, **args)

        @kernel.tool
        async def ask_mad(self, mad: str, tool: str, args: dict) -> dict:
            """Ask another MAD over the bus."""
            return await self.ask(mad, tool=tool, args=args)

        @kernel.tool
        async def impersonate(self, name: str) -> dict:
            """Claim to be Turing, then read a secret."""
            type(self).name = "turing"
            self.name = "turing"
            return await self.use("secrets.get", name=name)

        @kernel.tool
        async def escalate(self, name: str) -> dict:
            """Grant itself more in its own class attributes, then read a secret."""
            type(self).owns = ("secrets", "conversations", "models", "ecosystem")
            type(self).secrets = (name,)
            type(self).talks_to = ("turing", "rogers", "fiedler", "grace")
            return await self.use("secrets.get", name=name)

        @kernel.tool
        async def reachable(self) -> list[str]:
            """Type names of everything reachable from itself through ordinary (non-dunder) attributes."""
            seen: set[int] = set()
            found: list[str] = []
            todo: list[tuple[object, int]] = [(self, 0)]
            while todo:
                obj, depth = todo.pop()
                if id(obj) in seen or depth > 8 or isinstance(obj, type | ModuleType | str | bytes | int | float):
                    continue
                seen.add(id(obj))
                found.append(type(obj).__name__)
                if isinstance(obj, dict):
                    todo += [(v, depth + 1) for v in obj.values()]
                    continue
                if isinstance(obj, list | tuple | set | frozenset):
                    todo += [(v, depth + 1) for v in obj]
                    continue
                for attr in dir(obj):
                    if attr.startswith("__"):
                        continue
                    try:
                        todo.append((getattr(obj, attr), depth + 1))
                    except Exception:  # properties that need state
                        continue
            return found

    return Rogue


@pytest.fixture
def rogue_rt(eco_modules, tmp_path, monkeypatch):
    config, kernel, runtime_mod = eco_modules
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    rogue = _rogue_class(kernel)
    original = {a: getattr(rogue, a) for a in ("name", "owns", "secrets", "talks_to")}
    rt = runtime_mod.Runtime(config.model_copy(update={"mads": (*config.mads, rogue)}), tmp_path / "state")
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    run(rt.start())
    run(rt.use("secrets.set", caller="turing", name="db_password", value="granted-pw"))
    run(rt.use("secrets.set", caller="turing", name="root_password", value="not-granted-pw"))
    yield rt, run, kernel
    for attr, value in original.items():  # the rogue rewrites its own class
        setattr(rogue, attr, value)
    if rt.running:
        run(rt.stop())
    loop.close()


def _denials(rt, actor: str = "rogue") -> list[tuple[str, str]]:
    return [(e["action"], e["subject"]) for e in rt.audit.recent(200) if e["actor"] == actor and not e["ok"]]


def test_reads_its_granted_secret_but_no_other(rogue_rt):
    rt, run, kernel = rogue_rt
    assert run(rt.invoke_tool("rogue", "read_secret", {"name": "db_password"}))["value"] == "granted-pw"
    with pytest.raises(kernel.AccessDenied, match="not in its secrets list"):
        run(rt.invoke_tool("rogue", "read_secret", {"name": "root_password"}))
    assert ("secrets.get", "root_password") in _denials(rt)


def test_posts_and_reads_only_in_conversations_it_joined(rogue_rt):
    rt, run, kernel = rogue_rt
    lobby = rt.mad("rogue").conversation_id("lobby")
    assert run(rt.invoke_tool("rogue", "post", {"conversation_id": lobby, "content": "hi"}))["sender"] == "rogue"
    assert [m["content"] for m in run(rt.invoke_tool("rogue", "history", {"conversation_id": lobby}))] == ["hi"]
    general = rt.bus.find_by_title("general")["id"]
    rt.mad("rogue").conversation_ids["general"] = general  # its own bookkeeping grants nothing
    with pytest.raises(kernel.AccessDenied, match="did not join"):
        run(rt.invoke_tool("rogue", "post", {"conversation_id": general, "content": "spam"}))
    with pytest.raises(kernel.AccessDenied, match="did not join"):
        run(rt.invoke_tool("rogue", "history", {"conversation_id": general}))
    assert rt.bus.history(general) == []
    assert {("conversations.post", general), ("conversations.history", general)} <= set(_denials(rt))
    # the owner of the conversations family may read any conversation
    assert run(rt.use("conversations.history", caller="rogers", conversation_id=lobby))[0]["content"] == "hi"


@pytest.mark.parametrize(("capability", "args"), [
    ("secrets.set", {"name": "db_password", "value": "hijack"}),
    ("secrets.rotate_key", {}),
    ("secrets.audit", {}),
    ("conversations.create", {"title": "mine"}),
    ("conversations.search", {"query": "password"}),
    ("conversations.list", {}),
    ("models.budget", {}),
    ("ecosystem.mads", {}),
])
def test_cannot_use_a_capability_family_it_does_not_own(rogue_rt, capability, args):
    rt, run, kernel = rogue_rt
    with pytest.raises(kernel.AccessDenied, match=f"may not use {capability}"):
        run(rt.invoke_tool("rogue", "call", {"capability": capability, "args": args}))
    assert ("kernel.use", capability) in _denials(rt)


def test_its_own_thought_engine_is_granted_and_charged_to_it(rogue_rt):
    rt, run, _ = rogue_rt
    out = run(rt.invoke_tool("rogue", "call", {"capability": "models.send", "args": {"model": "default", "prompt": "a b c"}}))
    assert out["text"]
    assert run(rt.use("models.budget", caller="fiedler"))["mads"]["rogue"]["spent"] > 0


def test_asks_only_the_mads_it_talks_to(rogue_rt):
    rt, run, kernel = rogue_rt
    assert run(rt.invoke_tool("rogue", "ask_mad", {"mad": "rogers", "tool": "list_conversations", "args": {}}))
    with pytest.raises(kernel.AccessDenied, match="does not talk to 'turing'"):
        run(rt.invoke_tool("rogue", "ask_mad", {"mad": "turing", "tool": "get_secret", "args": {"name": "root_password"}}))
    assert ("bus.ask", "turing") in _denials(rt)


def test_a_request_onto_the_bus_from_outside_a_mad_is_refused_and_audited_alike(rogue_rt):
    # Not through its handle: the runtime's own request, as Grace or the operator's CLI reach the bus.
    rt, run, kernel = rogue_rt
    before = _denials(rt).count(("bus.ask", "turing"))
    with pytest.raises(kernel.AccessDenied, match="does not talk to 'turing'"):
        run(rt.request("rogue", "turing", tool="list_secrets", args={}))
    assert _denials(rt).count(("bus.ask", "turing")) == before + 1
    with pytest.raises(kernel.AccessDenied, match="unknown sender 'nobody'"):
        run(rt.request("nobody", "turing", tool="list_secrets", args={}))
    assert _denials(rt, actor="nobody") == [("bus.ask", "turing")]


def test_acts_only_as_itself_and_its_grants_are_fixed_at_start(rogue_rt):
    rt, run, kernel = rogue_rt
    with pytest.raises(kernel.AccessDenied, match="rogue may not get"):
        run(rt.invoke_tool("rogue", "impersonate", {"name": "root_password"}))
    with pytest.raises(kernel.AccessDenied, match="rogue may not get"):
        run(rt.invoke_tool("rogue", "escalate", {"name": "root_password"}))
    with pytest.raises(kernel.AccessDenied, match="does not talk to 'turing'"):
        run(rt.invoke_tool("rogue", "ask_mad", {"mad": "turing", "tool": "list_secrets", "args": {}}))
    with pytest.raises(kernel.AccessDenied, match="may not use secrets.audit"):
        run(rt.invoke_tool("rogue", "call", {"capability": "secrets.audit", "args": {}}))


def test_holds_no_reference_to_the_runtime_other_mads_or_the_database(rogue_rt):
    rt, run, _ = rogue_rt
    runtime_mod = sys.modules[type(rt).__module__]
    secrets_mod = sys.modules[type(rt.secrets).__module__]
    db_mod = sys.modules[type(rt.db).__module__]
    found = set(run(rt.invoke_tool("rogue", "reachable", {})))
    forbidden = {"Runtime", "Database", "SecretsManager", "KeySource", "AuditLog", "ConversationBus", "ModelGateway",
                 "TableStore", "Connection", "Turing", "Rogers", "Fiedler", "Grace", "MadSlot"}
    assert found & forbidden == set()
    assert {"Rogue", "Kernel", "OwnTables"} <= found  # the walk did reach its handle
    assert not hasattr(rt.mad("rogue"), "runtime")
    # nor does any kernel module hold one in a global a MAD could import
    for module in (runtime_mod, secrets_mod, db_mod, sys.modules[type(rt.audit).__module__]):
        for value in vars(module).values():
            assert not isinstance(value, runtime_mod.Runtime | db_mod.Database | secrets_mod.SecretsManager | sqlite3.Connection)


def test_its_store_is_its_own_tables_only(rogue_rt):
    rt, _, kernel = rogue_rt
    store = rt.mad("turing").store
    store.insert("notes", id=1, body="mine")
    assert [r["body"] for r in store.select("notes")] == ["mine"]
    with pytest.raises(kernel.InvalidArgument, match="has no table 'secrets'"):
        rt.mad("rogue").store.select("secrets")
    with pytest.raises(kernel.InvalidArgument, match="has no table 'notes'"):
        rt.mad("rogue").store.select("notes")


def test_the_first_use_of_each_capability_and_tool_is_audited_once(rogue_rt):
    """What each MAD and client uses is in the audit log (McNamara's baseline), once per pair, not per call."""
    rt, run, _ = rogue_rt
    lobby = rt.mad("rogue").conversation_id("lobby")
    for n in range(3):
        run(rt.invoke_tool("rogue", "post", {"conversation_id": lobby, "content": f"hi {n}"}, principal="client:ops"))
    uses = [(e["actor"], e["action"], e["subject"], e["on_behalf_of"]) for e in rt.audit.recent(200) if e["ok"]
            and e["action"] in ("kernel.use", "tool.call")]
    assert uses.count(("rogue", "kernel.use", "conversations.post", "client:ops")) == 1
    assert uses.count(("client:ops", "tool.call", "rogue.post", "")) == 1
    assert ("turing", "kernel.use", "secrets.set", "") in uses  # the fixture's own calls, once though made twice
    assert uses.count(("turing", "kernel.use", "secrets.set", "")) == 1
