"""The kernel implements every catalogue capability with exactly the catalogue's signature."""

from __future__ import annotations

import ast
import inspect

import pytest

from generator.kernel.capabilities import PACKS, available, with_required
from generator.kernel_contract import kernel_sources

CAPABILITY_PACKS = tuple(name for name, info in PACKS.items() if info.kind == "capabilities")


@pytest.mark.parametrize("packs", [(), *((name,) for name in CAPABILITY_PACKS), CAPABILITY_PACKS],
                         ids=lambda p: "+".join(p) or "core")
def test_every_capability_is_implemented_with_matching_signature(tmp_path, eco_modules, packs):
    """The core alone, the core with each pack a MAD owns, and with every pack (loaded by name, with the packs
    they require: nothing else is)."""
    config, kernel, runtime_mod = eco_modules
    owners = tuple(type(f"Owns_{p}", (kernel.Mad,), {"name": f"owns_{p}", "role": f"owns {p}", "owns": (p,)})
                   for p in packs)
    runtime = runtime_mod.Runtime(config.model_copy(update={"mads": (*config.mads, *owners)}), tmp_path / "state")
    try:
        assert set(runtime.packs) == with_required(packs)
        assert set(runtime._impls) == set(available(with_required(packs)))
        for name, cap in available(packs).items():
            impl = runtime.capability_impl(name)
            params = list(inspect.signature(impl).parameters.values())
            assert params[0].name == "caller", name
            rest = params[1:]
            assert [p.name for p in rest] == [p.name for p in cap.params], name
            for got, want in zip(rest, cap.params, strict=True):
                assert got.annotation == want.type, (name, got.name, got.annotation, want.type)
                if want.required:
                    assert got.default is inspect.Parameter.empty, (name, got.name)
                else:
                    assert got.default == want.default, (name, got.name, got.default, want.default)
            assert inspect.signature(impl).return_annotation == cap.returns, name
    finally:
        runtime.db.close()


def _pack_imports() -> dict[str, set[str]]:
    """Pack -> the import names its pinned dependencies provide (duckdb, docx, vl_convert, ...)."""
    from importlib.metadata import packages_distributions

    by_distribution: dict[str, set[str]] = {}
    for module, distributions in packages_distributions().items():
        for distribution in distributions:
            by_distribution.setdefault(distribution.lower().replace("_", "-"), set()).add(module)
    return {name: {module for dep in info.dependencies
                   for module in by_distribution.get(dep.split("==")[0].lower().replace("_", "-"), set())}
            for name, info in PACKS.items()}


def test_kernel_imports_nothing_outside_its_allowed_dependencies():
    """The core imports its runtime dependencies only; a pack's folder may add its own pinned dependencies."""
    core = {"mcp", "starlette", "uvicorn", "httpx", "httpx2", "cryptography", "pydantic", "prometheus_client"}
    import sys

    stdlib = set(sys.stdlib_module_names)
    extra = _pack_imports()
    for path in (path for rel, path in kernel_sources().items() if rel.endswith(".py")):  # not the packs' tests
        pack = path.parent.name if path.parent.parent.name == "packs" and path.parent.name in PACKS else ""
        allowed = core | extra.get(pack, set())
        tree = ast.parse(path.read_text())
        # redis is imported only where the Redis bus is configured, never when a module loads
        top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        top += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert not [m for m in top if m.split(".")[0] == "redis"], f"{path.name} imports redis at module level"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    continue
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in stdlib or root in allowed or root == "__future__", f"{path.name} imports {root}"


def test_mad_tools_introspection(eco_modules):
    config, _, _ = eco_modules
    turing = next(m for m in config.mads if m.name == "turing")
    tools = {t["name"]: t for t in turing.tools()}
    assert list(tools)[:2] == ["set_secret", "get_secret"]
    assert tools["set_secret"]["qualified_name"] == "turing.set_secret"
    assert tools["set_secret"]["params"] == [
        {"name": "name", "type": "str", "required": True},
        {"name": "value", "type": "str", "required": True},
    ]
    assert tools["audit"]["params"][0] == {"name": "limit", "type": "int", "required": False, "default": 50}
    assert tools["set_secret"]["description"] == "Store a secret, encrypted at rest."
    assert tools["audit"]["returns"] == "list[dict]"


def test_tools_introspection_without_future_annotations(eco_modules):
    _, kernel, _ = eco_modules

    class Plain(kernel.Mad):
        name = "plain"

    async def items(self, tags: list[str], limit: int = 5) -> list[dict]:
        """Items."""
        return []

    Plain.items = kernel.tool(items)
    (entry,) = Plain.tools()
    assert [p["type"] for p in entry["params"]] == ["list[str]", "int"] and entry["returns"] == "list[dict]"


