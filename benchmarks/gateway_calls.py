"""MCP tool calls per second through the gateway, with one client and with 16 at once, and their latency.

What runs: the newest archived madgroup with today's kernel copied in (as startup_memory.py
builds it), served by `python -m madgroup serve` on 127.0.0.1 at the default log level, so
every call pays for what production pays: bearer check, client admission, strict argument
validation, the MAD's tool, a JSON log line and a `gateway_calls` row (SQLite, synchronous=FULL).
The tool is `grace.status` (cheap: it reads the MADs' states), so the numbers are the gateway's.

Cases, each an MCP session per client (real `mcp` client over streamable HTTP, in this process):
- one client: calls one after another;
- one client with a rate limit and a daily quota set high enough never to refuse: the cost of the checks;
- 16 clients, each its own registered client and session, calling concurrently.
Reported: calls per second (completed calls / wall time) and per-call latency p50/p99.

Then the same ecosystem with its state in PostgreSQL (the postgres pack: `MADGROUP_DB_URL`, a cluster of our own
made by initdb, fsync on), one client and 16: every call's `gateway_calls` row goes to the server instead of the
SQLite file, and each client's token is looked up in the shared `tokens.json` document (one indexed read per call).
The target, side by side in this run: PostgreSQL state costs at most 2x SQLite's p50 for one client, and serves at
least half its calls per second with 16.
Prints a table and writes benchmarks/results/gateway_calls.json.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

from ecosystem import ECOSYSTEM, PACKAGE, build
from results import percentiles, print_table, write_results

from generator.artifact.store import versions
from generator.harness import mcp_client, running_ecosystem
from generator.kernel.clients import ClientRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernel"))
from pg_helpers import postgres_server  # noqa: E402  (the tests' real PostgreSQL, on a free 127.0.0.1 port)

TOOL = "grace.status"
WARMUP = 20
SEQUENTIAL_CALLS = 600
CONCURRENT_CLIENTS = 16
CALLS_PER_CONCURRENT_CLIENT = 100


async def one_client(url: str, token: str, calls: int) -> tuple[list[float], float]:
    """`calls` sequential calls in one session, after a warm-up: (latencies, wall seconds)."""
    async with mcp_client(url, token) as client:
        for _ in range(WARMUP):
            await client.call_tool(TOOL, {})
        latencies = []
        began = time.perf_counter()
        for _ in range(calls):
            started = time.perf_counter()
            result = await client.call_tool(TOOL, {})
            latencies.append(time.perf_counter() - started)
            if result.is_error:
                raise RuntimeError(f"{TOOL} failed: {result.content[0].text}")
        return latencies, time.perf_counter() - began


async def many_clients(url: str, tokens: list[str], calls: int) -> tuple[list[float], float]:
    """All sessions open and warmed up first; then every client calls at once. (latencies, wall seconds)."""
    start = asyncio.Event()

    async def run(token: str) -> list[float]:
        async with mcp_client(url, token) as client:
            for _ in range(WARMUP):
                await client.call_tool(TOOL, {})
            ready.release()
            await start.wait()
            latencies = []
            for _ in range(calls):
                began = time.perf_counter()
                result = await client.call_tool(TOOL, {})
                latencies.append(time.perf_counter() - began)
                if result.is_error:
                    raise RuntimeError(f"{TOOL} failed: {result.content[0].text}")
            return latencies

    ready = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(run(t)) for t in tokens]
    for _ in tokens:
        await ready.acquire()
    began = time.perf_counter()
    start.set()
    per_client = await asyncio.gather(*tasks)
    return [x for xs in per_client for x in xs], time.perf_counter() - began


def summary(latencies: list[float], wall_s: float) -> dict[str, object]:
    return {"calls": len(latencies), "calls_per_s": round(len(latencies) / wall_s, 1),
            "latency_ms": percentiles([x * 1000 for x in latencies], 3)}


def on_postgres(work: Path, src: Path) -> dict[str, object]:
    """One client and 16, as above, with the state in PostgreSQL."""
    from generator.kernel.packs.postgres.pack import PostgresDatabase

    with postgres_server(fsync=True) as server:
        server.admin("CREATE DATABASE bench")
        url, state = server.url("bench"), work / "pg-state"
        env = {"MADGROUP_DB_URL": url, "MADGROUP_SECRETS_KEY": base64.b64encode(os.urandom(32)).decode()}
        with running_ecosystem(PACKAGE, state, cwd=src, env=env, startup_timeout=60) as eco:
            shared = PostgresDatabase(url, state)
            registry = ClientRegistry(state, shared.document("tokens.json"))
            crowd = [registry.add(f"client{n:02d}", ["grace.*"]) for n in range(CONCURRENT_CLIENTS)]
            shared.close()
            one = summary(*asyncio.run(one_client(eco.url, eco.token, SEQUENTIAL_CALLS)))
            many = summary(*asyncio.run(many_clients(eco.url, crowd, CALLS_PER_CONCURRENT_CLIENT)))
    return {"postgres_one_client": one, "postgres_clients_16": many}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        work = Path(tmp)
        src = build(work)
        state = work / "state"
        registry = ClientRegistry(state)
        limited = registry.add("limited", ["grace.*"], rate="100000/s", quota="10000000/day")
        crowd = [registry.add(f"client{n:02d}", ["grace.*"]) for n in range(CONCURRENT_CLIENTS)]
        with running_ecosystem(PACKAGE, state, cwd=src, startup_timeout=60) as eco:
            results: dict[str, object] = {}
            for key, token in (("one_client", eco.token), ("one_client_rate_and_quota", limited)):
                results[key] = summary(*asyncio.run(one_client(eco.url, token, SEQUENTIAL_CALLS)))
            latencies, wall = asyncio.run(many_clients(eco.url, crowd, CALLS_PER_CONCURRENT_CLIENT))
            results["clients_16"] = summary(latencies, wall)
        results.update(on_postgres(work, src))
    results["tool"] = TOOL
    results["ecosystem"] = f"madgroup {versions(ECOSYSTEM)[-1]} with this kernel"
    rows = []
    for label, key in (("1 client", "one_client"), ("1 client, rate limit + quota", "one_client_rate_and_quota"),
                       (f"{CONCURRENT_CLIENTS} clients at once", "clients_16"),
                       ("1 client, state in PostgreSQL", "postgres_one_client"),
                       (f"{CONCURRENT_CLIENTS} clients at once, state in PostgreSQL", "postgres_clients_16")):
        r = results[key]
        rows.append([label, r["calls_per_s"], r["latency_ms"]["p50"], r["latency_ms"]["p99"], r["calls"]])
    print_table([f"MCP calls of {TOOL} through the gateway", "calls/s", "p50 ms", "p99 ms", "calls"], rows)
    p50_ratio = results["postgres_one_client"]["latency_ms"]["p50"] / results["one_client"]["latency_ms"]["p50"]
    rate_ratio = results["postgres_clients_16"]["calls_per_s"] / results["clients_16"]["calls_per_s"]
    results["postgres_vs_sqlite"] = {"p50_one_client": round(p50_ratio, 3), "calls_per_s_16": round(rate_ratio, 3),
                                     "target": "p50 <= 2x, calls/s >= 0.5x",
                                     "met": p50_ratio <= 2.0 and rate_ratio >= 0.5}
    print(f"\nPostgreSQL state vs SQLite: p50 {p50_ratio:.2f}x (one client), calls/s {rate_ratio:.2f}x (16 clients): "
          f"{'met' if results['postgres_vs_sqlite']['met'] else 'NOT met'} (target p50 <= 2x, calls/s >= 0.5x)")
    print(f"\nwrote {write_results('gateway_calls', results).relative_to(REPO)}")


if __name__ == "__main__":
    main()
