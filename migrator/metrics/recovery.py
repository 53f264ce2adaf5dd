"""Post-copy pauses, their recoveries and the injected faults, from a run's raw artifacts.

Inputs, all offline: ``timeline.jsonl`` (the marks written by
:mod:`migrator.migration.recovery` and :mod:`migrator.faults`), the MIGRATION
events of ``src|dst/events.jsonl``, the guest probe's console artifacts (read
by :func:`~migrator.metrics.guest.load_guest`) and the scenario's ``[[faults]]``.

One pause runs from the first sign of a broken stream (the watchdog's
``stream-stalled`` mark, migrator's ``postcopy-paused`` mark or the first
``postcopy-paused`` event of either side) to its ``recovered`` mark.  Runs
whose timeline has no recovery marks (recorded before recovery existed, or a
QEMU pausing by itself unwatched) are read from the events alone: a pause ends
when both sides report ``postcopy-active`` (or ``completed``) again.

Every instant is on the controller's clock: timeline marks and heartbeat
arrivals are stamped there, and QMP events carry their arrival time
(``host_ns``) besides QEMU's own stamp, which on an SSH run comes from another
host's clock.  Times are reported in s since the ``migrate`` mark, t = 0 of
the HTML report's plots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from migrator.metrics.events import MigrationEvents, PhaseTimeline, time_zero
from migrator.metrics.guest import GuestObservations
from migrator.model import FaultRecord, Metric, PauseRecord
from migrator.rundir import SIDE_OF_ROLE, RunMeta

__all__ = ["RecoveryAnalysis", "analyze_recovery"]

S = 1e9
# Marks only migrator.migration.recovery writes: their presence says the run was watched.
_RECOVERY_MARKS = frozenset({
    "stream-stalled", "postcopy-paused", "migrate-pause", "both-paused", "recover-listening",
    "recover-attempt", "recover-failed", "recovered", "recovery-disabled",
})
_RUNNING = frozenset({"postcopy-active", "completed"})


@dataclass(frozen=True)
class _Item:
    """One timeline mark or one MIGRATION event, on the controller clock."""

    ns: int
    what: str
    """The mark's name, or ``event``."""
    details: Mapping[str, Any]
    side: str = ""
    status: str = ""


@dataclass
class _Pause:
    """A pause being read (see :func:`_pauses`)."""

    began_ns: int
    cause: str
    cause_from_mark: bool
    fault: tuple[int, str, str] | None
    """(index, kind, side or host) of the fault injected last before it."""
    paused: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    both_paused_ns: int | None = None
    attempts: int = 0
    recover_events: int = 0
    errors: list[str] = field(default_factory=list)
    disabled: bool = False
    recovered_ns: int | None = None


@dataclass(frozen=True)
class RecoveryAnalysis:
    """The pauses and faults of one run, and what disagrees in its artifacts."""

    pauses: list[PauseRecord]
    faults: list[FaultRecord]
    warnings: list[str]


def _items(ev: MigrationEvents) -> tuple[list[_Item], list[_Item]]:
    """(timeline marks, MIGRATION events), each in time order on the controller clock."""
    marks = [_Item(int(r["host_ns"]), str(r.get("what")), r)
             for r in ev.timeline if isinstance(r.get("host_ns"), int)]
    events = [_Item(e.host_ns if e.host_ns is not None else e.qemu_ns, "event", e.data,
                    e.side, str(e.data.get("status")))
              for e in ev.events if e.name == "MIGRATION"]
    marks.sort(key=lambda item: item.ns)
    events.sort(key=lambda item: item.ns)
    return marks, events


def _fault_side(details: Mapping[str, Any]) -> str:
    """The side or host a fault acted on, as ``src``/``dst`` (``?`` when not said)."""
    where = details.get("side", details.get("host"))
    return SIDE_OF_ROLE.get(str(where), "?")


def _running_again(pause: _Pause) -> bool:
    """Each side that paused runs post-copy (or is done) since its last pause (events only)."""
    return all(side in pause.running and pause.running[side] >= paused
               for side, paused in pause.paused.items())


