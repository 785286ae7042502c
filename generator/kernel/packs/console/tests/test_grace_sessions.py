"""Grace's sessions in the state database: served replicas on one PostgreSQL honour one another's sessions (no
sticky sessions), a restart on SQLite keeps them, and the database holds nothing a sign-in could be made from.

Real servers (`serve` processes through the harness, a real PostgreSQL), a browser's requests over HTTP.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sqlite3
import subprocess
import sys
import threading
import uuid

import httpx
import psycopg
import pytest
from bus_helpers import bus_eco, redis_url, shared_key  # noqa: F401  (fixtures)
from pg_helpers import pg_server, pg_url  # noqa: F401  (fixtures)

from generator.harness import running_ecosystem

COOKIE = "grace_session"


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


class Browser:
    """One person's browser, whose requests a load balancer sends to whichever replica it likes: one cookie."""

    def __init__(self) -> None:
        self.sid = ""

    def get(self, replica, path: str) -> httpx.Response:
        response = httpx.get(replica.url + path, headers=self._cookie(), follow_redirects=False, timeout=30)
        self._keep(response)
        return response

    def post(self, replica, path: str, form: dict[str, str]) -> httpx.Response:
        headers = {**self._cookie(), "origin": replica.url}
        response = httpx.post(replica.url + path, data=form, headers=headers, follow_redirects=False, timeout=60)
        self._keep(response)
        return response

    def sign_in(self, replica, token: str) -> None:
        form = self.get(replica, "/signin")
        response = self.post(replica, "/signin", {"csrf": _csrf(form.text), "token": token, "next": "/"})
        assert response.status_code == 303 and response.headers["location"] == "/", response.text

    def signed_in_as(self, replica) -> str:
        """The client the replica says this browser is signed in as ("" when it sends it to sign in)."""
        page = self.get(replica, "/")
        if page.status_code == 303:
            assert page.headers["location"].startswith("/signin"), page.headers["location"]
            return ""
        match = re.search(r"Signed in as <strong>([^<]+)</strong>", page.text)
        assert page.status_code == 200 and match, page.text
        return match.group(1)

    def _cookie(self) -> dict[str, str]:
        return {"cookie": f"{COOKIE}={self.sid}"} if self.sid else {}

    def _keep(self, response: httpx.Response) -> None:
        if COOKIE in response.cookies:
            self.sid = response.cookies[COOKIE]


def _row_key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


@pytest.fixture
def replicas(bus_eco, pg_url, redis_url, shared_key, tmp_path):  # noqa: F811
    """Two `serve` processes on one PostgreSQL database and one Redis bus, each with a state directory of its own."""
    env = {f"{bus_eco.config.env_prefix}_DB_URL": pg_url, f"{bus_eco.config.env_prefix}_BUS_URL": redis_url,
           "PYTHONPATH": os.pathsep.join(sys.path)}
    with running_ecosystem(bus_eco.name, tmp_path / "a", cwd=bus_eco.root, env=env) as a, \
            running_ecosystem(bus_eco.name, tmp_path / "b", cwd=bus_eco.root, env=env, token_name="second") as b:
        yield a, b, env


