"""Start-up time of the generated ecosystem to healthy, and its memory at rest.

What runs: the newest archived madgroup (`ecosystems/madgroup/<newest>/src`) with today's kernel
copied in, as tests/test_upgrade.py builds it, served by `python -m madgroup serve` from this
repo's venv with the sources on PYTHONPATH. Not `uv sync --locked` of the archive: its lock
predates the kernel's newer dependencies (prometheus-client, redis), and a sync would time the
package manager and the network. The repo venv pins the versions the ecosystem declares
(spec/ecosystem.yaml), so this times the kernel and the MADs.

- start-up: wall time from exec to the first 200 from /healthz, on a fresh state directory
  (first start: database, key, migrations) and again on the state it left (a restart).
- memory at rest: VmRSS of the server process (from /proc/<pid>/status) once it is up and has
  served a few MCP calls (a secret set and read, a conversation, a post, a model call), and its
  peak (VmHWM).

Prints a table and writes benchmarks/results/startup_memory.json.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from ecosystem import ECOSYSTEM, PACKAGE, build
from results import percentiles, print_table, write_results

from generator.artifact.store import versions
from generator.harness import free_port, mcp_client, result_value

REPO = Path(__file__).resolve().parents[1]
RUNS = 7
MEMORY_RUNS = 3
TIMEOUT_S = 60.0


class Server:
    """`python -m madgroup serve` on a free loopback port; `start()` returns seconds to healthy."""

    def __init__(self, src: Path, state: Path, log: Path):
        self.src, self.state, self.log = src, state, log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        env = dict(os.environ, PYTHONPATH=str(self.src))
        cmd = [sys.executable, "-m", PACKAGE, "serve", "--port", str(self.port), "--state", str(self.state)]
        with self.log.open("ab") as log, httpx.Client(timeout=1.0) as http:
            started = time.perf_counter()
            self.proc = subprocess.Popen(cmd, cwd=self.src, env=env, stdout=log, stderr=subprocess.STDOUT)
            while time.perf_counter() - started < TIMEOUT_S:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                try:
                    if http.get(self.url + "/healthz").status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                time.sleep(0.005)
        self.stop()
        raise TimeoutError(f"not healthy within {TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM of the server process, in KiB."""
        assert self.proc is not None
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(rest.split()[0])
        return fields

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.proc = None


def token(src: Path, state: Path) -> str:
    """The client token, made the way deploy/run.sh makes it."""
    env = dict(os.environ, PYTHONPATH=str(src))
    path = subprocess.run([sys.executable, "-m", PACKAGE, "token", "--state", str(state)], cwd=src, env=env,
                          check=True, capture_output=True, text=True).stdout.strip()
    return Path(path).read_text().strip()


async def a_few_calls(url: str, secret_token: str) -> None:
    async with mcp_client(url, secret_token) as client:
        async def call(tool: str, **args):
            return result_value(await client.call_tool(tool, args))

        await call("turing.set_secret", name="bench", value="at-rest")
        await call("turing.get_secret", name="bench")
        conversation = await call("rogers.create_conversation", title="bench")
        await call("rogers.post", conversation_id=conversation["id"], content="hello")
        await call("fiedler.send", model="default", prompt="how much memory at rest", max_tokens=16)


def python_startup_s() -> float:
    samples = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        work = Path(tmp)
        src = build(work)
        log = work / "server.log"
        first, restart = [], []
        for run in range(RUNS):
            state = work / f"state-{run}"
            for samples in (first, restart):  # a fresh state, then a restart on the state it left
                server = Server(src, state, log)
                try:
                    samples.append(server.start())
                finally:
                    server.stop()
        rss, hwm = [], []
        for run in range(MEMORY_RUNS):
            state = work / f"memory-{run}"
            secret_token = token(src, state)
            server = Server(src, state, log)
            try:
                server.start()
                asyncio.run(a_few_calls(server.url, secret_token))
                time.sleep(1.0)  # at rest: let the calls' garbage settle
                memory = server.memory_kib()
            finally:
                server.stop()
            rss.append(memory["VmRSS"] / 1024)
            hwm.append(memory["VmHWM"] / 1024)
    bare = python_startup_s()
    results = {
        "ecosystem": f"madgroup {versions(ECOSYSTEM)[-1]} with this kernel",
        "startup_first_s": percentiles(first, 4),
        "startup_restart_s": percentiles(restart, 4),
        "python_startup_s": round(bare, 4),
        "rss_at_rest_mib": percentiles(rss, 1),
        "peak_rss_mib": percentiles(hwm, 1),
    }
    print_table(
        ["start-up to /healthz 200", "p50 s", "min s", "max s", "runs"],
        [[label, results[key]["p50"], results[key]["min"], results[key]["max"], results[key]["n"]]
         for label, key in (("first start (fresh state)", "startup_first_s"), ("restart (existing state)", "startup_restart_s"))],
    )
    print(f"(python -c pass alone: {bare:.3f} s)\n")
    print_table(
        ["memory of the server process", "p50 MiB", "min MiB", "max MiB", "runs"],
        [[label, results[key]["p50"], results[key]["min"], results[key]["max"], results[key]["n"]]
         for label, key in (("at rest after 5 calls (VmRSS)", "rss_at_rest_mib"), ("peak (VmHWM)", "peak_rss_mib"))],
    )
    print(f"\nwrote {write_results('startup_memory', results).relative_to(REPO)}")


if __name__ == "__main__":
    main()