def _pauses(marks: list[_Item], events: list[_Item]) -> list[_Pause]:
    """Cut the merged marks and events into pauses (see module docstring)."""
    watched = any(item.what in _RECOVERY_MARKS for item in marks)
    # Marks first at equal times: a mark names the cause an event would only suggest.
    items = sorted([*marks, *events], key=lambda item: (item.ns, item.what == "event"))
    done: list[_Pause] = []
    current: _Pause | None = None
    pending_fault: tuple[int, str, str] | None = None

    def begin(ns: int, cause: str, from_mark: bool) -> _Pause:
        nonlocal pending_fault
        fault, pending_fault = pending_fault, None
        return _Pause(ns, cause, from_mark, fault)

    for item in items:
        details = item.details
        if item.what == "event":
            if item.status == "postcopy-paused":
                if current is None:
                    current = begin(item.ns, f"QEMU on {item.side} reported a broken stream",
                                    from_mark=False)
                current.paused[item.side] = item.ns
                # Both sides' events, unless migrator's both-paused mark says when.
                if current.both_paused_ns is None and len(current.paused) == 2:
                    current.both_paused_ns = item.ns
            elif current is not None and item.status in _RUNNING:
                current.running[item.side] = item.ns
                if not watched and _running_again(current):
                    current.recovered_ns = item.ns
                    done.append(current)
                    current = None
            elif current is not None and item.status == "postcopy-recover" and item.side == "src":
                current.recover_events += 1
            continue
        if (item.what == "fault-injected" and isinstance(details.get("index"), int)
                and details.get("kind") != "pool-exhausted"):  # not timed: before the QEMUs
            pending_fault = (details["index"], str(details.get("kind", "?")),
                             _fault_side(details))
        elif item.what in ("stream-stalled", "postcopy-paused"):
            if item.what == "stream-stalled":
                cause = f"stream stalled {float(details.get('seconds', 0)):.1f} s (watchdog)"
            else:
                cause = f"QEMU on {details.get('side', '?')} reported a broken stream"
            if current is None:
                current = begin(item.ns, cause, from_mark=True)
            elif not current.cause_from_mark:
                current.cause, current.cause_from_mark = cause, True
        elif current is None:
            continue
        elif item.what == "both-paused":
            current.both_paused_ns = item.ns
        elif item.what == "recover-attempt":
            current.attempts += 1
        elif item.what == "recover-failed":
            current.errors.append(str(details.get("error", "?")))
        elif item.what == "recovery-disabled":
            current.disabled = True
        elif item.what == "recovered":
            current.recovered_ns = item.ns
            done.append(current)
            current = None
    if current is not None:
        done.append(current)
    if not watched:
        for pause in done:
            pause.attempts = pause.recover_events
    return done


def _cause(pause: _Pause) -> str:
    """How the stream broke; a migrate-pause fault is its own cause (other faults: ``fault``)."""
    if pause.fault is not None and pause.fault[1] == "migrate-pause":
        return f"migrate-pause fault on {pause.fault[2]} (faults[{pause.fault[0]}])"
    return pause.cause


def _note(pause: _Pause) -> str:
    failed = len(pause.errors)
    last = f"; last: {pause.errors[-1]}" if pause.errors else ""
    if pause.recovered_ns is not None:
        return f"{failed} failed attempt{'' if failed == 1 else 's'}{last}" if failed else ""
    if pause.disabled:
        return "not recovered: migration.recovery.auto = false"
    if pause.attempts:
        return f"recovery gave up after {pause.attempts} attempts{last}"
    return "the run ended while post-copy was paused"


