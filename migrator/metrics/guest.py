"""What the guest probe observed, read back from the console artifacts.

Two views of the same stalls:

* the guest's own: gaps in each vCPU's timestamp sequence, by the guest's
  CLOCK_MONOTONIC, which does not run while QEMU has the VM stopped;
* the outside world's: gaps between heartbeat arrivals at the controller, by
  the host wall clock, which does.

Guest times are placed on the host timeline through the heartbeat preceding
them (host arrival + guest time elapsed since that heartbeat).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from migrator.guest.console import read_console_log
from migrator.guest.protocol import Heartbeat, Hist, ProbeError, Ready, Stall, Verify

__all__ = ["GuestObservations", "HeartbeatArrival", "ProbeStall", "load_guest"]


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


@dataclass
class GuestObservations:
    """Everything the probe reported over both consoles of a run."""

    ready: Ready | None = None
    heartbeats: list[HeartbeatArrival] = field(default_factory=list)
    stalls: list[ProbeStall] = field(default_factory=list)
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


def _place_on_host(stalls: list[tuple[int, int, int]], beats: list[HeartbeatArrival]
                   ) -> list[ProbeStall]:
    ordered = sorted(beats, key=lambda h: h.guest_ns)
    guest_times = [h.guest_ns for h in ordered]
    placed = []
    for vcpu, start, gap in stalls:
        index = bisect.bisect_right(guest_times, start) - 1
        host = None
        if index >= 0:
            anchor = ordered[index]
            host = anchor.host_ns + (start - anchor.guest_ns)
        placed.append(ProbeStall(vcpu, start, gap, host))
    return placed


def load_guest(run_path: Path) -> GuestObservations:
    """Read ``src/console.jsonl`` and ``dst/console.jsonl`` of a run directory."""
    seen = GuestObservations()
    raw_stalls: list[tuple[int, int, int]] = []
    for side in ("src", "dst"):
        path = run_path / side / "console.jsonl"
        if not path.exists():
            continue
        for line in read_console_log(path):
            event = line.event
            if event is None:
                continue
            if isinstance(event, Heartbeat):
                seen.heartbeats.append(
                    HeartbeatArrival(event.seq, event.guest_ns, line.host_ns, side))
            elif isinstance(event, Stall):
                raw_stalls.append((event.cpu, event.start_ns, event.gap_ns))
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
    seen.stalls = _place_on_host(raw_stalls, seen.heartbeats)
    return seen
