"""Shared by the bus tests: an ecosystem with a MAD whose effects are idempotent by envelope id,
and a real `redis-server` on a free 127.0.0.1 port.

`build_bus_ecosystem(root, name)` is the tiny kernel-test ecosystem (conftest.build_ecosystem)
plus two MADs: `clerk`, which talks to `ledger`, and `ledger`, whose `record(n, hold_s)` writes one
row per request (keyed by the request's envelope id, as bus.py asks MAD authors to) and then waits
`hold_s`, so a crash or a takeover can land between the effect and the ack. It also logs every
run in `ledger_runs` (not idempotent, on purpose), so a test can count how often a handler ran.
`ledger.echo(n)` answers n and writes nothing (load tests).

Fixtures (import them into a test module): `bus_eco` (the built, importable ecosystem),
`redis_url` (one redis-server for the session) and `shared_key` (one secrets key in the
environment, as every process on one bus needs).
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from pg_helpers import stop_server

from generator.harness import free_port


def _kernel_conftest():
    # By path: pytest imports every package-less conftest.py as "conftest", so the name is ambiguous.
    spec = importlib.util.spec_from_file_location("kernel_tests_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_KERNEL_CONFTEST = _kernel_conftest()
build_ecosystem, importable = _KERNEL_CONFTEST.build_ecosystem, _KERNEL_CONFTEST.importable
REDIS_SERVER = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else "")

LEDGER = '''from __future__ import annotations

import asyncio

from ..kernel import Mad, tool
from ..kernel.bus import current_delivery


class Ledger(Mad):
    name = "ledger"
    role = "Keeps a ledger of requests"
    conversations = ()
    talks_to = ()
    owns = ()
    storage = ({"name": "entries", "columns": [
        {"name": "envelope_id", "type": "text", "primary_key": True, "nullable": False},
        {"name": "n", "type": "integer", "primary_key": False, "nullable": True},
        {"name": "pid", "type": "integer", "primary_key": False, "nullable": True},
    ]}, {"name": "runs", "columns": [
        {"name": "id", "type": "integer", "primary_key": True, "nullable": False},
        {"name": "envelope_id", "type": "text", "primary_key": False, "nullable": True},
    ]})

    @tool
    async def record(self, n: int, hold_s: float = 0.0) -> dict:
        """Record n once per request: the envelope id is the key, so a second run finds the first write."""
        import os

        key = current_delivery.get() or f"direct:{n}"
        self.store.insert("runs", envelope_id=key)  # every run, on purpose: the tests count re-runs
        if not self.store.select("entries", envelope_id=key):
            self.store.insert("entries", envelope_id=key, n=n, pid=os.getpid())
        await asyncio.sleep(hold_s)
        return {"n": n, "envelope_id": key, "pid": os.getpid()}

    @tool
    async def stored(self) -> dict:
        """Every n recorded, oldest first: a test compares it with the calls its callers saw succeed."""
        return {"ns": [row["n"] for row in self.store.select("entries", limit=1_000_000)]}

    @tool
    async def echo(self, n: int) -> dict:
        """Answer n, writing nothing: load tests measure the bus, not the disk."""
        return {"n": n}

    @tool
    async def busy(self, n: int) -> dict:
        """Write a run, then answer "overloaded" itself (its own backpressure, after an effect)."""
        from ..kernel.supervisor import Overloaded

        self.store.insert("runs", envelope_id=current_delivery.get() or f"direct:{n}")
        raise Overloaded("the ledger's own queue is full")
'''

CLERK = '''from __future__ import annotations

from ..kernel import Mad


class Clerk(Mad):
    name = "clerk"
    role = "Sends work to the ledger"
    conversations = ()
    talks_to = ("ledger",)
    owns = ()
'''


def build_bus_ecosystem(root: Path, name: str) -> Path:
    pkg = build_ecosystem(root, name)
    (pkg / "mads" / "ledger.py").write_text(LEDGER)
    (pkg / "mads" / "clerk.py").write_text(CLERK)
    (pkg / "mads" / "__init__.py").write_text(
        "from .turing import Turing\nfrom .rogers import Rogers\nfrom .fiedler import Fiedler\n"
        "from .grace import Grace\nfrom .ledger import Ledger\nfrom .clerk import Clerk\n\n"
        "MADS = (Turing, Rogers, Fiedler, Grace, Ledger, Clerk)\n"
    )
    return pkg


@contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server of our own (its own temp dir, append-only file on) on a free port; yields its URL."""
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server); the Redis bus tests need it")
    with tempfile.TemporaryDirectory(prefix="regen-redis-") as tmp:
        port = free_port()
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                        conn.sendall(b"PING\r\n")
                        if conn.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start (exit {proc.poll()})")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_server(proc, 10)


@pytest.fixture(scope="session")
def bus_eco(tmp_path_factory):
    """The bus ecosystem built once, importable (its root on sys.path): root, name, config, Runtime, kernel."""
    root = tmp_path_factory.mktemp("buseco")
    name = f"buseco_{uuid.uuid4().hex[:8]}"
    build_bus_ecosystem(root, name)
    with importable(root):
        config = importlib.import_module(f"{name}.ecosystem").CONFIG
        yield SimpleNamespace(root=root, name=name, config=config, Runtime=importlib.import_module(f"{name}.kernel.runtime").Runtime,
                              kernel=importlib.import_module(f"{name}.kernel"))


@pytest.fixture(scope="session")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture
def shared_key(bus_eco, monkeypatch) -> str:
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv(f"{bus_eco.config.env_prefix}_SECRETS_KEY", key)
    return key
