"""QMP to one QEMU, spoken in the migration vocabulary.

Wraps :class:`qemu.qmp.QMPClient`: every command has a deadline, error replies
become :class:`QmpCommandError`, and every event QEMU sends is stamped with the
host wall clock on arrival and appended to an ``events.jsonl`` raw artifact the
moment it arrives.  Callers wait for events (``wait_for_event``) instead of
polling state; the event history is kept because the interesting events of a
migration are few and the waiter may arrive after the event did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from migrator.errors import QmpCommandError, QmpConnectionLost, QmpTimeout

__all__ = ["EventPredicate", "EventRecord", "Monitor", "status_in"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventRecord:
    """A QMP event with QEMU's own timestamp and the host time it arrived here."""

    name: str
    data: Mapping[str, Any]
    qemu_ns: int
    host_ns: int

    def to_json(self, side: str) -> str:
        """One JSONL line for the raw events artifact."""
        return json.dumps(
            {"side": side, "event": self.name, "data": dict(self.data),
             "qemu_ns": self.qemu_ns, "host_ns": self.host_ns},
            separators=(",", ":"),
        )


EventPredicate = Callable[[EventRecord], bool]


def status_in(*statuses: str) -> EventPredicate:
    """Matches a ``MIGRATION`` event whose status is one of ``statuses``."""

    def predicate(record: EventRecord) -> bool:
        return record.data.get("status") in statuses

    return predicate


def _not_a_cancelled_accept(record: logging.LogRecord) -> bool:
    """False for qemu.qmp's ERROR record of an :meth:`Monitor.accept` that was cancelled.

    An accept is cancelled on purpose, when QEMU exits before connecting or never
    connects; the launch error then says what happened, without a CancelledError line.
    """
    return not (record.levelno >= logging.ERROR
                and record.getMessage().endswith("CancelledError"))


