"""Observability: /metrics per MAD, and JSON logs whose correlation id follows a call across MADs.

The end-to-end tests run a copy of the tiny ecosystem whose Rogers has two more tools: one that
asks Turing over the bus, and one with a bug. A real MCP client drives it; the assertions read
what an operator reads: the `/metrics` text and the JSON log lines on stderr.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import sys
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from generator import harness

SECRET = "metrics-must-never-show-this-9d1f"
PROMPT = "count these five words"
POSTED = "a message whose words stay out of metrics"
MADE_UP = f"tool_{uuid.uuid4().hex}"

EXTRA_ROGERS_TOOLS = '''

    @tool
    async def ask_turing(self) -> list[dict]:
        """Ask Turing over the bus which secrets it keeps."""
        return await self.ask("turing", tool="list_secrets")

    @tool
    async def boom(self) -> dict:
        """A tool with a bug."""
        raise RuntimeError("bug in rogers.boom")
'''


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value of every sample in a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def relay_eco(tiny_ecosystem, tmp_path_factory):
    """(root, package): a copy of the tiny ecosystem with Rogers' extra tools, importable."""
    root, name = tiny_ecosystem
    new_root = tmp_path_factory.mktemp("relay")
    package = f"relayeco_{uuid.uuid4().hex[:8]}"
    shutil.copytree(root / name, new_root / package, ignore=shutil.ignore_patterns("__pycache__"))
    rogers = new_root / package / "mads" / "rogers.py"
    rogers.write_text(rogers.read_text() + EXTRA_ROGERS_TOOLS)
    sys.path.insert(0, str(new_root))
    importlib.invalidate_caches()
    try:
        yield new_root, package
    finally:
        sys.path.remove(str(new_root))


