"""Everything a run's HTML page shows, read from the run directory (no plotting).

:func:`load_run_page_data` reads ``report.json`` (derived again from the raw
artifacts with :func:`build_report` when it is missing or of another schema),
``run.json``, ``scenario.toml``, the guest consoles, ``timeline.jsonl`` and
``samples.jsonl``, and returns a :class:`~migrator.pagedata.RunPageData` for
:func:`migrator.report.html.render_run_html` to draw.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from migrator.errors import ArtifactError
from migrator.metrics.events import PhaseTimeline, load_events, read_jsonl, time_zero
from migrator.metrics.guest import GuestObservations, load_guest
from migrator.metrics.histogram import Histogram
from migrator.metrics.summary import build_report, stall_threshold_ms
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
)

__all__ = ["block_cdf", "fetch_cdfs", "histogram_cdf", "load_run_page_data", "load_run_report",
           "load_samples", "run_clock", "stall_view"]

MS = 1e6


def load_run_report(run_path: Path) -> tuple[Report, str]:
    """The run's report and a sentence saying where it came from.

    ``report.json`` is a cache of :func:`build_report`: when it is absent, or
    written by another schema version, the report is derived again from the
    raw artifacts (nothing is written).
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
    return build_report(run_path), f"{why}: derived again from the raw artifacts"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; is this a migrator run directory?") from None


def load_samples(run_path: Path, clock: Clock) -> dict[str, SideSamples]:
    """Both sides' ``samples.jsonl`` replies with ``ram`` members (see :class:`SideSamples`)."""
    rows: dict[str, list[tuple[int, float, float, float]]] = {"src": [], "dst": []}
    replies = {"src": 0, "dst": 0}
    for record in read_jsonl(run_path / "samples.jsonl"):
        side = record.get("side")
        reply = record.get("reply")
        if side not in rows or not isinstance(reply, dict):
            continue
        replies[side] += 1
        ram = reply.get("ram")
        if not isinstance(ram, dict) or "remaining" not in ram or "transferred" not in ram:
            continue
        when = record.get("reply_ns") or record.get("host_ns")
        if not isinstance(when, int):
            continue
        rows[side].append((when, float(ram["remaining"]), float(ram["transferred"]),
                           float(ram.get("mbps", np.nan))))
    out = {}
    for side, data in rows.items():
        data.sort()
        arr = np.array([r[1:] for r in data], dtype=np.float64).reshape(-1, 3)
        t_s = np.array([clock.s(int(r[0])) for r in data], dtype=np.float64)
        out[side] = SideSamples(side, replies[side], t_s, arr[:, 0], arr[:, 1], arr[:, 2])
    return out


def run_clock(run_path: Path, report: Report, meta: Mapping[str, Any],
              guest: GuestObservations) -> Clock:
    """The :class:`~migrator.pagedata.Clock` of one run (see there)."""
    t0, start = time_zero(load_events(run_path).marks, report.phases,
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


def load_run_page_data(run_path: Path, report: Report | None = None) -> RunPageData:
    """What the HTML page of one run directory shows (see module docstring); writes nothing.

    ``report``: the run's report as the caller just built and wrote it to
    ``report.json``, so it is not read back; None reads (or derives) it here.
    """
    report, report_origin = ((report, "report.json") if report is not None
                             else load_run_report(run_path))
    meta = json.loads(_read_text(run_path / "run.json"))
    scenario_text = _read_text(run_path / "scenario.toml")
    try:
        scenario = tomllib.loads(scenario_text)
    except tomllib.TOMLDecodeError as error:
        raise ArtifactError(f"{run_path / 'scenario.toml'}: {error}") from None
    threshold_ms = stall_threshold_ms(scenario)
    guest = load_guest(run_path)
    clock = run_clock(run_path, report, meta, guest)
    samples = load_samples(run_path, clock)
    return RunPageData(report, report_origin, meta, scenario_text, threshold_ms, clock,
                       samples, fetch_cdfs(report), stall_view(report, guest, threshold_ms))
