"""report.json from a run directory's raw artifacts, and nothing else.

Pure functions of files: no live process is touched, so ``migrator report RUN``
rebuilds exactly what ``migrator run`` printed.  :func:`build_report` reads and
derives in one call; :func:`derive_report` derives from artifacts already read
(:func:`~migrator.metrics.run_artifacts.load_run_artifacts`), for a caller that
draws the run page from them too.  Each section names its source;
where two sources measure one quantity, both land in ``comparisons``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from migrator.metrics.events import MigrationEvents, PhaseTimeline
from migrator.metrics.guest import GuestObservations
from migrator.metrics.hgm import hgm_section
from migrator.metrics.histogram import Histogram
from migrator.metrics.latency_dist import compare_latency_dist
from migrator.metrics.placement import placement_of, placement_section, placement_warnings
from migrator.metrics.qemu_counters import QemuCounters
from migrator.metrics.ramblock import load_ramblocks
from migrator.metrics.recovery import analyze_recovery
from migrator.metrics.run_artifacts import RunArtifacts, load_run_artifacts
from migrator.metrics.run_outcome import derive_outcome
from migrator.metrics.threads import thread_cpu
from migrator.metrics.trace import analyze_trace
from migrator.metrics.trace_results import TraceAnalysis
from migrator.metrics.tuning import tuning_of, tuning_warnings
from migrator.model import (
    BlockFetch,
    ClockStepRecord,
    Comparison,
    Freeze,
    GuestClockSteps,
    GuestVcpuStalls,
    Metric,
    OutsideStalls,
    Report,
    Stall,
)
from migrator.qemu.known_issues import tcg_dirty_tracking_risk
from migrator.rundir import artifact_path, atomic_write

__all__ = ["build_report", "derive_report", "stall_threshold_ms", "write_report"]

TRACE_SOURCE = "dst QEMU trace: postcopy_ram_fault_thread_request -> postcopy_place_page"
BACKLOG_SOURCE = ("dst QEMU trace: placements between postcopy_ram_fault_thread_request and "
                  "the placement of its page")
EVENTS_SOURCE = "QMP event timestamps (QEMU, host wall clock)"
PROBE_SOURCE = "guest probe, guest CLOCK_MONOTONIC"
CLOCK_STEPS_SOURCE = ("guest probe: clock_step lines, and stall lines with an impossible gap "
                      "(older probes), guest CLOCK_MONOTONIC")
CLOCK_STEP_SOURCE = {
    "clock_step": "guest probe clock_step lines, guest CLOCK_MONOTONIC",
    "stall": "guest probe stall lines with an impossible gap (a probe before clock_step "
             "lines: unsigned now - prev), guest CLOCK_MONOTONIC",
}
OUTSIDE_SOURCE = "heartbeat arrival at the controller, host wall clock"
MS = 1e6


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / MS, 4)


def _metric(value: float | int | None, unit: str, source: str) -> Metric:
    return Metric(value=value, unit=unit, source=source)


def _quantiles(hist: Histogram, percentiles: tuple[float, ...], unit: str, source: str,
               scale: Callable[[float | None], float | None] | None = None) -> dict[str, Metric]:
    """``p<N>`` for each percentile, then ``max``, of a histogram (values scaled to ``unit``)."""
    def value(v: int | None) -> float | int | None:
        return v if scale is None else scale(v)

    out = {f"p{p:g}": _metric(value(v), unit, source)
           for p, v in hist.percentiles(percentiles).items()}
    out["max"] = _metric(value(hist.max), unit, source)
    return out


def _compare(quantity: str, a: Metric, b: Metric, note: str = "") -> Comparison:
    diff = None
    if isinstance(a.value, int | float) and isinstance(b.value, int | float):
        diff = round(float(b.value) - float(a.value), 4)
    return Comparison(quantity=quantity, a=a, b=b, difference=diff, note=note)


def _fetch(analysis: TraceAnalysis) -> list[BlockFetch]:
    blocks = []
    for block in analysis.blocks:
        if not block.faults and not block.pages_placed:
            continue
        hist = block.latency
        latency = _quantiles(hist, (50, 90, 99, 99.9), "ms", TRACE_SOURCE, _ms)
        latency["mean"] = _metric(_ms(hist.mean), "ms", TRACE_SOURCE)
        backlog = _quantiles(block.backlog, (50, 90), "placements", BACKLOG_SOURCE)
        blocks.append(BlockFetch(
            ramblock=block.name, page_size=block.page_size, faults=block.faults,
            resolved=block.resolved, unresolved=block.unresolved,
            pages_placed_requested=block.pages_requested,
            pages_placed_background=block.pages_background, zero_pages=block.zero_pages,
            placement_granularity=block.placement_granularity, latency_ms=latency,
            backlog_placements=backlog, histogram=hist.to_dict(),
        ))
    blocks.sort(key=lambda b: -b.faults)
    return blocks


def _freeze(ev: MigrationEvents, counters: QemuCounters) -> Freeze | None:
    migrate = ev.marks.get("migrate", 0)
    stop = ev.first("src", "STOP", after_ns=migrate)
    resume = ev.first("dst", "RESUME")
    if stop is None and resume is None:
        return None
    freeze = _ms(resume - stop) if stop is not None and resume is not None else None
    return Freeze(
        source_stop_ns=stop, destination_resume_ns=resume,
        freeze=_metric(freeze, "ms", f"src STOP -> dst RESUME, {EVENTS_SOURCE}"),
        qemu_downtime=counters.metric("src", "downtime", "ms"),
    )


def _vcpu_stalls(guest: GuestObservations, phases: PhaseTimeline) -> list[GuestVcpuStalls]:
    vcpus = sorted({s.vcpu for s in guest.stalls} | set(guest.histograms))
    out = []
    for vcpu in vcpus:
        mine = [s for s in guest.stalls if s.vcpu == vcpu]
        by_phase: dict[str, int] = {}
        for stall in mine:
            name = phases.phase_at(stall.host_start_ns) if stall.host_start_ns else "unknown"
            by_phase[name] = by_phase.get(name, 0) + 1
        hist = guest.histograms.get(vcpu)
        p99 = None
        if hist is not None and any(hist.buckets):
            counts = np.array(hist.buckets, dtype=np.int64)
            rank = int(np.searchsorted(np.cumsum(counts), 0.99 * counts.sum()))
            p99 = _ms(hist.bucket_bounds(rank)[1])
        max_gap = max([s.gap_ns for s in mine] + ([hist.max_gap_ns] if hist else []),
                      default=None)
        out.append(GuestVcpuStalls(
            vcpu=vcpu, stalls=len(mine),
            max_ms=_metric(_ms(max_gap), "ms", PROBE_SOURCE),
            p99_ms=_metric(p99, "ms", f"{PROBE_SOURCE}, log2 histogram (bucket upper bound)"),
            total_stalled_ms=_metric(_ms(sum(s.gap_ns for s in mine)), "ms", PROBE_SOURCE),
            by_phase=by_phase,
            histogram={"unit": "ns", "scheme": "log2: bucket k = [2^k, 2^(k+1)) ns",
                       "buckets": list(hist.buckets), "ops": hist.ops} if hist else None,
        ))
    return out


def _clock_steps(guest: GuestObservations, phases: PhaseTimeline
                 ) -> tuple[GuestClockSteps | None, list[str]]:
    """The guest clock's steps (never stalls) and a warning when there were any."""
    if guest.ready is None and not guest.clock_steps:
        return None, []
    steps = guest.clock_steps
    back = min((s.step_ns for s in steps if s.step_ns < 0), default=None)
    largest = sorted(steps, key=lambda s: -abs(s.step_ns))[:10]
    section = GuestClockSteps(
        count=_metric(len(steps), "steps", CLOCK_STEPS_SOURCE),
        largest_back=_metric(None if back is None else _ms(-back), "ms", CLOCK_STEPS_SOURCE),
        steps=[ClockStepRecord(
            vcpu=s.vcpu, host_ns=s.host_ns,
            phase=phases.phase_at(s.host_ns) if s.host_ns else "unknown",
            step=_metric(_ms(s.step_ns), "ms", CLOCK_STEP_SOURCE[s.reported_as]),
            reported_as=s.reported_as) for s in largest],
    )
    if not steps:
        return section, []
    top, record = largest[0], section.steps[0]
    warning = (f"guest clock: CLOCK_MONOTONIC stepped {len(steps)} time(s), largest "
               f"{'back' if top.step_ns < 0 else 'ahead'} {abs(top.step_ns) / MS:,.3f} ms on "
               f"vCPU {top.vcpu} ({record.phase}); counted as clock steps, not as stalls")
    gaps = [s.line_gap_ns for s in steps if s.line_gap_ns is not None]
    if gaps:
        span = "" if guest.console_span_ns is None else (
            f", longer than the {guest.console_span_ns / MS:,.0f} ms the consoles recorded")
        warning += (f"; {len(gaps)} of them came as stall lines with an impossible gap (up to "
                    f"{max(gaps) / MS:,.0f} ms{span}) from a probe that predates clock_step "
                    "lines")
    return section, [warning]


