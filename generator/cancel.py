"""Stopping a build from outside without leaving half of it behind.

A caller that may cancel (the MCP server) sets `CANCEL` to an Event in the context the build runs in; the build then
stops at its next stage or unit (`Reporter.stage`/`progress` call `check`) and a running subprocess (the sandbox's
tests, uv) is killed at once (`communicate`). `BuildCancelled` unwinds through `staging`, which removes the half-made
version. The command line never sets it: Ctrl-C is its cancellation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextvars import ContextVar

from .errors import BuildCancelled

CANCEL: ContextVar[threading.Event | None] = ContextVar("regen_cancel", default=None)
POLL_S = 0.2


def check() -> None:
    """Raise BuildCancelled if this build was cancelled."""
    event = CANCEL.get()
    if event is not None and event.is_set():
        raise BuildCancelled("the build was cancelled; nothing was archived")


def communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, bool]:
    """`proc.communicate(timeout)` that also watches for cancellation: (its output, whether it ended in time); one
    that runs past `timeout` is killed. A cancelled build kills the process's group (it runs in a session of its own)
    and raises BuildCancelled."""
    event = CANCEL.get()
    waited = 0.0
    while True:
        step = timeout if event is None else min(POLL_S, max(timeout - waited, 0.01))
        try:
            return proc.communicate(timeout=step)[0] or "", True
        except subprocess.TimeoutExpired:  # what was read so far is kept by communicate for the next call
            waited += step
            if event is not None and event.is_set():
                _kill(proc)
                check()
            if waited >= timeout:
                return _kill(proc), False


def _kill(proc: subprocess.Popen) -> str:
    """Kill the process's group; what it wrote before it died."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # gone already: nothing else of it to kill
        proc.kill()
    return proc.communicate()[0] or ""
