"""How a run ended, stated plainly, with one exit code per outcome.

Post-copy is the one migration mode in which a failure can lose the VM: after
the switch the guest's CPU state is on the destination while part of its
memory is still only on the source.  So every run ends in exactly one outcome,
and the statement says where the guest is (or was) and which side holds what.

=============================  ===================================================
outcome                        meaning
=============================  ===================================================
completed                      the guest runs on the destination, every page it
                               wrote verified
completed-after-recovery       the same, after post-copy paused and was recovered
                               at least once
completed-without-postcopy     post-copy was asked for, but pre-copy completed
                               first: the guest runs on the destination and
                               verified, yet no page was fetched post-copy, so the
                               run did not measure what it was asked to
failed-before-switchover       the guest never left the source (it was still
                               running there, unless the source QEMU died)
failed-after-switchover        the switch happened and the run failed after it:
                               the VM is lost (or its memory is wrong)
not-started                    bad input, a host that cannot run the scenario or
                               cannot be used: nothing was booted (the error's own
                               exit code: 1, 2 or 3)
interrupted                    Ctrl-C or SIGTERM: torn down in order (130, 143)
=============================  ===================================================

Each outcome's exit code is in :data:`EXIT_CODES`, from the one table
:class:`migrator.errors.ExitCode`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from migrator.errors import (
    ExitCode,
    GuestError,
    IntegrityError,
    MigratorError,
    QemuError,
    RunFailed,
)

__all__ = [
    "EXIT_CODES", "Outcome", "Situation", "describe", "failure", "last_source_ram",
    "postcopy_missed", "severity", "switched_over",
]

MIB = 1 << 20


class Outcome(StrEnum):
    """Every way a run ends (``run.json`` field ``outcome``)."""

    COMPLETED = "completed"
    COMPLETED_AFTER_RECOVERY = "completed-after-recovery"
    COMPLETED_WITHOUT_POSTCOPY = "completed-without-postcopy"
    FAILED_BEFORE_SWITCHOVER = "failed-before-switchover"
    FAILED_AFTER_SWITCHOVER = "failed-after-switchover"
    NOT_STARTED = "not-started"
    INTERRUPTED = "interrupted"


def severity(outcome: str) -> Literal["ok", "warn", "bad"]:
    """How reports show an outcome: ``ok``, ``warn`` (completed after recovery) or ``bad``.

    Takes the string a report or the results store holds (older runs may hold others).
    """
    if outcome == Outcome.COMPLETED:
        return "ok"
    if outcome == Outcome.COMPLETED_AFTER_RECOVERY:
        return "warn"
    return "bad"


#: The exit code of each outcome that has one of its own (not-started gives its error's;
#: interrupted gives 130 or 143, by signal).
EXIT_CODES: dict[Outcome, ExitCode] = {
    Outcome.COMPLETED: ExitCode.OK,
    Outcome.FAILED_BEFORE_SWITCHOVER: ExitCode.FAILED_BEFORE_SWITCHOVER,
    Outcome.FAILED_AFTER_SWITCHOVER: ExitCode.FAILED_AFTER_SWITCHOVER,
    Outcome.COMPLETED_AFTER_RECOVERY: ExitCode.COMPLETED_AFTER_RECOVERY,
    Outcome.COMPLETED_WITHOUT_POSTCOPY: ExitCode.COMPLETED_WITHOUT_POSTCOPY,
}


# A MIGRATION status that means the guest's CPU state has left the source: post-copy
# runs on the destination, or pre-copy handed everything over.
_AFTER_SWITCH = {"postcopy-active", "postcopy-paused", "postcopy-recover", "completed"}


def switched_over(statuses: Iterable[tuple[str, str]]) -> bool:
    """Whether the switch happened, from ``(side, MIGRATION status)`` pairs in any order.

    The source reporting ``postcopy-active`` (it has stopped the guest and sent
    its device state), or either side reporting post-copy or completion.
    """
    return any(status in _AFTER_SWITCH for _side, status in statuses)


def postcopy_missed(statuses: Iterable[tuple[str, str]],
                    final_source_ram: Mapping[str, Any]) -> str | None:
    """Why a run that asked for post-copy fetched nothing post-copy; None if it did.

    From the raw artifacts: the MIGRATION events as ``(side, status)`` (did either
    side ever enter post-copy) and the ``ram`` section of the source's final
    ``query-migrate`` (``ram.postcopy-bytes``, where the QEMU reports it; ``{}``
    when there is none).
    """
    passes = final_source_ram.get("dirty-sync-count", "unknown")
    if not any(status.startswith("postcopy") for _side, status in statuses):
        return ("pre-copy completed before the switchover policy fired (source "
                f"dirty-sync-count {passes}); migration.downtime_limit_ms, if set, let it "
                "converge, or the guest dirtied too little memory")
    if final_source_ram.get("postcopy-bytes") == 0:
        return ("post-copy began but the source sent no byte in it (ram.postcopy-bytes 0, "
                f"dirty-sync-count {passes})")
    return None


@dataclass(frozen=True)
class Situation:
    """What the runner saw when the run ended: the facts an outcome is stated from."""

    switched: bool
    recoveries: int
    completed: bool = False
    """The destination reported the migration completed."""
    error: MigratorError | None = None
    booted: bool = True
    source_remaining_bytes: int | None = None
    """The source's last ``ram.remaining``: memory that existed only there."""
    destination_received_bytes: int | None = None
    """The source's last ``ram.transferred``: what the destination had been sent."""
    exited: frozenset[str] = frozenset()
    """Sides (``src``, ``dst``) whose QEMU had exited by itself when the run failed."""
    postcopy_missed: str | None = None
    """Why a run that asked for post-copy fetched no page post-copy (None: it did, or
    it did not ask)."""


