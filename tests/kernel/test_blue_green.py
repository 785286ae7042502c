"""Blue/green upgrades on a real PostgreSQL: deploy/upgrade.sh, as the generator renders it, run for real.

Versions of the tiny ecosystem share one database: 1.0 (its first migration), 2.0 (plus an expand migration: a
table created), 3.0 (plus a contract one: that table dropped). A small load balancer in the test (a forwarding
proxy, switched by upgrade.sh's --switch hook) carries a steady load of MCP calls while 1.0 hands over to 2.0:
none fails. A 2.0 that never gets healthy is rolled back (its migration undone). And the refusals: a state at a
newer contract migration; a contract migration while an older replica serves.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from bus_helpers import build_bus_ecosystem, bus_eco, redis_url, shared_key  # noqa: F401  (fixtures)
from pg_helpers import pg_server, pg_url  # noqa: F401  (fixtures)

from generator.harness import call_tool, free_port, running_ecosystem
from generator.kernel.packs.storage.pack import table_ddl

NOTES = [{"name": "id", "type": "integer", "primary_key": True, "nullable": False},
         {"name": "body", "type": "text", "primary_key": False, "nullable": True}]
HISTORY = [
    {"number": 1, "name": "create table turing_notes", "statements": [table_ddl("turing_notes", NOTES)],
     "destructive": False, "kind": "expand", "down": []},
    {"number": 2, "name": "create table turing_extra", "destructive": False, "kind": "expand",
     "statements": ["CREATE TABLE IF NOT EXISTS turing_extra (id INTEGER PRIMARY KEY, note TEXT)"],
     "down": ["DROP TABLE turing_extra"]},
    {"number": 3, "name": "drop table turing_extra", "statements": ["DROP TABLE turing_extra"], "destructive": True,
     "kind": "contract", "down": []},
]
BROKEN = '''
async def _broken_start(self):
    raise RuntimeError("this build cannot start")


Turing.on_start = _broken_start
'''


def render_upgrade(name: str, out: Path) -> Path:
    """deploy/upgrade.sh as the generator renders it, for the test ecosystem."""
    from generator.render import environment

    text = environment("senior/offline/templates").get_template("frame/upgrade.sh.j2").render(
        package=name, ecosystem={"name": name})
    script = out / "deploy" / "upgrade.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    return script


class Versions:
    """The versions of one ecosystem (one package name, one folder each) on one database, with one key."""

    def __init__(self, tmp_path: Path, db_url: str, bus_url: str):
        self.tmp = tmp_path
        self.name = f"upg_{uuid.uuid4().hex[:8]}"
        self.prefix = self.name.upper()
        self.db_url = db_url
        # Two versions serve at once during a switch: they share the bus as well as the state (the local bus is
        # one process's: a second one on the database is refused).
        self.env = {f"{self.prefix}_DB_URL": db_url, f"{self.prefix}_BUS_URL": bus_url,
                    f"{self.prefix}_SECRETS_KEY": "A" * 43 + "="}
        self.script = render_upgrade(self.name, tmp_path / "release")
        self.started: list[int] = []  # new versions upgrade.sh started (and left serving): the fixture stops them

    def build(self, version: str, migrations: int, *, broken: bool = False) -> Path:
        root = self.tmp / f"v{version}{'-broken' if broken else ''}"
        pkg = build_bus_ecosystem(root, self.name)
        (pkg / "build.json").write_text(json.dumps({"ecosystem": self.name, "version": version}))
        (pkg / "migrations.json").write_text(json.dumps(HISTORY[:migrations]))
        if broken:
            with open(pkg / "mads" / "__init__.py", "a") as mads:
                mads.write(BROKEN)
        return root

    def upgrade(self, root: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, **self.env, PY=sys.executable, PYTHONPATH=str(root), TMPDIR=str(self.tmp))
        done = subprocess.run(["bash", str(self.script), *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
        self.started += [int(pid) for pid in re.findall(r"the new version \(pid (\d+)\) is healthy", done.stdout)]
        return done

    def serve(self, root: Path, state: str):
        return running_ecosystem(self.name, self.tmp / state, cwd=root, env=self.env, startup_timeout=60)

    def query(self, sql: str) -> list[tuple]:
        with psycopg.connect(self.db_url) as conn:
            return [tuple(row) for row in conn.execute(sql).fetchall()]

    def level(self) -> list[tuple]:
        return self.query("SELECT number, kind FROM schema_migrations ORDER BY number")

    def has_table(self, table: str) -> bool:
        return self.query(f"SELECT to_regclass('{table}') IS NOT NULL")[0][0]


@pytest.fixture
def versions(tmp_path, pg_url, redis_url):  # noqa: F811
    made = Versions(tmp_path, pg_url, redis_url)
    yield made
    for pid in made.started:
        _terminate(pid)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)


class Balancer:
    """The load balancer in front of the versions: new MCP sessions go to the port in `backend_file` (which the
    --switch hook rewrites), a request of an open session to the version that opened it (sessions live in one
    process); a request opening a session that a draining version answers 503 is retried on the current one."""

    def __init__(self, backend_file: Path):
        self.backend_file = backend_file
        self.sessions: dict[str, int] = {}
        self.calls_by_port: dict[int, int] = {}
        self.retried = 0
        self.port = free_port()
        self._client: httpx.AsyncClient | None = None
        self._server = uvicorn.Server(uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Balancer:
        self._thread.start()
        while not self._server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def current(self) -> int:
        return int(self.backend_file.read_text().strip())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if self._client is not None:
                await self._client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k not in (b"host", b"connection")]
        session = dict(scope["headers"]).get(b"mcp-session-id", b"").decode()
        self._client = self._client or httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=120.0))
        for _ in range(50):
            port = self.sessions.get(session) or self.current()
            url = f"http://127.0.0.1:{port}{scope['path']}" + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
            try:
                answer = await self._client.send(self._client.build_request(scope["method"], url, headers=headers,
                                                                            content=body), stream=True)
            except httpx.ConnectError:
                if session:
                    break
                await asyncio.sleep(0.1)
                continue
            if answer.status_code == 503 and not session:  # draining: this request can go to the other version
                await answer.aclose()
                self.retried += 1
                await asyncio.sleep(0.1)
                continue
            if b'"tools/call"' in body:
                self.calls_by_port[port] = self.calls_by_port.get(port, 0) + 1
            if sid := answer.headers.get("mcp-session-id"):
                self.sessions[sid] = port
            await send({"type": "http.response.start", "status": answer.status_code,
                        "headers": [(k.encode(), v.encode()) for k, v in answer.headers.items()
                                    if k not in ("transfer-encoding", "connection")]})
            async for chunk in answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            await answer.aclose()
            return
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b"no backend"})


class Load:
    """A steady load of MCP calls (each on a session of its own) from `workers` clients until stopped: a write,
    a read, and a call that takes a while (so some are in flight on the old version when it is stopped)."""

    def __init__(self, url: str, token: str, workers: int = 4):
        self.url, self.token, self.workers = url, token, workers
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _worker(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                if i % 3 == 0:
                    await call_tool(self.url, self.token, "rogers.create_conversation", {"title": f"w{n}-{i}"})
                elif i % 3 == 1:
                    await call_tool(self.url, self.token, "rogers.list_conversations", {"limit": 5})
                else:
                    await call_tool(self.url, self.token, "ledger.record", {"n": n * 100_000 + i, "hold_s": 0.5})
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                self.failed.append(f"{type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        await asyncio.gather(*(self._worker(n) for n in range(self.workers)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_an_added_column_on_postgresql_is_ignored_by_the_older_version_and_undone(bus_eco, pg_url, shared_key,  # noqa: F811
                                                                                  tmp_path):
    """On PostgreSQL as on SQLite: 1.0 starts on a state where 2.0 added a nullable column to its table (and
    writes rows without it), then `migrate down` drops the column again."""
    migrations = importlib.import_module(f"{bus_eco.name}.kernel.packs.storage.migrations")
    turing = next(m for m in bus_eco.config.mads if m.name == "turing")
    tag = {"name": "tag", "type": "text", "primary_key": False, "nullable": True}
    tagged = type("Turing", (turing,), {"storage": ({"name": "notes", "columns": [*NOTES, tag]},)})
    config_2 = bus_eco.config.model_copy(update={"mads": tuple(tagged if m is turing else m for m in bus_eco.config.mads)})
    first = migrations.Migration.model_validate(HISTORY[0])
    add_tag = migrations.Migration(number=2, name="add column tag to turing_notes", kind="expand",
                                   statements=["ALTER TABLE turing_notes ADD COLUMN tag TEXT"],
                                   down=["ALTER TABLE turing_notes DROP COLUMN tag"])
    new = bus_eco.Runtime(config_2, tmp_path / "new", db_url=pg_url, migrations=[first, add_tag])
    new.table_store("turing").insert("notes", body="by 2.0", tag="t")
    new.db.close()
    old = bus_eco.Runtime(bus_eco.config, tmp_path / "old", db_url=pg_url, migrations=[first])
    try:
        old.table_store("turing").insert("notes", body="by 1.0")
        assert [r["body"] for r in old.table_store("turing").select("notes")] == ["by 2.0", "by 1.0"]
        assert [r["number"] for r in migrations.migrate_down(old.db, 1, [first])] == [2]
    finally:
        old.db.close()
    with psycopg.connect(pg_url) as conn:
        columns = conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'turing_notes'"
                               " ORDER BY ordinal_position").fetchall()
        assert [c[0] for c in columns] == ["id", "body", "rowid"]
        assert conn.execute("SELECT number FROM schema_migrations").fetchall() == [(1,)]


def test_a_build_with_the_postgres_pack_gets_the_script_and_its_runbook_section(tmp_path):
    """Rendered from the real spec: with the postgres and redis packs, deploy/upgrade.sh (valid bash, shellcheck-clean)
    and the RUNBOOK's "Blue/green upgrade"; without either, neither (every build's RUNBOOK explains kinds and down)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from generator.senior.offline import render_unit
    from generator.senior.synthesise import unit_spec
    from generator.spec.load import load_spec
    from generator.spec.plan import make_plan

    spec = load_spec(Path(__file__).resolve().parents[2] / "spec")
    plan = make_plan(spec)
    unit = unit_spec(spec, plan, plan.unit("frame"))
    assert "postgres" in unit["ecosystem"]["packs"]  # spec/ names it
    files = {f["path"]: f["content"] for f in render_unit(unit)}
    unit["ecosystem"]["packs"] = {name: v for name, v in unit["ecosystem"]["packs"].items() if name != "postgres"}
    without = {f["path"]: f["content"] for f in render_unit(unit)}
    assert "deploy/upgrade.sh" not in without and "## Blue/green upgrade" not in without["RUNBOOK.md"]
    assert "migrate down --to N" in without["RUNBOOK.md"]
    unit["ecosystem"]["packs"] = {name: {} for name in ("postgres", "tracing")}  # no Redis bus: two versions cannot share
    no_bus = {f["path"]: f["content"] for f in render_unit(unit)}
    assert "deploy/upgrade.sh" not in no_bus and "## Blue/green upgrade" not in no_bus["RUNBOOK.md"]
    assert "## Blue/green upgrade" in files["RUNBOOK.md"] and "deploy/upgrade.sh --old-pid PID" in files["RUNBOOK.md"]
    script = tmp_path / "upgrade.sh"
    script.write_text(files["deploy/upgrade.sh"])
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "--severity=style", str(script)], check=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_blue_green_upgrade_under_load_fails_no_request(versions):
    """1.0 serves behind the balancer under a steady load of MCP calls; upgrade.sh starts 2.0 beside it (its
    expand migration runs while 1.0 serves), switches the balancer, stops 1.0 (which drains). 0 failed calls."""
    old_root, new_root = versions.build("1.0.0", 1), versions.build("2.0.0", 2)
    backend = versions.tmp / "backend"
    with versions.serve(old_root, "old") as old, Balancer(backend) as balancer:
        backend.write_text(str(old.port))
        with Load(f"http://127.0.0.1:{balancer.port}", old.token) as load:
            time.sleep(2)
            before = load.ok
            done = versions.upgrade(new_root, "--old-pid", str(old.process.pid), "--state", str(versions.tmp / "new"),
                                    "--switch", f'echo "$1" > {backend}', "--settle", "2", "--health-timeout", "90")
            time.sleep(2)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "did not stop" not in done.stderr  # SIGTERM was enough: no SIGKILL
        assert old.process.wait(30) == 0, old.logs()[-3000:]  # it drained and stopped cleanly
    new_port = int(backend.read_text())
    assert new_port != old.port and "done: the new version serves" in done.stdout
    assert load.failed == [], load.failed[:5]
    assert before > 0 and load.ok > before + 10, (before, load.ok)
    assert balancer.calls_by_port.get(old.port, 0) > 0 and balancer.calls_by_port.get(new_port, 0) > 0
    assert versions.level() == [(1, "expand"), (2, "expand")] and versions.has_table("turing_extra")
    assert versions.query("SELECT version, level FROM replicas") == [("2.0.0", 2)]  # 1.0 left at its clean stop
    assert "the state is at migration 1" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_new_version_that_never_gets_healthy_is_rolled_back(versions):
    """2.0 applies its expand migration, then never gets healthy: stopped, its migration undone (its row and its
    table gone, the undo in the audit log), 1.0 still serving."""
    old_root, broken_root = versions.build("1.0.0", 1), versions.build("2.0.0", 2, broken=True)
    with versions.serve(old_root, "old") as old:
        done = versions.upgrade(broken_root, "--old-pid", str(old.process.pid), "--state", str(versions.tmp / "new"),
                                "--switch", "exit 99", "--health-timeout", "8")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "rolling back: the new version did not get healthy within 8s" in done.stdout
        assert "undid migration 2 'create table turing_extra'" in done.stdout
        assert "rolled back: the old version" in done.stderr
        assert versions.level() == [(1, "expand")] and not versions.has_table("turing_extra")
        assert versions.query("SELECT action, subject FROM audit_log WHERE action = 'storage.migrate_down'") == [
            ("storage.migrate_down", "to 1")]
        assert old.process.poll() is None
        assert old.call("rogers.create_conversation", title="after the rollback")["title"] == "after the rollback"
        assert versions.query("SELECT version FROM replicas") == [("1.0.0",)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_contract_migration_is_refused_while_an_older_version_serves(versions):
    """3.0 drops what 2.0 reads: with 2.0 serving, 3.0 refuses to start, the script says why, nothing changed;
    once 2.0 has stopped, 3.0 starts; then 2.0 and 1.0 are refused on the contracted state, nothing written."""
    v1, v2, v3 = (versions.build(f"{n}.0.0", n) for n in (1, 2, 3))
    with versions.serve(v2, "old") as old:
        done = versions.upgrade(v3, "--old-pid", str(old.process.pid), "--state", str(versions.tmp / "new"),
                                "--health-timeout", "60")
        assert done.returncode == 1, done.stdout + done.stderr
        assert re.search(r"the new version refused to start: migration 3 'drop table turing_extra' is a contract "
                         r"migration .*replicas of an older version still serve .*version 2\.0\.0 \(storage level 2",
                         done.stderr), done.stderr
        assert "nothing changed; the old version" in done.stderr
        assert versions.level() == [(1, "expand"), (2, "expand")] and versions.has_table("turing_extra")
        assert old.call("rogers.list_conversations", limit=1) is not None
    with versions.serve(v3, "old"):  # the state directory 2.0 had, as on one host
        assert versions.level()[-1] == (3, "contract") and not versions.has_table("turing_extra")
    written = versions.query("SELECT (SELECT count(*) FROM audit_log), (SELECT count(*) FROM replicas)")
    env = dict(os.environ, **versions.env)
    for root in (v2, v1):
        refused = subprocess.run([sys.executable, "-m", versions.name, "serve", "--port", "0", "--state",
                                  str(versions.tmp / "old")], env={**env, "PYTHONPATH": str(root)},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert re.search(r"^error: the state in .* was migrated by a newer version of this ecosystem \(migration 3 "
                         r"'drop table turing_extra'; this version knows \d\).*contract migration", refused.stderr)
    assert versions.query("SELECT (SELECT count(*) FROM audit_log), (SELECT count(*) FROM replicas)") == written
    assert versions.level()[-1] == (3, "contract")
