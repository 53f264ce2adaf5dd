"""Post-copy recovery: notice a broken stream, pause both sides, mend it, retry with backoff.

After the switch the guest's memory lives on two hosts, so a broken migration
stream must be mended rather than abandoned.  QEMU supports that (since 3.0):
both sides sit in ``postcopy-paused`` keeping everything they have; the
destination listens again (``migrate-recover``, out-of-band, because its main
loop may be stuck behind a vCPU waiting for a page) and the source reconnects
(``migrate`` with ``resume``), after which pages flow again.

QEMU pauses by itself when a socket fails.  A dead link often does not fail a
socket (TCP retransmits for minutes), so a stall watchdog stands in: post-copy
with pages left to send and no byte moving on the source for
``stall_timeout_s`` is a broken stream, and both sides are paused with
``migrate-pause``.

Every step is a timeline mark (the driver's ``mark``, host wall clock), and the
QEMUs' own MIGRATION events are in ``events.jsonl``: each pause and recovery
can be recomputed offline (:mod:`migrator.metrics.recovery`).

Differences between QEMU generations handled here: QEMU 7.2 reports a failed
resume connection only in its stderr (the source stays ``postcopy-paused``
without a new event), newer QEMUs pass through ``postcopy-recover-setup`` and
announce ``postcopy-paused`` again.  So an attempt succeeds when
``postcopy-recover`` (or ``postcopy-active``) arrives and fails when
``postcopy-paused`` arrives or nothing does within :data:`CONNECT_WAIT_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from migrator.config.models import RecoverySpec
from migrator.errors import MigrationError, QmpCommandError, QmpTimeout
from migrator.qemu.monitor import Monitor, status_in

__all__ = ["CONNECT_WAIT_S", "PostcopyRecovery"]

log = logging.getLogger(__name__)

# How long one resume attempt may take to connect before it counts as failed.
CONNECT_WAIT_S = 2.0
# How often the watchdog reads the source's counters.
WATCH_INTERVAL_S = 0.2
# A side that has not paused this long after the other did is paused by migrator.
PARTNER_PAUSE_WAIT_S = 1.0
# How long a QMP command may take while QEMU is wedged (e.g. SIGSTOPped).
QMP_PATIENCE_S = 2.0


class Mark(Protocol):
    """The driver's timeline recorder."""

    def __call__(self, what: str, **details: Any) -> int: ...


