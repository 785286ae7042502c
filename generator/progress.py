"""What a run shows a person: one line per stage as it happens, a spinner for slow
stages, and a one-screen summary at the end. Tests pass `Reporter(quiet=True)`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table


class Reporter:
    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self._status = None

    @contextmanager
    def stage(self, name: str, doing: str) -> Iterator[dict]:
        """Run a stage under a spinner; the body may set `note` in the yielded dict."""
        info: dict = {"note": ""}
        started = time.monotonic()
        if self.quiet:
            yield info
            return
        with self.console.status(f"[bold]{name}[/] {doing}…") as self._status:
            try:
                yield info
            except BaseException:
                self.console.print(f"  [red]✗[/] [bold]{name:<11}[/] {doing}")
                raise
            finally:
                self._status = None
        elapsed = time.monotonic() - started
        note = f" — {info['note']}" if info["note"] else ""
        self.console.print(f"  [green]✓[/] [bold]{name:<11}[/] {doing}{note} [dim]({elapsed:.1f}s)[/]")

    def progress(self, name: str, doing: str) -> None:
        """Replace the spinner's text while a stage is running (e.g. which unit is being written)."""
        if self._status is not None:
            self._status.update(f"[bold]{name}[/] {doing}…")

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def warn(self, text: str) -> None:
        # Warnings are shown even when quiet: they are never to be dropped silently.
        self.console.print(f"[bold yellow]warning:[/] {text}")

    def summary(self, title: str, rows: list[tuple[str, str]]) -> None:
        if self.quiet:
            return
        table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        self.console.print()
        self.console.print(table)
