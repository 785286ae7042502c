"""Ephemeral MADs (kernel/emads.py): a persistent MAD spawns instances of a role per task.

The tiny ecosystem gets a team: Hopper (persistent, the software engineer, spawns "pm" and "dev"),
a PM role (the default work: its Thought Engine, the offline echo model) and a developer role
(cap 2, short time limit) whose work the test observes and can make raise or hang. Everything
runs with the deterministic echo model.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from types import SimpleNamespace

import pytest
from bus_helpers import redis_url  # noqa: F401  (fixtures)
from pg_helpers import pg_server, pg_url  # noqa: F401  (fixtures)

DETAIL = "internal-detail-5521"  # in an exception message: never in a report
ECHO = "[offline echo model]"


def _team(kernel, ctl: SimpleNamespace) -> tuple[type, ...]:
    class Hopper(kernel.Mad):
        name = "hopper"
        role = "Software engineer: coordinates a PM and developers"
        spawns = ("pm", "dev")
        talks_to = ("rogers",)
        handler_timeout_s = 10.0

        @kernel.tool
        async def build(self, goal: str, parts: int = 4) -> dict:
            """A PM plans the goal, then developers build its parts at once, in the PM's conversation."""
            plan = await self.spawn("pm", f"plan {goal}")
            devs = await asyncio.gather(*(self.spawn("dev", f"build part {i} of {goal}", plan["conversation_id"])
                                          for i in range(1, parts + 1)))
            return {"plan": plan, "devs": list(devs)}

    class Pm(kernel.Mad):
        name = "pm"
        role = "Project manager"
        lifecycle = "ephemeral"
        imperator_prompt = "You are a project manager."
        budget_tokens = 5000

        async def work(self, task: str) -> str:
            ctl.seen[self.instance] = await self.earlier_reports()
            ctl.mads[self.instance] = self
            return await super().work(task)  # the default: the Thought Engine

    class Dev(kernel.Mad):
        name = "dev"
        role = "Developer"
        lifecycle = "ephemeral"
        max_instances = 2
        task_timeout_s = 0.3
        budget_tokens = 5000

        async def on_stop(self) -> None:
            ctl.stopped.append(self.instance)

        async def work(self, task: str) -> str:
            ctl.seen[self.instance] = await self.earlier_reports()
            ctl.running += 1
            ctl.peak = max(ctl.peak, ctl.running)
            ctl.listed.append({m["name"]: m for m in await ctl.rt.ecosystem_mads("grace")}["dev"]["instances"])
            try:
                await asyncio.sleep(0.02)  # room for the others to start, were the cap not kept
                if "raise" in task:
                    raise ValueError(DETAIL)
                if "hang" in task:
                    await asyncio.Event().wait()
                return await self.think(f"Done: {task}")
            finally:
                ctl.running -= 1

        @kernel.tool
        async def estimate(self, task: str) -> str:
            """A developer's tool: its own Action Engine's, never served."""
            return "small"

    return Hopper, Pm, Dev


@pytest.fixture
def team(eco_modules, tmp_path, monkeypatch):
    """`run(body)`: a started runtime of the tiny ecosystem plus the team, `body(rt, ctl)` run in one event loop."""
    config, kernel, runtime_mod = eco_modules
    monkeypatch.delenv(f"{config.env_prefix}_SECRETS_KEY", raising=False)
    ctl = SimpleNamespace(seen={}, mads={}, stopped=[], listed=[], running=0, peak=0, rt=None)
    team_config = config.model_copy(update={"mads": (*config.mads, *_team(kernel, ctl))})

    def runtime(state: str = "state", **options):
        ctl.rt = runtime_mod.Runtime(team_config, tmp_path / state, **options)
        return ctl.rt

    def run(body, state: str = "state", **options):
        async def main():
            rt = runtime(state, **options)
            await rt.start()
            try:
                return await asyncio.wait_for(body(rt, ctl), 20)
            finally:
                await rt.stop()

        return asyncio.run(main())

    return SimpleNamespace(run=run, runtime=runtime, ctl=ctl, kernel=kernel, config=team_config,
                           errors=importlib.import_module(kernel.__name__ + ".errors"))


