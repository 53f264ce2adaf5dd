"""What a run's HTML page shows, as plain data: derived by :mod:`migrator.metrics.run_page`,
drawn by :mod:`migrator.report.html`; and what the overlay page of several runs shows,
derived by :mod:`migrator.metrics.run_overlay`, drawn by :mod:`migrator.report.overlay`.

The renderers and the artifact analysis are siblings that must not import each
other; this module is the contract between them (dataclasses and numpy arrays,
no file reading and no plotting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from migrator.model import Metric, Report

__all__ = ["BlockCdf", "Cdf", "Clock", "HeadlineRow", "HeartbeatGaps", "OverlayData",
           "OverlayRun", "RunPageData", "SideSamples", "StallSeries", "StallView", "ThreadLoad"]

F64 = npt.NDArray[np.float64]
S = 1e9


@dataclass(frozen=True)
class Clock:
    """The host wall clock as the time axes show it.

    ``t0_ns`` is t = 0: the ``migrate`` command when the run got that far, else
    the first phase, else the run's start.  ``end_ns``: the end of the run, where
    a phase still open at the end stops.  ``view_ns`` is the initial x range:
    from the warm-up on (the boot takes seconds and shows nothing about the
    migration) to the last phase change, heartbeat or stall (a run that waited
    out a timeout would otherwise be mostly that wait); the autoscale button
    shows everything.
    """

    t0_ns: int
    what: str
    axis: str
    end_ns: int
    view_ns: tuple[int, int]

    def s(self, ns: int) -> float:
        """Seconds since t = 0 (subtracted in integers: epoch ns overflow a float mantissa)."""
        return (ns - self.t0_ns) / S

    def view(self) -> list[float]:
        """The initial x range in seconds, with a small margin."""
        lo, hi = self.s(self.view_ns[0]), self.s(self.view_ns[1])
        pad = max((hi - lo) * 0.02, 0.01)
        return [lo - pad, hi + pad]


@dataclass(frozen=True)
class SideSamples:
    """``query-migrate`` replies of one side that carry ram statistics, as arrays.

    ``t_s`` is the reply time relative to the page's time origin: QEMU fills in
    the reply when it runs the command, which a busy main loop delays (the
    destination's replies took up to 0.5 s during the switchover), so the reply
    time is closer to the moment the numbers describe than the request time.
    ``replies`` counts every reply of the side, with ram statistics or not, with a
    time or not (a page without ram statistics says how many replies there were).
    """

    side: str
    replies: int
    t_s: F64
    remaining: F64
    transferred: F64
    mbps: F64


@dataclass(frozen=True)
class Cdf:
    """The step CDF of a non-empty fetch latency histogram: ``x_ms`` the step
    positions (bucket upper bounds clamped to the exact max, in ms), ``fraction``
    the fraction of the ``count`` faults at most that."""

    count: int
    x_ms: F64
    fraction: F64


@dataclass(frozen=True)
class BlockCdf:
    """The fetch latency CDF of one RAMBlock (``report.fetch[*].histogram``)."""

    ramblock: str
    page_size: int
    cdf: Cdf


@dataclass(frozen=True)
class StallSeries:
    """The stalls of one vCPU that can be placed on the host clock, in probe order:
    host-clock start, duration by the guest clock (ms) and the phase at the start."""

    vcpu: int
    starts_ns: list[int]
    gaps_ms: F64
    phases: list[str]


@dataclass(frozen=True)
class HeartbeatGaps:
    """Heartbeat arrival gaps longer than ``cut_ms`` (the outside view): where each
    opened (host clock, ns), its length (ms) and the phases it spans."""

    cut_ms: float
    starts_ns: npt.NDArray[np.int64]
    gaps_ms: F64
    spans: list[str]


@dataclass(frozen=True)
class StallView:
    """The guest stall timeline's series and what it cannot show.

    ``stalls``: every stall the probe reported (placed or not); ``unplaced``: those
    before the first heartbeat; ``clock_steps``: guest clock steps (not stalls);
    ``heartbeat_gaps``: None with fewer than two heartbeats or no outside view.
    """

    series: list[StallSeries]
    stalls: int
    unplaced: int
    clock_steps: int
    heartbeat_gaps: HeartbeatGaps | None


@dataclass(frozen=True)
class ThreadLoad:
    """The CPU use over time of one kind of QEMU thread on one side.

    ``t_s``: the middle of each interval between two consecutive samples of
    ``SIDE/threads.jsonl`` (s on the page's clock); ``percent``: the CPU time the
    kind's ``threads`` took in it, summed, in % of one core; ``source`` says where
    the numbers come from.  ``tick_percent`` is the resolution: one clock tick of
    the host over the median interval, in % of one core (each point is a multiple
    of it, give or take a sample answered late).
    """

    side: str
    thread: str
    threads: int
    t_s: F64
    percent: F64
    source: str
    tick_percent: float


@dataclass(frozen=True)
class RunPageData:
    """Everything the run page shows, read from one run directory.

    ``switchover_ns``: the source's STOP after ``migrate`` (the start of the
    freeze phase), where the guest left the source; None when it never did.
    """

    report: Report
    report_origin: str
    meta: dict[str, Any]
    scenario_text: str
    threshold_ms: float
    clock: Clock
    samples: dict[str, SideSamples]
    fetch_cdfs: list[BlockCdf]
    stalls: StallView
    threads: list[ThreadLoad]
    switchover_ns: int | None


@dataclass(frozen=True)
class OverlayRun:
    """One run of the overlay page.

    ``label`` names it in every legend (scenario, run id, the first dimensions
    that differ); ``differs`` holds its value of every dimension that differs
    between the runs; ``page`` is its run page's data.  On the overlay's time
    axes t = 0 is ``zero_ns`` (``zero_what`` says which instant that is), so a
    time ``t`` of the page's clock is at ``t + shift_s`` there.  ``threads``: the
    thread kinds the overlay's CPU plot shows.
    """

    label: str
    differs: dict[str, str]
    path: str
    page: RunPageData
    zero_ns: int
    zero_what: str
    threads: list[ThreadLoad]

    @property
    def shift_s(self) -> float:
        """What moves a time of the page's clock onto the overlay's axis (s)."""
        return (self.page.clock.t0_ns - self.zero_ns) / S


@dataclass(frozen=True)
class HeadlineRow:
    """One headline number of every run, side by side (None where a run has none)."""

    name: str
    unit: str
    metrics: list[Metric | None]


@dataclass(frozen=True)
class OverlayData:
    """Everything the overlay page of several runs shows.

    ``dimensions``: the names of the dimensions whose values differ between the
    runs, in the order the page lists them.
    """

    runs: list[OverlayRun]
    dimensions: list[str]
    headline: list[HeadlineRow]
