"""Traces (kernel/tracing.py): spans for the gateway call, each bus hop and the MAD handler.

The tests read spans with the SDK's InMemorySpanExporter, in this process: the ecosystem's
HTTP server runs on a thread (uvicorn on 127.0.0.1), and a real MCP client calls it. The
ecosystem is the tiny one with Rogers' tools that ask Turing over the bus, ask it for a tool it
does not have, and crash. One test sends spans over OTLP/HTTP to a tiny collector of its own;
one carries a trace across the Redis bus; one checks tracing is off, and costs nothing to
import, by default.
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
import tomllib
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from bus_helpers import bus_eco, redis_url, shared_key  # noqa: F401  (fixtures)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from generator import harness

REPO = Path(__file__).resolve().parents[2]
VERSION = "4.5.6"
EXTRA_ROGERS_TOOLS = '''

    @tool
    async def ask_turing(self) -> list[dict]:
        """Ask Turing over the bus which secrets it keeps."""
        return await self.ask("turing", tool="list_secrets")

    @tool
    async def ask_turing_wrong(self) -> list[dict]:
        """Ask Turing for a tool it does not have."""
        return await self.ask("turing", tool="no_such_tool")

    @tool
    async def boom(self) -> dict:
        """A tool with a bug."""
        raise RuntimeError("bug in rogers.boom, with a-secret-in-its-message")
'''
OTEL_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED")


@pytest.fixture(scope="module")
def eco(tiny_ecosystem, tmp_path_factory):
    """The tiny ecosystem with Rogers' extra tools and a build.json (version VERSION), importable."""
    root, name = tiny_ecosystem
    new_root = tmp_path_factory.mktemp("traced")
    package = f"tracedeco_{uuid.uuid4().hex[:8]}"
    shutil.copytree(root / name, new_root / package, ignore=shutil.ignore_patterns("__pycache__"))
    rogers = new_root / package / "mads" / "rogers.py"
    rogers.write_text(rogers.read_text() + EXTRA_ROGERS_TOOLS)
    (new_root / package / "build.json").write_text(json.dumps({"ecosystem": package, "version": VERSION}))
    sys.path.insert(0, str(new_root))
    importlib.invalidate_caches()
    try:
        mods = {m: importlib.import_module(f"{package}.kernel.{m}")
                for m in ("tracing", "runtime", "gateway", "clients", "cli", "logs", "errors")}
        yield SimpleNamespace(root=new_root, package=package, config=importlib.import_module(f"{package}.ecosystem").CONFIG,
                              **mods)
    finally:
        sys.path.remove(str(new_root))


@pytest.fixture
def clean_env(monkeypatch):
    for var in OTEL_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # the OTLP exporter (requests) honours proxies


@pytest.fixture
def memory(eco, clean_env):
    """Tracing on, to an InMemorySpanExporter; off again after the test."""
    exporter = InMemorySpanExporter()
    assert eco.tracing.configure(eco.config.name, VERSION, span_exporter=exporter)
    yield exporter
    eco.tracing.shutdown()


def by_name(spans) -> dict:
    found = {}
    for span in spans:
        assert span.name not in found, f"two spans named {span.name!r}"
        found[span.name] = span
    return found


def parent_of(span) -> int | None:
    return span.parent.span_id if span.parent is not None else None


# ---- a gateway call over MCP ------------------------------------------------------------------


