"""How a run ended, derived again from its raw artifacts and checked against run.json.

The runner states the outcome when the run ends (``run.json``: ``outcome``,
``statement``).  ``migrator report`` derives it again, offline, with the same
rules (:func:`migrator.outcome.describe`) from what was observed:

* whether anything booted: the ``source-started`` mark in ``timeline.jsonl``;
* whether the switch happened, and whether the destination completed: the
  MIGRATION events in ``src/events.jsonl`` and ``dst/events.jsonl``;
* recoveries: the pauses that recovered (:mod:`migrator.metrics.recovery`);
* whether post-copy fetched anything: the events and the source's final
  ``query-migrate`` (``final-query-migrate.json``);
* the guest's verdict on its pages: the probe's ``verify`` line on the consoles;
* what the source still held: its last ``query-migrate`` sample (``samples.jsonl``).

Only two facts come from ``run.json`` itself, as no raw artifact holds them: the
error the run stopped with (its message) and an interruption by a signal.  When
the derived outcome differs from the recorded one, the report carries the
derived one and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from migrator.errors import IntegrityError, MigratorError
from migrator.metrics.guest import GuestObservations
from migrator.metrics.run_artifacts import RunArtifacts
from migrator.outcome import (
    Outcome,
    Situation,
    describe,
    last_source_ram,
    postcopy_missed,
    switched_over,
)
from migrator.rundir import RunMeta

__all__ = ["DerivedOutcome", "derive_outcome"]


@dataclass(frozen=True)
class DerivedOutcome:
    """The outcome a report shows, its statement, and a warning when run.json disagrees."""

    outcome: str
    statement: str | None
    disagreement: str | None = None


def derive_outcome(run: RunArtifacts, recoveries: int, postcopy_asked: bool) -> DerivedOutcome:
    """The outcome of ``run``, from its raw artifacts (see module docstring)."""
    meta = run.meta
    recorded = meta.outcome or "unknown"
    if recorded == Outcome.INTERRUPTED:
        # A signal leaves no raw trace but run.json's own record of it.
        return DerivedOutcome(recorded, meta.statement)
    derived, statement = describe(_situation(run, recoveries, postcopy_asked))
    if derived == recorded:
        return DerivedOutcome(recorded, meta.statement)
    return DerivedOutcome(derived.value, statement, (
        f"outcome: run.json records {recorded!r}, the raw artifacts say {derived.value!r} "
        "(MIGRATION events, timeline marks, the guest's verify line and the final "
        "query-migrate); the report shows the latter"))


def _situation(run: RunArtifacts, recoveries: int, postcopy_asked: bool) -> Situation:
    statuses = run.events.statuses()
    remaining, transferred = last_source_ram(
        {"side": "src", "reply": reply} for _when, reply in run.samples.timed["src"])
    return Situation(
        switched=switched_over(statuses), recoveries=recoveries,
        completed=("dst", "completed") in statuses, error=_error(run.meta, run.guest, statuses),
        booted="source-started" in run.events.marks, source_remaining_bytes=remaining,
        destination_received_bytes=transferred,
        postcopy_missed=(postcopy_missed(statuses, run.counters.final_source_ram)
                         if postcopy_asked else None))


def _error(meta: RunMeta, guest: GuestObservations,
           statuses: list[tuple[str, str]]) -> MigratorError | None:
    """The error the run stopped with, as far as its artifacts tell; None if it did not."""
    if guest.verify is not None and guest.verify.bad_pages:
        return IntegrityError(f"the guest found {guest.verify.bad_pages} bad pages")
    if meta.error is not None:
        return MigratorError(meta.error.message or meta.error.type or "an error")
    if meta.outcome == "running" or ("dst", "completed") not in statuses:
        return MigratorError("the run stopped without the destination completing the "
                             f"migration (run.json outcome {meta.outcome!r})")
    return None
