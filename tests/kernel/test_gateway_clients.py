"""The MCP gateway's clients: hashed tokens, tool patterns, rate limits, quotas, the call log, strict schemas.

Most tests run in-process: the registry, the CLI's `main`, and the gateway's MCP server with the
client identity BearerGate would set put in place. The last test runs the real server as a
subprocess and revokes a client while one of its sessions is open.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest

from generator import harness


@pytest.fixture
def kernel(tiny_ecosystem):
    _, name = tiny_ecosystem
    mods = ("clients", "gateway", "cli", "logs", "db", "audit", "errors")
    return SimpleNamespace(**{m: importlib.import_module(f"{name}.kernel.{m}") for m in mods})


def _cli(kernel, eco_modules, capsys, *argv):
    config = eco_modules[0]
    code = kernel.cli.main(config, [str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- the registry and the CLI --------------------------------------------------------------------


def test_clients_add_prints_the_token_once_and_stores_only_its_hash(kernel, eco_modules, capsys, tmp_path):
    state = tmp_path / "state"
    code, out, err = _cli(kernel, eco_modules, capsys, "clients", "add", "ci", "--state", state,
                          "--allow", "rogers.*", "--allow", "turing.get_secret", "--rate", "10/s", "--quota", "1000/day")
    assert code == 0
    token = out.strip()
    assert len(token) >= 32 and "will not be shown again" in err and token not in err
    # No token file: the registry, and the database whose audit log records the change.
    assert {p.name for p in state.iterdir() if not p.name.startswith(".")} <= {
        "tokens.json", "ecosystem.db", "ecosystem.db-wal", "ecosystem.db-shm", "audit-anchor.json"}
    stored = (state / "tokens.json").read_text()
    assert token not in stored
    assert stat.S_IMODE((state / "tokens.json").stat().st_mode) == 0o600

    registry = kernel.clients.ClientRegistry(state)
    assert registry.verify(token) == "ci" and registry.verify("not-a-token") is None and registry.verify("") is None
    assert registry.allowed("ci", "rogers.post") and registry.allowed("ci", "turing.get_secret")
    assert not registry.allowed("ci", "turing.set_secret") and not registry.allowed("nobody", "rogers.post")

    code, out, _ = _cli(kernel, eco_modules, capsys, "clients", "list", "--state", state)
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["NAME", "ALLOW", "RATE"]
    assert row.split()[:7] == ["ci", "rogers.*", "turing.get_secret", "10/s", "1000/day", "0", row.split()[6]]
    code, out, _ = _cli(kernel, eco_modules, capsys, "clients", "list", "--state", state, "--json")
    [listed] = json.loads(out)
    assert listed == {"name": "ci", "allow": ["rogers.*", "turing.get_secret"], "secrets": [], "rate": "10/s",
                      "quota": "1000/day",
                      "created_at": listed["created_at"], "revoked_at": "", "calls_today": 0}
    assert token not in out and registry.get("ci").sha256 not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "ci", "--allow", "grace.*"], "a client named 'ci' exists already (active); choose another name"),
        (["add", "bad name", "--allow", "*"], "client and token names are 1-64 characters"),
        (["add", "x", "--allow", "rog[ers"], "bad tool pattern 'rog[ers'"),
        (["add", "x", "--allow", "rogers"], "matches none of this ecosystem's tools, which are named <mad>.<tool> with <mad> one "
                                            "of fiedler, grace, rogers, turing; did you mean 'rogers.*'?"),
        (["add", "x", "--allow", "*", "--rate", "10 per second"], "bad rate '10 per second': write CALLS/UNIT"),
        (["add", "x", "--allow", "*", "--rate", "0/s"], "bad rate '0/s'"),
        (["add", "x", "--allow", "*", "--quota", "5/week"], "bad quota '5/week': write CALLS/day"),
        (["revoke", "nobody"], "no client named 'nobody'; clients: ci"),
    ],
)
def test_clients_cli_refuses_bad_input_with_a_clear_error_and_exit_2(kernel, eco_modules, capsys, tmp_path, argv, message):
    state = tmp_path / "state"
    assert _cli(kernel, eco_modules, capsys, "clients", "add", "ci", "--state", state, "--allow", "*")[0] == 0
    before = (state / "tokens.json").read_text()
    code, out, err = _cli(kernel, eco_modules, capsys, "clients", *argv, "--state", state)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err
    assert (state / "tokens.json").read_text() == before


def test_a_revocation_reaches_a_registry_that_is_already_loaded(kernel, eco_modules, capsys, tmp_path):
    state = tmp_path / "state"
    server_side = kernel.clients.ClientRegistry(state)
    token = server_side.add("ci", ["*"])
    assert server_side.verify(token) == "ci"  # loaded and cached, as a running server has it
    code, out, _ = _cli(kernel, eco_modules, capsys, "clients", "revoke", "ci", "--state", state)
    assert code == 0 and "revoked" in out
    assert server_side.verify(token) is None
    assert server_side.identify(token).revoked and not server_side.allowed("ci", "grace.status")
    code, out, _ = _cli(kernel, eco_modules, capsys, "clients", "list", "--state", state, "--json")
    assert json.loads(out)[0]["revoked_at"]
    # a revoked name is not reused, and the `token` command neither revives nor rotates it
    assert "exists already (revoked)" in _cli(kernel, eco_modules, capsys, "clients", "add", "ci", "--state", state,
                                              "--allow", "*")[2]
    path, problem = server_side.ensure("ci")
    assert "was revoked" in problem and not path.exists() and server_side.verify(token) is None


def test_adding_and_revoking_a_client_is_in_the_audit_log_without_its_token(kernel, eco_modules, capsys, tmp_path):
    state = tmp_path / "state"
    token = _cli(kernel, eco_modules, capsys, "clients", "add", "ci", "--state", state, "--allow", "rogers.*",
                 "--rate", "10/s", "--secret", "db.*")[1].strip()
    assert json.loads(_cli(kernel, eco_modules, capsys, "clients", "list", "--state", state, "--json")[1])[0][
        "secrets"] == ["db.*"]
    assert _cli(kernel, eco_modules, capsys, "clients", "revoke", "ci", "--state", state)[0] == 0
    db = kernel.db.Database(state / "ecosystem.db")
    try:
        rows = [r for r in db.query("SELECT * FROM audit_log ORDER BY id") if r["action"].startswith("clients.")]
    finally:
        db.close()
    assert [(r["actor"], r["action"], r["subject"], r["ok"]) for r in rows] == [
        ("operator", "clients.add", "ci", 1), ("operator", "clients.revoke", "ci", 1)]
    assert rows[0]["detail"] == "allow rogers.*; rate 10/s; secrets db.*"
    assert token not in str(rows)
    count, _, problems = kernel.audit.verify_file(state / "ecosystem.db")
    assert problems == [] and count >= 2


def test_token_command_creates_the_client_once_and_never_rotates_it(kernel, tmp_path):
    registry = kernel.clients.ClientRegistry(tmp_path / "state")
    path, problem = registry.ensure("default")
    token = path.read_text().strip()
    assert problem == "" and registry.verify(token) == "default" and registry.allowed("default", "turing.set_secret")
    assert registry.ensure("default") == (path, "")
    path.unlink()  # the operator handed the token out and deleted the file, as the runbook says
    again, problem = registry.ensure("default")
    assert "token is unchanged" in problem and not again.exists() and registry.verify(token) == "default"


def test_rate_limiter_is_a_token_bucket(kernel):
    now = [100.0]
    limiter = kernel.clients.RateLimiter(clock=lambda: now[0])
    rate = kernel.clients.parse_rate("5/s")
    assert [limiter.take("ci", rate) for _ in range(5)] == [0.0] * 5  # a burst of up to 5
    assert limiter.take("ci", rate) == pytest.approx(0.2)
    assert limiter.take("other", rate) == 0.0  # buckets are per client
    now[0] += 0.2
    assert limiter.take("ci", rate) == 0.0
    assert limiter.take("ci", rate) > 0
    assert kernel.clients.parse_rate("600/min").per_second == 10 and str(kernel.clients.parse_rate("2/hour")) == "2/h"


# ---- the gateway's MCP server, in-process --------------------------------------------------------


@pytest.fixture
def gateway(runtime, kernel, monkeypatch):
    """The gateway's MCP server over the started runtime; `call(client, tool, **args)` calls a tool as
    `client`, which is what BearerGate puts in the request scope for a valid token."""
    registry = kernel.clients.ClientRegistry(runtime.state_dir)
    audit = kernel.gateway.GatewayAudit(runtime)
    server = kernel.gateway.build_mcp(runtime, registry, audit)
    who = {"client": None}
    monkeypatch.setattr(kernel.gateway, "_caller", lambda ctx: (who["client"], "127.0.0.1:4242"))

    def call(client, tool, _server=None, **args):
        who["client"] = client
        return asyncio.run((_server or server).call_tool(tool, args))

    def refusal(client, tool, _server=None, **args):
        with pytest.raises(kernel.gateway.ToolError) as caught:
            call(client, tool, _server, **args)
        return str(caught.value)

    def rows():
        return runtime.db.query("SELECT client, tool, correlation_id, outcome, counted FROM gateway_calls ORDER BY id")

    def audited():
        return [(e["actor"], e["action"], e["detail"]) for e in reversed(runtime.audit.recent(50, action_prefix="gateway."))]

    yield SimpleNamespace(server=server, registry=registry, audit=audit, call=call, refusal=refusal, rows=rows,
                          audited=audited, runtime=runtime)
    server.ledger.close()


def test_patterns_allow_some_tools_and_deny_the_rest_with_an_audit_record(gateway, kernel):
    gateway.registry.add("viewer", ["grace.*", "rogers.list_*"])
    assert harness.result_value(gateway.call("viewer", "grace.status"))["status"] == "ok"
    gateway.call("viewer", "rogers.list_conversations")
    message = gateway.refusal("viewer", "turing.get_secret", name="db_password")
    assert message.startswith("access_denied: client 'viewer' may not call turing.get_secret (it may call: grace.*, rogers.list_*)")
    assert ("client:viewer", "gateway.tool-denied", "turing.get_secret") in gateway.audited()
    assert [(r["tool"], r["outcome"], r["counted"]) for r in gateway.rows()] == [
        ("grace.status", "ok", 1), ("rogers.list_conversations", "ok", 1), ("turing.get_secret", "denied", 0)]


def test_rate_limit_refuses_with_a_clear_error_and_is_audited_and_logged(gateway):
    gateway.registry.add("ci", ["grace.*"], rate="2/min")
    gateway.call("ci", "grace.status")
    gateway.call("ci", "grace.status")
    message = gateway.refusal("ci", "grace.status")
    assert message.startswith("rate_limited: client 'ci' may make 2 calls per minute; retry in 30.0 s")
    assert any(a[:2] == ("client:ci", "gateway.rate-limited") for a in gateway.audited())
    assert [r["outcome"] for r in gateway.rows()] == ["ok", "ok", "rate_limited"]


def test_daily_quota_refuses_and_is_kept_in_the_database(gateway, kernel):
    gateway.registry.add("daily", ["grace.*"], quota="2/day")
    gateway.call("daily", "grace.status")
    gateway.refusal("daily", "grace.nope")  # an unknown tool still counts as a call
    message = gateway.refusal("daily", "grace.status")
    assert message.startswith("quota_exceeded: client 'daily' has made its 2 calls for today; the quota resets at 00:00 UTC")
    assert any(a[:2] == ("client:daily", "gateway.quota-exceeded") for a in gateway.audited())
    assert [r["outcome"] for r in gateway.rows()] == ["ok", "unknown_tool", "quota_exceeded"]
    # a new server on the same database (a restart) counts from the table
    restarted = kernel.gateway.build_mcp(gateway.runtime, gateway.registry, gateway.audit)
    assert gateway.refusal("daily", "grace.status", restarted).startswith("quota_exceeded")
    restarted.ledger.close()
    assert kernel.clients.calls_today_by_client(gateway.runtime.state_dir) == {"daily": 2}


def test_every_call_is_logged_with_its_correlation_id(gateway, kernel):
    gateway.registry.add("ci", ["grace.*"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(kernel.logs.JsonFormatter())
    logger = logging.getLogger("kernel.gateway")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        ok = gateway.call("ci", "grace.status")
        failed = gateway.refusal("ci", "turing.list_secrets")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    first, second = gateway.rows()
    assert ok.meta["regen/correlation_id"] == first["correlation_id"]
    assert failed.endswith(f"(correlation id {second['correlation_id']})")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    calls = [line for line in lines if line["msg"] == "gateway call"]
    assert [(c["client"], c["tool"], c["outcome"], c["correlation_id"]) for c in calls] == [
        ("ci", "grace.status", "ok", first["correlation_id"]),
        ("ci", "turing.list_secrets", "denied", second["correlation_id"])]
    assert all(isinstance(c["ms"], float) for c in calls)
    assert first["correlation_id"] != second["correlation_id"]


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        ("rogers.history", {"conversation_id": "x", "limit": "many"},
         "invalid_argument: rogers.history: argument 'limit' must be an integer, not a string"),
        ("rogers.history", {"conversation_id": "x", "limit": "7"},  # the SDK alone would coerce this
         "invalid_argument: rogers.history: argument 'limit' must be an integer, not a string"),
        ("rogers.history", {}, "invalid_argument: rogers.history: argument 'conversation_id' is required (a string)"),
        ("rogers.history", {"conversation_id": "x", "limt": 5},  # the SDK alone would drop it silently
         "invalid_argument: rogers.history: 'limt' is not an argument of rogers.history; it takes: conversation_id, limit"),
        ("rogers.create_conversation", {"title": "t", "participants": "turing"},
         "argument 'participants' must be an array of strings, not a string"),
        ("rogers.create_conversation", {"title": "t", "participants": ["turing", 7]},
         "argument 'participants[1]' must be a string, not an integer"),
        ("turing.set_secret", {"name": "db", "value": 12345},
         "invalid_argument: turing.set_secret: argument 'value' must be a string, not an integer"),
        ("nope.tool", {}, "unknown_tool: there is no tool 'nope.tool'; tools are named <mad>.<tool>"),
    ],
)
def test_arguments_are_checked_against_the_advertised_schema_with_clear_errors(gateway, tool, args, message):
    gateway.registry.add("ci", ["*"])
    text = gateway.refusal("ci", tool, **args)
    assert message in text and "(correlation id " in text
    assert "12345" not in text  # values are not echoed: they may be secrets
    assert gateway.rows()[-1]["outcome"] == ("unknown_tool" if tool == "nope.tool" else "invalid")
    if tool != "nope.tool":  # a refused argument is an audited event, named without its value
        actor, action, detail = gateway.audited()[-1]
        assert (actor, action) == ("client:ci", "gateway.invalid-argument") and message in detail
        assert "12345" not in detail and "many" not in detail


def test_tools_list_advertises_the_strict_schemas(gateway):
    tools = {t.name: t for t in asyncio.run(gateway.server.list_tools())}
    schema = tools["rogers.history"].input_schema
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["conversation_id"] and schema["properties"]["limit"] == {
        "default": 50, "title": "Limit", "type": "integer"}
    assert all(t.input_schema.get("additionalProperties") is False for t in tools.values())


# ---- end to end: a server subprocess -------------------------------------------------------------


def test_revoke_takes_effect_on_a_running_server(tiny_ecosystem, kernel, eco_modules, capsys, tmp_path):
    root, name = tiny_ecosystem
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(root))

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", name, "clients", *argv, "--state", str(state)], env=env,
                              capture_output=True, text=True, timeout=60)

    with harness.running_ecosystem(name, state, cwd=root) as eco:
        added = cli("add", "ci", "--allow", "grace.*")  # added while the server runs
        assert added.returncode == 0, added.stderr
        token = added.stdout.strip()

        async def session():
            async with harness.mcp_client(eco.url, token) as client:
                ok = await client.call_tool("grace.status", {})
                assert not ok.is_error
                denied = await client.call_tool("turing.get_secret", {"name": "db_password"})
                assert denied.is_error and denied.content[0].text.startswith("access_denied: client 'ci' may not call")
                revoked = await asyncio.to_thread(cli, "revoke", "ci")
                assert revoked.returncode == 0, revoked.stderr
                with pytest.raises(Exception):  # the open session's next request is refused
                    await client.call_tool("grace.status", {})
                return ok.meta["regen/correlation_id"]

        try:
            cid = asyncio.run(session())
        except BaseExceptionGroup as group:  # the SDK's task groups wrap what the session raised
            raise group.exceptions[0] from group
        refused = httpx.post(eco.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                             headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"})
        assert refused.status_code == 401 and "revoked" in refused.json()["message"]
        assert eco.call("grace.status")["status"] == "ok"  # other clients are unaffected
        listed = json.loads(_cli(kernel, eco_modules, capsys, "clients", "list", "--state", state, "--json")[1])
        assert {c["name"]: c["calls_today"] for c in listed} == {"ci": 1, "default": 1}
    db = sqlite3.connect(state / "ecosystem.db")
    try:
        rows = db.execute("SELECT client, tool, outcome, correlation_id FROM gateway_calls ORDER BY id").fetchall()
        actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE actor = 'client:ci' ORDER BY id")]
    finally:
        db.close()
    assert rows[:2] == [("ci", "grace.status", "ok", cid), ("ci", "turing.get_secret", "denied", rows[1][3])]
    # Its first call of a tool is recorded once (what it uses), then the refusal and the revocation.
    assert actions[:2] == ["tool.call", "gateway.tool-denied"] and "gateway.revoked" in actions
    logged = [json.loads(line) for line in eco.logs().splitlines() if line.startswith("{")]
    assert any(line["msg"] == "gateway call" and line.get("correlation_id") == cid and line["client"] == "ci" for line in logged)


def test_a_clients_secret_patterns_bound_what_its_calls_read_write_and_list(gateway, kernel, eco_modules, capsys):
    gateway.registry.add("ops", ["turing.*"], secrets=["db.*"])
    gateway.registry.add("admin", ["turing.*"])
    assert gateway.call("admin", "turing.set_secret", name="api_key", value="k-123")
    assert gateway.call("ops", "turing.set_secret", name="db.password", value="p-456")
    value = harness.result_value
    assert value(gateway.call("ops", "turing.get_secret", name="db.password"))["value"] == "p-456"
    for tool, args in (("turing.get_secret", {"name": "api_key"}), ("turing.set_secret", {"name": "api_key", "value": "x"})):
        text = gateway.refusal("ops", tool, **args)
        assert "access_denied" in text and "outside the secrets client:ops may touch (db.*)" in text
        assert "k-123" not in text
    names = [s["name"] for s in value(gateway.call("ops", "turing.list_secrets"))]
    assert names == ["db.password"]
    admin_names = [s["name"] for s in value(gateway.call("admin", "turing.list_secrets"))]
    assert admin_names == ["api_key", "db.password"]  # a client without --secret: every secret its tools reach
    refused = [a for a in gateway.runtime.audit.recent(50) if a["action"].startswith("secrets.") and not a["ok"]]
    assert {(a["action"], a["subject"], a["on_behalf_of"]) for a in refused} == {
        ("secrets.get", "api_key", "client:ops"), ("secrets.set", "api_key", "client:ops")}
    with pytest.raises(kernel.errors.InvalidArgument, match="bad secret pattern 'db password'"):
        gateway.registry.add("bad", ["turing.*"], secrets=["db password"])


def test_the_call_log_keeps_its_last_days_and_todays_quota(gateway):
    ledger = gateway.server.ledger
    gateway.registry.add("ci", ["grace.*"], quota="5/day")
    gateway.call("ci", "grace.status")
    day = 86400
    now = time.time()
    old = [(time.strftime("%Y-%m-%d", time.gmtime(now - n * day)), n) for n in (1, 30, 89, 90, 91, 400)]
    for stamp, n in old:
        gateway.runtime.db.execute(
            "INSERT INTO gateway_calls (ts, day, client, tool, correlation_id, outcome, counted, duration_ms) "
            "VALUES (?, ?, 'ci', 'grace.status', ?, 'ok', 1, 1.0)", (stamp + "T00:00:00Z", stamp, f"c{n}"))
    assert ledger.prune(90, now=now) == 2  # 91 and 400 days ago
    kept = {r["correlation_id"] for r in gateway.runtime.db.query("SELECT correlation_id FROM gateway_calls")}
    assert {"c1", "c30", "c89", "c90"} <= kept and not {"c91", "c400"} & kept
    assert ledger.calls_today("ci") == 1  # today's calls, which the quota counts, stay
    assert ledger.prune(0, now=now) == 4 and ledger.calls_today("ci") == 1  # even "keep 0 days" keeps today


def _initialize(http, token: str):
    return http.post("/mcp", headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
                     json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                           "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                      "clientInfo": {"name": "probe", "version": "1"}}})


def test_a_client_holds_at_most_its_cap_of_sessions_and_others_still_get_in(runtime, kernel):
    from starlette.testclient import TestClient

    registry = kernel.clients.ClientRegistry(runtime.state_dir)
    hog, other = registry.add("hog", ["grace.*"]), registry.add("other", ["grace.*"])
    app = kernel.gateway.build_app(runtime, registry, sessions_per_client=2)
    with TestClient(app, base_url="http://127.0.0.1:8000") as http:
        opened = [_initialize(http, hog) for _ in range(2)]
        assert all(r.status_code == 200 and r.headers.get("mcp-session-id") for r in opened)
        assert '"version":"unreleased"' in opened[0].text.replace(" ", "")  # serverInfo: the build's version
        refused = _initialize(http, hog)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert refused.json()["error"]["message"].startswith("too_many_sessions: client 'hog' has 2 sessions open")
        assert _initialize(http, other).status_code == 200  # one client's sessions do not shut the others out
        closed = http.delete("/mcp", headers={"Authorization": f"Bearer {hog}",
                                              "mcp-session-id": opened[0].headers["mcp-session-id"]})
        assert closed.status_code in (200, 204)
        assert _initialize(http, hog).status_code == 200  # a closed session frees its place
        health = http.get("/healthz").json()
        assert health["mcp_sessions"] == {"open": 3, "max": 1000}
        denied = [a for a in runtime.audit.recent(50) if a["action"] == "gateway.sessions-exhausted"]
        assert [a["actor"] for a in denied] == ["client:hog"]


def test_opening_sessions_and_listing_tools_count_against_the_rate_limit(runtime, kernel):
    from starlette.testclient import TestClient

    registry = kernel.clients.ClientRegistry(runtime.state_dir)
    token = registry.add("slow", ["grace.*"], rate="2/min")
    app = kernel.gateway.build_app(runtime, registry)
    with TestClient(app, base_url="http://127.0.0.1:8000") as http:
        opened = _initialize(http, token)
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
                   "mcp-session-id": opened.headers["mcp-session-id"]}
        http.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        listed = http.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert "grace.status" in listed.text  # the second of its two calls a minute
        again = http.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
        assert "rate_limited: client 'slow' lists tools too fast" in again.text and "grace.status" not in again.text
        assert _initialize(http, token).status_code == 429  # and a new session is no way round it
        limited = [a["detail"] for a in runtime.audit.recent(20) if a["action"] == "gateway.rate-limited"]
        assert any(d.startswith("tools/list") for d in limited) and any(d.startswith("initialize") for d in limited)


def test_a_flood_of_bad_tokens_is_throttled_per_address_and_audited_in_a_few_rows(runtime, kernel):
    from starlette.testclient import TestClient

    registry = kernel.clients.ClientRegistry(runtime.state_dir)
    good = registry.add("ci", ["grace.*"])
    app = kernel.gateway.build_app(runtime, registry)
    with TestClient(app, base_url="http://127.0.0.1:8000") as http:
        before = runtime.audit.head_id()
        codes = [http.post("/mcp", json={}, headers={"Authorization": f"Bearer wrong-{n}"}).status_code
                 for n in range(200)]
        assert codes[:20] == [401] * 20 and codes.count(429) >= 150  # a burst, then the address waits
        written = runtime.audit.head_id() - before
        assert written == 1, "one row for the flood's first minute; the rest are counted"
        assert _initialize(http, good).status_code == 200  # a valid token is never throttled with them
    conn = sqlite3.connect(runtime.state_dir / "ecosystem.db")
    rows = [{"action": a, "detail": d} for a, d in conn.execute(
        "SELECT action, detail FROM audit_log WHERE action = 'gateway.unauthorized' ORDER BY id")]
    conn.close()
    assert len(rows) == 2 and rows[1]["detail"] == "199 more refused requests from testclient"


def test_requests_the_mcp_layer_refuses_are_audited_too(runtime, kernel):
    from starlette.testclient import TestClient

    registry = kernel.clients.ClientRegistry(runtime.state_dir)
    token = registry.add("ci", ["grace.*"])
    app = kernel.gateway.build_app(runtime, registry)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    with TestClient(app, base_url="http://127.0.0.1:8000") as http:
        assert http.post("/mcp", headers=headers, content=b"{not json").status_code == 400
        assert http.post("/mcp", headers=headers, content=b'{"pad": "' + b"x" * (5 << 20) + b'"}').status_code == 413
        refused = [(a["actor"], a["detail"]) for a in runtime.audit.recent(20) if a["action"] == "gateway.bad-request"]
    assert ("client:ci", "HTTP 413 (body over the size limit) on POST /mcp") in refused
    assert ("client:ci", "HTTP 400 (malformed request) on POST /mcp") in refused


def test_a_client_that_discovers_the_gateway_finds_a_bearer_token_and_no_oauth(runtime, kernel):
    """RFC 9728: the 401 names the protected-resource metadata, which lists no authorization server."""
    from starlette.testclient import TestClient

    registry = kernel.clients.ClientRegistry(runtime.state_dir)
    app = kernel.gateway.build_app(runtime, registry)
    with TestClient(app, base_url="http://127.0.0.1:8000") as http:
        refused = http.post("/mcp", json={})
        assert refused.status_code == 401
        challenge = refused.headers["www-authenticate"]
        assert challenge.startswith("Bearer ") and 'realm="mcp"' in challenge
        url = challenge.split('resource_metadata="', 1)[1].split('"', 1)[0]
        assert url == "http://127.0.0.1:8000/.well-known/oauth-protected-resource/mcp"
        for path in (url.removeprefix("http://127.0.0.1:8000"), "/.well-known/oauth-protected-resource"):
            metadata = http.get(path)
            assert metadata.status_code == 200, path
            assert metadata.json() == {
                "resource": "http://127.0.0.1:8000/mcp", "resource_name": f"{runtime.config.name} MCP gateway",
                "bearer_methods_supported": ["header"], "authorization_servers": [],
                "resource_documentation": "http://127.0.0.1:8000/"}


def test_tools_carry_the_mcp_annotations_their_capability_implies(gateway, kernel):
    tools = {t.name: t for t in asyncio.run(gateway.server.list_tools())}
    history, post = tools["rogers.history"].annotations, tools["rogers.post"].annotations
    assert (history.read_only_hint, history.destructive_hint, history.idempotent_hint) == (True, False, True)
    assert (post.read_only_hint, post.idempotent_hint) == (False, False)
    assert tools["grace.status"].annotations is None  # not hinted: MCP's cautious defaults apply
    caps = importlib.import_module(kernel.clients.__name__.rsplit(".", 1)[0] + ".capabilities")
    assert caps.READ_ONLY <= set(caps.CAPABILITIES) and caps.IDEMPOTENT_WRITES <= set(caps.CAPABILITIES)
    assert caps.tool_hints("secrets.get") == {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True,
                                              "openWorldHint": False}
    assert caps.tool_hints("web.fetch")["openWorldHint"] is True
    assert caps.tool_hints("conversations.post")["readOnlyHint"] is False and caps.tool_hints("nope") == {}


def test_every_tool_has_an_output_schema_and_a_bound_tool_its_capabilitys_shape(gateway, kernel):
    """The SDK publishes no outputSchema, nor structuredContent, for a bare `dict` return annotation (it takes
    `dict` for a class without fields); the gateway gives every tool one (test_output_schemas.py checks them)."""
    tools = {t.name: t for t in asyncio.run(gateway.server.list_tools())}
    assert [name for name, t in tools.items() if not t.output_schema] == []
    caps = importlib.import_module(kernel.clients.__name__.rsplit(".", 1)[0] + ".capabilities")
    assert [name for name, c in caps.CAPABILITIES.items() if c.shape is None] == []
    assert tools["turing.get_secret"].output_schema == caps.SecretValue.model_json_schema()
    assert tools["rogers.search"].output_schema["properties"]["result"]["items"] == {"$ref": "#/$defs/Message"}
    assert tools["grace.chat"].output_schema["properties"]["result"]["type"] == "string"  # not bound: its annotation
    gateway.registry.add("ci", ["*"])
    created = gateway.call("ci", "rogers.create_conversation", title="shapes").structured_content
    assert created["title"] == "shapes" and set(created) == {"id", "title", "participants", "created_by", "created_at"}


def test_a_result_that_does_not_fit_its_output_schema_fails_the_call_and_the_log_says_why(gateway, kernel, monkeypatch):
    gateway.registry.add("ci", ["*"])

    async def wrong_shape(mad, tool, args, principal=""):
        return {"id": 7, "title": "s3cret-title"}  # id not a string; participants, created_by, created_at missing

    monkeypatch.setattr(gateway.runtime, "invoke_tool", wrong_shape)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(kernel.logs.JsonFormatter())
    logger = logging.getLogger("kernel.gateway")
    logger.addHandler(handler)
    try:
        text = gateway.refusal("ci", "rogers.create_conversation", title="shapes")
    finally:
        logger.removeHandler(handler)
    assert text.startswith("internal_error: rogers.create_conversation failed unexpectedly")
    assert gateway.rows()[-1]["outcome"] == "internal_error"  # the server's fault: not audited as the client's
    assert not [a for a in gateway.audited() if a[1] == "gateway.invalid-argument"]
    [line] = [json.loads(line) for line in stream.getvalue().splitlines()
              if json.loads(line)["msg"] == "tool result does not fit its outputSchema"]
    assert line["tool"] == "rogers.create_conversation" and line["correlation_id"] == gateway.rows()[-1]["correlation_id"]
    assert "id: Input should be a valid string" in line["problems"] and "created_by: Field required" in line["problems"]
    assert "s3cret" not in stream.getvalue()  # what the tool returned may be secret: never logged


def test_a_tool_that_crashes_on_its_own_validation_error_is_the_servers_fault_not_the_clients(gateway, monkeypatch):
    """A pydantic ValidationError raised inside a tool is a crash (internal_error, not audited against the
    client); only arguments that fail the input schema are the client's invalid_argument."""
    import pydantic

    gateway.registry.add("ci", ["*"])

    async def crashes(mad, tool, args, principal=""):
        pydantic.TypeAdapter(int).validate_python("not a number")

    monkeypatch.setattr(gateway.runtime, "invoke_tool", crashes)
    text = gateway.refusal("ci", "rogers.create_conversation", title="x")
    assert text.startswith("internal_error: rogers.create_conversation failed unexpectedly")
    assert gateway.rows()[-1]["outcome"] == "internal_error"
    assert not [a for a in gateway.audited() if a[1] == "gateway.invalid-argument"]
