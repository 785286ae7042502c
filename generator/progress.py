"""What a run shows a person: one line per stage as it happens, a spinner for slow
stages, and a one-screen summary at the end. Tests pass `Reporter(quiet=True)`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import cancel

if TYPE_CHECKING:
    from rich.console import Console


class Reporter:
    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self._console = console
        self._status = None

    @property
    def console(self) -> Console:
        if self._console is None:  # rich takes a while to import: not before there is something to show
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
        return self._console

    @contextmanager
    def stage(self, name: str, doing: str) -> Iterator[dict]:
        """Run a stage under a spinner; the body may set `note` in the yielded dict, and `failed` to show it
        failed without raising (a check that found problems, which the caller reports)."""
        cancel.check()  # every stage is a point where a cancelled build stops (generator/cancel.py)
        info: dict = {"note": "", "failed": False}
        started = time.monotonic()
        if self.quiet:
            yield info
            return
        doing = _plain(doing)  # names, paths and model text are shown as written, never read as markup
        with self.console.status(f"[bold]{name}[/] {doing}…") as self._status:
            try:
                yield info
            except BaseException:
                self.console.print(f"  [red]✗[/] [bold]{name:<11}[/] {doing}", emoji=False)
                raise
            finally:
                self._status = None
        elapsed = time.monotonic() - started
        note = f" — {_plain(info['note'])}" if info["note"] else ""
        mark = "[red]✗[/]" if info["failed"] else "[green]✓[/]"
        self.console.print(f"  {mark} [bold]{name:<11}[/] {doing}{note} [dim]({elapsed:.1f}s)[/]", emoji=False)

    def progress(self, name: str, doing: str) -> None:
        """Replace the spinner's text while a stage is running (e.g. which unit is being written)."""
        cancel.check()
        if self._status is not None:
            self._status.update(f"[bold]{name}[/] {_plain(doing)}…")

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, emoji=False)

    def warn(self, text: str) -> None:
        # Warnings are shown even when quiet: they are never to be dropped silently.
        self.console.print(f"[bold yellow]warning:[/] {_plain(text)}", emoji=False)

    def summary(self, title: str, rows: list[tuple[str, str]]) -> None:
        if self.quiet:
            return
        from rich.table import Table

        table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        self.console.print()
        self.console.print(table, emoji=False)


def _plain(text: object) -> str:
    """Text rich prints as it is: `[prices]` or `[/x]` in a message is not markup."""
    from rich.markup import escape

    return escape(str(text))
