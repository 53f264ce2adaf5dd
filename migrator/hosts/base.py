"""The one interface through which migrator touches a machine.

A :class:`Host` runs commands (argv lists, never shell strings), supervises
long-running processes, holds a line-by-line dialogue with a command, reads and
writes files, and makes a unix socket on the host reachable from the controller.
``LocalHost`` is the machine migrator runs on; remote hosts implement the same
interface so nothing above this layer cares where a QEMU lives.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from migrator.errors import HostError

__all__ = ["CommandResult", "Host", "HostProcess", "LineExchange"]


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left: argv, exit status and its output."""

    argv: tuple[str, ...]
    status: int
    stdout: str
    stderr: str

    def check(self, what: str) -> CommandResult:
        """Return self, or raise :class:`HostError` describing ``what`` failed."""
        if self.status != 0:
            raise HostError(
                f"{what} failed: {' '.join(self.argv)}",
                argv=self.argv,
                status=self.status,
                output=self.stderr or self.stdout,
            )
        return self


class HostProcess(abc.ABC):
    """A long-running process started on a host."""

    argv: tuple[str, ...]

    @property
    @abc.abstractmethod
    def pid(self) -> int:
        """Process id on its host."""

    @property
    @abc.abstractmethod
    def returncode(self) -> int | None:
        """Exit status once it has exited (negative: killed by that signal), else None."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait for the process to exit and return its status."""

    @abc.abstractmethod
    async def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig``; a process that already exited is not an error."""


class LineWriter(Protocol):
    """Where an exchange writes its questions (a command's stdin)."""

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the command."""


class LineReader(Protocol):
    """Where an exchange reads its answers (a command's stdout)."""

    async def readline(self) -> bytes:
        """The next line with its newline; what is left (maybe b"") at end of file."""


class LineExchange:
    """A running command that answers each line on its stdin with one line on its stdout.

    Made by :meth:`Host.exchange_lines`.  One question at a time: the command
    is never more than one line ahead, so a slow reader cannot stall it.
    """

    def __init__(
        self, host: str, argv: Sequence[str], writer: LineWriter, reader: LineReader,
        ended: Callable[[], Awaitable[HostError]],
    ) -> None:
        """``ended`` says why the command stopped answering (its status, its stderr)."""
        self.host = host
        self.argv = tuple(argv)
        self._writer = writer
        self._reader = reader
        self._ended = ended

    async def ask(self, line: str, *, timeout: float = 10.0) -> str:
        """Send ``line`` and return the command's answer, without its newline.

        :class:`HostError` when the command has ended or gives no whole line
        within ``timeout`` seconds.
        """
        if "\n" in line:
            raise ValueError(f"one line at a time: {line!r}")
        try:
            self._writer.write(line.encode() + b"\n")
        except OSError:
            raise await self._ended() from None
        try:
            async with asyncio.timeout(timeout):
                answer = await self._reader.readline()
        except TimeoutError:
            raise HostError(f"{self.argv[0]} on {self.host} did not answer within "
                            f"{timeout:g} s", argv=self.argv) from None
        if not answer.endswith(b"\n"):
            raise await self._ended()
        return answer[:-1].decode("utf-8", errors="replace")


class Host(abc.ABC):
    """A machine that runs commands and holds files (see module docstring)."""

    name: str
    is_controller_machine: bool = False
    """True for the machine migrator runs on: a unix socket migrator listens on is one
    this host's processes can connect to, at the same path."""

    @abc.abstractmethod
    async def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, stdin: bytes | None = None
    ) -> CommandResult:
        """Run ``argv`` to completion and return its result.

        A non-zero status is not raised; a command not found or still running after
        ``timeout`` seconds (it is then killed) raises :class:`HostError`.
        """

    @abc.abstractmethod
    async def start(
        self, argv: Sequence[str], *, stdout: Path, stderr: Path, cwd: Path | None = None
    ) -> HostProcess:
        """Start ``argv`` in the background, output into files on the host.

        The process must die with the controller: it may never outlive migrator.
        """

    @abc.abstractmethod
    def exchange_lines(self, argv: Sequence[str]) -> AbstractAsyncContextManager[LineExchange]:
        """Run ``argv`` for the block as a dialogue (see :class:`LineExchange`).

        The command must answer every line with one line, flushed at once; its
        stderr is only read for the error once it stops answering, so it should
        stay within a pipe's worth (64 KiB).  On exit its stdin is closed, and
        whatever of it still runs a moment later (its children too) is killed.
        A command not found raises :class:`HostError`.
        """

    @abc.abstractmethod
    async def read_file(self, path: Path) -> bytes:
        """Read a whole file; FileNotFoundError when it does not exist."""

    @abc.abstractmethod
    async def write_file(self, path: Path, data: bytes) -> None:
        """Write (truncate) a file, e.g. a sysfs knob."""

    @abc.abstractmethod
    async def exists(self, path: Path) -> bool:
        """Whether ``path`` exists on the host."""

    @abc.abstractmethod
    async def make_private_dir(self, path: Path) -> None:
        """Create ``path`` (and parents) with the leaf at mode 0700."""

    @abc.abstractmethod
    async def remove_tree(self, path: Path) -> None:
        """Remove a file or directory tree; a missing path is not an error."""

    @abc.abstractmethod
    async def get(self, remote: Path, local: Path) -> None:
        """Copy a file from the host to the controller (FileNotFoundError if it is absent)."""

    @abc.abstractmethod
    async def put(self, local: Path, remote: Path) -> None:
        """Copy a file from the controller to the host, replacing ``remote``."""

    @abc.abstractmethod
    def forward_unix_socket(self, path: Path) -> AbstractAsyncContextManager[Path]:
        """Make a unix socket on the host reachable here; yields the local path to use."""

    async def read_text(self, path: Path) -> str:
        """Read a whole file as UTF-8 text."""
        return (await self.read_file(path)).decode("utf-8", errors="replace")

    async def sever(self) -> None:
        """Drop the connection to the host abruptly, as a network failure would (fault
        injection); only a host reached over a connection can.  The default refuses."""
        raise HostError(f"{self.name}: a connection-loss fault needs an SSH host")

    @contextlib.asynccontextmanager
    async def temp_dir(self, prefix: str = "migrator-") -> AsyncIterator[Path]:
        """A new private (0700) directory on the host, removed with its content on exit."""
        # mktemp(1) picks an unused name and creates it 0700 in one step, on any host.
        made = (await self.run(["mktemp", "-d", "-t", f"{prefix}XXXXXXXX"])).check(
            f"creating a temporary directory on {self.name}")
        path = Path(made.stdout.strip())
        try:
            yield path
        finally:
            await self.remove_tree(path)