def _outside(guest: GuestObservations, phases: PhaseTimeline,
             threshold_ms: float) -> OutsideStalls | None:
    if len(guest.heartbeats) < 2:
        return None
    arrivals = guest.heartbeat_arrivals_ns()
    gaps = np.diff(arrivals)
    period = float(np.median(gaps)) / MS
    worst_idx = np.argsort(gaps)[::-1][:10]
    worst = [Stall(host_ns=int(arrivals[i]), duration_ms=round(float(gaps[i]) / MS, 3),
                   phase=phases.span(int(arrivals[i]), int(arrivals[i + 1])))
             for i in worst_idx]
    return OutsideStalls(
        heartbeats=len(guest.heartbeats), lost=guest.lost_heartbeats(),
        period_ms=round(period, 3),
        max_gap=_metric(_ms(float(gaps.max())), "ms", OUTSIDE_SOURCE),
        p99_gap=_metric(_ms(float(np.percentile(gaps, 99))), "ms", OUTSIDE_SOURCE),
        gaps_over_threshold=int((gaps > (period + threshold_ms) * MS).sum()),
        worst=worst,
    )


def stall_threshold_ms(scenario: dict[str, Any]) -> float:
    """The probe's stall threshold in ms from a run's ``scenario.toml`` (parsed); the
    probe's default (2 ms) when the scenario predates the field."""
    return float(scenario.get("workload", {}).get("stall_threshold_us", 2000)) / 1000