@pytest.fixture
def served(eco, tmp_path, monkeypatch):
    """The ecosystem's HTTP app on a thread (uvicorn on a free 127.0.0.1 port), in this process; yields
    (url, token of a client that may call everything, runtime)."""
    import uvicorn

    monkeypatch.delenv(f"{eco.config.env_prefix}_SECRETS_KEY", raising=False)
    runtime = eco.runtime.Runtime(eco.config, tmp_path / "state")
    registry = eco.clients.ClientRegistry(runtime.state_dir)
    token = registry.add("ci", ["*"])
    port = harness.free_port()
    server = uvicorn.Server(uvicorn.Config(eco.gateway.build_app(runtime, registry), host="127.0.0.1", port=port,
                                           log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", token, runtime
    finally:
        server.should_exit = True
        thread.join(30)


def call(url: str, token: str, tool: str):
    async def run():
        async with harness.mcp_client(url, token) as client:
            return await client.call_tool(tool, {})

    return asyncio.run(run())


def test_a_gateway_call_is_one_trace_gateway_handler_bus_hop_handler(eco, memory, served):
    url, token, runtime = served
    result = call(url, token, "rogers.ask_turing")
    assert not result.is_error
    cid = result.meta["regen/correlation_id"]
    spans = by_name(s for s in memory.get_finished_spans() if s.attributes.get("regen.correlation_id") == cid)
    assert set(spans) == {"tools/call rogers.ask_turing", "rogers.ask_turing", "bus send turing", "bus deliver turing",
                          "turing.list_secrets"}
    gateway, asking = spans["tools/call rogers.ask_turing"], spans["rogers.ask_turing"]
    send, deliver, handler = spans["bus send turing"], spans["bus deliver turing"], spans["turing.list_secrets"]
    # One trace, each span the child of the one before.
    assert {s.context.trace_id for s in spans.values()} == {gateway.context.trace_id}
    assert gateway.parent is None
    assert parent_of(asking) == gateway.context.span_id
    assert parent_of(send) == asking.context.span_id
    assert parent_of(deliver) == send.context.span_id
    assert parent_of(handler) == deliver.context.span_id
    assert [s.kind for s in (gateway, asking, send, deliver, handler)] == [
        SpanKind.SERVER, SpanKind.INTERNAL, SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.INTERNAL]
    # Who, what, and how it went, on every span.
    assert dict(gateway.attributes) == {"regen.correlation_id": cid, "regen.client": "ci", "regen.tool": "rogers.ask_turing",
                                        "regen.mad": "rogers", "mcp.method.name": "tools/call", "regen.outcome": "ok"}
    assert (asking.attributes["regen.mad"], asking.attributes["regen.tool"]) == ("rogers", "ask_turing")
    assert (send.attributes["regen.sender"], send.attributes["regen.mad"], send.attributes["regen.tool"]) == (
        "rogers", "turing", "list_secrets")
    assert (deliver.attributes["regen.sender"], deliver.attributes["regen.mad"]) == ("rogers", "turing")
    assert (handler.attributes["regen.mad"], handler.attributes["regen.tool"]) == ("turing", "list_secrets")
    for span in spans.values():
        assert span.attributes["regen.outcome"] == "ok" and span.status.status_code == StatusCode.UNSET, span.name
        assert span.attributes["regen.client"] == "ci", span.name  # the bus carries on behalf of the client
        assert span.resource.attributes["service.name"] == eco.config.name
        assert span.resource.attributes["service.version"] == VERSION
    # The trace context rode in the request's payload; the conversation's history does not keep it.
    rows = runtime.db.query("SELECT payload FROM messages WHERE kind = 'request' AND correlation_id = ?", (cid,))
    assert rows and all("traceparent" not in row["payload"] for row in rows)


def test_failed_calls_are_error_spans_wherever_they_failed(eco, memory, served):
    url, token, _ = served
    crashed = call(url, token, "rogers.boom")
    missing = call(url, token, "rogers.ask_turing_wrong")
    unknown = call(url, token, "rogers.no_such_tool")
    assert crashed.is_error and missing.is_error and unknown.is_error
    spans = memory.get_finished_spans()

    def of(text) -> dict:
        cid = re.search(r"correlation id ([0-9a-f]+)", text.content[0].text).group(1)
        return by_name(s for s in spans if s.attributes.get("regen.correlation_id") == cid)

    # A MAD's crash: its handler's span and the gateway's, named by type, never by its message.
    boom = of(crashed)
    assert set(boom) == {"tools/call rogers.boom", "rogers.boom"}
    for span in boom.values():
        assert span.status.status_code == StatusCode.ERROR and span.attributes["regen.outcome"] == "mad_error", span.name
    assert "a-secret-in-its-message" not in json.dumps([s.to_json() for s in boom.values()])
    event = boom["rogers.boom"].events[0]
    assert event.name == "exception" and event.attributes["exception.type"] == "MadFault"
    # A refusal across the bus: error on the delivery, the handlers that passed it on, and the gateway.
    wrong = of(missing)
    assert set(wrong) == {"tools/call rogers.ask_turing_wrong", "rogers.ask_turing_wrong", "bus send turing",
                          "bus deliver turing", "turing.no_such_tool"}
    assert wrong["bus send turing"].status.status_code == StatusCode.UNSET  # the bus took the request
    for name in ("bus deliver turing", "turing.no_such_tool", "rogers.ask_turing_wrong", "tools/call rogers.ask_turing_wrong"):
        span = wrong[name]
        assert span.status.status_code == StatusCode.ERROR and span.attributes["regen.outcome"] == "not_found", name
        assert "has no tool 'no_such_tool'" in span.status.description, name
    # Refused at the gateway: one span, no MAD reached.
    refused = of(unknown)
    assert list(refused) == ["tools/call"]
    assert refused["tools/call"].status.status_code == StatusCode.ERROR
    assert refused["tools/call"].attributes["regen.outcome"] == "unknown_tool"


# ---- the Redis bus ----------------------------------------------------------------------------


def test_the_trace_crosses_processes_on_the_redis_bus(bus_eco, redis_url, shared_key, tmp_path, clean_env):  # noqa: F811
    """A's gateway forwards a client's call to Turing, which B serves: B's delivery continues A's trace, its
    only link to it the trace context sealed in the Redis entry."""
    tracing = importlib.import_module(f"{bus_eco.name}.kernel.tracing")
    exporter = InMemorySpanExporter()
    tracing.configure(bus_eco.config.name, VERSION, span_exporter=exporter)
    everyone = [m.name for m in bus_eco.config.mads]

    async def scenario():
        a = bus_eco.Runtime(bus_eco.config, tmp_path / "a", bus_url=redis_url, serve_mads=[m for m in everyone if m != "turing"])
        b = bus_eco.Runtime(bus_eco.config, tmp_path / "b", bus_url=redis_url, serve_mads=["turing"])
        await a.start()
        await b.start()
        try:
            return await a.invoke_tool("turing", "list_secrets", {}, principal="client:ops")
        finally:
            await a.stop()
            await b.stop()

    try:
        assert asyncio.run(scenario()) == []
        spans = by_name(exporter.get_finished_spans())
    finally:
        tracing.shutdown()
    send, deliver, handler = spans["bus send turing"], spans["bus deliver turing"], spans["turing.list_secrets"]
    assert send.parent is None and send.attributes["regen.sender"] == "gateway"
    assert parent_of(deliver) == send.context.span_id and deliver.context.trace_id == send.context.trace_id
    assert parent_of(handler) == deliver.context.span_id
    assert {s.attributes["regen.client"] for s in (send, deliver, handler)} == {"ops"}


# ---- configuration: off by default, OTLP when configured --------------------------------------


def test_tracing_is_off_by_default_and_the_sdk_is_not_even_imported(eco, clean_env, tmp_path):
    assert eco.tracing.configure("x", "1", env={}) is False
    assert (eco.tracing.tracer, eco.tracing._pack) == (None, None)
    assert eco.tracing.start("anything", {"a": 1}) is eco.tracing.OFF
    # A process that serves requests with nothing configured loads no part of the SDK or of the exporter.
    script = (
        "import asyncio, sys\n"
        f"from {eco.package}.ecosystem import CONFIG\n"
        f"from {eco.package}.kernel import gateway, tracing\n"
        f"from {eco.package}.kernel.runtime import Runtime\n"
        "async def main():\n"
        f"    rt = Runtime(CONFIG, {str(tmp_path / 'state')!r})\n"
        "    await rt.start()\n"
        "    assert tracing.configure(CONFIG.name, rt.version) is False\n"
        "    await rt.request('rogers', 'turing', tool='list_secrets')\n"
        "    await rt.invoke_tool('rogers', 'ask_turing', {}, principal='client:ci')\n"
        "    await rt.stop()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and not k.endswith("_SECRETS_KEY")}
    env["PYTHONPATH"] = str(eco.root)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_endpoint_comes_from_the_flag_or_the_standard_variables(eco, clean_env):
    endpoint_from = importlib.import_module(f"{eco.package}.kernel.packs.tracing.pack").endpoint_from
    assert endpoint_from(None, {}) == ""
    assert endpoint_from("http://collector:4318", {}) == "http://collector:4318/v1/traces"
    assert endpoint_from("http://collector:4318/v1/traces/", {}) == "http://collector:4318/v1/traces"
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example:4318/"}
    assert endpoint_from(None, base) == "https://otel.example:4318/v1/traces"
    both = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces.example/custom"}
    assert endpoint_from(None, both) == "http://traces.example/custom"  # the signal's own URL, as it is
    assert endpoint_from("http://flag:4318", both) == "http://flag:4318/v1/traces"  # the flag wins
    assert eco.tracing.configure("x", "1", env={**both, "OTEL_SDK_DISABLED": "true"}) is False
    with pytest.raises(eco.errors.InvalidArgument, match="not an http:// or https:// URL"):
        eco.tracing.configure("x", "1", otlp_endpoint="collector:4318", env={})
    with pytest.raises(eco.errors.InvalidArgument, match="not an http:// or https:// URL"):  # a blank flag: the variable
        eco.tracing.configure("x", "1", otlp_endpoint=" ", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://collector"})
    with pytest.raises(eco.errors.InvalidArgument, match="not an http:// or https:// URL"):  # the flag wins
        eco.tracing.configure("x", "1", otlp_endpoint="http://[::1", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert eco.tracing.tracer is None


def test_serve_turns_tracing_on_only_with_an_otlp_endpoint(eco, clean_env, tmp_path, monkeypatch):
    """`serve` with neither flag nor variable leaves tracing off; --otlp-endpoint turns it on with the
    ecosystem's name and the build's version; tracing is shut down (flushed) when serve returns."""
    import uvicorn

    seen = []

    pack = importlib.import_module(f"{eco.package}.kernel.packs.tracing.pack")

    def fake_run(server, sockets=None):  # instead of serving: what tracing is at this point
        seen.append({"on": eco.tracing.tracer is not None, "endpoint": pack.endpoint,
                     "resource": dict(pack.provider.resource.attributes) if pack.provider else {}})
        server.config.app.state.runtime.db.close()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    monkeypatch.setattr(eco.logs, "configure", lambda level: None)  # keep pytest's logging as it is
    monkeypatch.delenv(f"{eco.config.env_prefix}_SECRETS_KEY", raising=False)
    port = harness.free_port()
    serve = ["serve", "--state", str(tmp_path / "state"), "--port", str(port)]
    eco.cli.main(eco.config, serve)
    eco.cli.main(eco.config, [*serve, "--otlp-endpoint", f"http://127.0.0.1:{port}"])
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    eco.cli.main(eco.config, serve)
    assert [(s["on"], s["endpoint"]) for s in seen] == [
        (False, ""), (True, f"http://127.0.0.1:{port}/v1/traces"), (True, "http://127.0.0.1:4318/v1/traces")]
    assert seen[1]["resource"]["service.name"] == eco.config.name
    assert seen[1]["resource"]["service.version"] == VERSION
    assert eco.tracing.tracer is None and pack.provider is None  # shut down on the way out


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps what it is sent."""

    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.received.append((self.path, self.headers.get("content-type"), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_spans_reach_the_otlp_endpoint_configured(eco, clean_env, tmp_path, monkeypatch):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    Collector.received = []
    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    monkeypatch.delenv(f"{eco.config.env_prefix}_SECRETS_KEY", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_address[1]}")
    try:
        async def scenario():
            rt = eco.runtime.Runtime(eco.config, tmp_path / "state")
            assert eco.tracing.configure(eco.config.name, rt.version)
            await rt.start()
            try:
                await rt.invoke_tool("rogers", "ask_turing", {}, principal="client:ci")
            finally:
                await rt.stop()

        asyncio.run(scenario())
        eco.tracing.shutdown()  # exports the batch
    finally:
        eco.tracing.shutdown()
        collector.shutdown()
        collector.server_close()
    assert [(path, kind) for path, kind, _ in Collector.received] == [("/v1/traces", "application/x-protobuf")]
    sent = ExportTraceServiceRequest.FromString(Collector.received[0][2])
    resource = {a.key: a.value.string_value for a in sent.resource_spans[0].resource.attributes}
    assert resource["service.name"] == eco.config.name and resource["service.version"] == VERSION
    names = {s.name for rs in sent.resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert names == {"rogers.ask_turing", "bus send turing", "bus deliver turing", "turing.list_secrets"}


# ---- the dependencies and the runbook ----------------------------------------------------------


def test_the_tracing_libraries_are_the_tracing_packs_pinned_in_spec_and_locked_for_regen():
    from generator.kernel.capabilities import PACKS
    from generator.kernel_contract import RUNTIME_DEPENDENCIES
    from generator.spec.load import load_spec

    pins = dict(r.split("==") for r in PACKS["tracing"].dependencies)
    wanted = ("opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http")
    assert set(wanted) == set(pins)
    assert not [r for r in RUNTIME_DEPENDENCIES if r.startswith("opentelemetry")]  # a spec without the pack: none
    spec = load_spec(REPO / "spec")
    assert "tracing" in spec.packs and set(PACKS["tracing"].dependencies) <= set(spec.ecosystem.dependencies)
    locked = {p["name"]: p["version"] for p in tomllib.loads((REPO / "uv.lock").read_text())["package"]}
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    for name in wanted:
        assert locked[name] == pins[name], name  # regen's tests run the versions the ecosystems pin
        assert any(re.match(rf"{name}\b", d) for d in dev), name


def test_the_runbook_says_how_to_turn_traces_on():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from generator.senior.offline import render_unit
    from generator.senior.synthesise import unit_spec
    from generator.spec.load import load_spec
    from generator.spec.plan import make_plan

    spec = load_spec(REPO / "spec")
    plan = make_plan(spec)
    files = {f["path"]: f["content"] for f in render_unit(unit_spec(spec, plan, plan.unit("frame")))}
    runbook = files["RUNBOOK.md"]
    assert "**Traces**" in runbook
    for words in ("--otlp-endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "regen.correlation_id", "bus deliver", "off by default"):
        assert words in runbook, words


def test_a_spec_naming_no_deployment_pack_gets_no_failover_script_and_a_runbook_saying_how(tmp_path):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import shutil

    import yaml

    from generator.senior.offline import render_unit
    from generator.senior.synthesise import unit_spec
    from generator.spec.load import load_spec
    from generator.spec.plan import make_plan

    shutil.copytree(REPO / "spec", tmp_path / "spec")
    doc = yaml.safe_load((tmp_path / "spec" / "ecosystem.yaml").read_text())
    del doc["packs"]["redis"], doc["packs"]["tracing"]
    (tmp_path / "spec" / "ecosystem.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = load_spec(tmp_path / "spec")
    assert not spec.packs & {"redis", "tracing"}
    plan = make_plan(spec)
    files = {f["path"]: f["content"] for f in render_unit(unit_spec(spec, plan, plan.unit("frame")))}
    assert "deploy/failover.sh" not in files and "deploy/run.sh" in files
    runbook = files["RUNBOOK.md"]
    assert "Failover: two replicas" not in runbook and "--otlp-endpoint http" not in runbook
    assert "add `redis: {}` under `packs:`" in runbook and "add `tracing: {}` under `packs:`" in runbook
