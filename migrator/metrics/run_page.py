"""Everything a run's HTML page shows, derived from the run directory (no plotting).

:func:`load_run_page_data` takes the run's artifacts as
:func:`~migrator.metrics.run_artifacts.load_run_artifacts` read them (``run.json``,
``scenario.toml``, the guest consoles, ``timeline.jsonl``, ``samples.jsonl``,
``SIDE/threads.jsonl``)
and its report (the caller's, else ``report.json``, else derived again from
those artifacts with :func:`derive_report` when it is missing or of another
schema), and returns a :class:`~migrator.pagedata.RunPageData` for
:func:`migrator.report.html.render_run_html` to draw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import ValidationError

from migrator.metrics.events import PhaseTimeline, time_zero
from migrator.metrics.guest import GuestObservations
from migrator.metrics.histogram import Histogram
from migrator.metrics.qemu_counters import SampledReplies
from migrator.metrics.run_artifacts import RunArtifacts
from migrator.metrics.summary import build_report, derive_report, stall_threshold_ms
from migrator.metrics.threads import ThreadSamples, source_of, thread_load
from migrator.model import SCHEMA_VERSION, BlockFetch, Report
from migrator.pagedata import (
    BlockCdf,
    Cdf,
    Clock,
    HeartbeatGaps,
    RunPageData,
    SideSamples,
    StallSeries,
    StallView,
    ThreadLoad,
)

__all__ = ["block_cdf", "fetch_cdfs", "guest_ram_block", "histogram_cdf", "load_run_page_data",
           "load_run_report", "run_clock", "side_samples", "stall_view", "switchover_ns",
           "thread_loads"]

MS = 1e6


def load_run_report(run_path: Path,
                    artifacts: RunArtifacts | None = None) -> tuple[Report, str]:
    """The run's report and a sentence saying where it came from.

    ``report.json`` is a cache of :func:`build_report`: when it is absent, or
    written by another schema version, the report is derived again from the
    raw artifacts (``artifacts`` when the caller has read them; nothing is written).
    """
    path = run_path / "report.json"
    if path.exists():
        try:
            report = Report.model_validate_json(path.read_bytes())
        except ValidationError as error:
            why = (f"report.json does not match schema {SCHEMA_VERSION} "
                   f"({error.error_count()} errors)")
        else:
            if report.schema_version == SCHEMA_VERSION:
                return report, "report.json"
            why = f"report.json has schema {report.schema_version}, not {SCHEMA_VERSION}"
    else:
        why = "no report.json"
    derived = derive_report(artifacts) if artifacts is not None else build_report(run_path)
    return derived, f"{why}: derived again from the raw artifacts"


def side_samples(samples: SampledReplies, clock: Clock) -> dict[str, SideSamples]:
    """Both sides' timed replies with ``ram`` members, in time order (see :class:`SideSamples`)."""
    out = {}
    for side, replies in samples.timed.items():
        rows = sorted(
            (when, float(ram["remaining"]), float(ram["transferred"]),
             float(ram.get("mbps", np.nan)))
            for when, reply in replies
            if isinstance(ram := reply.get("ram"), dict)
            and "remaining" in ram and "transferred" in ram)
        arr = np.array([r[1:] for r in rows], dtype=np.float64).reshape(-1, 3)
        t_s = np.array([clock.s(int(r[0])) for r in rows], dtype=np.float64)
        out[side] = SideSamples(side, samples.replies(side), t_s, arr[:, 0], arr[:, 1],
                                arr[:, 2])
    return out


def run_clock(artifacts: RunArtifacts, report: Report) -> Clock:
    """The :class:`~migrator.pagedata.Clock` of one run (see there)."""
    meta, guest = artifacts.meta_document, artifacts.guest
    t0, start = time_zero(artifacts.events.marks, report.phases,
                          int(meta.get("started_ns") or 0))
    if start == "migrate":
        what, axis = "the migrate command", "s since migrate"
    elif start is not None:
        what, axis = f"the start of {start}", f"s since {start}"
    else:
        what, axis = "the start of the run", "s since the run started"
    seen = ([p.end_ns or p.start_ns for p in report.phases]
            + [h.host_ns for h in guest.heartbeats]
            + [st.host_start_ns + st.gap_ns for st in guest.stalls if st.host_start_ns])
    last_seen = max([*seen, t0])
    end = max(last_seen, int(meta.get("finished_ns") or 0))
    warmup = next((p.start_ns for p in report.phases if p.name == "warmup"), None)
    first_seen = min([p.start_ns for p in report.phases] or [t0])
    return Clock(t0, what, f"{axis} (host wall clock)", end, (warmup or first_seen, last_seen))


