"""What the guest probe observed, read back from the console artifacts.

Two views of the same stalls:

* the guest's own: gaps in each vCPU's timestamp sequence, by the guest's
  CLOCK_MONOTONIC, which does not run while QEMU has the VM stopped;
* the outside world's: gaps between heartbeat arrivals at the controller, by
  the host wall clock, which does.

Guest times are placed on the host timeline through the heartbeat preceding
them (host arrival + guest time elapsed since that heartbeat).

A guest clock that steps is no stall.  The probe reports a step back as a
``clock_step`` line; probes that predate it computed an unsigned ``now - prev``
and printed the step as a ``stall`` of nearly 2**64 ns.  A stall line whose
gap is impossible (it wrapped, or it is longer than the consoles' whole
recording) is therefore read as a clock step too, and such a probe's histogram
gets the same correction: see :data:`WRAPPED` and :func:`load_guest`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from migrator.guest.console import read_console_log
from migrator.guest.protocol import ClockStep, Heartbeat, Hist, ProbeError, Ready, Stall, Verify
from migrator.rundir import artifact_path

__all__ = [
    "WRAPPED",
    "GuestClockStep",
    "GuestObservations",
    "HeartbeatArrival",
    "ProbeStall",
    "load_guest",
]

#: A probe gap at or above 2**63 ns (292 years) is an unsigned ``now - prev`` that
#: wrapped: the clock went back by ``2**64 - gap`` ns.
WRAPPED = 1 << 63


@dataclass(frozen=True)
class HeartbeatArrival:
    """One heartbeat: its sequence number, guest time, and host arrival time."""

    seq: int
    guest_ns: int
    host_ns: int
    side: str


@dataclass(frozen=True)
class ProbeStall:
    """A stall one vCPU saw, placed on the host timeline."""

    vcpu: int
    guest_start_ns: int
    gap_ns: int
    host_start_ns: int | None


@dataclass(frozen=True)
class GuestClockStep:
    """A step of one vCPU's guest CLOCK_MONOTONIC, placed on the host timeline; never a stall.

    ``reported_as``: ``clock_step`` (the probe's own line) or ``stall`` (a stall
    line whose gap was impossible, from a probe that predates ``clock_step``).
    """

    vcpu: int
    #: Guest time of the access before the step.
    guest_ns: int
    #: Signed: negative when the clock went back.
    step_ns: int
    host_ns: int | None
    reported_as: Literal["clock_step", "stall"]
    #: The gap the stall line said, for a step ``reported_as`` a stall.
    line_gap_ns: int | None = None


@dataclass
class GuestObservations:
    """Everything the probe reported over both consoles of a run."""

    ready: Ready | None = None
    heartbeats: list[HeartbeatArrival] = field(default_factory=list)
    stalls: list[ProbeStall] = field(default_factory=list)
    clock_steps: list[GuestClockStep] = field(default_factory=list)
    #: Host time from the first to the last console record (both sides): no stall the
    #: probe reported can be longer.  None with fewer than two records.
    console_span_ns: int | None = None
    histograms: dict[int, Hist] = field(default_factory=dict)
    verify: Verify | None = None
    errors: list[str] = field(default_factory=list)
    malformed: int = 0

    def heartbeat_arrivals_ns(self) -> np.ndarray:
        """Host-clock arrival times of every heartbeat, both consoles merged, in order."""
        return np.array(sorted(h.host_ns for h in self.heartbeats), dtype=np.int64)

    def lost_heartbeats(self) -> int:
        """Heartbeats whose sequence number never arrived on either console."""
        seqs = {h.seq for h in self.heartbeats}
        return (max(seqs) - min(seqs) + 1 - len(seqs)) if seqs else 0


def _host_clock(beats: list[HeartbeatArrival]) -> Callable[[int], int | None]:
    """Guest time -> host time through the heartbeat before it (None before the first)."""
    ordered = sorted(beats, key=lambda h: h.guest_ns)
    guest_times = [h.guest_ns for h in ordered]

    def host_ns(guest_ns: int) -> int | None:
        index = bisect.bisect_right(guest_times, guest_ns) - 1
        if index < 0:
            return None
        anchor = ordered[index]
        return anchor.host_ns + (guest_ns - anchor.guest_ns)

    return host_ns


def _possible(gap_ns: int, span_ns: int | None) -> bool:
    """Whether a probe gap can be real: it did not wrap and fits in the consoles' recording."""
    return gap_ns < WRAPPED and (span_ns is None or gap_ns <= span_ns)


