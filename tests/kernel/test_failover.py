"""The failover runbook's script (deploy/failover.sh), run for real: two server processes on one Redis."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import redis
from bus_helpers import bus_eco, redis_url  # noqa: F401  (fixtures)
from pg_helpers import pg_server, pg_url  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]


def render_failover(eco, out: Path, packs: tuple[str, ...] = ()) -> Path:
    """deploy/failover.sh as the generator renders it, for the test ecosystem (built with these deployment packs)."""
    from generator.render import environment

    mads = [
        {"name": cls.name, "talks_to": list(cls.talks_to),
         "tools": [{"name": t["name"], "params": [{"name": p["name"]} | ({} if p["required"] else {"default": p["default"]})
                                                  for p in t["params"]]} for t in cls.tools()]}
        for cls in eco.config.mads
    ]
    text = environment("senior/offline/templates").get_template("frame/failover.sh.j2").render(
        package=eco.name, ecosystem={"name": eco.name, "packs": dict.fromkeys(packs, {})}, mads=mads)
    script = out / "deploy" / "failover.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    return script


@pytest.fixture
def bus(redis_url):  # noqa: F811
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def eco_env(eco, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(eco.root), TMPDIR=str(tmp_path))
    env.pop(f"{eco.config.env_prefix}_SECRETS_KEY", None)
    env.pop(f"{eco.config.env_prefix}_BUS_URL", None)
    env.pop(f"{eco.config.env_prefix}_DB_URL", None)
    return env


def test_the_generated_script_is_valid_bash_and_drills_a_pair_the_spec_declares(tmp_path):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from generator.senior.offline import render_unit
    from generator.senior.synthesise import unit_spec
    from generator.spec.load import load_spec
    from generator.spec.plan import make_plan

    spec = load_spec(REPO / "spec")
    plan = make_plan(spec)
    files = {f["path"]: f["content"] for f in render_unit(unit_spec(spec, plan, plan.unit("frame")))}
    script = tmp_path / "failover.sh"
    script.write_text(files["deploy/failover.sh"])
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(script)], check=True)
    sender = re.search(r"^FROM=(\w+)$", script.read_text(), re.M).group(1)
    target = re.search(r"^TO=(\w+)$", script.read_text(), re.M).group(1)
    assert target in spec.mad(sender).talks_to
    assert "Failover: two replicas on one Redis" in files["RUNBOOK.md"]


def test_forget_refuses_a_consumer_that_still_holds_deliveries(bus_eco, redis_url, bus, tmp_path):  # noqa: F811
    stream = f"regen:{bus_eco.config.name}:bus:ledger"
    bus.xgroup_create(stream, "mads", id="0", mkstream=True)
    entry = bus.xadd(stream, {"e": b"x"})
    bus.xreadgroup("mads", "deadhost:123:abc", {stream: ">"}, count=1)  # a process that took it and died
    script = render_failover(bus_eco, tmp_path)
    env = eco_env(bus_eco, tmp_path)
    refused = subprocess.run(["bash", str(script), "forget", "deadhost:123:abc", "--bus", redis_url],
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and "still holds deliveries (ledger)" in refused.stderr
    assert bus.xpending(stream, "mads")["pending"] == 1
    bus.xack(stream, "mads", entry)
    done = subprocess.run(["bash", str(script), "forget", "deadhost:123:abc", "--bus", redis_url],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert bus.xinfo_consumers(stream, "mads") == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failover_drill_two_servers_one_redis(bus_eco, redis_url, bus, tmp_path):  # noqa: F811
    """The runbook's drill, scripted: replica A takes slow requests, replica B starts on the same Redis
    and key, A is killed with SIGKILL while it holds them; B takes them over, every request is answered,
    nothing stays pending, and B keeps serving and stops cleanly."""
    script = render_failover(bus_eco, tmp_path)
    done = subprocess.run(
        ["bash", str(script), "drill", "--bus", redis_url, "--from", "clerk", "--to", "ledger", "--tool", "record",
         "--args", '{"n": 1, "hold_s": 3}', "--count", "4", "--claim-idle", "1", "--timeout", "90"],
        capture_output=True, text=True, env=eco_env(bus_eco, tmp_path), timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    held = int(re.search(r"A held (\d+) deliveries when it was killed", done.stdout).group(1))
    assert held >= 1, done.stdout  # the kill did land while A held requests: B took them over
    stream = f"regen:{bus_eco.config.name}:bus:ledger"
    assert bus.xpending(stream, "mads")["pending"] == 0 and bus.xlen(stream) == 0
    assert bus.xinfo_consumers(stream, "mads") == []  # A forgotten, B left when it stopped
    assert not list(tmp_path.glob(f"{bus_eco.name}-failover.*")), "the drill cleans up after itself"


def test_failover_drill_two_replicas_sharing_one_postgresql_state(bus_eco, redis_url, pg_url, bus, tmp_path):  # noqa: F811
    """The drill with `--db`: A and B share the state as well as the bus. A is killed holding requests whose
    effects B then makes: every request's row is in the one database, once, though some ran twice."""
    import psycopg

    script = render_failover(bus_eco, tmp_path, packs=("redis", "postgres"))
    done = subprocess.run(
        ["bash", str(script), "drill", "--bus", redis_url, "--db", pg_url, "--from", "clerk", "--to", "ledger",
         "--tool", "record", "--args", '{"n": 1, "hold_s": 1}', "--count", "6", "--claim-idle", "1", "--timeout", "90"],
        capture_output=True, text=True, env=eco_env(bus_eco, tmp_path), timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "and the shared database" in done.stdout and pg_url not in done.stdout + done.stderr
    held = int(re.search(r"A held (\d+) deliveries when it was killed", done.stdout).group(1))
    with psycopg.connect(pg_url) as conn:
        entries = conn.execute("SELECT envelope_id FROM ledger_entries").fetchall()
        runs = conn.execute("SELECT count(*) FROM ledger_runs").fetchone()[0]
    assert len(entries) == len(set(entries)) == 7  # six requests and the drill's last one, each written once
    assert runs >= 7 and held >= 1, (runs, held)  # what A held and was killed with ran again on B
    assert not (tmp_path / "a" / "ecosystem.db").exists()


def test_a_replica_killed_under_steady_load_loses_no_acknowledged_call(bus_eco, redis_url, pg_url, bus, tmp_path):  # noqa: F811
    """Two served replicas on one PostgreSQL and one Redis; clients call through whichever replica answers, as
    behind a load balancer, and move to the other when theirs fails. A is killed with SIGKILL mid-load: every
    call a client saw succeed has its effect in the shared state, read through B."""
    import asyncio
    import base64

    from generator.harness import RunningEcosystem, call_tool

    env = {**eco_env(bus_eco, tmp_path), f"{bus_eco.config.env_prefix}_DB_URL": pg_url,
           f"{bus_eco.config.env_prefix}_BUS_URL": redis_url,
           f"{bus_eco.config.env_prefix}_SECRETS_KEY": base64.b64encode(os.urandom(32)).decode()}
    a = RunningEcosystem(bus_eco.name, tmp_path / "a", cwd=bus_eco.root, env=env, token_name="default", startup_timeout=60)
    b = RunningEcosystem(bus_eco.name, tmp_path / "b", cwd=bus_eco.root, env=env, token_name="lb", startup_timeout=60)
    a.start()
    b.start()
    acknowledged: list[int] = []

    async def client(first: int, stop: asyncio.Event) -> None:
        n, replicas = first, [a, b]
        while not stop.is_set():
            for replica in replicas:
                try:
                    await call_tool(replica.url, a.token, "ledger.record", {"n": n})
                except Exception:  # noqa: BLE001 - the replica died under the call: the balancer tries the other
                    continue
                acknowledged.append(n)
                break
            n += 100

    async def until(count: int) -> None:
        async with asyncio.timeout(120):
            while len(acknowledged) < count:
                await asyncio.sleep(0.05)

    async def load() -> int:
        stop = asyncio.Event()
        clients = [asyncio.create_task(client(i, stop)) for i in range(1, 9)]
        await until(20)
        at_kill = len(acknowledged)
        a.process.kill()  # SIGKILL, mid-load: some calls are in flight on A
        await until(at_kill + 20)  # the load goes on through B
        stop.set()
        await asyncio.gather(*clients)
        return at_kill

    try:
        at_kill = asyncio.run(load())
        assert len(acknowledged) >= at_kill + 20
        stored = asyncio.run(call_tool(b.url, a.token, "ledger.stored", {}))
    finally:
        a.stop()
        b.stop()
    assert set(acknowledged) <= set(stored["ns"]), sorted(set(acknowledged) - set(stored["ns"]))


@pytest.fixture
def work(tmp_path):
    """The drill's TMPDIR (its replicas' state directories): in memory when there is a tmpfs, so a drill
    with many requests measures the bus, not the disk's fsyncs (every request and reply is recorded)."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _drill(eco, url: str, tmp_path: Path, work: Path, *options: str) -> subprocess.CompletedProcess:
    script = render_failover(eco, tmp_path)
    return subprocess.run(["bash", str(script), "drill", "--bus", url, *options],
                          capture_output=True, text=True, env=dict(eco_env(eco, tmp_path), TMPDIR=str(work)), timeout=240)


def _consumers(bus, eco) -> dict[str, list[str]]:
    streams = [k.decode() for k in bus.keys(f"regen:{eco.config.name}:bus:*")]
    return {s: [c["name"].decode() for c in bus.xinfo_consumers(s, "mads")] for s in streams}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_default_drill_kills_a_while_it_holds_deliveries_and_b_takes_them_over(bus_eco, redis_url, bus, tmp_path, work):  # noqa: F811
    """The drill as users run it (the pair and the fast tool the script picks, no --args), with 1,500 requests:
    A holds deliveries when it is killed (it holds each one until then), B takes every one of them over
    and removes A's consumer, and the drill says how many; nothing is left on the bus."""
    done = _drill(bus_eco, redis_url, tmp_path, work, "--count", "1500", "--claim-idle", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"A held (\d+) deliveries when it was killed; B took over (\d+), answered all 1500", done.stdout)
    assert found, done.stdout
    held, taken = int(found.group(1)), int(found.group(2))
    assert 1 <= held <= taken, done.stdout
    stream = f"regen:{bus_eco.config.name}:bus:turing"  # the spec's first pair: rogers -> turing
    assert bus.xpending(stream, "mads")["pending"] == 0 and bus.xlen(stream) == 0
    assert int(bus.hget(f"regen:{bus_eco.config.name}:takeovers", "turing")) == taken
    assert all(names == [] for names in _consumers(bus, bus_eco).values()), _consumers(bus, bus_eco)
    assert not list(work.glob(f"{bus_eco.name}-failover.*")), "the drill cleans up after itself"


@pytest.mark.timeout(300)
def test_a_drill_in_which_b_takes_nothing_over_fails_and_leaves_no_consumer_behind(bus_eco, redis_url, bus, tmp_path, work):  # noqa: F811
    """With --hold 0 and a fast tool, A answers every request before it is killed: the takeover is not
    exercised, so the drill fails instead of claiming it; it still stops its processes and removes the
    consumers of A and B (they hold nothing) from the bus."""
    done = _drill(bus_eco, redis_url, tmp_path, work, "--count", "2", "--hold", "0", "--claim-idle", "1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "B took over none of A's deliveries (A held 0 when it was killed)" in done.stderr, done.stderr
    assert "drill passed" not in done.stdout
    assert _consumers(bus, bus_eco) and all(names == [] for names in _consumers(bus, bus_eco).values()), _consumers(bus, bus_eco)
    assert bus.keys(f"regen:{bus_eco.config.name}:alive:*") == []  # B stopped (it left), A is dead
    logs = next(work.glob(f"{bus_eco.name}-failover.*"))  # a failed drill keeps its logs
    assert (logs / "a.log").exists() and (logs / "b.log").exists()
