"""The controller's end of one QEMU's serial line: record, parse, wait, send.

QEMU exposes the guest's ttyS0 as a listening Unix socket (see
:func:`serial_chardev_args`).  :class:`GuestConsole` connects to it, stamps
every line with the host wall clock on arrival, appends it to a JSONL raw
artifact, parses it with :func:`~migrator.guest.protocol.parse_line`, and lets
callers wait for events and send commands.  There is one console per QEMU:
after a migration the guest's output comes out of the destination's.

Host arrival times matter as much as guest times: the guest clock stops while
the VM is stopped, so only ``host_ns`` shows a freeze (docs/qemu-notes.md,
"Other things that surprised us").

Raw artifact format, one JSON object per line::

    {"host_ns": 1764093164005123456, "side": "src", "line": "@MIG {\\"t\\":\\"hb\\",...}"}
    {"host_ns": 1764093164105123456, "side": "src", "line": "verify", "sent": true}

Several consoles may append to the same plain file: each record is one
``O_APPEND`` write.  With ``compress`` a console has a zstd stream of its own
instead (``console.jsonl.zst``, see :class:`~migrator.rundir.JsonlWriter`).
:func:`read_console_log` re-parses either offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload

from migrator.errors import ArtifactError, GuestError
from migrator.guest.protocol import ClockStep, GuestEvent, Malformed, ProbeError, parse_line
from migrator.rundir import JsonlWriter, open_artifact_text

__all__ = ["ConsoleLine", "GuestConsole", "Side", "read_console_log", "serial_chardev_args"]

logger = logging.getLogger(__name__)

Side = Literal["src", "dst"]
E = TypeVar("E")

#: Longest line kept whole; a guest spewing without newlines is cut here.
MAX_LINE = 64 * 1024
#: Events kept per kind for wait_for; heartbeats at 10/s cover ~7 minutes.
HISTORY = 4096
#: Raw lines kept for error messages.
TAIL_LINES = 12


def serial_chardev_args(sock: Path, log: Path, *, chardev_id: str = "ser0") -> list[str]:
    """QEMU arguments putting the first serial port on a Unix socket plus a log file.

    ``server=on,wait=off``: QEMU listens and starts the guest without waiting
    for the console; ``logfile`` keeps QEMU's own copy of everything the guest
    wrote, including output while no console was connected.
    """

    def escape(path: Path) -> str:
        # QEMU option syntax: a literal comma in a value is written twice.
        return str(path).replace(",", ",,")

    return [
        "-chardev",
        f"socket,id={chardev_id},path={escape(sock)},server=on,wait=off,logfile={escape(log)}",
        "-serial",
        f"chardev:{chardev_id}",
    ]


@dataclass(frozen=True)
class ConsoleLine(Generic[E]):
    """One line received from (or sent to) the guest, with its host arrival time."""

    #: Host wall clock (``time.time_ns()``) when the line's last byte arrived.
    host_ns: int
    side: str
    #: The line without its line ending.
    line: str
    #: The decoded probe event; None for non-probe text and for sent lines.
    event: E
    #: Live: arrival index among this console's probe events (what :meth:`GuestConsole.mark`
    #: counts).  From :func:`read_console_log`: the record's index in the file.
    seq: int
    #: True for a command the controller sent.
    sent: bool = False


class GuestConsole:
    """Async context manager owning the connection to one QEMU's serial socket.

    ::

        async with GuestConsole(sock, run_dir / "console.jsonl", side="src") as console:
            await console.wait_for("ready", timeout=60)
            mark = await console.send("verify")
            result = await console.wait_for(Verify, timeout=60, since=mark)

    Survives QEMU closing the socket: the reader stops, everything received
    stays available, and waits that can no longer be satisfied fail at once.
    With ``compress`` the record goes to ``jsonl`` + ``.zst`` (see the module docstring).
    """

    def __init__(
        self, sock: Path, jsonl: Path, *, side: Side, connect_timeout: float = 10.0,
        compress: bool = False,
    ) -> None:
        self.sock = sock
        self.jsonl = jsonl
        self.compress = compress
        self.side: Side = side
        self.connect_timeout = connect_timeout
        self._log = logger.getChild(side)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._compressed: JsonlWriter | None = None
        # One condition per event kind that somebody waits for: a heartbeat every few
        # ms must not wake the tasks waiting for a verify line or a probe error.
        self._arrived: dict[str, asyncio.Condition] = {}
        self._by_kind: dict[str, deque[ConsoleLine[GuestEvent]]] = {}
        self._cursor: dict[str, int] = {}
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._seq = 0
        self._closed = False
        self._failure: BaseException | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> GuestConsole:
        if self.compress:
            self._compressed = JsonlWriter(self.jsonl, compress=True)
        else:
            self._fd = os.open(self.jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o644)
        try:
            self._reader, self._writer = await self._connect()
        except BaseException:
            self._close_record()
            raise
        self._task = asyncio.create_task(self._read_loop(), name=f"console-{self.side}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
            # The peer may already be gone; closing is all that is left to do.
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._close_record()

    def _close_record(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._compressed is not None:
            self._compressed.close()
            self._compressed = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # QEMU creates the socket during start-up; until then there is nothing
        # to connect to, so retry briefly instead of racing the launch.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            try:
                return await asyncio.open_unix_connection(str(self.sock), limit=MAX_LINE)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if loop.time() >= deadline:
                    raise GuestError(
                        f"{self.side}: serial socket {self.sock} not accepting connections "
                        f"after {self.connect_timeout:g}s ({exc.strerror}); did QEMU start "
                        f"with {' '.join(serial_chardev_args(self.sock, Path('LOG')))}?"
                    ) from exc
                await asyncio.sleep(0.05)
            except OSError as exc:
                raise GuestError(f"{self.side}: cannot connect to {self.sock}: {exc}") from exc

    # ----------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        assert self._reader is not None
        pending = bytearray()
        try:
            while True:
                try:
                    chunk = await self._reader.read(MAX_LINE)
                except ConnectionError as exc:
                    # QEMU killed hard resets the connection; that is an EOF too.
                    self._log.debug("serial connection ended: %s", exc)
                    chunk = b""
                host_ns = time.time_ns()
                if not chunk:
                    break
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    await self._receive(host_ns, bytes(pending[:end]))
                    del pending[: end + 1]
                if len(pending) >= MAX_LINE:
                    await self._receive(host_ns, bytes(pending))
                    pending.clear()
            if pending:
                await self._receive(time.time_ns(), bytes(pending))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failure = exc
            self._log.exception("console reader failed")
        finally:
            self._closed = True
            # Wake every waiter: what they wait for can no longer arrive.
            for arrived in self._arrived.values():
                async with arrived:
                    arrived.notify_all()

    async def _receive(self, host_ns: int, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        self._record(host_ns, text, sent=False)
        self._tail.append(text)
        event = parse_line(text)
        if event is None:
            if text.strip():
                self._log.debug("guest: %s", text)
            return
        if isinstance(event, Malformed):
            self._log.warning("malformed probe line (%s): %r", event.reason, text)
        elif isinstance(event, ProbeError):
            self._log.warning("guest reported an error: %s", event.msg)
        elif isinstance(event, ClockStep):
            self._log.warning("guest clock went back %.3f ms on vCPU %d (not a stall)",
                              event.back_ns / 1e6, event.cpu)
        line: ConsoleLine[GuestEvent] = ConsoleLine(
            host_ns=host_ns, side=self.side, line=text, event=event, seq=self._seq
        )
        self._seq += 1
        self._by_kind.setdefault(event.kind, deque(maxlen=HISTORY)).append(line)
        if (arrived := self._arrived.get(event.kind)) is not None:
            async with arrived:
                arrived.notify_all()

    def _record(self, host_ns: int, text: str, *, sent: bool) -> None:
        record: dict[str, Any] = {"host_ns": host_ns, "side": self.side, "line": text}
        if sent:
            record["sent"] = True
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._fd is not None:
            # One write per record: the file is a raw artifact that must be
            # complete up to the last line even if migrator dies right after.
            os.write(self._fd, line.encode())
        elif self._compressed is not None:
            self._compressed.append(line)

    # ----------------------------------------------------------------- API

    @property
    def closed(self) -> bool:
        """True once QEMU closed the serial socket (or the console failed)."""
        return self._closed

    def mark(self) -> int:
        """Return a position: ``wait_for(..., since=mark)`` only sees later events."""
        return self._seq

    def last(self, kind: str) -> ConsoleLine[GuestEvent] | None:
        """Return the most recent event of ``kind`` (e.g. ``"hb"``), if any."""
        history = self._by_kind.get(kind)
        return history[-1] if history else None

    def received(self, kind: str) -> tuple[ConsoleLine[GuestEvent], ...]:
        """Return the retained events of ``kind`` (the newest ``HISTORY``), oldest first."""
        return tuple(self._by_kind.get(kind, ()))

    @overload
    async def wait_for(
        self, kind: type[E], timeout: float, *, since: int | None = None
    ) -> ConsoleLine[E]: ...

    @overload
    async def wait_for(
        self, kind: str, timeout: float, *, since: int | None = None
    ) -> ConsoleLine[GuestEvent]: ...

    async def wait_for(
        self, kind: str | type[Any], timeout: float, *, since: int | None = None
    ) -> ConsoleLine[Any]:
        """Wait up to ``timeout`` s for an event of ``kind`` (a ``t`` value or event class).

        Without ``since``, returns the oldest event of that kind not yet
        returned by an earlier ``wait_for`` (so the boot line that arrived
        before the call is still found); with ``since`` (from :meth:`mark` or
        :meth:`send`), the first one at or after that position.  Raises
        :class:`GuestError` on timeout or when the socket closed first.
        """
        name: str = kind if isinstance(kind, str) else kind.kind
        start = self._cursor.get(name, 0) if since is None else since
        try:
            arrived = self._arrived.setdefault(name, asyncio.Condition())
            async with asyncio.timeout(timeout), arrived:
                while True:
                    for line in self._by_kind.get(name, ()):
                        if line.seq >= start:
                            self._cursor[name] = line.seq + 1
                            return line
                    if self._closed:
                        raise self._gone(f"closed before a {name!r} line arrived")
                    await arrived.wait()
        except TimeoutError as exc:
            raise self._gone(f"no {name!r} line within {timeout:g}s") from exc

    async def send(self, command: str) -> int:
        """Send one command line (e.g. ``"verify"``); return :meth:`mark` from before it."""
        if "\n" in command or "\r" in command:
            raise ValueError(f"a command is one line: {command!r}")
        if self._writer is None or self._closed:
            raise self._gone(f"closed; cannot send {command!r}")
        mark = self.mark()
        self._record(time.time_ns(), command, sent=True)
        self._writer.write(command.encode() + b"\n")
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise self._gone(f"lost while sending {command!r}") from exc
        return mark

    def _gone(self, what: str) -> GuestError:
        tail = " | ".join(line.strip() for line in self._tail if line.strip())
        error = GuestError(
            f"{self.side} console {what}" + (f"; last output: {tail[-600:]}" if tail else "")
        )
        error.__cause__ = self._failure
        return error


def read_console_log(path: Path) -> Iterator[ConsoleLine[GuestEvent | None]]:
    """Re-read a console JSONL artifact, parsing each received line again.

    A final line without a newline (migrator killed mid-write) is skipped;
    any other undecodable record raises :class:`ArtifactError`.
    """
    with open_artifact_text(path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith("\n"):
                return
            try:
                record = json.loads(raw)
                host_ns, side, text = record["host_ns"], record["side"], record["line"]
                sent = bool(record.get("sent", False))
            except (ValueError, KeyError, TypeError) as exc:
                raise ArtifactError(f"{path}:{number}: not a console record: {exc}") from exc
            yield ConsoleLine(
                host_ns=host_ns,
                side=side,
                line=text,
                event=None if sent else parse_line(text),
                seq=number - 1,
                sent=sent,
            )
