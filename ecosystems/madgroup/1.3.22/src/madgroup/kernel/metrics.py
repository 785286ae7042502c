"""Prometheus metrics of one Runtime, served at `GET /metrics` in the text exposition format.

Each Runtime has its own `CollectorRegistry` (never prometheus_client's global one): several
runtimes share a test process, and a process-wide registry would mix their counts.

What is recorded are counts and durations labelled by MAD, tool, envelope kind and outcome,
never a message, an argument or a secret. Label values come from closed sets (the MADs and
tools the ecosystem declares, the envelope kinds, fixed outcome and place names): a name a
caller made up is counted under "other", so nobody can grow the series without bound.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format every Prometheus version scrapes
OTHER = "other"
# In the MAD: ok, refused (a kernel error), crashed (a bug); at the gateway, before any MAD runs, the rest.
OUTCOMES = ("ok", "refused", "crashed", "denied", "rate_limited", "quota_exceeded", "unknown_tool")
WHERES = ("tool", "bus", "model", "start", "stop")
TOKEN_KINDS = ("prompt", "completion")
MESSAGE_KINDS = ("message", "request", "reply", "error", "event", "thought", "report")
SPAWN_OUTCOMES = ("reported", "failed")  # how an eMAD instance ended (kernel/packs/emads/)
ROUTES = ("mcp", "healthz", "metrics", "grace")  # HTTP requests by where they went: MCP, health, metrics, the web UI
SIGNIN_FAILURES = ("invalid_token", "empty_token", "locked_out")
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the bind addresses only this machine can reach
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _closed(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


class Metrics:
    """The counters of one ecosystem process.

    `tools`: MAD name -> its tool names (the closed label sets); `mad_up`: called at each scrape.
    """

    def __init__(self, tools: Mapping[str, Iterable[str]], mad_up: Callable[[], Mapping[str, bool]]):
        self._tools = {mad: frozenset(names) for mad, names in tools.items()}
        self._mad_up = mad_up
        self._watched: dict[str, tuple[str, Callable[[], float]]] = {}  # gauge name -> (documentation, read)
        self.registry = CollectorRegistry()
        r = self.registry
        self._messages = Counter("regen_bus_messages", "Envelopes posted on the bus, by sending MAD and kind",
                                 ["mad", "kind"], registry=r)
        self._tool_calls = Counter("regen_tool_calls", "Tool calls from outside (MCP clients, the web UI), by outcome",
                                   ["mad", "tool", "outcome"], registry=r)
        self._tool_seconds = Histogram("regen_tool_call_duration_seconds", "Wall time of tool calls from outside",
                                       ["mad", "tool"], buckets=_LATENCY_BUCKETS, registry=r)
        self._errors = Counter("regen_errors", "Failures, by MAD and where they happened (tool, bus, model, start, stop)",
                               ["mad", "where"], registry=r)
        self._tokens = Counter("regen_llm_tokens", "Model tokens used, by MAD and kind (prompt, completion)",
                               ["mad", "kind"], registry=r)
        self._http = Counter("regen_http_requests", "HTTP requests answered, by route (mcp, healthz, metrics, grace) "
                             "and status code", ["route", "status"], registry=r)
        self._spawns = Counter("regen_emad_spawns", "eMAD instances run, by role and how they ended (reported, failed)",
                               ["role", "outcome"], registry=r)
        self._signin_failures = Counter("regen_signin_failures", "Refused sign-ins to the web UI, by reason",
                                        ["reason"], registry=r)
        r.register(self)  # the gauges read at scrape time: see `collect`
        self._message_children: dict[tuple[str, str], Any] = {}
        # The process's CPU, memory, open files and start time, and the Python version: what an operator
        # reads first when a process misbehaves (on Linux; elsewhere the process collector is empty).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def _mad(self, mad: str) -> str:
        return _closed(mad, self._tools)

    def message(self, mad: str, kind: str) -> None:
        # Counted twice per bus hop: the labelled child is looked up once per (mad, kind).
        child = self._message_children.get((mad, kind))
        if child is None:
            child = self._message_children[(mad, kind)] = self._messages.labels(self._mad(mad), _closed(kind, MESSAGE_KINDS))
        child.inc()

    def tool_call(self, mad: str, tool: str, outcome: str, seconds: float | None = None) -> None:
        """One call of `<mad>.<tool>` and its outcome (one of OUTCOMES); `seconds` when it reached the MAD."""
        known = self._tools.get(mad, frozenset())
        labels = (self._mad(mad), tool if tool in known else OTHER)
        self._tool_calls.labels(*labels, _closed(outcome, OUTCOMES)).inc()
        if seconds is not None:
            self._tool_seconds.labels(*labels).observe(seconds)

    def error(self, mad: str, where: str) -> None:
        self._errors.labels(self._mad(mad), _closed(where, WHERES)).inc()

    def llm_tokens(self, mad: str, n: int, *, kind: Literal["prompt", "completion"]) -> None:
        if n > 0:
            self._tokens.labels(self._mad(mad), _closed(kind, TOKEN_KINDS)).inc(n)

    def spawn(self, role: str, outcome: str) -> None:
        """One eMAD instance of `role` ended: "reported" or "failed"."""
        self._spawns.labels(self._mad(role), _closed(outcome, SPAWN_OUTCOMES)).inc()

    def build_info(self, **labels: str) -> None:
        """`regen_build_info{ecosystem, version, inputs_hash} 1`: which build this process runs."""
        Info("regen_build", "The build this process runs", registry=self.registry).info(labels)

    def http_request(self, path: str, status: int) -> None:
        route = path.strip("/").split("/", 1)[0]
        self._http.labels(route if route in ROUTES else "grace", str(status) if 100 <= status < 600 else OTHER).inc()

    def signin_failure(self, reason: str) -> None:
        self._signin_failures.labels(_closed(reason, SIGNIN_FAILURES)).inc()

    def watch(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read at each scrape (e.g. open MCP sessions, which only the session manager knows); watching
        the same name again (a new app on this runtime) reads the new source."""
        self._watched[name] = (documentation, read)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """The gauges read at each scrape (the registry asks this object as a collector): 1 for each MAD that is
        up (running or idle, its breaker closed), 0 for one that is not; then each watched source."""
        up = GaugeMetricFamily("regen_mad_up", "1 when the MAD is up (running or idle, its breaker closed), else 0",
                               labels=["mad"])
        for mad, is_up in sorted(self._mad_up().items()):
            up.add_metric([mad], 1.0 if is_up else 0.0)
        yield up
        for name, (documentation, read) in self._watched.items():
            yield GaugeMetricFamily(name, documentation, value=float(read()))

    def render(self) -> bytes:
        """Every metric of this runtime in the Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


def scrape_allowed(authorization: str, bind_host: str, token: str) -> bool:
    """Whether a request for /metrics may be answered.

    With a metrics token configured, only `Authorization: Bearer <token>` may scrape. Without
    one, scraping is open only when the server listens on loopback (the same trust as /healthz);
    on a routable address it is closed until a token is set.
    """
    if token:
        scheme, _, given = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    return bind_host in LOOPBACK
