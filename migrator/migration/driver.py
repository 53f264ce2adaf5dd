"""Drives one migration over QMP, from capabilities to completion.

Sequence (cf. QEMU's tests/qtest/migration/framework.c): set capabilities and
parameters on both sides, ``migrate-incoming`` on the destination, ``migrate``
on the source, apply the switchover policy, then wait for the terminal
``MIGRATION`` event on both sides.  State is followed through events, never by
polling.  Every step is written to the run's timeline with the host wall clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from migrator.aio import first_error
from migrator.config.models import (
    AfterPasses,
    AfterSeconds,
    Immediately,
    MigrationSpec,
    PauseSourceAfterPasses,
)
from migrator.errors import MigrationError, MigrationTimeout, QmpCommandError
from migrator.migration.plan import MigrationPlan
from migrator.migration.recovery import PostcopyRecovery
from migrator.migration.tls import tls_hint
from migrator.qemu.monitor import EventRecord, Monitor, status_in
from migrator.rundir import JsonlWriter, timeline_record

__all__ = ["MigrationDriver", "MigrationResult"]

log = logging.getLogger(__name__)

SOURCE_TERMINAL = ("completed", "failed", "cancelled")
DESTINATION_TERMINAL = ("completed", "failed")


@dataclass(frozen=True)
class MigrationResult:
    """How the migration ended, in QEMU's own words."""

    source_status: str
    destination_status: str
    postcopy_requested_ns: int | None
    postcopy_skipped_reason: str | None
    recoveries: int = 0


async def _settings(monitor: Monitor) -> dict[str, Any]:
    """A QEMU's migration capabilities that are on, and its migration parameters."""
    capabilities, parameters = await asyncio.gather(
        monitor.migrate_capabilities(), monitor.execute("query-migrate-parameters"))
    return {"capabilities": sorted(name for name, on in capabilities.items() if on),
            "parameters": parameters}