def build_report(run_path: Path) -> Report:
    """Derive the report of one run directory (see module docstring)."""
    return derive_report(load_run_artifacts(run_path))


def derive_report(artifacts: RunArtifacts) -> Report:
    """The report of a run from its artifacts as :func:`load_run_artifacts` read them; the
    destination trace, its RAM blocks and the HGM smaps samples are read here."""
    run_path, meta, scenario = artifacts.path, artifacts.meta, artifacts.scenario
    ev, counters, guest = artifacts.events, artifacts.counters, artifacts.guest
    phases = PhaseTimeline.from_events(ev)
    warnings: list[str] = list(counters.warnings)

    analysis: TraceAnalysis | None = None
    trace = run_path / "dst" / "trace.log"
    if artifact_path(trace) is not None:
        ramblocks_file = run_path / "dst" / "ramblocks.txt"
        blocks = load_ramblocks(ramblocks_file) if ramblocks_file.exists() else []
        if not blocks:
            warnings.append("no dst/ramblocks.txt: page sizes guessed from the trace")
        analysis = analyze_trace(trace, blocks)
        if analysis.malformed_lines:
            warnings.append(f"trace: {analysis.malformed_lines} malformed lines skipped")
    fetch = _fetch(analysis) if analysis else []
    for block in fetch:
        if block.unresolved:
            warnings.append(f"{block.ramblock}: {block.unresolved} fault requests never "
                            "resolved in the trace (trace cut short?)")

    vm = scenario.get("vm", {})
    migration = scenario.get("migration", {})
    hgm, hgm_warnings = hgm_section(run_path, meta, vm.get("backing"), analysis, phases)
    warnings += hgm_warnings
    qemu = meta.qemu.destination
    environment = {
        "qemu_version": qemu.version, "qemu_binary": qemu.binary, "qemu_root": qemu.root,
        "accel": meta.accel.accel, "accel_decided_by": meta.accel.method,
        "backing": vm.get("backing"), "memory_mib": vm.get("memory_mib"),
        "vcpus": vm.get("vcpus"), "postcopy": migration.get("postcopy"),
        "preempt": migration.get("preempt"), "switchover": migration.get("switchover"),
        "hgm": hgm.enabled,
        "guest_kernel": meta.guest.kernel_release,
        "host_kernel": meta.controller.kernel,
        "migrator_version": meta.migrator_version,
        "tuning": tuning_of(meta),
        "placement": placement_of(scenario),
    }

    marks = ev.marks
    postcopy_start = ev.first("src", "MIGRATION", "postcopy-active")
    dst_done = ev.first("dst", "MIGRATION", "completed")
    timings = {
        "total-time": counters.metric("src", "total-time", "ms"),
        "setup-time": counters.metric("src", "setup-time", "ms"),
        "pre-copy (migrate -> postcopy-active)": _metric(
            _ms(postcopy_start - marks["migrate"]) if postcopy_start and "migrate" in marks
            else None, "ms", EVENTS_SOURCE),
        "post-copy (postcopy-active -> dst completed)": _metric(
            _ms(dst_done - postcopy_start) if postcopy_start and dst_done else None,
            "ms", EVENTS_SOURCE),
        "guest boot to ready": _metric(
            _ms(marks["guest-ready"] - marks["source-started"])
            if {"guest-ready", "source-started"} <= marks.keys() else None,
            "ms", "migrator timeline (host wall clock)"),
    }
    transfer = {
        "ram.transferred": counters.metric("src", "ram.transferred", "bytes"),
        "ram.precopy-bytes": counters.metric("src", "ram.precopy-bytes", "bytes"),
        "ram.postcopy-bytes": counters.metric("src", "ram.postcopy-bytes", "bytes"),
        "ram.postcopy-requests": counters.metric("src", "ram.postcopy-requests", "requests"),
        "ram.dirty-sync-count": counters.metric("src", "ram.dirty-sync-count", "passes"),
    }
    blocktime: dict[str, Metric] = {
        "postcopy-blocktime (all vCPUs)": counters.metric("dst", "postcopy-blocktime", "ms"),
    }
    vcpu_blocktime = counters.destination.get("postcopy-vcpu-blocktime")
    if isinstance(vcpu_blocktime, list):
        for index, value in enumerate(vcpu_blocktime):
            blocktime[f"postcopy-vcpu-blocktime[{index}]"] = _metric(
                value, "ms", f"{counters.origin} (dst)")
    if analysis is not None:
        for vcpu, ns in sorted(analysis.vcpu_blocktime_ns.items()):
            blocktime[f"trace blocktime vCPU {vcpu}"] = _metric(
                _ms(ns), "ms", "dst QEMU trace: blocktime begin -> page placed")

    # QEMU >= 10.1 only; ns (qapi/migration.json).
    qemu_latency: dict[str, Metric] = {}
    for field in ("postcopy-latency", "postcopy-non-vcpu-latency"):
        if field in counters.destination:
            qemu_latency[field] = counters.metric("dst", field, "ms", scale=1e-6)
    for index, value in enumerate(counters.destination.get("postcopy-vcpu-latency", [])):
        qemu_latency[f"postcopy-vcpu-latency[{index}]"] = _metric(
            round(value / MS, 4), "ms", f"{counters.origin} (dst)")
    latency_dist = None
    if "postcopy-latency-dist" in counters.destination:
        latency_dist = {
            "unit": "faults per bucket; bucket k = [2^k, 2^(k+1)) us, the last open-ended",
            "source": f"{counters.origin} (dst: postcopy-latency-dist)",
            "counts": counters.destination["postcopy-latency-dist"],
        }
    dist_comparison = None
    if latency_dist is not None and analysis is not None:
        dist_comparison = compare_latency_dist(
            latency_dist["counts"], analysis.latency, analysis.faults,
            qemu_source=latency_dist["source"], trace_source=TRACE_SOURCE)

    freeze = _freeze(ev, counters)
    threshold_ms = stall_threshold_ms(scenario)
    guest_stalls = _vcpu_stalls(guest, phases)
    clock_steps, clock_warnings = _clock_steps(guest, phases)
    warnings += clock_warnings
    outside = _outside(guest, phases, threshold_ms)
    worst_guest = sorted(guest.stalls, key=lambda s: -s.gap_ns)[:10]

    comparisons = _comparisons(freeze, analysis, counters, guest_stalls, outside, blocktime)
    if meta.migration.postcopy_skipped_reason:
        warnings.append("post-copy never started: " + meta.migration.postcopy_skipped_reason)
    passes = counters.source.get("ram", {}).get("dirty-sync-count")
    risk = tcg_dirty_tracking_risk(environment["qemu_version"], environment["accel"],
                                   passes if isinstance(passes, int) else None)
    if risk:
        warnings.append(risk)
    warnings += [f"guest probe: {e}" for e in guest.errors]
    recovery = analyze_recovery(ev, scenario, meta, guest)
    warnings += recovery.warnings
    warnings += tuning_warnings(meta, ev)
    warnings += placement_warnings(meta)
    outcome = derive_outcome(artifacts,
                             sum(1 for pause in recovery.pauses if pause.result == "recovered"),
                             bool(migration.get("postcopy")))
    if outcome.disagreement:
        warnings.append(outcome.disagreement)
    if guest.malformed:
        warnings.append(f"guest console: {guest.malformed} malformed probe lines")

    return Report(
        run_id=meta.run_id, scenario=meta.scenario,
        outcome=outcome.outcome, statement=outcome.statement,
        error=meta.error.message if meta.error else None,
        environment=environment, phases=phases.phases, timings=timings, transfer=transfer,
        freeze=freeze, fetch=fetch, hgm=hgm, blocktime=blocktime, qemu_latency=qemu_latency,
        qemu_latency_dist=latency_dist, latency_dist_comparison=dist_comparison,
        guest_stalls=guest_stalls,
        worst_guest_stalls=[
            Stall(host_ns=s.host_start_ns or 0, duration_ms=round(s.gap_ns / MS, 3),
                  vcpu=s.vcpu,
                  phase=phases.phase_at(s.host_start_ns) if s.host_start_ns else "unknown")
            for s in worst_guest],
        guest_clock_steps=clock_steps, outside_stalls=outside,
        integrity=guest.verify.model_dump(mode="json") if guest.verify else {},
        comparisons=comparisons, warnings=warnings,
        recoveries=recovery.pauses, faults=recovery.faults,
        thread_cpu=thread_cpu(artifacts.threads, ev), placement=placement_section(meta),
    )