def _rows(rt):
    return rt.db.query("SELECT role, instance, spawned_by, task, state, report, ended_at FROM emad_instances ORDER BY id")


def _denials(rt, action):
    return [(e["actor"], e["subject"], e["detail"]) for e in rt.audit.recent(50) if e["action"] == action and not e["ok"]]


# ---- the happy path ----------------------------------------------------------------------------------------------


def test_a_spawned_instance_works_reports_in_its_conversation_and_is_gone(team):
    async def body(rt, ctl):
        result = await rt.mad("hopper").spawn("pm", "plan a calculator")
        history = rt.bus.history(result["conversation_id"])
        conversation = rt.bus.get(result["conversation_id"])
        budgets = await rt.use("models.budget", caller="fiedler")
        return result, history, conversation, budgets, _rows(rt), dict(rt.emads.live)

    result, history, conversation, budgets, rows, live = team.run(body)
    report = f"{ECHO} Your task: plan a calculator"  # the prompt's last paragraph, echoed
    assert result == {"instance": "pm-1", "role": "pm", "conversation_id": result["conversation_id"],
                      "state": "reported", "report": report}
    assert conversation["title"] == "pm: plan a calculator" and conversation["participants"] == ["hopper", "pm-1"]
    assert [(m["sender"], m["kind"], m["content"]) for m in history] == [
        ("hopper", "message", "plan a calculator"), ("pm-1", "report", report)]
    assert history[0]["payload"] == {"spawned": "pm-1", "role": "pm"}
    assert history[1]["payload"] == {"role": "pm", "state": "reported"}
    assert [r[k] for r in rows for k in ("role", "instance", "spawned_by", "task", "state", "report")] == [
        "pm", "pm-1", "hopper", "plan a calculator", "reported", report]
    assert rows[0]["ended_at"] and live == {}
    # one budget per role: the instance spent its role's, and has no account of its own
    assert budgets["mads"]["pm"]["spent"] > 0 and budgets["mads"]["pm"]["calls"] == 1 and "pm-1" not in budgets["mads"]


def test_hopper_runs_a_pm_then_developers_at_once_never_past_the_cap_deterministically(team):
    async def body(rt, ctl):
        result = await rt.invoke_tool("hopper", "build", {"goal": "a calculator", "parts": 5})
        history = rt.bus.history(result["plan"]["conversation_id"])
        return result, history, dict(ctl.seen), ctl.peak, list(ctl.listed), sorted(ctl.stopped), rt.metrics.render().decode()

    first = team.run(body, "one")
    result, history, seen, peak, listed, stopped, metrics = first
    assert result["plan"]["state"] == "reported"
    assert [(d["instance"], d["state"], d["report"]) for d in result["devs"]] == [
        (f"dev-{i}", "reported", f"{ECHO} Done: build part {i} of a calculator") for i in range(1, 6)]
    assert {d["conversation_id"] for d in result["devs"]} == {result["plan"]["conversation_id"]}
    assert peak == 2 and max(listed) == 2 and len(listed) == 5  # two at once, never three, and all five ran
    assert stopped == [f"dev-{i}" for i in range(1, 6)]  # each stopped (on_stop) after its report
    reports = [(m["sender"], m["content"]) for m in history if m["kind"] == "report"]
    assert sorted(reports) == sorted([("pm-1", result["plan"]["report"])] + [(d["instance"], d["report"]) for d in result["devs"]])
    assert re.search(r'regen_emad_spawns_total\{outcome="reported",role="dev"\} 5\.0|'
                     r'regen_emad_spawns_total\{role="dev",outcome="reported"\} 5\.0', metrics)
    assert seen["pm-1"] == []  # no earlier PM
    # the same flow on a fresh state gives the same results: the echo model and the cap's order are deterministic
    again = team.run(body, "two")[0]
    strip = lambda r: {**r, "conversation_id": ""}  # noqa: E731
    assert strip(again["plan"]) == strip(result["plan"])
    assert [strip(d) for d in again["devs"]] == [strip(d) for d in result["devs"]]