def _pg(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def test_a_sign_in_on_one_replica_is_valid_on_the_other_until_sign_out_there(replicas, pg_url):  # noqa: F811
    a, b, _ = replicas
    browser = Browser()
    browser.sign_in(a, a.token)
    assert browser.signed_in_as(b) == "default"
    # a form from one replica is posted to the other: the CSRF token is the session's, in the shared state
    secret = "s3cret-" + uuid.uuid4().hex
    a.call("turing.set_secret", name="db_password", value=secret)
    csrf = _csrf(browser.get(a, "/chat").text)
    assert browser.post(b, "/chat", {"csrf": csrf, "message": "/turing.get_secret name=db_password"}).status_code == 303
    [(sealed,)] = _pg(pg_url, "SELECT flash FROM console_sessions WHERE client <> ''")
    assert sealed and secret.encode() not in bytes(sealed)
    # the answer is shown once, in full, whichever replica serves the next page; the database only has it sealed
    assert secret in browser.get(a, "/chat").text
    assert secret not in browser.get(b, "/chat").text and secret not in browser.get(a, "/chat").text
    [(sid_hash, client, credential)] = _pg(pg_url, "SELECT id_sha256, client, credential FROM console_sessions")
    assert (sid_hash, client) == (_row_key(browser.sid), "default")
    assert credential == hashlib.sha256(a.token.encode()).hexdigest()  # the registry's hash of the token, not it
    # signing out through b ends the session on a: no replica keeps a copy of its own
    copied = browser.sid
    assert browser.post(b, "/signout", {"csrf": _csrf(browser.get(b, "/").text)}).status_code == 303
    browser.sid = copied
    assert browser.signed_in_as(a) == "" and browser.signed_in_as(b) == ""
    assert _pg(pg_url, "SELECT COUNT(*) FROM console_sessions WHERE client <> ''") == [(0,)]


def test_revoking_the_client_ends_its_sessions_on_every_replica(replicas, bus_eco, pg_url, tmp_path):  # noqa: F811
    a, b, env = replicas
    revoked, kept = Browser(), Browser()
    revoked.sign_in(b, b.token)  # client "second"
    kept.sign_in(a, a.token)
    assert revoked.signed_in_as(a) == "second" and revoked.signed_in_as(b) == "second"
    done = subprocess.run([sys.executable, "-m", bus_eco.name, "clients", "revoke", "second", "--state", str(tmp_path / "a")],
                          cwd=bus_eco.root, env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    r = revoked.get(b, "/chat")  # the first replica to see it ends the session for all of them
    assert r.status_code == 303 and r.headers["location"] == "/signin?next=%2Fchat&m=expired"
    assert revoked.signed_in_as(a) == "" and revoked.signed_in_as(b) == ""
    assert _pg(pg_url, "SELECT client FROM console_sessions WHERE client <> ''") == [("default",)]
    assert kept.signed_in_as(b) == "default"  # another client's session is not touched


def test_idle_and_absolute_expiry_hold_on_every_replica(replicas, pg_url):  # noqa: F811
    a, b, _ = replicas
    idle, old = Browser(), Browser()
    idle.sign_in(a, a.token)
    old.sign_in(a, a.token)
    seen = _pg(pg_url, "SELECT seen FROM console_sessions WHERE id_sha256 = %s", (_row_key(idle.sid),))
    for _ in range(3):  # requests within a minute of the last one read the session and write nothing
        assert idle.signed_in_as(b) == "default"
    assert _pg(pg_url, "SELECT seen FROM console_sessions WHERE id_sha256 = %s", (_row_key(idle.sid),)) == seen
    # 31 minutes without a request; 9 hours since sign-in although active a minute ago
    _pg(pg_url, "UPDATE console_sessions SET seen = seen - 31 * 60, created = created - 31 * 60 WHERE id_sha256 = %s",
        (_row_key(idle.sid),))
    _pg(pg_url, "UPDATE console_sessions SET seen = seen - 60, created = created - 9 * 3600 WHERE id_sha256 = %s",
        (_row_key(old.sid),))
    assert idle.signed_in_as(b) == "" and old.signed_in_as(b) == ""
    assert _pg(pg_url, "SELECT COUNT(*) FROM console_sessions WHERE client <> ''") == [(0,)]  # and they are gone


def test_a_forged_or_dumped_cookie_signs_nobody_in(replicas, pg_url):  # noqa: F811
    a, b, _ = replicas
    browser = Browser()
    browser.sign_in(a, a.token)
    [(stored,)] = _pg(pg_url, "SELECT id_sha256 FROM console_sessions WHERE client <> ''")
    for forged in (stored, uuid.uuid4().hex, browser.sid[:-1] + ("A" if browser.sid[-1] != "A" else "B"), "'; --"):
        intruder = Browser()
        intruder.sid = forged
        assert intruder.signed_in_as(b) == "", forged
    dump = " ".join(str(row) for row in _pg(pg_url, "SELECT * FROM console_sessions"))
    assert browser.sid not in dump and a.token not in dump
    assert browser.signed_in_as(b) == "default"


def test_on_sqlite_a_session_outlives_a_restart_and_is_kept_as_a_hash(grace_eco, tmp_path):
    root, name = grace_eco
    state = tmp_path / "state"
    browser = Browser()
    with running_ecosystem(name, state, cwd=root) as eco:
        browser.sign_in(eco, eco.token)
        assert browser.signed_in_as(eco) == "default"
        eco.restart()  # a new process, on a new port: the session is the state's
        assert browser.signed_in_as(eco) == "default"
        assert browser.post(eco, "/signout", {"csrf": _csrf(browser.get(eco, "/").text)}).status_code == 303
        signed_out = browser.sid
        browser.sign_in(eco, eco.token)
        kept = browser.sid
        with sqlite3.connect(f"file:{state / 'ecosystem.db'}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT id_sha256, client FROM console_sessions WHERE client <> ''").fetchall()
            dump = " ".join(str(r) for t in ("console_sessions", "audit_log") for r in db.execute(f"SELECT * FROM {t}"))
        assert rows == [(_row_key(kept), "default")]  # the signed-out session is gone; the cookie only as its hash
        assert kept not in dump and signed_out not in dump and eco.token not in dump
        browser.sid = signed_out
        assert browser.signed_in_as(eco) == ""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_replicas_adding_sessions_at_once_keep_to_the_bound(bus_eco, pg_server, tmp_path, backend):  # noqa: F811
    """Two stores (two replicas' connections) signing people in at once: the table never holds more than the bound,
    the oldest sessions going first."""
    if backend == "sqlite":
        database = importlib.import_module(f"{bus_eco.name}.kernel.db").Database
        connections = [database(tmp_path / "ecosystem.db") for _ in range(2)]
    else:
        url = pg_server.url(f"bound_{uuid.uuid4().hex[:8]}")
        pg_server.admin(f"CREATE DATABASE {url.rsplit('/', 1)[1]}")
        postgres = importlib.import_module(f"{bus_eco.name}.kernel.packs.postgres.pack").PostgresDatabase
        connections = [postgres(url, tmp_path / name) for name in "ab"]
    pack = importlib.import_module(f"{bus_eco.name}.kernel.packs.console.pack")
    stores = [pack.SessionStore(db, max_sessions=12) for db in connections]
    try:
        errors: list[BaseException] = []

        def flood(store) -> None:
            try:
                for _ in range(30):
                    store.new("crowd", "credential")
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        threads = [threading.Thread(target=flood, args=(store,)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert connections[0].one("SELECT COUNT(*) AS n FROM console_sessions")["n"] == 12
        people = [stores[i % 2].new("admin", "credential") for i in range(4)]  # the newest stay, on either replica
        assert all(stores[1].get(p.sid).client == "admin" for p in people)
    finally:
        for db in connections:
            db.close()