def _comparisons(
    freeze: Freeze | None, analysis: TraceAnalysis | None, counters: QemuCounters,
    guest_stalls: list[GuestVcpuStalls], outside: OutsideStalls | None,
    blocktime: dict[str, Metric],
) -> list[Comparison]:
    out = []
    if freeze is not None:
        out.append(_compare(
            "VM stopped during switchover", freeze.qemu_downtime, freeze.freeze,
            "QEMU's downtime ends when the destination starts loading device state; with "
            "huge pages the destination first faults in the page holding its state"))
    if analysis is not None:
        out.append(_compare(
            "post-copy page requests",
            counters.metric("src", "ram.postcopy-requests", "requests"),
            _metric(analysis.faults, "requests", TRACE_SOURCE),
            "QEMU counts requests the source served; the trace counts faults on the "
            "destination, duplicates and already-arrived pages included"))
        if "postcopy-latency" in counters.destination:
            mean = analysis.latency.mean
            out.append(_compare(
                "mean fetch latency",
                counters.metric("dst", "postcopy-latency", "ms", scale=1e-6),
                _metric(_ms(mean), "ms", TRACE_SOURCE)))
    worst_guest = max((v.max_ms.value or 0 for v in guest_stalls), default=None)
    if outside is not None and worst_guest is not None:
        out.append(_compare(
            "worst stall", _metric(worst_guest, "ms", PROBE_SOURCE), outside.max_gap,
            "the guest clock does not run while the VM is stopped; the outside view does"))
    total = blocktime.get("postcopy-blocktime (all vCPUs)")
    stalled = sum((v.total_stalled_ms.value or 0) for v in guest_stalls)
    if total is not None and guest_stalls:
        out.append(_compare(
            "time vCPUs were blocked", total, _metric(round(stalled, 3), "ms", PROBE_SOURCE),
            "QEMU blocktime counts vCPU faults only; the probe sums every gap over its "
            "threshold, whatever caused it, in guest time"))
    return out


def write_report(run_path: Path, report: Report) -> Path:
    """Write ``report.json`` atomically; returns its path."""
    target = run_path / "report.json"
    atomic_write(target, report.model_dump_json(indent=2) + "\n")
    return target


