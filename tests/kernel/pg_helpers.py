"""A real PostgreSQL server for the tests of the postgres pack: Debian's `postgresql` binaries, a cluster
made by `initdb` in a temporary folder, on a free 127.0.0.1 port, run as an unprivileged user (PostgreSQL
refuses to run as root: as root the cluster is made and run as the `postgres` user Debian's package adds).

Fixtures (import them into a test module): `pg_server` (one server for the session: its base URL and the
superuser's password) and `pg_url` (a new, empty database on it for each test).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from generator.harness import free_port


def _bin_dir() -> Path | None:
    """Where Debian puts the server's binaries (/usr/lib/postgresql/<major>/bin), newest major first."""
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    majors = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name), reverse=True)
    return majors[0].parent if majors else None


def stop_server(proc: subprocess.Popen, wait_s: float) -> None:
    """SIGTERM a test's server, and SIGKILL it if it has not stopped within `wait_s`."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    password: str

    def url(self, database: str = "postgres", user: str = "regen", password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{user}:{secret}@{self.host}:{self.port}/{database}"

    def admin(self, sql: str, database: str = "postgres") -> None:
        """Run one statement as the superuser (outside a transaction: CREATE DATABASE, pg_terminate_backend)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(sql)


@contextmanager
def postgres_server(*, fsync: bool = False) -> Iterator[PgServer]:
    """A PostgreSQL cluster of our own, with a superuser `regen` whose password is random (scram-sha-256 over
    TCP, so a wrong password is refused as it would be in production); yields it. Tests run it without fsync
    (nothing of theirs outlives the server); a benchmark asks for it, as production runs."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install -y postgresql); the postgres pack's tests need it")
    as_root = os.geteuid() == 0
    run_as = pwd.getpwnam("postgres") if as_root else None
    password = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="regen-pg-") as tmp:
        data, pwfile = Path(tmp) / "data", Path(tmp) / "pw"
        pwfile.write_text(password)
        if run_as:
            os.chown(tmp, run_as.pw_uid, run_as.pw_gid)
            os.chown(pwfile, run_as.pw_uid, run_as.pw_gid)

        def run(*cmd: str) -> list[str]:
            return ["runuser", "-u", "postgres", "--", *cmd] if run_as else list(cmd)

        subprocess.run(run(str(bin_dir / "initdb"), "-D", str(data), "-U", "regen", "--pwfile", str(pwfile),
                           "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
                           "--no-sync"), check=True, capture_output=True)
        port = free_port()
        proc = subprocess.Popen(run(str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                                    "-k", tmp, "-c", f"fsync={'on' if fsync else 'off'}", "-c", "max_connections=200",
                                    "-c", "shared_buffers=32MB"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = PgServer("127.0.0.1", port, password)
        try:
            deadline = time.monotonic() + 60
            while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"]).returncode:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres on port {port} did not start (exit {proc.poll()})")
                time.sleep(0.1)
            yield server
        finally:
            stop_server(proc, 20)  # SIGTERM: PostgreSQL's smart shutdown


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A new, empty database for this test; its URL (with the password)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_server.admin(f"CREATE DATABASE {name}")
    return pg_server.url(name)