def test_config_rejects_bad_names(eco_modules):
    _, kernel, _ = eco_modules
    with pytest.raises(ValueError):
        kernel.EcosystemConfig(name="Bad-Name")
    with pytest.raises(ValueError):
        kernel.ModelAlias(provider="nope")


def test_a_pack_missing_from_the_build_is_a_clear_error(eco_modules):
    import importlib

    _, kernel, _ = eco_modules
    packs = importlib.import_module(kernel.__name__ + ".packs")
    with pytest.raises(kernel.KernelError, match="the 'spreadsheets' capability pack is not in this build"):
        packs.load("spreadsheets")


def test_a_pack_capability_no_mad_owns_is_refused_and_audited_like_any_other(tmp_path, eco_modules):
    """Without the pack in the build, files.read is still a capability MADs are refused (not an unknown name)."""
    import asyncio

    config, kernel, runtime_mod = eco_modules

    async def main():
        runtime = runtime_mod.Runtime(config, tmp_path / "state")
        await runtime.start()
        try:
            assert runtime.packs == {}
            with pytest.raises(kernel.AccessDenied, match="may not use files.read"):
                await runtime.use("files.read", caller="rogers", path="notes.txt")
            # A name no build has: a MAD probing for it is refused and audited the same way.
            with pytest.raises(kernel.AccessDenied, match="may not use files.shred"):
                await runtime.use("files.shred", caller="rogers")
            return runtime.db.query("SELECT actor, action, subject, ok FROM audit_log "
                                    "WHERE subject IN ('files.read', 'files.shred') ORDER BY id")
        finally:
            await runtime.stop()

    assert asyncio.run(main()) == [{"actor": "rogers", "action": "kernel.use", "subject": s, "ok": 0}
                                   for s in ("files.read", "files.shred")]


def test_a_state_database_that_cannot_be_used_is_a_clear_refusal_with_the_database_closed(
        eco_modules, tmp_path, monkeypatch):
    """Another process holding the database past the busy timeout (a long upgrade) is said in words, not a
    traceback, and this process lets go of the database."""
    import importlib
    import sqlite3

    config, kernel, runtime_mod = eco_modules
    db_mod = importlib.import_module(kernel.__name__ + ".db")

    def locked(self, sql, part=""):
        raise sqlite3.OperationalError("database is locked")

    closed = []
    close = db_mod.Database.close
    monkeypatch.setattr(db_mod.Database, "script", locked)
    monkeypatch.setattr(db_mod.Database, "close", lambda self: (closed.append(self.path), close(self)))
    with pytest.raises(kernel.KernelError, match=r"cannot be opened for use \(database is locked\): another process"):
        runtime_mod.Runtime(config, tmp_path / "state")
    assert closed == [tmp_path / "state" / "ecosystem.db"]


def test_security_headers_reach_a_response_that_set_no_headers_of_its_own(eco_modules):
    import asyncio
    import importlib
    import types

    _, kernel, _ = eco_modules
    gateway = importlib.import_module(kernel.__name__ + ".gateway")

    async def bare(scope, receive, send):  # ASGI lets a response start leave `headers` out
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body", "body": b""})

    sent = []

    async def send(message):
        sent.append(message)

    counted = []
    runtime = types.SimpleNamespace(metrics=types.SimpleNamespace(http_request=lambda *a: counted.append(a)))
    scope = {"type": "http", "scheme": "http", "method": "GET", "path": "/"}
    asyncio.run(gateway.observed(bare, runtime)(scope, None, send))
    assert counted == [("/", 204)]
    assert {name for name, _ in sent[0]["headers"]} >= {b"content-security-policy", b"x-content-type-options"}


def test_the_drain_gate_counts_requests_in_flight_and_turns_new_ones_away_with_the_security_headers(eco_modules):
    import asyncio
    import importlib
    import time
    import types

    _, kernel, _ = eco_modules
    gateway = importlib.import_module(kernel.__name__ + ".gateway")
    runtime = types.SimpleNamespace(metrics=types.SimpleNamespace(http_request=lambda *a: None))
    gate = gateway.DrainGate()
    release = asyncio.Event()

    async def slow(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    app = gateway.observed(gate.middleware(slow), runtime)

    async def request(path: str) -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app({"type": "http", "scheme": "http", "method": "POST", "path": path, "headers": []}, receive, send)
        return sent

    async def scenario():
        in_flight = asyncio.create_task(request("/mcp"))
        await asyncio.sleep(0.05)
        assert gate.in_flight == 1
        gate.begin()
        refused = await request("/metrics")
        assert not await gate.wait_idle(time.monotonic() + 0.1)  # the deadline passes with one still in flight
        release.set()
        assert await gate.wait_idle(time.monotonic() + 5) and gate.in_flight == 0
        assert (await in_flight)[0]["status"] == 200
        return refused

    start = asyncio.run(scenario())[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert start["status"] == 503 and headers["retry-after"] == "5" and headers["x-content-type-options"] == "nosniff"