def histogram_cdf(hist: Histogram) -> Cdf:
    """The step CDF of a non-empty fetch latency histogram (ns), x in ms.

    Each step is a bucket's upper bound (clamped to the exact max).
    """
    buckets = hist.buckets()
    assert hist.min is not None
    assert hist.max is not None
    x = np.array([hist.min] + [min(b.upper, hist.max) for b in buckets]) / MS
    cum = np.concatenate(([0], np.cumsum([b.count for b in buckets]))) / hist.count
    return Cdf(hist.count, x, cum)


def block_cdf(block: BlockFetch) -> BlockCdf | None:
    """The fetch latency CDF of one RAMBlock (None when it took no faults)."""
    hist = Histogram.from_dict(block.histogram)
    return BlockCdf(block.ramblock, block.page_size, histogram_cdf(hist)) if hist.count else None


def guest_ram_block(report: Report, page_size: int | None) -> BlockFetch | None:
    """The guest RAM block: the block of the backing's page size that took the most faults
    (of any page size when ``page_size`` is None)."""
    blocks = [block for block in report.fetch
              if page_size is None or block.page_size == page_size]
    return max(blocks, key=lambda block: block.faults, default=None)


def fetch_cdfs(report: Report) -> list[BlockCdf]:
    """The CDF of each RAMBlock of ``report.fetch`` that took faults, in report order."""
    return [cdf for cdf in map(block_cdf, report.fetch) if cdf is not None]


def stall_view(report: Report, guest: GuestObservations, threshold_ms: float) -> StallView:
    """Every guest stall per vCPU on the host clock, and the heartbeat gaps longer than
    the heartbeat period plus the probe's threshold (the cut ``report.outside_stalls``
    counts), each with its phase(s)."""
    timeline = PhaseTimeline(list(report.phases))
    unplaced = sum(1 for s in guest.stalls if s.host_start_ns is None)
    series = []
    for vcpu in sorted({s.vcpu for s in guest.stalls}):
        mine = [s for s in guest.stalls if s.vcpu == vcpu and s.host_start_ns is not None]
        if not mine:
            continue
        starts = [s.host_start_ns or 0 for s in mine]
        series.append(StallSeries(vcpu, starts, np.array([s.gap_ns / MS for s in mine]),
                                  [timeline.phase_at(ns) for ns in starts]))
    gaps = None
    outside = report.outside_stalls
    if outside is not None and len(guest.heartbeats) > 1:
        arrivals = guest.heartbeat_arrivals_ns()
        gaps_ms = np.diff(arrivals) / MS
        cut = outside.period_ms + threshold_ms
        over = np.flatnonzero(gaps_ms > cut)
        starts_ns = arrivals[over]
        over_ms = gaps_ms[over]
        gaps = HeartbeatGaps(cut, starts_ns, over_ms, [
            timeline.span(int(a), int(a + g * MS))
            for a, g in zip(starts_ns.tolist(), over_ms.tolist(), strict=True)])
    return StallView(series, len(guest.stalls), unplaced, len(guest.clock_steps), gaps)


def thread_loads(threads: dict[str, ThreadSamples], clock: Clock) -> list[ThreadLoad]:
    """Each side's CPU use per thread kind over time (:func:`thread_load`), on ``clock``."""
    out = []
    for side, samples in threads.items():
        times = np.array([clock.s(ns) for ns in samples.times], dtype=np.float64)
        middle = (times[1:] + times[:-1]) / 2
        tick = 100 / samples.per_second / float(np.median(np.diff(times)) or np.inf)
        out += [ThreadLoad(side, kind, count, middle, percent,
                           f"{source_of(side)}: Δ(utime + stime) / CLK_TCK / Δt between "
                           "samples, % of one core", tick)
                for kind, count, percent in thread_load(samples)]
    return out


def switchover_ns(report: Report) -> int | None:
    """Where the guest left the source: the start of the freeze phase (the source's STOP
    after ``migrate``), None when the run never got there."""
    return next((phase.start_ns for phase in report.phases if phase.name == "freeze"), None)


def load_run_page_data(artifacts: RunArtifacts, report: Report | None = None) -> RunPageData:
    """What the HTML page of one run shows (see module docstring); writes nothing.

    ``artifacts``: the run directory as :func:`load_run_artifacts` read it.
    ``report``: the run's report as the caller just derived it from ``artifacts``
    and wrote it to ``report.json``, so it is not read back; None reads (or
    derives) it here.
    """
    report, report_origin = ((report, "report.json") if report is not None
                             else load_run_report(artifacts.path, artifacts))
    threshold_ms = stall_threshold_ms(artifacts.scenario)
    clock = run_clock(artifacts, report)
    return RunPageData(report, report_origin, artifacts.meta_document, artifacts.scenario_text,
                       threshold_ms, clock, side_samples(artifacts.samples, clock),
                       fetch_cdfs(report),
                       stall_view(report, artifacts.guest, threshold_ms),
                       thread_loads(artifacts.threads, clock), switchover_ns(report))