def test_earlier_reports_reach_the_next_instance_of_the_role_and_no_other_role(team):
    async def body(rt, ctl):
        hopper = rt.mad("hopper")
        first = await hopper.spawn("pm", "plan A")
        second = await hopper.spawn("pm", "plan B")
        await hopper.spawn("dev", "build A")
        with pytest.raises(team.errors.InvalidArgument, match="no live eMAD"):
            await hopper.earlier_reports()  # a persistent MAD has no role
        with pytest.raises(team.errors.InvalidArgument, match="no live eMAD"):
            await ctl.mads["pm-1"].earlier_reports()  # an ended instance: not even its role's any more
        return first, second, dict(ctl.seen)

    first, second, seen = team.run(body)
    assert seen["pm-1"] == []
    assert [(r["instance"], r["task"], r["state"], r["report"]) for r in seen["pm-2"]] == [
        ("pm-1", "plan A", "reported", first["report"])]
    assert seen["pm-2"][0]["ended_at"] >= seen["pm-2"][0]["started_at"]
    # the default work told the model the earlier report, and the task last (what the echo model answers)
    assert second["report"] == f"{ECHO} Your task: plan B"
    assert seen["dev-1"] == []  # the PMs' reports are not a developer's


# ---- refusals ----------------------------------------------------------------------------------------------------


def test_spawns_outside_the_grants_are_refused_and_audited_and_roles_are_never_asked(team):
    errors = team.errors

    async def body(rt, ctl):
        hopper, rogers = rt.mad("hopper"), rt.mad("rogers")
        with pytest.raises(errors.AccessDenied, match=r"MAD 'rogers' may not spawn 'pm' \(spawns: \[\]\)"):
            await rogers.spawn("pm", "plan A")
        with pytest.raises(errors.AccessDenied, match="'turing' is a persistent MAD: ask it over the bus"):
            await hopper.spawn("turing", "keep a secret")
        with pytest.raises(errors.AccessDenied, match=r"may not spawn 'nobody' \(spawns: \['dev', 'pm'\]\)"):
            await hopper.spawn("nobody", "anything")
        with pytest.raises(errors.InvalidArgument, match="non-empty"):
            await hopper.spawn("pm", "   ")
        private = (await rogers.use("conversations.create", title="rogers only"))["id"]
        with pytest.raises(errors.AccessDenied, match="did not join conversation"):
            await hopper.spawn("pm", "plan A", private)
        with pytest.raises(errors.AccessDenied, match="roles are spawned, not asked"):
            await hopper.ask("pm", "hello")
        with pytest.raises(errors.NotFound, match="'dev' is a role"):
            await rt.invoke_tool("dev", "estimate", {"task": "x"})
        with pytest.raises(errors.NotFound, match="'pm' is a role"):
            rt.mad("pm")
        with pytest.raises(errors.AccessDenied, match="unknown sender 'pm'"):  # a role's bare name acts as nobody
            await rt.request("pm", "rogers", prose="hello")
        hopper_ok = await hopper.spawn("dev", "build A")  # and the spawner still works
        return (_denials(rt, "emads.spawn"), _denials(rt, "bus.ask"), _rows(rt), hopper_ok,
                [c["title"] for c in rt.bus.list(100)])

    spawn_denials, ask_denials, rows, hopper_ok, titles = team.run(body)
    assert [(actor, subject) for actor, subject, _ in reversed(spawn_denials)] == [
        ("rogers", "pm"), ("hopper", "turing"), ("hopper", "nobody")]
    assert [(actor, subject) for actor, subject, _ in reversed(ask_denials)] == [("hopper", "pm"), ("pm", "rogers")]
    assert [r["instance"] for r in rows] == ["dev-1"] and hopper_ok["state"] == "reported"
    assert "pm: plan A" not in titles and "pm:" not in " ".join(titles)  # nothing refused made a conversation


