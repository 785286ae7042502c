"""The tracing pack's part of the command line (the core's cli.py adds it when the build carries the pack):
serve's `--otlp-endpoint`, which the core's `tracing.configure` reads (as it reads the OTEL_ variables).

Light on purpose (argparse only): every command's parser is built from it; `pack.py`, with OpenTelemetry,
is imported only once an endpoint is configured.
"""

from __future__ import annotations

from typing import Any


def add_commands(parsers: dict[str, Any], config: Any) -> None:
    """serve's `--otlp-endpoint` (see cli.py's PACK_PARTS)."""
    parsers["serve"].add_argument(
        "--otlp-endpoint", default=None, metavar="URL",
        help="send traces (OpenTelemetry, OTLP over HTTP) to this collector, e.g. http://127.0.0.1:4318 (/v1/traces "
             "is appended); default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else $OTEL_EXPORTER_OTLP_ENDPOINT; "
             "neither: no traces")
