"""What every command shares: the consoles, the error line, logging, interrupts, arguments.

Imported by every module of :mod:`migrator.cli` at start-up, so it imports
nothing heavy: ``migrator --help`` must stay fast (``benchmarks/cli_startup.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from migrator.errors import ExitCode, MigratorError

__all__ = [
    "PIPED_WIDTH",
    "RunDirArgument",
    "ScenarioArgument",
    "VerboseOption",
    "err",
    "fail",
    "interrupted",
    "out",
    "print_error",
    "print_json",
    "run_until_interrupted",
    "setup_logging",
    "stdout_console",
]

T = TypeVar("T")

# The width of piped output: wider than any table migrator prints.  rich sizes a table
# to its content, so a piped table is as wide as it needs and no wider.
PIPED_WIDTH = 10_000
#: rich's own default height: nothing migrator prints depends on it.
PIPED_HEIGHT = 25

ScenarioArgument = Annotated[Path, typer.Argument(metavar="SCENARIO.toml",
                                                  help="scenario TOML file")]
RunDirArgument = Annotated[Path, typer.Argument(metavar="RUN_DIR",
                                                help="a run directory made by 'migrator run'")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="log to stderr")]


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
    columns = os.environ.get("COLUMNS", "")
    # Width with a height: rich takes a width alone as a hint that TERM=dumb overrides
    # with 80 columns once FORCE_COLOR has made the stream a "terminal" (CI jobs set both).
    if columns.isdigit():
        return Console(width=int(columns), height=PIPED_HEIGHT)
    if _is_tty(sys.stdout):
        return Console()
    return Console(width=PIPED_WIDTH, height=PIPED_HEIGHT)


def _is_tty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except ValueError:  # a closed stream
        return False


#: Errors, warnings, progress and log lines.
err = Console(stderr=True, log_path=False)
#: Reports, tables and anything else a user may pipe or parse.
out = stdout_console()


def print_json(document: str) -> None:
    """Print a JSON document on stdout: coloured on a terminal, plain JSON otherwise.

    Plain when piped: rich's highlighting costs tens of ms on a report, and whatever
    reads a pipe parses the JSON rather than looks at it.
    """
    if out.is_terminal:
        out.print_json(document)
    else:
        sys.stdout.write(json.dumps(json.loads(document), indent=2) + "\n")
        sys.stdout.flush()


def print_error(error: MigratorError) -> None:
    """Print a migrator error as one line (and where a failed run's artifacts are)."""
    # Escaped: messages quote user input (names, paths), which may look like rich markup.
    err.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False,
              soft_wrap=True)
    run_dir = getattr(error, "run_dir", None)
    if run_dir is not None:
        err.print(f"raw artifacts kept in {escape(str(run_dir))}", highlight=False,
                  soft_wrap=True)


def fail(error: MigratorError, exit_code: int | None = None) -> typer.Exit:
    """Print a migrator error (:func:`print_error`); give its exit code (or ``exit_code``)."""
    print_error(error)
    return typer.Exit(error.exit_code if exit_code is None else exit_code)


def setup_logging(verbose: bool, log_file: Path | None = None) -> None:
    """Send log records to stderr (INFO and up) with ``verbose``, and all of them to ``log_file``.

    Without either, only warnings are shown.  Records logged while a run of a
    parallel suite goes name that run (:mod:`migrator.logcontext`).
    """
    from migrator.logcontext import RunLabelFilter

    handlers: list[logging.Handler] = []
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(run_prefix)s%(message)s"))
        handler.setLevel(logging.DEBUG)
        handlers.append(handler)
    if verbose:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(run_prefix)s%(message)s"))
        stream.setLevel(logging.INFO)
        handlers.append(stream)
    for each in handlers:
        each.addFilter(RunLabelFilter())
    logging.basicConfig(level=logging.DEBUG if handlers else logging.WARNING,
                        handlers=handlers or None, force=True)
    # qemu.qmp logs every disconnect at INFO; that is noise for a user.
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    # asyncssh logs every exec request (with the whole remote supervisor) at INFO.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def run_until_interrupted(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` in a new event loop; SIGTERM cancels it as Ctrl-C does.

    Either way every ``finally`` of the run gets to tear down.  What the caller
    sees is :class:`KeyboardInterrupt` (Ctrl-C) or
    :class:`asyncio.CancelledError` (SIGTERM): see :func:`interrupted`.
    """
    import asyncio
    import signal

    async def cancellable() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main

    return asyncio.run(cancellable())


def interrupted(stop: BaseException, run_dir: Path | None) -> typer.Exit:
    """Say how the interrupted run at ``run_dir`` was left; give the exit of the interrupt.

    130 after Ctrl-C (``stop`` is a :class:`KeyboardInterrupt`), 143 after SIGTERM.
    """
    from migrator.cli.teardown import interrupted_statement

    err.print(interrupted_statement(run_dir), highlight=False, soft_wrap=True)
    return typer.Exit(ExitCode.INTERRUPTED_SIGINT if isinstance(stop, KeyboardInterrupt)
                      else ExitCode.INTERRUPTED_SIGTERM)