def test_an_ended_instance_keeps_no_power(team):
    errors = team.errors

    async def body(rt, ctl):
        await rt.mad("hopper").spawn("pm", "plan A")
        pm = ctl.mads["pm-1"]
        assert (pm.instance, pm.name, rt.mad("hopper").instance) == ("pm-1", "pm", "")
        with pytest.raises(errors.AccessDenied, match="unknown caller 'pm-1'"):
            await rt.use("models.list", caller="pm-1")
        with pytest.raises(errors.AccessDenied, match="unknown caller 'pm-1'"):
            await pm.think("still there?")
        with pytest.raises(errors.AccessDenied, match="unknown caller 'pm'"):  # nor is the role's bare name a caller
            await rt.use("models.list", caller="pm")
        with pytest.raises(errors.AccessDenied, match="unknown sender 'pm-1'"):
            await pm.ask("rogers", "hello")
        with pytest.raises(errors.AccessDenied, match="unknown spawner 'pm-1'"):
            await pm.spawn("dev", "build A")
        return (await rt.use("models.budget", caller="fiedler"))["mads"]["pm"]["calls"]

    assert team.run(body) == 1  # the refused think() was never sent


# ---- failures ----------------------------------------------------------------------------------------------------


def test_an_instance_that_raises_or_hangs_fails_alone_and_the_ecosystem_keeps_working(team):
    async def body(rt, ctl):
        hopper = rt.mad("hopper")
        raised = await hopper.spawn("dev", "raise please")
        hung = await hopper.spawn("dev", "hang please")
        fine = await hopper.spawn("dev", "build it")
        status = await rt.use("ecosystem.status", caller="grace")
        messages = [m for r in (raised, hung) for m in rt.bus.history(r["conversation_id"])]
        return raised, hung, fine, status, messages, _rows(rt), list(ctl.stopped), dict(rt.emads.live)

    raised, hung, fine, status, messages, rows, stopped, live = team.run(body)
    assert raised["state"] == "failed" and raised["instance"] == "dev-1"
    assert raised["report"].startswith("MAD 'dev' failed in 'work' (ValueError); the details are in the server log")
    assert hung["state"] == "failed" and "did not finish 'work' within 0.3 s (task_timeout_s)" in hung["report"]
    assert fine == {**fine, "instance": "dev-3", "state": "reported", "report": f"{ECHO} Done: build it"}
    assert [(m["sender"], m["kind"], m["payload"].get("state")) for m in messages if m["kind"] == "report"] == [
        ("dev-1", "report", "failed"), ("dev-2", "report", "failed")]
    assert [(r["instance"], r["state"]) for r in rows] == [("dev-1", "failed"), ("dev-2", "failed"), ("dev-3", "reported")]
    assert DETAIL not in repr((rows, messages, raised))  # the exception's type, never its message
    assert stopped == ["dev-1", "dev-2", "dev-3"] and live == {}
    dev = next(m for m in status["mads"] if m["name"] == "dev")
    assert status["healthy"] is True and dev["ok"] is True and (dev["state"], dev["instances"]) == ("idle", 0)


