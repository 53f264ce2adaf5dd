"""The console the CLI prints its reports and tables on: never cut short when piped."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rich.console import Console

__all__ = ["PIPED_WIDTH", "stdout_console"]

# The width of piped output: wider than any table migrator prints.  rich sizes a table
# to its content, so a piped table is as wide as it needs and no wider.
PIPED_WIDTH = 10_000


def stdout_console() -> Console:
    """A console on stdout: the terminal's width, ``COLUMNS`` when set, else :data:`PIPED_WIDTH`.

    rich gives output that is not a terminal 80 columns (or the width of whatever
    terminal stdin is), and cuts table cells to fit: a report piped to a file or a
    CI log would lose digits and names.  Whether stdout is a terminal is asked of
    the stream itself, as ``FORCE_COLOR`` makes rich call any stream a terminal.

    Only stdout needs this: stderr carries log lines, which rich folds rather than
    cuts (and pads to the console's width, so a wide one would fill logs with
    spaces), and messages printed with ``soft_wrap``, which are never wrapped.
    """
    if _is_tty(sys.stdout) or os.environ.get("COLUMNS", "").isdigit():
        return Console()  # rich reads COLUMNS itself
    return Console(width=PIPED_WIDTH)


def _is_tty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except ValueError:  # a closed stream
        return False
