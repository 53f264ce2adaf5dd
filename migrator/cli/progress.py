"""Live progress of a run on the terminal (rich); the only place that draws while running."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from migrator.runner import Observer

__all__ = ["LiveProgress", "mib"]


def mib(value: Any) -> str:
    """A byte count as MiB for progress lines (``-`` when QEMU did not report it)."""
    return f"{value / 1048576:,.1f} MiB" if isinstance(value, int | float) else "-"


class LiveProgress(Observer):
    """Phase, elapsed time, bytes and post-copy requests, redrawn a few times a second."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.monotonic()
        self.phase_name = "starting"
        self.detail = ""
        self.latest: dict[str, dict[str, Any]] = {}
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=True)

    def __enter__(self) -> LiveProgress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def phase(self, name: str, detail: str = "") -> None:
        elapsed = time.monotonic() - self.started
        self.console.log(f"[bold]{name}[/bold] {detail}".rstrip(), _stack_offset=2)
        self.phase_name, self.detail = name, detail
        del elapsed
        self.live.update(self._render())

    def sample(self, side: str, reply: dict[str, Any]) -> None:
        self.latest[side] = reply
        self.live.update(self._render())

    def _render(self) -> Group:
        elapsed = time.monotonic() - self.started
        head = Text.assemble(("phase ", "dim"), (self.phase_name, "bold cyan"),
                             ("   elapsed ", "dim"), f"{elapsed:6.1f} s")
        table = Table(box=None, padding=(0, 2), show_edge=False)
        for column in ("side", "status", "transferred", "remaining", "post-copy requests",
                       "dirty-sync passes"):
            table.add_column(column)
        for side in ("src", "dst"):
            reply = self.latest.get(side)
            if not reply:
                continue
            ram = reply.get("ram", {})
            table.add_row(side, str(reply.get("status", "-")), mib(ram.get("transferred")),
                          mib(ram.get("remaining")), str(ram.get("postcopy-requests", "-")),
                          str(ram.get("dirty-sync-count", "-")))
        return Group(head, table) if self.latest else Group(head)
