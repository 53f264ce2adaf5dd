"""Migration phases and the real freeze, from QMP events and the driver's timeline.

Inputs are the raw artifacts ``src/events.jsonl``, ``dst/events.jsonl`` and
``timeline.jsonl``.  QMP event times are QEMU's own timestamps (the host wall
clock when QEMU emitted the event); timeline times are the controller's wall
clock.  Both are the same clock on one host.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrator.model import Phase
from migrator.rundir import SIDES, open_artifact_text

__all__ = ["MigrationEvents", "PhaseTimeline", "load_events", "read_jsonl", "time_zero"]


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL artifact, plain or compressed (:func:`~migrator.rundir.open_artifact`);
    a torn last line (run killed mid-write) is skipped, and so is an absent artifact."""
    try:
        opened = open_artifact_text(path)
    except FileNotFoundError:
        return
    with opened as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


@dataclass(frozen=True)
class QmpEvent:
    """One recorded QMP event."""

    side: str
    name: str
    data: dict[str, Any]
    qemu_ns: int
    host_ns: int | None = None
    """When it arrived at the controller (controller clock), if recorded."""


@dataclass(frozen=True)
class MigrationEvents:
    """QMP events of both sides plus the driver's timeline marks."""

    events: list[QmpEvent]
    marks: dict[str, int]
    """Host ns of the first mark of each name."""
    timeline: list[dict[str, Any]] = field(default_factory=list)
    """Every timeline record, in the order written."""

    def statuses(self) -> list[tuple[str, str]]:
        """(side, status) of every MIGRATION event, in QEMU time order."""
        return [(e.side, str(e.data.get("status"))) for e in self.events
                if e.name == "MIGRATION"]

    def first(self, side: str, name: str, status: str | None = None,
              after_ns: int = 0) -> int | None:
        """QEMU time of the first matching event after ``after_ns``, or None."""
        for event in self.events:
            if (event.side == side and event.name == name and event.qemu_ns >= after_ns
                    and (status is None or event.data.get("status") == status)):
                return event.qemu_ns
        return None

    def passes(self) -> list[tuple[int, int]]:
        """(pass number, QEMU ns) of each MIGRATION_PASS on the source."""
        return [(int(e.data.get("pass", 0)), e.qemu_ns) for e in self.events
                if e.side == "src" and e.name == "MIGRATION_PASS"]


def time_zero(marks: Mapping[str, int], phases: Sequence[Phase],
              started_ns: int) -> tuple[int, str | None]:
    """t = 0 of a run's report times and plots (host ns), and the phase it starts.

    The ``migrate`` mark; without one the start of the first phase (named); without
    phases the start of the run (``None``).
    """
    if "migrate" in marks:
        return marks["migrate"], "migrate"
    if phases:
        return phases[0].start_ns, phases[0].name
    return started_ns, None


def load_events(run_path: Path) -> MigrationEvents:
    """Read both sides' events and the timeline of a run directory."""
    events = [
        QmpEvent(side, str(r["event"]), dict(r.get("data", {})), int(r["qemu_ns"]),
                 r["host_ns"] if isinstance(r.get("host_ns"), int) else None)
        for side in SIDES
        for r in read_jsonl(run_path / side / "events.jsonl")
    ]
    events.sort(key=lambda e: e.qemu_ns)
    timeline = list(read_jsonl(run_path / "timeline.jsonl"))
    marks: dict[str, int] = {}
    for record in timeline:
        marks.setdefault(str(record.get("what")), int(record["host_ns"]))
    return MigrationEvents(events, marks, timeline)


class PhaseTimeline:
    """The run cut into named phases, to say in which phase an instant fell."""

    def __init__(self, phases: list[Phase]) -> None:
        self.phases = sorted(phases, key=lambda p: p.start_ns)

    @classmethod
    def from_events(cls, ev: MigrationEvents) -> PhaseTimeline:
        """Boot, warm-up, setup, pre-copy, freeze, post-copy, verify (those that happened)."""
        m = ev.marks
        migrate = m.get("migrate")
        active = ev.first("src", "MIGRATION", "active", after_ns=migrate or 0)
        postcopy = ev.first("src", "MIGRATION", "postcopy-active", after_ns=migrate or 0)
        src_done = ev.first("src", "MIGRATION", "completed")
        dst_done = ev.first("dst", "MIGRATION", "completed")
        stop = ev.first("src", "STOP", after_ns=migrate or 0)
        resume = ev.first("dst", "RESUME")
        finished = dst_done or src_done
        phases: list[Phase] = []

        def add(name: str, start: int | None, end: int | None) -> None:
            if start is not None:
                phases.append(Phase(name=name, start_ns=start, end_ns=end))

        add("boot", m.get("source-started"), m.get("guest-ready"))
        add("warmup", m.get("guest-ready"), migrate)
        add("setup", migrate, active)
        add("precopy", active, stop or finished)
        # Each dirty-sync pass inside pre-copy (MIGRATION_PASS marks its start); these
        # start later than "precopy" and so win in phase_at.
        precopy_end = stop or finished
        # Pass 1 is announced a moment before the source reports "active".
        passes = [(number, max(ns, active or ns)) for number, ns in ev.passes()
                  if precopy_end is None or ns < precopy_end]
        for index, (number, start) in enumerate(passes):
            end = passes[index + 1][1] if index + 1 < len(passes) else precopy_end
            add(f"precopy-pass-{number}", start, end)
        add("freeze", stop, resume)
        if postcopy is not None:
            add("postcopy", resume or postcopy, finished)
        add("settle", finished, m.get("verifying"))
        add("verify", m.get("verifying"), m.get("verified"))
        return cls(phases)

    def phase_at(self, host_ns: int) -> str:
        """Name of the phase containing ``host_ns`` (the latest one started, for overlaps)."""
        current = "before"
        for phase in self.phases:
            if phase.start_ns <= host_ns:
                current = phase.name if (phase.end_ns is None or host_ns < phase.end_ns) \
                    else current
        return current

    def span(self, start_ns: int, end_ns: int) -> str:
        """Phase of an interval: ``a`` or ``a->b`` when it starts and ends in different ones."""
        first, last = self.phase_at(start_ns), self.phase_at(end_ns)
        return first if first == last else f"{first}->{last}"