class PostcopyRecovery:
    """Watches one post-copy migration and recovers each pause (see module docstring)."""

    def __init__(
        self, source: Monitor, destination: Monitor, spec: RecoverySpec,
        listen_uri: Callable[[], Awaitable[str]], mark: Mark,
    ) -> None:
        self.source = source
        self.destination = destination
        self.spec = spec
        self._listen_uri = listen_uri
        self._mark = mark
        self.recoveries = 0

    async def watch(self) -> None:
        """Run beside the migration from the switch on; raises when a pause cannot be mended.

        Never returns by itself: the driver cancels it once both sides are done.
        """
        await self.source.wait_for_event("MIGRATION", status_in("postcopy-active"))
        while True:
            await self._until_paused()
            if not self.spec.auto:
                self._mark("recovery-disabled")
                raise MigrationError(
                    "post-copy paused and migration.recovery.auto = false: not recovering")
            await self._recover()
            self.recoveries += 1

    async def _until_paused(self) -> None:
        """Wait for a pause (QEMU's own, or the watchdog's); return once both sides paused.

        A side's pause counts from the moment it last entered post-copy, so a pause
        that arrived before this wait began (right after the switch or the last
        recovery) is not missed.
        """
        source_since, destination_since = _since_active(self.source), _since_active(
            self.destination)
        paused = status_in("postcopy-paused")
        source_paused = asyncio.create_task(
            self.source.wait_for_event("MIGRATION", paused, since=source_since))
        destination_paused = asyncio.create_task(
            self.destination.wait_for_event("MIGRATION", paused, since=destination_since))
        watchdog = asyncio.create_task(self._stalled())
        try:
            await asyncio.wait({source_paused, destination_paused, watchdog},
                               return_when=asyncio.FIRST_COMPLETED)
            if watchdog.done():
                stalled_s = watchdog.result()
                self._mark("stream-stalled", seconds=round(stalled_s, 3),
                           stall_timeout_s=self.spec.stall_timeout_s)
            else:
                first = "src" if source_paused.done() else "dst"
                self._mark("postcopy-paused", side=first, by="qemu")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PARTNER_PAUSE_WAIT_S):
                        await asyncio.wait({source_paused, destination_paused},
                                           return_when=asyncio.ALL_COMPLETED)
            for monitor, task in ((self.source, source_paused),
                                  (self.destination, destination_paused)):
                if not task.done():
                    await self._pause(monitor)
            async with asyncio.timeout(self.spec.deadline_s):
                await asyncio.gather(source_paused, destination_paused)
        except TimeoutError:
            raise MigrationError(
                f"post-copy broke but the sides did not both pause within "
                f"{self.spec.deadline_s:g} s (migration.recovery.deadline_s)") from None
        finally:
            watchdog.cancel()
            source_paused.cancel()
            destination_paused.cancel()
            await asyncio.gather(watchdog, source_paused, destination_paused,
                                 return_exceptions=True)
        self._mark("both-paused")

    async def _pause(self, monitor: Monitor) -> None:
        """``migrate-pause`` on one side; a QEMU too wedged to answer is given time."""
        self._mark("migrate-pause", side=monitor.name)
        try:
            await monitor.migrate_pause(timeout=QMP_PATIENCE_S)
        except QmpTimeout:
            # A stopped QEMU answers once it runs again; its pause event is awaited.
            log.info("%s: migrate-pause not answered yet", monitor.name)
        except QmpCommandError as error:
            # It paused by itself between the check and the command.
            log.info("%s: migrate-pause refused: %s", monitor.name, error.desc)

    async def _stalled(self) -> float:
        """Return (seconds) once the source has sent nothing for ``stall_timeout_s``.

        Only while it reports post-copy with pages left: with nothing left to send,
        the source idles legitimately until the destination reports it is done.
        """
        progress = time.monotonic()
        last: tuple[Any, Any] | None = None
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                # The sampler's replies when fresh: no second stream of queries.
                reply = await self.source.fresh_query_migrate(WATCH_INTERVAL_S,
                                                             timeout=QMP_PATIENCE_S)
            except QmpTimeout:
                reply = None  # a wedged source moves nothing
            now = time.monotonic()
            if reply is not None:
                ram = reply.get("ram", {})
                counters = (ram.get("transferred"), ram.get("remaining"))
                if (reply.get("status") != "postcopy-active" or not ram.get("remaining")
                        or counters != last):
                    progress, last = now, counters
            if now - progress >= self.spec.stall_timeout_s:
                return now - progress

    async def _back_off(self, delay: float, deadline: float) -> float:
        """Wait ``delay`` s (never past ``deadline``); returns the next, doubled delay."""
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        return min(delay * 2, self.spec.backoff_max_s)

    async def _recover(self) -> None:
        """Re-establish the stream, retrying with backoff until the deadline.

        The destination listens again (``migrate-recover``) whenever it is paused
        and not listening: at first, and after a handshake that broke again.
        """
        began = time.monotonic()
        deadline = began + self.spec.deadline_s
        delay = self.spec.backoff_initial_s
        attempt = 0
        last_error = "no attempt made"
        listening_since: int | None = None
        uri = ""
        while time.monotonic() < deadline:
            if listening_since is None or self._paused_since(self.destination, listening_since):
                uri = await self._listen_uri()
                try:
                    await self.destination.migrate_recover(uri, timeout=QMP_PATIENCE_S)
                except (QmpCommandError, QmpTimeout) as error:
                    last_error = f"the destination could not listen on {uri}: {error}"
                    self._mark("recover-failed", attempt=attempt, error=last_error)
                    delay = await self._back_off(delay, deadline)
                    continue
                listening_since = self.destination.event_count
                self._mark("recover-listening", uri=uri)
            attempt += 1
            self._mark("recover-attempt", attempt=attempt, uri=uri)
            since = self.source.event_count
            failed = await self._attempt(uri, min(CONNECT_WAIT_S, deadline - time.monotonic()))
            if failed is None:
                failed = await self._resumed(since, listening_since, deadline)
            if failed is None:
                self._mark("recovered", attempt=attempt,
                           seconds=round(time.monotonic() - began, 3))
                return
            last_error = failed
            self._mark("recover-failed", attempt=attempt, error=failed)
            delay = await self._back_off(delay, deadline)
        raise MigrationError(
            f"post-copy recovery gave up after {self.spec.deadline_s:g} s "
            f"(migration.recovery.deadline_s) and {attempt} attempts; last: {last_error}")

    @staticmethod
    def _paused_since(monitor: Monitor, since: int) -> bool:
        """Whether ``monitor`` announced ``postcopy-paused`` after event ``since``."""
        index = monitor.last_event_index("MIGRATION", status_in("postcopy-paused"))
        return index is not None and index >= since

    async def _attempt(self, uri: str, wait_s: float) -> str | None:
        """One ``migrate resume``; None when the source reconnected, else why not."""
        since = self.source.event_count
        outcome = status_in("postcopy-recover", "postcopy-active", "postcopy-paused", "failed")
        try:
            await self.source.migrate_resume(uri, timeout=QMP_PATIENCE_S)
        except QmpTimeout:
            return f"the source did not answer migrate within {QMP_PATIENCE_S:g} s"
        except QmpCommandError as error:
            if "no paused migration" not in error.desc:
                return error.desc
            # An earlier attempt's connection got through after all.
        try:
            event = await self.source.wait_for_event("MIGRATION", outcome, since=since,
                                                     timeout=max(wait_s, 0.1))
        except TimeoutError:
            if self.source.migration_status() in ("postcopy-recover", "postcopy-active"):
                return None
            return f"no connection to {uri} within {wait_s:.1f} s"
        status = event.data.get("status")
        if status == "failed":
            raise MigrationError("the source gave the migration up while recovering")
        if status == "postcopy-paused":
            return f"the source could not reconnect to {uri}"
        return None

    async def _resumed(self, source_since: int, destination_since: int, deadline: float,
                       ) -> str | None:
        """After a reconnect: None once both sides run post-copy again (or finished).

        Otherwise why not: the stream broke again during the handshake (a side
        paused again), to be retried like any failed attempt.
        """
        ended = status_in("postcopy-active", "completed", "postcopy-paused", "failed")
        for monitor, since in ((self.source, source_since),
                               (self.destination, destination_since)):
            try:
                event = await monitor.wait_for_event(
                    "MIGRATION", ended, since=since,
                    timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                return (f"{monitor.name} reconnected but did not resume post-copy before "
                        "migration.recovery.deadline_s")
            status = event.data.get("status")
            if status == "failed":
                raise MigrationError(f"{monitor.name} gave the migration up while recovering")
            if status == "postcopy-paused":
                return f"the stream broke again during the recovery handshake ({monitor.name})"
        return None


def _since_active(monitor: Monitor) -> int:
    """The event count just after ``monitor`` last announced ``postcopy-active`` (0 if never)."""
    index = monitor.last_event_index("MIGRATION", status_in("postcopy-active"))
    return 0 if index is None else index + 1