class _Window:
    """What the guest saw over one interval of the controller clock."""

    def __init__(self, guest: GuestObservations) -> None:
        # The same series as the report's outside view: both consoles merged (the last
        # heartbeat before the switch comes from the source, the next from the destination).
        self.arrivals = guest.heartbeat_arrivals_ns()
        self.gaps = np.diff(self.arrivals)
        self.stalls = [s for s in guest.stalls if s.host_start_ns is not None]

    def longest_gap(self, start: int, end: int) -> tuple[int, int, bool] | None:
        """(start ns, length ns, still open) of the longest heartbeat gap overlapping.

        A gap still open at ``end`` (no heartbeat arrived after it) counts from
        the last heartbeat to ``end``: a lower bound.
        """
        best: tuple[int, int, bool] | None = None
        if self.gaps.size:
            overlapping = np.flatnonzero((self.arrivals[:-1] < end) & (self.arrivals[1:] > start))
            if overlapping.size:
                index = int(overlapping[np.argmax(self.gaps[overlapping])])
                best = (int(self.arrivals[index]), int(self.gaps[index]), False)
        if self.arrivals.size and self.arrivals[-1] < end:
            tail = (int(self.arrivals[-1]), end - int(self.arrivals[-1]), True)
            if best is None or tail[1] > best[1]:
                best = tail
        return best

    def longest_stall(self, start: int, end: int) -> tuple[int, int, int] | None:
        """(host start ns, guest-clock length ns, vCPU) of the longest probe stall overlapping."""
        overlapping = [s for s in self.stalls
                       if s.host_start_ns is not None and s.host_start_ns < end
                       and s.host_start_ns + s.gap_ns > start]
        if not overlapping:
            return None
        worst = max(overlapping, key=lambda s: s.gap_ns)
        assert worst.host_start_ns is not None
        return worst.host_start_ns, worst.gap_ns, worst.vcpu


def _fault_target(kind: str, spec: Mapping[str, Any]) -> str:
    """What a fault acts on, in a few words (its kind says what it does)."""
    if kind == "link-down":
        return f"{spec.get('interface', '?')} on {spec.get('host', 'destination')}"
    if kind == "connection-loss":
        return f"SSH to {spec.get('side', '?')}"
    if kind == "pool-exhausted":
        return "destination hugepages"
    if kind in ("migrate-pause", "kill", "stop"):
        return f"{spec.get('side', 'source' if kind == 'migrate-pause' else '?')} QEMU"
    return "?"


def _faults(marks: Iterable[_Item], scenario_faults: list[Any],
            seconds: Callable[[_Item | None], float | None], source: str) -> list[FaultRecord]:
    seen: dict[int, dict[str, _Item]] = {}
    for item in marks:
        index = item.details.get("index")
        if item.what in ("fault-injected", "fault-cleared", "fault-not-injected") \
                and isinstance(index, int):
            seen.setdefault(index, {}).setdefault(item.what, item)
    indices = sorted(set(seen) | set(range(len(scenario_faults))))
    records = []
    for index in indices:
        got = seen.get(index, {})
        spec: dict[str, Any] = {}
        if index < len(scenario_faults) and isinstance(scenario_faults[index], dict):
            spec.update(scenario_faults[index])
        for what in ("fault-not-injected", "fault-cleared", "fault-injected"):
            if what in got:
                spec.update({k: v for k, v in got[what].details.items()
                             if k not in ("host_ns", "controller_cpu_ns", "what", "index")})
        injected, cleared = got.get("fault-injected"), got.get("fault-cleared")
        refused = got.get("fault-not-injected")
        status: Literal["injected", "cleared", "not injected", "not recorded"]
        reason = None
        if injected is not None:
            status = "cleared" if cleared is not None else "injected"
        elif refused is not None:
            status, reason = "not injected", str(refused.details.get("reason", "?"))
        else:
            status, reason = "not recorded", "no fault mark in timeline.jsonl"
        kind = str(spec.get("kind", "?"))
        duration = spec.get("duration_s")
        after = spec.get("after_ms")
        records.append(FaultRecord(
            index=index, kind=kind, target=_fault_target(kind, spec),
            at=str(spec["at"]) if "at" in spec else None,
            after_ms=after if isinstance(after, int) else None,
            duration_s=float(duration) if isinstance(duration, int | float) else None,
            status=status,
            injected_ns=injected.ns if injected else None,
            injected=Metric(value=seconds(injected), unit="s", source=source),
            cleared_ns=cleared.ns if cleared else None,
            cleared=Metric(value=seconds(cleared), unit="s", source=source),
            reason=reason,
        ))
    return records


