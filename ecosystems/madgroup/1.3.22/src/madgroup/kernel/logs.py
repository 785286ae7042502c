"""Structured JSON logs on stderr, with correlation ids carried in context variables.

Nothing here ever receives a secret value: callers log names, ids and outcomes only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("regen_correlation_id", default="")
principal: contextvars.ContextVar[str] = contextvars.ContextVar("regen_principal", default="")
# The MAD whose code is running (a tool call, a bus delivery): every line logged there names it.
mad: contextvars.ContextVar[str] = contextvars.ContextVar("regen_mad", default="")


@contextmanager
def bound(*pairs: tuple[contextvars.ContextVar[Any], Any]) -> Iterator[None]:
    """Each (context variable, value) of `pairs` set for the block, and reset after it."""
    tokens = [(var, var.set(value)) for var, value in pairs]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


def new_id() -> str:
    """32 hex digits: the time in milliseconds (48 bits), then 80 random bits, like a UUIDv7. Ids made later
    sort later, so the bus's indexes on them grow at their end instead of touching a random page per
    message: a batch of concurrent hops writes a few pages, not one per id. The random bits come straight from
    os.urandom (a 4 KiB buffer of them measured no faster, and needed a lock and a reset at fork)."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, correlation_id, principal, mad, and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in (("correlation_id", correlation_id), ("principal", principal), ("mad", mad)):
            if value := var.get():
                entry[key] = value
        entry.update((key, value) for key, value in record.__dict__.items()
                     if key not in _STD_ATTRS and not key.startswith("_"))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO") -> None:
    """Route every log record (kernel, uvicorn, mcp) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # Library loggers stay at WARNING: at DEBUG they may echo request bodies, which can hold secrets.
    for name in ("mcp", "httpx", "httpx2", "httpcore", "httpcore2", "uvicorn.access", "sse_starlette"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"kernel.{name}")
