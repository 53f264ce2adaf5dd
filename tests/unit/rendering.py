"""The terminal report as plain text, for tests that read what a user sees."""

from __future__ import annotations

from rich.console import Console

from migrator.model import Report
from migrator.report.terminal import render_report

__all__ = ["terminal_text"]


def terminal_text(report: Report, width: int = 140) -> str:
    """``render_report`` on a recording console ``width`` columns wide, no colour codes."""
    console = Console(record=True, width=width, force_terminal=False)
    render_report(report, console)
    return console.export_text()