def analyze_recovery(ev: MigrationEvents, scenario: Mapping[str, Any],
                     meta: RunMeta, guest: GuestObservations) -> RecoveryAnalysis:
    """The pauses and faults of a run (see module docstring), from its loaded events.

    ``scenario`` is the parsed ``scenario.toml``, ``meta`` the run's ``run.json``.
    """
    marks, events = _items(ev)
    # The HTML plots' t = 0, so that these seconds and their axes agree.
    origin, start = time_zero(ev.marks, PhaseTimeline.from_events(ev).phases,
                              meta.started_ns or 0)
    since = ("the migrate mark" if start == "migrate"
             else f"the start of {start}" if start else "the start of the run")
    run_end = max([meta.finished_ns or 0, *(item.ns for item in marks),
                   *(item.ns for item in events)])

    def seconds(at: int | _Item | None) -> float | None:
        if isinstance(at, _Item):
            at = at.ns
        return None if at is None else round((at - origin) / S, 3)

    clock = f"controller host wall clock, t = 0 at {since}"
    if any(item.what in _RECOVERY_MARKS for item in marks):  # as _pauses decides
        pause_source = f"recovery marks (timeline.jsonl) and MIGRATION events; {clock}"
        attempts_source = "recover-attempt marks (timeline.jsonl)"
    else:
        pause_source = f"MIGRATION events, postcopy-paused -> postcopy-active; {clock}"
        attempts_source = "src MIGRATION events entering postcopy-recover"
    gap_source = ("gaps between guest heartbeat arrivals (host wall clock), the longest "
                  "overlapping the pause")
    stall_source = ("guest probe stalls (guest CLOCK_MONOTONIC), the longest overlapping "
                    "the pause")
    window = _Window(guest)
    pauses = []
    for number, pause in enumerate(_pauses(marks, events), start=1):
        end = pause.recovered_ns if pause.recovered_ns is not None else run_end
        gap = window.longest_gap(pause.began_ns, end)
        stall = window.longest_stall(pause.began_ns, end)
        duration = (None if pause.recovered_ns is None
                    else round((pause.recovered_ns - pause.began_ns) / S, 3))
        pauses.append(PauseRecord(
            number=number, cause=_cause(pause),
            fault=pause.fault[0] if pause.fault else None,
            began_ns=pause.began_ns,
            began=Metric(value=seconds(pause.began_ns), unit="s", source=pause_source),
            both_paused_ns=pause.both_paused_ns,
            both_paused=Metric(value=seconds(pause.both_paused_ns), unit="s",
                               source=pause_source),
            recovered_ns=pause.recovered_ns,
            recovered=Metric(value=seconds(pause.recovered_ns), unit="s", source=pause_source),
            duration=Metric(value=duration, unit="s",
                            source="pause began -> recovered, controller host wall clock"),
            attempts=Metric(value=pause.attempts, unit="attempts", source=attempts_source),
            result="recovered" if pause.recovered_ns is not None else "not recovered",
            note=_note(pause),
            guest_gap=Metric(value=None if gap is None else round(gap[1] / S, 3), unit="s",
                             source=gap_source),
            guest_gap_start_ns=None if gap is None else gap[0],
            guest_gap_open=gap is not None and gap[2],
            probe_stall=Metric(value=None if stall is None else round(stall[1] / S, 3),
                               unit="s", source=stall_source),
            probe_stall_start_ns=None if stall is None else stall[0],
            probe_stall_vcpu=None if stall is None else stall[2],
        ))
    scenario_faults = scenario.get("faults", [])
    faults = _faults(marks, scenario_faults if isinstance(scenario_faults, list) else [],
                     seconds, f"fault marks (timeline.jsonl); {clock}")
    warnings = []
    stated = meta.recoveries
    recovered = sum(1 for p in pauses if p.result == "recovered")
    if stated is not None and stated != recovered:
        warnings.append(f"run.json counts {stated} recoveries, the timeline and events show "
                        f"{recovered}")
    return RecoveryAnalysis(pauses, faults, warnings)