def test_a_spawner_that_stops_waiting_ends_its_instance_and_gives_back_its_place(team):
    async def body(rt, ctl):
        hopper = rt.mad("hopper")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(hopper.spawn("dev", "hang on"), 0.1)  # before its own time limit
        assert rt.emads.live == {}
        holders = [asyncio.ensure_future(hopper.spawn("dev", f"hang {i}")) for i in (1, 2)]
        while rt.emads.running("dev") < 2:
            await asyncio.sleep(0.005)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(hopper.spawn("dev", "queued"), 0.05)  # waited its turn, then gave up
        ended = await asyncio.gather(*holders)
        after = await asyncio.gather(hopper.spawn("dev", "build A"), hopper.spawn("dev", "build B"))
        return _rows(rt), ended, after

    rows, ended, after = team.run(body)
    assert [(r["instance"], r["task"], r["state"]) for r in rows] == [
        ("dev-1", "hang on", "failed"), ("dev-2", "hang 1", "failed"), ("dev-3", "hang 2", "failed"),
        ("dev-4", "build A", "reported"), ("dev-5", "build B", "reported")]  # the queued spawn never began
    assert rows[0]["report"].startswith("cancelled") and all("task_timeout_s" in e["report"] for e in ended)
    assert [a["state"] for a in after] == ["reported", "reported"]


# ---- across restarts ---------------------------------------------------------------------------------------------


def test_names_never_repeat_and_an_instance_a_crash_left_running_is_failed_at_the_next_start(team):
    async def crashed(rt, ctl):
        first = await rt.mad("hopper").spawn("pm", "plan A")
        rt.emads._begin("pm", "hopper", "plan B", first["conversation_id"])  # the process dies while pm-2 works
        return first

    async def next_start(rt, ctl):
        rows = _rows(rt)
        third = await rt.mad("hopper").spawn("pm", "plan C")
        return rows, third, ctl.seen["pm-3"]

    team.run(crashed)
    rows, third, seen = team.run(next_start)
    emads = importlib.import_module(team.kernel.__name__ + ".packs.emads.pack")
    assert [(r["instance"], r["state"], r["report"]) for r in rows][1] == ("pm-2", "failed", emads.INTERRUPTED)
    assert rows[1]["ended_at"]
    assert third["instance"] == "pm-3" and [(r["instance"], r["state"]) for r in seen] == [
        ("pm-1", "reported"), ("pm-2", "failed")]

    async def later(rt, ctl):
        return (await rt.mad("hopper").spawn("pm", "plan D"))["instance"]

    assert team.run(later) == "pm-4"


# ---- what the ecosystem shows --------------------------------------------------------------------------------


def test_roles_are_not_started_nor_served_but_listed_with_their_instances(team):
    kernel = team.kernel
    gateway = importlib.import_module(kernel.__name__ + ".gateway")
    clients = importlib.import_module(kernel.__name__ + ".clients")
    capabilities = importlib.import_module(kernel.__name__ + ".capabilities")

    async def body(rt, ctl):
        server = gateway.build_mcp(rt, clients.ClientRegistry(rt.state_dir), gateway.GatewayAudit(rt))
        served = set(server.schemas)
        server.ledger.close()
        mads = {m["name"]: m for m in await rt.use("ecosystem.mads", caller="grace")}
        status = await rt.use("ecosystem.status", caller="grace")
        await rt.invoke_tool("hopper", "build", {"goal": "x", "parts": 2})
        return set(rt.slots), served, mads, status

    slots, served, mads, status = team.run(body)
    assert {"hopper", "turing", "grace"} <= slots and not {"pm", "dev"} & slots
    assert "hopper.build" in served and not [t for t in served if t.startswith(("pm.", "dev."))]
    assert mads["dev"] == {**mads["dev"], "lifecycle": "ephemeral", "state": "idle", "tools": [], "spawns": [],
                           "max_instances": 2, "instances": 0}
    assert mads["hopper"]["spawns"] == ["pm", "dev"] and "instances" not in mads["hopper"]
    assert mads["hopper"]["tools"] == ["hopper.build"]
    for entry in mads.values():
        capabilities.MadInfo.model_validate(entry)  # the shape MCP clients are told
    roles = {m["name"]: m for m in status["mads"] if m.get("lifecycle") == "ephemeral"}
    assert set(roles) == {"pm", "dev"} and all(m["ok"] and m["state"] == "idle" for m in roles.values())
    assert roles["dev"]["max_instances"] == 2 and status["healthy"] is True
    assert team.ctl.listed == [2, 2]  # while two developers worked, the listing said so