@pytest.fixture(scope="module")
def served(relay_eco, tmp_path_factory):
    """Run the ecosystem, make a few calls over MCP, and return (metrics text, log lines, token)."""
    root, package = relay_eco
    with harness.running_ecosystem(package, tmp_path_factory.mktemp("state"), cwd=root) as eco:

        async def calls():
            async with eco.client() as client:
                async def call(tool, **args):
                    return harness.result_value(await client.call_tool(tool, args))

                await call("turing.set_secret", name="db_password", value=SECRET)
                assert (await call("turing.get_secret", name="db_password"))["value"] == SECRET
                assert [s["name"] for s in await call("rogers.ask_turing")] == ["db_password"]
                general = next(c for c in await call("rogers.list_conversations") if c["title"] == "general")
                await call("rogers.post", conversation_id=general["id"], content=POSTED)
                await call("fiedler.send", model="default", prompt=PROMPT, max_tokens=50)
                with pytest.raises(harness.ToolCallError):
                    await call("rogers.boom")
                with pytest.raises(harness.ToolCallError, match="unknown_tool"):
                    await call(f"rogers.{MADE_UP}")

        asyncio.run(calls())
        # A wrong token at the web UI's sign-in, and one at the MCP door (the query string stays out of logs).
        page = httpx.get(f"{eco.url}/signin")
        csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        refused = httpx.post(f"{eco.url}/signin", data={"csrf": csrf, "token": "not-a-token", "next": "/"},
                             cookies=page.cookies, headers={"origin": eco.url})
        assert refused.status_code == 401
        assert httpx.post(f"{eco.url}/mcp?probe=query-must-not-be-logged", json={}).status_code == 401
        response = httpx.get(f"{eco.url}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        lines = [json.loads(line) for line in eco.logs().splitlines() if line.startswith("{")]
        return response.text, lines, eco.token


def test_metrics_count_each_mads_tool_calls_bus_messages_and_tokens(served):
    found = samples(served[0])
    assert value(found, "regen_tool_calls_total", mad="turing", tool="set_secret", outcome="ok") == 1
    assert value(found, "regen_tool_calls_total", mad="turing", tool="get_secret", outcome="ok") == 1
    assert value(found, "regen_tool_calls_total", mad="rogers", tool="ask_turing", outcome="ok") == 1
    assert value(found, "regen_tool_call_duration_seconds_count", mad="rogers", tool="ask_turing") == 1
    # The bus request is Rogers' envelope; the answer is Turing's.
    assert value(found, "regen_bus_messages_total", mad="rogers", kind="request") == 1
    assert value(found, "regen_bus_messages_total", mad="turing", kind="reply") == 1
    assert value(found, "regen_bus_messages_total", mad="rogers", kind="message") == 1
    # The echo model counts words: the prompt's four, and its three-word label plus the four in its answer.
    assert value(found, "regen_llm_tokens_total", mad="fiedler", kind="prompt") == len(PROMPT.split())
    assert value(found, "regen_llm_tokens_total", mad="fiedler", kind="completion") == len(PROMPT.split()) + 3
    assert value(found, "regen_llm_tokens_total", mad="turing", kind="prompt") == 0
    assert all(value(found, "regen_mad_up", mad=m) == 1 for m in ("turing", "rogers", "fiedler"))


def test_errors_and_refusals_are_counted_against_the_mad_where_they_happened(served):
    found = samples(served[0])
    assert value(found, "regen_tool_calls_total", mad="rogers", tool="boom", outcome="crashed") == 1
    assert value(found, "regen_errors_total", mad="rogers", where="tool") == 1
    assert value(found, "regen_errors_total", mad="turing", where="tool") == 0
    # Refused at the gateway, before any MAD ran: counted, under "other" since nobody declared that tool.
    assert value(found, "regen_tool_calls_total", mad="rogers", tool="other", outcome="unknown_tool") == 1
    assert MADE_UP not in served[0]


def test_metrics_never_carry_a_secret_a_token_or_content(served):
    text, _, token = served
    assert SECRET not in text
    assert token not in text
    assert "count these" not in text and "stay out" not in text


def test_one_correlation_id_follows_a_tool_call_across_the_bus_into_the_other_mad(served):
    _, lines, _ = served
    call = next(line for line in lines if line.get("tool") == "rogers.ask_turing" and line["msg"] == "tool call")
    cid = call["correlation_id"]
    chain = [line for line in lines if line.get("correlation_id") == cid]
    assert {line.get("mad") for line in chain} >= {"rogers", "turing"}, chain
    # The kernel itself logs the delivery in Turing, whatever Turing's own code logs.
    assert any(line["msg"] == "bus delivery" and line.get("mad") == "turing" and line["sender"] == "rogers" for line in chain)
    assert all(line.get("principal") == "client:default" for line in chain), chain
    logged = json.dumps(lines)
    assert SECRET not in logged and "stay out" not in logged, "the kernel logs names and outcomes, never values or content"
    # Another call has another id.
    other = next(line for line in lines if line.get("tool") == "turing.set_secret")
    assert other["correlation_id"] != cid


def test_each_runtime_counts_on_its_own_registry(eco_modules, tmp_path):
    config, _, runtime_mod = eco_modules

    async def run():
        first = runtime_mod.Runtime(config, tmp_path / "a")
        second = runtime_mod.Runtime(config, tmp_path / "b")
        await first.start()
        await second.start()
        try:
            await first.invoke_tool("grace", "mads", {})
            return samples(first.metrics.render().decode()), samples(second.metrics.render().decode())
        finally:
            await first.stop()
            await second.stop()

    one, two = asyncio.run(run())
    assert value(one, "regen_tool_calls_total", mad="grace", tool="mads", outcome="ok") == 1
    assert value(two, "regen_tool_calls_total", mad="grace", tool="mads", outcome="ok") == 0


def test_a_mad_whose_breaker_opened_is_down_in_metrics(relay_eco, tmp_path):
    _, package = relay_eco
    config = importlib.import_module(f"{package}.ecosystem").CONFIG
    kernel = importlib.import_module(f"{package}.kernel")
    runtime_mod = importlib.import_module(f"{package}.kernel.runtime")
    policy = importlib.import_module(f"{package}.kernel.supervisor").SupervisionPolicy(failure_threshold=1, restart_backoff_s=60)

    async def run():
        rt = runtime_mod.Runtime(config, tmp_path / "state", supervision=policy)
        await rt.start()
        try:
            with pytest.raises(kernel.KernelError):
                await rt.invoke_tool("rogers", "boom", {})
            return samples(rt.metrics.render().decode())
        finally:
            await rt.stop()

    found = asyncio.run(run())
    assert value(found, "regen_mad_up", mad="rogers") == 0
    assert value(found, "regen_mad_up", mad="turing") == 1


def test_names_a_caller_makes_up_never_become_label_values(runtime, eco_modules):
    _, kernel, _ = eco_modules
    made_up = f"tool_{uuid.uuid4().hex}"

    async def run():
        for mad, tool in (("rogers", made_up), (f"mad_{made_up}", "history")):
            with pytest.raises(kernel.KernelError):
                await runtime.invoke_tool(mad, tool, {})

    asyncio.run(run())
    text = runtime.metrics.render().decode()
    assert made_up not in text
    found = samples(text)
    assert value(found, "regen_tool_calls_total", mad="rogers", tool="other", outcome="refused") == 1
    assert value(found, "regen_tool_calls_total", mad="other", tool="other", outcome="refused") == 1


class _NoClients:
    """The client registry seam with nobody in it: /metrics must not depend on MCP clients."""

    def verify(self, token: str) -> str | None:
        return None

    def allowed(self, name: str, tool: str) -> bool:
        return False

    def secret_scope(self, principal: str) -> tuple[str, ...] | None:
        return ()


@pytest.fixture
def gateway(tiny_ecosystem):
    return importlib.import_module(f"{tiny_ecosystem[1]}.kernel.gateway")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_metrics_on_a_routable_address_need_the_metrics_token(runtime, gateway, monkeypatch, host):
    from starlette.testclient import TestClient

    env = f"{runtime.config.env_prefix}_METRICS_TOKEN"
    monkeypatch.delenv(env, raising=False)
    closed = TestClient(gateway.build_app(runtime, _NoClients(), host=host), base_url=f"http://{host}:8000")
    refused = closed.get("/metrics")
    assert refused.status_code == 401 and env in refused.json()["message"]

    monkeypatch.setenv(env, "scrape-token-1")
    guarded = TestClient(gateway.build_app(runtime, _NoClients(), host=host), base_url=f"http://{host}:8000")
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = guarded.get("/metrics", headers={"Authorization": "Bearer scrape-token-1"})
    assert ok.status_code == 200 and "regen_mad_up" in ok.text


def test_metrics_on_loopback_are_open_like_healthz(runtime, gateway, monkeypatch):
    from starlette.testclient import TestClient

    monkeypatch.delenv(f"{runtime.config.env_prefix}_METRICS_TOKEN", raising=False)
    client = TestClient(gateway.build_app(runtime, _NoClients(), host="127.0.0.1"), base_url="http://127.0.0.1:8000")
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert value(samples(answer.text), "regen_mad_up", mad="turing") == 1


def test_http_requests_sessions_sign_ins_and_the_process_are_in_metrics(served):
    found = samples(served[0])
    assert value(found, "regen_http_requests_total", route="mcp", status="200") >= 8
    assert value(found, "regen_http_requests_total", route="mcp", status="401") == 1
    assert value(found, "regen_http_requests_total", route="grace", status="401") == 1
    assert value(found, "regen_http_requests_total", route="grace", status="200") >= 1
    assert value(found, "regen_signin_failures_total", reason="invalid_token") == 1
    assert ("regen_mcp_sessions_open", frozenset()) in found  # the client above has closed its session
    assert value(found, "regen_mcp_sessions_open") == 0
    assert value(found, "process_resident_memory_bytes") > 0 and value(found, "process_open_fds") > 0
    assert any(name == "python_info" for name, _ in found)


def test_every_http_request_has_an_access_log_line(served):
    _, lines, token = served
    access = [line for line in lines if line.get("logger") == "kernel.access"]
    assert {(a["method"], a["path"], a["status"]) for a in access} >= {
        ("POST", "/signin", 401), ("GET", "/signin", 200), ("POST", "/mcp", 401), ("POST", "/mcp", 200)}
    assert all(isinstance(a["ms"], float) and a["remote"].startswith("127.0.0.1:") for a in access)
    assert {a.get("client") for a in access if a["path"] == "/mcp"} == {None, "default"}  # named once identified
    text = "\n".join(json.dumps(a) for a in access)
    assert "query-must-not-be-logged" not in text and token not in text and "not-a-token" not in text


def test_the_build_says_what_it_is_in_metrics_and_health(runtime, eco_modules, tmp_path):
    _, _, runtime_mod = eco_modules
    stamp = tmp_path / "build.json"
    stamp.write_text(json.dumps({"ecosystem": "notes", "version": "2.3.4", "inputs_hash": "ab" * 32, "other": 1}))
    assert runtime_mod.read_build_info(stamp) == {"ecosystem": "notes", "version": "2.3.4", "inputs_hash": "ab" * 32}
    assert runtime_mod.read_build_info(tmp_path / "missing.json") == {}
    stamp.write_text("not json")
    assert runtime_mod.read_build_info(stamp) == {}
    # The tiny test ecosystem was not stamped by the compiler: it says so rather than show nothing.
    assert runtime.version == "unreleased"
    found = samples(runtime.metrics.render().decode())
    assert value(found, "regen_build_info", ecosystem=runtime.config.name, version="unreleased", inputs_hash="") == 1
    assert asyncio.run(runtime.ecosystem_status("grace"))["version"] == "unreleased"