class MigrationDriver:
    """One migration between two connected monitors."""

    def __init__(
        self, source: Monitor, destination: Monitor, plan: MigrationPlan, spec: MigrationSpec,
        timeline: JsonlWriter, listen_uri: Callable[[], Awaitable[str]],
    ) -> None:
        self.source = source
        self.destination = destination
        self.plan = plan
        self.spec = spec
        self.timeline = timeline
        #: Set once a cancel rule sent migrate_cancel: the destination QEMU then ends on
        #: its own (its incoming stream is cut), which is no failure of its own.
        self.cancel_sent = asyncio.Event()
        self.recovery = PostcopyRecovery(source, destination, spec.recovery, listen_uri,
                                         self.mark)

    def mark(self, what: str, **details: Any) -> int:
        """Record a driver step on the timeline; returns its host ns."""
        record = timeline_record(what, details)
        self.timeline.write(record)
        log.info("%s %s", what, details or "")
        return int(record["host_ns"])

    async def prepare(self, incoming_uri: str) -> None:
        """Capabilities and parameters on both sides; the destination starts listening."""
        await self.destination.set_capabilities(self.plan.destination_capabilities)
        await self.destination.set_parameters(self.plan.destination_parameters)
        await self.source.set_capabilities(self.plan.source_capabilities)
        await self.source.set_parameters(self.plan.source_parameters)
        self.mark("capabilities-set", source=self.plan.source_capabilities,
                  destination=self.plan.destination_capabilities,
                  parameters=self.plan.source_parameters)
        # What each QEMU reports it now has: the raw record that the asked-for settings
        # took (the report compares the two).
        source, destination = await asyncio.gather(_settings(self.source),
                                                   _settings(self.destination))
        self.mark("settings-in-effect", source=source, destination=destination)
        await self.destination.migrate_incoming(incoming_uri)
        self.mark("incoming-listening", uri=incoming_uri)

    async def run(self, uri: str) -> MigrationResult:
        """Migrate to ``uri`` and wait until both sides reach a terminal state."""
        try:
            async with asyncio.timeout(self.spec.timeout_s):
                try:
                    return await self._run(uri)
                except BaseExceptionGroup as group:
                    raise first_error(group) from None
        except TimeoutError:
            statuses = await self._last_statuses()
            self.mark("timeout", statuses=statuses)
            raise MigrationTimeout(
                f"migration.timeout_s: not finished after {self.spec.timeout_s:g} s "
                f"(source {statuses[0]}, destination {statuses[1]}); raise the timeout or "
                "lower the working set"
            ) from None

    async def _last_statuses(self) -> tuple[str, str]:
        return (self.source.migration_status() or "none",
                self.destination.migration_status() or "none")

    async def _run(self, uri: str) -> MigrationResult:
        started = self.mark("migrate", uri=uri)
        await self.source.migrate(uri)
        requested: int | None = None
        skipped: str | None = None
        async with asyncio.TaskGroup() as group:
            source_done = group.create_task(
                self.source.wait_for_event("MIGRATION", status_in(*SOURCE_TERMINAL))
            )
            destination_done = group.create_task(
                self.destination.wait_for_event("MIGRATION", status_in(*DESTINATION_TERMINAL))
            )
            recovering = (group.create_task(self.recovery.watch(), name="postcopy-recovery")
                          if self.spec.postcopy else None)
            if self.spec.postcopy:
                requested, skipped = await self._switchover(started, source_done)
            paused = await self._pause_source(source_done)
            cancelled = await self._cancel_rule(started, source_done)
            source_end = await source_done
            self.mark("source-finished", status=source_end.data["status"])
            if cancelled is not None and source_end.data["status"] == "cancelled":
                raise MigrationError(f"{cancelled}; migrate_cancel sent, the guest stays on "
                                     "the source")
            if source_end.data["status"] != "completed":
                # Raising out of the group cancels its other tasks (the waits, recovery).
                raise MigrationError(
                    f"migration {source_end.data['status']} on the source: "
                    f"{await self._error_desc(self.source)}"
                )
            destination_end = await destination_done
            if recovering is not None:
                recovering.cancel()
        self.mark("destination-finished", status=destination_end.data["status"])
        if destination_end.data["status"] != "completed":
            raise MigrationError(
                f"migration {destination_end.data['status']} on the destination: "
                f"{await self._error_desc(self.destination)}"
            )
        if paused:
            # The source was paused, so the destination keeps the guest paused: resume it.
            await self.destination.execute("cont")
            self.mark("destination-resumed")
        return MigrationResult(
            str(source_end.data["status"]), str(destination_end.data["status"]),
            requested, skipped, self.recovery.recoveries,
        )

    async def _error_desc(self, monitor: Monitor) -> str:
        """QEMU's own explanation of a failed migration (if it still answers), with a hint."""
        try:
            info = await monitor.query_migrate(timeout=5.0)
        except Exception:
            return f"no error text ({monitor.name} did not answer); see its stderr.log"
        desc = str(info.get("error-desc", f"no error text; see {monitor.name}/stderr.log"))
        hostname = self.plan.source_parameters.get("tls-hostname")
        hint = tls_hint(desc, str(hostname)) if hostname is not None else None
        return f"{desc}; {hint}" if hint else desc

    def _pass_reached(self, passes: int) -> asyncio.Task[Any]:
        """A task that ends once the source reports dirty-sync pass ``passes`` (or later)."""
        return asyncio.create_task(self.source.wait_for_event(
            "MIGRATION_PASS", lambda r: int(r.data.get("pass", 0)) >= passes))

    @staticmethod
    def _seconds_after(started_ns: int, seconds: float) -> asyncio.Task[Any]:
        """A task that ends ``seconds`` after ``started_ns`` (host wall clock)."""
        remaining = seconds - (time.time_ns() - started_ns) / 1e9
        return asyncio.create_task(asyncio.sleep(max(0.0, remaining)))

    @staticmethod
    async def _first_trigger(triggers: list[asyncio.Task[Any]],
                             source_done: asyncio.Task[EventRecord]) -> int | None:
        """Wait for the first of ``triggers`` or the end of the migration on the source.

        The index of the trigger that fired, None when the migration ended first;
        every trigger is cancelled on the way out.
        """
        try:
            await asyncio.wait({source_done, *triggers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for trigger in triggers:
                trigger.cancel()
        if source_done.done():
            return None
        return next((index for index, trigger in enumerate(triggers)
                     if trigger.done() and not trigger.cancelled()), None)

    async def _pause_source(self, source_done: asyncio.Task[EventRecord]) -> bool:
        """Pause the source's vCPUs after N passes (``pause-source-after-passes``); whether
        it was paused (False at once for any other policy, or if pre-copy finished first)."""
        policy = self.spec.switchover
        if self.spec.postcopy or not isinstance(policy, PauseSourceAfterPasses):
            return False
        if await self._first_trigger([self._pass_reached(policy.passes)], source_done) is None:
            self.mark("pause-skipped", reason="pre-copy finished before the pause policy fired")
            return False
        await self.source.execute("stop")
        self.mark("source-paused", passes=policy.passes)
        return True

    async def _cancel_rule(self, started_ns: int,
                           source_done: asyncio.Task[EventRecord]) -> str | None:
        """Cancel a pre-copy that exceeds ``max_passes`` or ``max_seconds``; why, or None.

        Returns at once when the scenario sets neither (and always with post-copy,
        which the scenario model enforces).
        """
        reasons: list[str] = []
        triggers: list[asyncio.Task[Any]] = []
        if self.spec.max_passes is not None:
            limit = self.spec.max_passes
            reasons.append(f"migration.max_passes: pre-copy did not converge in {limit} passes")
            triggers.append(self._pass_reached(limit + 1))
        if self.spec.max_seconds is not None:
            reasons.append(f"migration.max_seconds: pre-copy did not converge in "
                           f"{self.spec.max_seconds:g} s")
            triggers.append(self._seconds_after(started_ns, self.spec.max_seconds))
        if not triggers:
            return None
        fired = await self._first_trigger(triggers, source_done)
        if fired is None:
            return None
        self.mark("cancel", reason=reasons[fired])
        self.cancel_sent.set()
        await self.source.migrate_cancel()
        return reasons[fired]

    async def _switchover(
        self, started_ns: int, source_done: asyncio.Task[EventRecord]
    ) -> tuple[int | None, str | None]:
        """Apply the switchover policy; returns (when post-copy was asked, why not)."""
        policy = self.spec.switchover
        trigger: asyncio.Task[Any] | None = None
        if isinstance(policy, AfterSeconds):
            trigger = self._seconds_after(started_ns, policy.seconds)
        elif isinstance(policy, AfterPasses):
            trigger = self._pass_reached(policy.passes)
        else:
            assert isinstance(policy, Immediately)
        if trigger is not None and await self._first_trigger([trigger], source_done) is None:
            reason = "pre-copy finished before the switchover policy fired"
            self.mark("postcopy-skipped", reason=reason)
            return None, reason
        try:
            await self.source.start_postcopy()
        except QmpCommandError as error:
            if source_done.done():
                reason = f"pre-copy finished first ({error.desc})"
                self.mark("postcopy-skipped", reason=reason)
                return None, reason
            raise
        return self.mark("postcopy-requested", policy=policy.policy), None