def test_a_role_that_cannot_work_is_refused_when_the_runtime_is_made(team, eco_modules, tmp_path):
    config, kernel, runtime_mod = eco_modules
    hopper, pm, dev = (m for m in team.config.mads if m.name in ("hopper", "pm", "dev"))
    cases = [
        (type("Chatty", (pm,), {"conversations": ("general",)}), "declare no conversations"),
        (type("Crowd", (pm,), {"max_instances": 0}), "max_instances must be an integer >= 1"),
        (type("Hasty", (pm,), {"task_timeout_s": 0}), "task_timeout_s must be > 0"),
        (type("Odd", (pm,), {"lifecycle": "sometimes"}), "lifecycle must be"),
    ]
    for broken, message in cases:
        with pytest.raises(team.errors.InvalidArgument, match=message):
            runtime_mod.Runtime(config.model_copy(update={"mads": (*config.mads, hopper, broken, dev)}), tmp_path / "s")
    with pytest.raises(team.errors.InvalidArgument, match="spawns pm, which is no role"):
        runtime_mod.Runtime(config.model_copy(update={"mads": (*config.mads, hopper, dev)}), tmp_path / "s")
    assert not (tmp_path / "s").exists()  # refused before any state was made


def test_the_cap_passes_on_a_place_its_waiter_was_given_then_cancelled(team):
    emads = importlib.import_module(team.kernel.__name__ + ".packs.emads.pack")

    async def main():
        cap = emads._Cap(1)
        await cap.__aenter__()
        given, next_in_line = asyncio.ensure_future(cap.__aenter__()), asyncio.ensure_future(cap.__aenter__())
        await asyncio.sleep(0)  # both wait their turn
        await cap.__aexit__()  # the place goes to `given`...
        given.cancel()  # ...which is cancelled before it could run: the place must not be lost
        await asyncio.wait_for(next_in_line, 1)  # it passed on
        assert given.cancelled() and cap.held == 1
        await cap.__aexit__()
        return cap.held

    assert asyncio.run(main()) == 0


def test_on_a_shared_postgresql_state_instances_and_reports_are_everyones_and_a_live_replicas_stay_running(
        team, pg_url, redis_url, monkeypatch):  # noqa: F811
    """The role's numbering and earlier reports are the state's (another replica's instance counts), and a replica
    that starts does not fail the instances another one is running: only one older than any task could be."""
    monkeypatch.setenv(f"{team.config.env_prefix}_SECRETS_KEY", "A" * 43 + "=")
    shared = {"db_url": pg_url, "bus_url": redis_url}

    async def first(rt, ctl):
        return await rt.mad("hopper").spawn("pm", "plan A")

    assert team.run(first, "a", **shared)["instance"] == "pm-1"
    rt = team.runtime("b", **shared)  # a replica still running an instance, and one a crash left long ago
    rt.db.execute("INSERT INTO emad_instances (role, n, instance, spawned_by, task, conversation_id, started_at)"
                  " VALUES ('pm', 2, 'pm-2', 'hopper', 'live elsewhere', 'c', ?)", (team.kernel.bus.now_iso(),))
    rt.db.execute("INSERT INTO emad_instances (role, n, instance, spawned_by, task, conversation_id, started_at)"
                  " VALUES ('pm', 3, 'pm-3', 'hopper', 'left by a crash', 'c', '2020-01-01T00:00:00.000000Z')")
    rt.db.close()

    async def second(rt, ctl):
        states = {r["instance"]: r["state"] for r in _rows(rt)}
        done = await rt.mad("hopper").spawn("pm", "plan B")
        return states, done, ctl.seen["pm-4"]

    states, done, seen = team.run(second, "c", **shared)
    assert states == {"pm-1": "reported", "pm-2": "running", "pm-3": "failed"}
    assert done["instance"] == "pm-4"  # numbered after every replica's
    assert [r["instance"] for r in seen] == ["pm-1", "pm-3"]  # the ended ones, whichever replica ran them