class Monitor:
    """A QMP session with one QEMU (see module docstring)."""

    def __init__(self, name: str, events_log: Path) -> None:
        self.name = name
        self._client = QMPClient(name)
        self._events_log_path = events_log
        self._events_log: IO[str] | None = None
        self._listener = EventListener()
        self._history: list[EventRecord] = []
        self._arrived = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._last_migrate_reply: tuple[float, dict[str, Any]] | None = None

    @property
    def events(self) -> list[EventRecord]:
        """Every event received so far, oldest first."""
        return list(self._history)

    async def connect(self, socket_path: Path) -> None:
        """Connect, negotiate capabilities and start recording events."""
        # Register before connecting so not even the first event can be missed.
        self._client.register_listener(self._listener)
        await self._client.connect(str(socket_path))
        await self._start_recording()

    async def listen(self, socket_path: Path) -> None:
        """Listen on ``socket_path`` for QEMU to connect (then :meth:`accept`)."""
        self._client.logger.addFilter(_not_a_cancelled_accept)
        self._client.register_listener(self._listener)
        await self._client.start_server(str(socket_path))

    async def accept(self) -> None:
        """Wait for QEMU's connection, negotiate capabilities and start recording events."""
        await self._client.accept()
        await self._start_recording()

    async def _start_recording(self) -> None:
        self._events_log = await asyncio.to_thread(
            open, self._events_log_path, "a", encoding="utf-8"
        )
        self._pump = asyncio.create_task(self._record_events(), name=f"{self.name}-events")

    async def close(self) -> None:
        """Stop recording and disconnect (or stop listening); safe to call more than once."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        with contextlib.suppress(Exception):
            await self._client.disconnect()
        with contextlib.suppress(Exception):
            self._client.remove_listener(self._listener)
        if self._events_log is not None:
            self._events_log.close()
            self._events_log = None

    async def _record_events(self) -> None:
        async for message in self._listener:
            host_ns = time.time_ns()
            # qemu.qmp's Message is a Mapping[str, object]; QMP events are JSON objects.
            raw = cast(dict[str, Any], message)
            stamp: dict[str, Any] = raw.get("timestamp", {})
            qemu_ns = int(stamp.get("seconds", 0)) * 1_000_000_000 + int(
                stamp.get("microseconds", 0)
            ) * 1000
            data: dict[str, Any] = raw.get("data", {})
            self.record_event(EventRecord(str(raw["event"]), dict(data), qemu_ns, host_ns))

    def record_event(self, record: EventRecord) -> None:
        """Keep an arrived event: history, the raw events artifact, and wake the waiters."""
        self._history.append(record)
        if self._events_log is not None:
            self._events_log.write(record.to_json(self.name) + "\n")
            self._events_log.flush()
        log.debug("%s: event %s %s", self.name, record.name, record.data)
        self._arrived.set()

    @property
    def event_count(self) -> int:
        """How many events have arrived so far (a ``since`` mark for :meth:`wait_for_event`)."""
        return len(self._history)

    async def wait_for_event(
        self, name: str, predicate: EventPredicate | None = None, *, timeout: float | None = None,
        since: int = 0,
    ) -> EventRecord:
        """Return the first event named ``name`` matching ``predicate`` (past or future).

        ``since`` (an :attr:`event_count`) skips the events that had arrived before it.
        """
        async with asyncio.timeout(timeout):
            seen = since
            while True:
                for record in self._history[seen:]:
                    if record.name == name and (predicate is None or predicate(record)):
                        return record
                seen = len(self._history)
                self._arrived.clear()
                await self._arrived.wait()

    def last_event_index(self, name: str, predicate: EventPredicate | None = None) -> int | None:
        """Index in :attr:`events` of the latest event ``name`` matching ``predicate``, or None."""
        for index in range(len(self._history) - 1, -1, -1):
            record = self._history[index]
            if record.name == name and (predicate is None or predicate(record)):
                return index
        return None

    def find_events(self, name: str) -> list[EventRecord]:
        """Every recorded event with this name."""
        return [record for record in self._history if record.name == name]

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *,
        timeout: float = 30.0, oob: bool = False,
    ) -> Any:
        """Run a QMP command; errors and timeouts become migrator errors."""
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(command, arguments, oob=oob)
        except ExecuteError as error:
            raise QmpCommandError(
                self.name, command, error.error_class, error.error.error.desc
            ) from error
        except TimeoutError:
            raise QmpTimeout(self.name, command, timeout) from None
        except (QMPError, ConnectionError, EOFError) as error:
            raise QmpConnectionLost(
                f"QMP connection lost during {command} ({type(error).__name__})", name=self.name
            ) from error

    # The migration vocabulary (qapi/migration.json).

    async def query_version(self) -> str:
        """QEMU version as ``major.minor.micro``."""
        reply = await self.execute("query-version")
        q = reply["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']}"

    async def query_status(self) -> dict[str, Any]:
        """``query-status``: running flag and runstate."""
        reply: dict[str, Any] = await self.execute("query-status")
        return reply

    async def vcpu_threads(self) -> dict[int, int]:
        """``query-cpus-fast``: each vCPU's index and the host thread id running it."""
        reply = await self.execute("query-cpus-fast")
        return {int(cpu["cpu-index"]): int(cpu["thread-id"]) for cpu in reply}

    async def query_migrate(self, *, timeout: float = 30.0) -> dict[str, Any]:
        """``query-migrate``, raw (also kept for :meth:`fresh_query_migrate`)."""
        reply: dict[str, Any] = await self.execute("query-migrate", timeout=timeout)
        self._last_migrate_reply = (time.monotonic(), reply)
        return reply

    async def fresh_query_migrate(self, max_age: float, *, timeout: float) -> dict[str, Any]:
        """The last ``query-migrate`` reply if it is under ``max_age`` s old, else a new one.

        For a second reader beside the sampler: the sampler's replies serve both.
        """
        if self._last_migrate_reply is not None:
            at, reply = self._last_migrate_reply
            if time.monotonic() - at < max_age:
                return reply
        return await self.query_migrate(timeout=timeout)

    async def migrate_capabilities(self) -> dict[str, bool]:
        """Every migration capability this QEMU knows, with its current state."""
        reply = await self.execute("query-migrate-capabilities")
        return {item["capability"]: bool(item["state"]) for item in reply}

    async def set_capabilities(self, capabilities: Mapping[str, bool]) -> None:
        """``migrate-set-capabilities``."""
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in capabilities.items()]},
        )

    async def set_parameters(self, parameters: Mapping[str, object]) -> None:
        """``migrate-set-parameters`` (no-op when empty)."""
        if parameters:
            await self.execute("migrate-set-parameters", dict(parameters))

    async def migrate_incoming(self, uri: str) -> None:
        """Start listening for the incoming migration (destination, ``-incoming defer``)."""
        await self.execute("migrate-incoming", {"uri": uri})

    async def migrate(self, uri: str) -> None:
        """Start the outgoing migration (source)."""
        await self.execute("migrate", {"uri": uri})

    async def start_postcopy(self) -> None:
        """``migrate-start-postcopy``: switch to post-copy as soon as QEMU can."""
        await self.execute("migrate-start-postcopy")

    async def migrate_pause(self, *, timeout: float = 30.0) -> None:
        """``migrate-pause`` (post-copy only), out-of-band: it must pass a busy main loop."""
        await self.execute("migrate-pause", oob=True, timeout=timeout)

    async def migrate_recover(self, uri: str, *, timeout: float = 30.0) -> None:
        """``migrate-recover`` on a paused destination (out-of-band): listen on ``uri``."""
        await self.execute("migrate-recover", {"uri": uri}, oob=True, timeout=timeout)

    async def migrate_resume(self, uri: str, *, timeout: float = 30.0) -> None:
        """``migrate`` with ``resume``: a paused source reconnects to ``uri``."""
        await self.execute("migrate", {"uri": uri, "resume": True}, timeout=timeout)

    def migration_status(self) -> str | None:
        """The last MIGRATION status this QEMU announced (None before any)."""
        events = self.find_events("MIGRATION")
        return str(events[-1].data.get("status")) if events else None

    async def migrate_cancel(self) -> None:
        """``migrate_cancel``."""
        await self.execute("migrate_cancel")

    async def hmp(self, command_line: str, *, timeout: float = 30.0) -> str:
        """A human-monitor command's text output (e.g. ``info ramblock``)."""
        reply: str = await self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
        return reply

    async def quit(self, *, timeout: float = 5.0) -> None:
        """Ask QEMU to exit; the connection dropping before the reply is success."""
        with contextlib.suppress(Exception):
            await self.execute("quit", timeout=timeout)
