"""The run log: every model attempt of a build, on screen as it happens and in `.regen/runs/<name>/<version>.jsonl`
(`regen gate` shows them on screen only).

Retries, waits and fallbacks vary from run to run, so they are kept out of the signed
artifact (two builds of the same inputs write the same bytes) and go here instead: one
JSON object a line, written as it happens, so a run that dies leaves its log up to that
point. The manifest keeps what does not vary: the model that answered each unit.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

from rich.markup import escape

from ..progress import Reporter
from .client import ModelEvent


class RunLog:
    """Listens to the model clients of one build: shows retries and fallbacks, and logs every event."""

    def __init__(self, report: Reporter):
        self.report = report
        self.path: Path | None = None
        self._written = False
        self._lock = threading.Lock()

    def start(self, path: Path) -> None:
        """Log to `path` from the first event on (a rerun of the same version starts it afresh)."""
        self.path = path
        self._written = False

    @property
    def written(self) -> bool:
        return self._written

    def record(self, event: ModelEvent) -> None:
        if event.event == "retry":
            self.report.say(f"  [yellow]↻[/] {escape(event.line())}")
        elif event.event in ("gave_up", "fallback"):
            self.report.warn(escape(event.line()))
        if self.path is None:
            return
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")} | event.model_dump(
            mode="json", exclude_none=True)
        with self._lock:
            if not self._written:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a" if self._written else "w", encoding="utf-8") as log:
                log.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._written = True


def run_log_path(runs_dir: Path, ecosystem: str, version: str) -> Path:
    return runs_dir / ecosystem / f"{version}.jsonl"