def _step_of_impossible_gap(gap_ns: int) -> int:
    """The clock step an impossible gap stands for (signed ns, see :class:`GuestClockStep`)."""
    # A wrapped gap is exact: the clock went back 2**64 - gap.  Any other impossible
    # gap means the clock jumped ahead by it.
    return gap_ns - (1 << 64) if gap_ns >= WRAPPED else gap_ns


def _without_steps(hist: Hist, span_ns: int | None, stall_max_ns: int | None) -> Hist:
    """A histogram of a probe that predates clock_step lines, corrected as the probe now counts.

    Gaps in buckets that cannot hold a real gap move to bucket 0 (a step back
    counts as a gap of 0); the maximum, which was such a gap, becomes the
    longest real stall of that vCPU or else the low bound of the highest bucket left.
    """
    if _possible(hist.max_gap_ns, span_ns):
        return hist
    buckets = list(hist.buckets)
    for k in range(1, len(buckets)):
        if not _possible(Hist.bucket_bounds(k)[0], span_ns):
            buckets[0] += buckets[k]
            buckets[k] = 0
    while len(buckets) > 1 and not buckets[-1]:
        buckets.pop()
    top = Hist.bucket_bounds(len(buckets) - 1)[0]
    return hist.model_copy(update={"buckets": tuple(buckets),
                                   "max_gap_ns": max(stall_max_ns or 0, top)})


def load_guest(run_path: Path) -> GuestObservations:
    """Read ``src/console.jsonl`` and ``dst/console.jsonl`` of a run directory."""
    seen = GuestObservations()
    stalls: list[Stall] = []
    steps: list[ClockStep] = []
    arrivals: list[int] = []
    for side in ("src", "dst"):
        path = run_path / side / "console.jsonl"
        if artifact_path(path) is None:
            continue
        for line in read_console_log(path):
            arrivals.append(line.host_ns)
            event = line.event
            if event is None:
                continue
            if isinstance(event, Heartbeat):
                seen.heartbeats.append(
                    HeartbeatArrival(event.seq, event.guest_ns, line.host_ns, side))
            elif isinstance(event, Stall):
                stalls.append(event)
            elif isinstance(event, ClockStep):
                steps.append(event)
            elif isinstance(event, Ready):
                seen.ready = seen.ready or event
            elif isinstance(event, Hist):
                seen.histograms[event.cpu] = event
            elif isinstance(event, Verify):
                seen.verify = event
            elif isinstance(event, ProbeError):
                seen.errors.append(f"{side}: {event.msg}")
            elif event.kind == "malformed":
                seen.malformed += 1
    span = max(arrivals) - min(arrivals) if len(arrivals) > 1 else None
    seen.console_span_ns = span
    host_ns = _host_clock(seen.heartbeats)
    seen.clock_steps = [GuestClockStep(s.cpu, s.before_ns, -s.back_ns, host_ns(s.before_ns),
                                       "clock_step") for s in steps]
    for stall in stalls:
        if _possible(stall.gap_ns, span):
            seen.stalls.append(ProbeStall(stall.cpu, stall.start_ns, stall.gap_ns,
                                          host_ns(stall.start_ns)))
        else:
            seen.clock_steps.append(GuestClockStep(
                stall.cpu, stall.start_ns, _step_of_impossible_gap(stall.gap_ns),
                host_ns(stall.start_ns), "stall", stall.gap_ns))
    for cpu, hist in list(seen.histograms.items()):
        longest = max((s.gap_ns for s in seen.stalls if s.vcpu == cpu), default=None)
        seen.histograms[cpu] = _without_steps(hist, span, longest)
    seen.clock_steps.sort(key=lambda s: s.guest_ns)
    return seen
