"""The tracing pack (OpenTelemetry)'s catalogue: what it is for, its pinned dependencies.

Light on purpose (pydantic and the core's catalogue types only): the compiler and `capabilities.py` read it;
the implementation, with its libraries, is `pack.py`, imported only when the pack is loaded.
"""

from __future__ import annotations

from ...capabilities import PackInfo

PACK = PackInfo("tracing", "OpenTelemetry traces of tool calls, bus hops and MAD handlers, exported over OTLP/HTTP "
                           "once an endpoint is configured (`serve --otlp-endpoint URL`)",
                dependencies=("opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2",
                              "opentelemetry-exporter-otlp-proto-http==1.45.2"), kind="deployment")