def failure(outcome: Outcome, statement: str) -> RunFailed:
    """The error a run that ended in ``outcome`` raises: its statement and exit code."""
    return RunFailed(outcome.value, statement, EXIT_CODES[outcome])


def _mib(value: int | None) -> str:
    return "an unknown amount" if value is None else f"{value / MIB:.0f} MiB"


# Where the amounts in a statement come from, and what they count.
_AMOUNTS = (" (amounts from the source's last query-migrate: memory sent is ram.transferred, "
            "resent pages included; not yet sent is ram.remaining)")


def _dead_side(error: MigratorError | None) -> str | None:
    """``src`` or ``dst`` when the error is that QEMU dying (or its QMP dropping)."""
    if isinstance(error, QemuError) and error.name in ("src", "dst"):
        return error.name
    return None


def describe(situation: Situation) -> tuple[Outcome, str]:
    """The outcome and its one-line statement (which side holds what)."""
    error = situation.error
    if error is None:
        if situation.postcopy_missed is not None:
            return Outcome.COMPLETED_WITHOUT_POSTCOPY, (
                f"completed without post-copy: {situation.postcopy_missed}; the guest runs "
                "on the destination and every page it wrote verified, but no page was "
                "fetched post-copy, so this run measured no post-copy")
        if situation.recoveries:
            plural = "y" if situation.recoveries == 1 else "ies"
            return Outcome.COMPLETED_AFTER_RECOVERY, (
                f"completed after {situation.recoveries} recover{plural}: post-copy paused "
                "and was resumed; the guest runs on the destination and every page it "
                "wrote verified")
        return Outcome.COMPLETED, ("completed: the guest runs on the destination and every "
                                   "page it wrote verified")
    if not situation.booted:
        # Refused before any QEMU started: the error says why (its own exit code).
        return Outcome.NOT_STARTED, str(error)
    dead = _dead_side(error)
    if "src" in situation.exited and (not situation.switched or dead != "dst"):
        # A dead source explains the rest (a destination then fails its load), whichever
        # failure was noticed first.
        dead = "src"
    elif dead is None and situation.exited:
        dead = sorted(situation.exited)[0]
    if not situation.switched:
        if dead == "src":
            where = ("the guest died with its source QEMU, and the destination held nothing "
                     "of it yet")
        else:
            where = ("the VM was still running on the source with its state intact (the "
                     "destination held nothing of it yet) when migrator stopped it")
        return Outcome.FAILED_BEFORE_SWITCHOVER, (
            f"failed before switchover: {error}; {where}")
    remaining, received = situation.source_remaining_bytes, situation.destination_received_bytes
    if isinstance(error, IntegrityError):
        where = ("the guest ran on the destination, whose copy of its memory is not what "
                 "the guest wrote")
    elif dead == "dst":
        where = (f"the destination QEMU, which ran the guest (its CPU and device state and "
                 f"{_mib(received)} of memory sent to it), is gone; the source holds only a "
                 "copy of memory as it was at the switch: the VM is lost" + _AMOUNTS)
    elif situation.completed:
        where = ("the migration had completed and the guest ran on the destination with all "
                 "its memory; the run failed after that")
    elif isinstance(error, GuestError):
        where = ("the guest ran on the destination and stopped answering there: the VM is "
                 "lost")
    elif dead == "src":
        where = (f"the source QEMU, the only holder of {_mib(remaining)} of guest memory not "
                 "yet sent, is gone; the destination holds the guest's CPU state and the "
                 "rest: the VM is lost" + _AMOUNTS)
    else:
        where = (f"the guest's CPU state is on the destination and {_mib(remaining)} of its "
                 "memory only on the source; once both stop, the VM is lost" + _AMOUNTS)
    return Outcome.FAILED_AFTER_SWITCHOVER, f"failed after switchover: {error}; {where}"


def last_source_ram(samples: Iterable[Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """(remaining, transferred) bytes from the last source query-migrate sample with RAM."""
    remaining = transferred = None
    for record in samples:
        ram = record.get("reply", {}).get("ram") if record.get("side") == "src" else None
        if isinstance(ram, Mapping):
            remaining = ram.get("remaining")
            transferred = ram.get("transferred")
    return remaining, transferred
