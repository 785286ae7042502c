"""Traces (OpenTelemetry): a span for each gateway tool call, each bus hop and each MAD handler.

Off by default. Until `configure` finds an OTLP endpoint, `tracer` is None, nothing of the
OpenTelemetry SDK is imported, and `start` returns `OFF`, whose methods do nothing: the hot
path pays a call and an `is None` test. The OpenTelemetry side (the SDK, the OTLP exporter, the
spans) is the tracing pack (packs/tracing/), which an artifact carries, with its libraries,
only when its spec names it (`packs: {tracing: {}}` in ecosystem.yaml); configuring an endpoint
in a build without it is a clear error.

On when an endpoint is configured, for the process (`serve` calls `configure`):
- `serve --otlp-endpoint URL` (the tracing pack's option: packs/tracing/cli.py): the collector's OTLP/HTTP base URL, e.g. http://127.0.0.1:4318
  (`/v1/traces` is appended unless the URL ends with it); else
- the standard variables: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (the traces URL, used as it is),
  else OTEL_EXPORTER_OTLP_ENDPOINT (the base URL, `/v1/traces` appended).
OTEL_SDK_DISABLED=true keeps tracing off whatever is configured. Spans go out over OTLP/HTTP
(protobuf; a collector's port 4318) in batches; the exporter's other standard variables apply
(OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE, and their _TRACES_ forms),
and OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG choose the sampler (default: every trace).
The resource is service.name = the ecosystem, service.version = the build's version, with
OTEL_RESOURCE_ATTRIBUTES added. The kernel keeps its own TracerProvider: it does not replace a
global one.

The spans, with the kind OpenTelemetry gives them:
- `tools/call <mad>.<tool>` (server): an MCP tools/call at the gateway (GatewayServer.call_tool);
- `<mad>.<tool>` (internal): a MAD's handler, a tool run for a client or for a bus request
  (`<mad>.handle` for a request in prose, which goes to its Thought Engine);
- `bus send <mad>` (producer): a request handed to the bus (Runtime._submit), ended once accepted;
- `bus deliver <mad>` (consumer): its delivery (Runtime._deliver), a child of the send span in
  whichever process runs it: the W3C trace context (`traceparent`) rides in the request's
  payload, sealed with it on the SQLite bus and on Redis, and is kept out of the conversation's
  history.
Every span carries `regen.correlation_id` (the id of the JSON log lines and the result's
`_meta`), `regen.outcome` ("ok", or what went wrong: a gateway refusal, a KernelError's code,
"crashed", "cancelled"), and where they apply `regen.mad`, `regen.tool`, `regen.client` (the
MCP client's name), `regen.sender` and `regen.envelope_id`. A span that is not "ok" has status
ERROR; where an exception ended it, an `exception` event names its type, and gives its message
when it is a KernelError's (written to be shown; a MAD's own exception is named by type only,
as in the logs). Never an argument's value or a result.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from . import packs
from .errors import KernelError

tracer: Any = None  # the kernel's Tracer while tracing is on; None (off) by default
_pack: Any = None  # the tracing pack's module while tracing is on (it holds the provider, the exporter, the endpoint)


class _Off:
    """The span of tracing turned off: nothing recorded, nothing to end."""

    __slots__ = ()
    recording = False

    def _nothing(self, *_args: Any, **_kwargs: Any) -> None:
        """set(key, value), inject(carrier), end(outcome="ok", error=None): as the pack's Span has them."""

    set = inject = end = _nothing


OFF = _Off()


def start(name: str, attributes: Mapping[str, Any], *, kind: str = "internal",
          carrier: Mapping[str, Any] | None = None, current: bool = True) -> Any:
    """A new span (OFF when tracing is off), a child of the current span, or of the trace context
    `carrier` holds (a request's payload); `current`: made the current span until its `end`.
    Attributes that are None or "" are left out."""
    if tracer is None:
        return OFF
    return _pack.start(tracer, name, attributes, kind=kind, carrier=carrier, current=current)


@contextmanager
def ending(span: Any) -> Iterator[Any]:
    """`span` for the block, ended when the block ends: with the outcome of the exception that left it, if one did."""
    try:
        yield span
    except BaseException as exc:
        span.end(outcome_of(exc), exc)
        raise
    span.end()


def outcome_of(error: BaseException) -> str:
    """What a span records as the outcome of an exception: a KernelError's code, "cancelled", else "crashed"."""
    if isinstance(error, KernelError):
        return error.code
    return "cancelled" if isinstance(error, asyncio.CancelledError) else "crashed"


def client_of(principal: str) -> str:
    """The MCP client's name in a principal ("client:<name>"), else ""."""
    return principal[7:] if principal.startswith("client:") else ""


ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")  # after the flag


def configure(service: str, version: str, *, otlp_endpoint: str | None = None,
              env: Mapping[str, str] | None = None, span_exporter: Any = None) -> bool:
    """Turn tracing on for this process if an OTLP endpoint is configured (see the module docstring),
    or to `span_exporter` (tests pass the SDK's InMemorySpanExporter; its spans are exported as each
    ends); True when on. A previous configuration is shut down first, so the last call wins.
    No endpoint: off, at the cost of a few lookups; the pack does the rest (packs/tracing/pack.py), from checking
    that the endpoint is an http(s) URL on."""
    global tracer, _pack
    env = os.environ if env is None else env
    shutdown()
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    given = [u.strip() for u in (otlp_endpoint or "", *(env.get(v, "") for v in ENDPOINT_VARIABLES)) if u.strip()]
    if span_exporter is None and not given:
        return False
    pack = packs.module("tracing", packs.NO_TRACING)
    tracer, _pack = pack.configure(service, version, otlp_endpoint, env, span_exporter), pack
    return True


def shutdown() -> None:
    """Export what is still batched and turn tracing off (serve calls it on its way out)."""
    global tracer, _pack
    pack, tracer, _pack = _pack, None, None
    if pack is not None:
        pack.shutdown()
