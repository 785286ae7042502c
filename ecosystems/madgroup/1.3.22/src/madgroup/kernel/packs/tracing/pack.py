"""The tracing pack: OpenTelemetry's SDK and OTLP/HTTP exporter behind the kernel's spans (tracing.py).

An artifact carries it, with the OpenTelemetry packages, only when its spec names it (`packs: {tracing: {}}`
in ecosystem.yaml); the core's `tracing.configure` loads it once an OTLP endpoint is configured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ... import logs
from ...errors import InvalidArgument, KernelError

log = logs.get("tracing")

SCOPE = "regen.kernel"
TRACES_PATH = "/v1/traces"

provider: Any = None  # the TracerProvider while tracing is on
exporter: Any = None  # where its spans go (the OTLP exporter, or the one a test passed)
endpoint = ""  # the OTLP traces URL, when that is where they go
_otel = SimpleNamespace(context=context, trace=trace, Status=Status, StatusCode=StatusCode,
                        propagator=TraceContextTextMapPropagator(),
                        kinds={"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER,
                               "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER})


class Span:
    """One span, made current by `start` (its children's parent) until `end`."""

    __slots__ = ("span", "_token")
    recording = True

    def __init__(self, span: Any, token: Any):
        self.span = span
        self._token = token

    def set(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def inject(self, carrier: MutableMapping[str, Any]) -> None:
        """Write this span's trace context into `carrier` (`traceparent`, and `tracestate` if any)."""
        _otel.propagator.inject(carrier, context=_otel.trace.set_span_in_context(self.span))

    def end(self, outcome: str = "ok", error: BaseException | str | None = None) -> None:
        """End the span with its outcome; anything but "ok" is status ERROR, described by `error`."""
        span = self.span
        span.set_attribute("regen.outcome", outcome)
        if outcome != "ok":
            if isinstance(error, BaseException):
                # Type always; the message only where the kernel wrote it to be shown (never a MAD's own).
                event = {"exception.type": type(error).__qualname__}
                if isinstance(error, KernelError):
                    event["exception.message"] = str(error)
                span.add_event("exception", event)
                error = event.get("exception.message", event["exception.type"])
            span.set_status(_otel.Status(_otel.StatusCode.ERROR, str(error or outcome)))
        span.end()
        if self._token is not None:
            _otel.context.detach(self._token)
            self._token = None


def start(tracer: Any, name: str, attributes: Mapping[str, Any], *, kind: str = "internal",
          carrier: Mapping[str, Any] | None = None, current: bool = True) -> Span:
    """A span of `tracer` (see tracing.start)."""
    parent = None
    if carrier is not None and isinstance(carrier.get("traceparent"), str):
        fields = {key: carrier[key] for key in ("traceparent", "tracestate") if isinstance(carrier.get(key), str)}
        parent = _otel.propagator.extract(fields)
    span = tracer.start_span(name, context=parent, kind=_otel.kinds[kind],
                             attributes={k: v for k, v in attributes.items() if v is not None and v != ""})
    return Span(span, _otel.context.attach(_otel.trace.set_span_in_context(span)) if current else None)


def _shown(url: str) -> str:
    """A URL as the log may show it: no user, password, query or fragment."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":?"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))


def _is_web(url: str) -> bool:
    try:
        return urlsplit(url).scheme in ("http", "https") and bool(urlsplit(url).hostname)
    except ValueError:  # e.g. an unclosed [IPv6 address]
        return False


def traces_url(base: str) -> str:
    """An OTLP/HTTP base URL's traces endpoint: `/v1/traces` appended unless it is there."""
    base = base.strip().rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def endpoint_from(flag: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The OTLP traces URL configured ("" for none): the flag (a base URL), else
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as it is, else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces."""
    env = os.environ if env is None else env
    if flag and flag.strip():
        return traces_url(flag)
    if url := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return url
    if url := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return traces_url(url)
    return ""


def configure(service: str, version: str, otlp_endpoint: str | None, env: Mapping[str, str],
              span_exporter: Any) -> Any:
    """The kernel's tracer, its spans to `span_exporter` as each ends, else batched to the OTLP traces URL
    configured (tracing.configure checked there is one), which must be an http(s) URL."""
    global provider, exporter, endpoint
    url = "" if span_exporter is not None else endpoint_from(otlp_endpoint, env)
    if span_exporter is None and not _is_web(url):
        raise InvalidArgument("the OTLP endpoint is not an http:// or https:// URL; traces go over OTLP/HTTP to a "
                              "collector, e.g. --otlp-endpoint http://127.0.0.1:4318")
    made = TracerProvider(resource=Resource.create({"service.name": service, "service.version": version}))
    if span_exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=url)
        made.add_span_processor(BatchSpanProcessor(span_exporter))
    else:
        made.add_span_processor(SimpleSpanProcessor(span_exporter))
    if url:
        log.info("tracing on: spans go to the OTLP endpoint", extra={"endpoint": _shown(url), "service": service})
    provider, exporter, endpoint = made, span_exporter, url
    return made.get_tracer(SCOPE, version)


def shutdown() -> None:
    """Export what is still batched and forget the configuration (tracing.shutdown calls it)."""
    global provider, exporter, endpoint
    made, provider, exporter, endpoint = provider, None, None, ""
    if made is not None:
        made.shutdown()
