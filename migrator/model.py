"""The report model: the versioned schema of ``report.json``.

Every number is a :class:`Metric`: a value with its unit and the source it was
measured from.  Where two sources measure the same thing the report carries a
:class:`Comparison` holding both and how far apart they are.  Bump
:data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

__all__ = [
    "SCHEMA_VERSION",
    "BlockFetch",
    "ClockStepRecord",
    "Comparison",
    "FaultRecord",
    "Freeze",
    "GuestClockSteps",
    "GuestVcpuStalls",
    "LatencyBucket",
    "LatencyDistComparison",
    "Metric",
    "OutsideStalls",
    "PauseRecord",
    "Phase",
    "PlacedThread",
    "PlacementSection",
    "RamBinding",
    "Report",
    "Stall",
    "ThreadCpu",
]

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metric(_Model):
    """One measured number, with its unit and where it came from.

    ``contradicted_by`` is set when another source of the same run rules the
    value out (a cumulative counter below an earlier sample of itself): the
    value stays as its source gave it, and the contradicting one, in the same
    unit, stands beside it.
    """

    value: float | int | None
    unit: str
    source: str
    contradicted_by: Metric | None = None

    @model_serializer(mode="wrap")
    def _omit_no_contradiction(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Nearly every metric has none: keep report.json as it was for them.
        data: dict[str, Any] = handler(self)
        if data.get("contradicted_by") is None:
            data.pop("contradicted_by", None)
        return data


class Comparison(_Model):
    """Two sources measuring the same quantity, side by side."""

    quantity: str
    a: Metric
    b: Metric
    difference: float | None = Field(description="b - a, in a's unit, when both are known")
    note: str = ""


class Phase(_Model):
    """A stretch of the run on the host wall clock."""

    name: str
    start_ns: int
    end_ns: int | None

    @property
    def duration_ms(self) -> float | None:
        """Length in ms, when the phase ended."""
        return None if self.end_ns is None else (self.end_ns - self.start_ns) / 1e6


class Stall(_Model):
    """One stall: when (host wall clock), how long, where, in which phase."""

    host_ns: int
    duration_ms: float
    vcpu: int | None = None
    phase: str = ""


class BlockFetch(_Model):
    """Per-page fetch latency of one RAMBlock (destination QEMU trace).

    ``backlog_placements`` (p50, p90, max) tells queueing from page-size cost:
    how many pages were placed after a request and before its own page, i.e.
    were queued ahead of it in the migration stream.
    """

    ramblock: str
    page_size: int
    faults: int
    resolved: int
    unresolved: int
    pages_placed_requested: int
    pages_placed_background: int
    zero_pages: int
    placement_granularity: int | None
    latency_ms: dict[str, Metric]
    # Optional so that report.json files written before it existed still load.
    backlog_placements: dict[str, Metric] = Field(
        default_factory=dict,
        description="placements between a fault request and the placement of its page")
    histogram: dict[str, Any]


class Freeze(_Model):
    """The real freeze next to QEMU's reported downtime."""

    source_stop_ns: int | None
    destination_resume_ns: int | None
    freeze: Metric
    qemu_downtime: Metric


class GuestVcpuStalls(_Model):
    """Stalls one vCPU saw by its own clock (guest probe)."""

    vcpu: int
    stalls: int
    max_ms: Metric
    p99_ms: Metric
    total_stalled_ms: Metric
    by_phase: dict[str, int]
    histogram: dict[str, Any] | None = None


class ClockStepRecord(_Model):
    """One step of a vCPU's guest clock (guest probe): never counted as a stall.

    ``step`` is negative when the clock went back.  ``reported_as``:
    ``clock_step`` (the probe's own line) or ``stall`` (a stall line whose gap
    was impossible, from a probe that predates clock_step lines).
    """

    vcpu: int
    host_ns: int | None = Field(description="placed through the heartbeat before the step")
    phase: str
    step: Metric
    reported_as: Literal["clock_step", "stall"]


class GuestClockSteps(_Model):
    """Steps of the guest's CLOCK_MONOTONIC the probe saw, apart from its stalls."""

    count: Metric
    largest_back: Metric = Field(description="None when the clock never went back")
    steps: list[ClockStepRecord] = Field(description="the largest steps, at most 10")


class OutsideStalls(_Model):
    """Gaps between guest heartbeats as they arrived at the controller (host clock)."""

    heartbeats: int
    lost: int
    period_ms: float
    max_gap: Metric
    p99_gap: Metric
    gaps_over_threshold: int
    worst: list[Stall]


class LatencyBucket(_Model):
    """One bucket of QEMU's ``postcopy-latency-dist`` and how many faults each source put in it."""

    bucket_us_low: int
    bucket_us_high: int | None = Field(description="exclusive; None for the open last bucket")
    qemu_count: int
    trace_count: int


class LatencyDistComparison(_Model):
    """QEMU's own fault-latency distribution next to the trace's, bucket by bucket."""

    qemu_source: str
    trace_source: str
    rows: list[LatencyBucket]
    qemu_total: int
    trace_total: int = Field(description="resolved fault requests (latencies) in the trace")
    trace_requests: int = Field(description="every fault request line, resolved or not")
    largest_disagreement: LatencyBucket | None = Field(
        description="the bucket whose counts differ most; None when every bucket agrees")
    faults_in_other_buckets: int = Field(
        description="at least this many faults are counted in different buckets by the two")
    note: str = ""


class HgmBlock(_Model):
    """The fault granularity one huge-page RAMBlock really got (destination trace).

    ``fetched``: ``whole pages``, ``4 KiB pieces`` (or another piece size) or
    ``nothing placed``; ``matches_decision`` is None when nothing was placed.
    """

    ramblock: str
    page_size: int
    pages_placed: int
    placement_granularity: Metric
    subpage_resolution: bool = Field(description="faults were resolved per 4 KiB piece")
    fetched: str
    matches_decision: bool | None


class HgmMappingSpan(_Model):
    """Consecutive smaps samples with the guest RAM mapped at one level.

    ``level``: ``pud``, ``pmd``, ``pte``, ``mixed``, ``unmapped`` or
    ``not-found`` (no guest RAM VMA in that sample).  ``mapped`` is at the
    span's last sample; ``split_peak`` is the most memory mapped below
    huge-page level (unknown without the kernel's HGM counters).
    """

    level: str
    start_ns: int
    end_ns: int
    phase: str
    samples: int
    mapped: Metric
    split_peak: Metric


class HgmCollapse(_Model):
    """When guest RAM split into pieces went back to huge mappings (see CollapseSummary).

    The collapse happened between ``last_split_ns`` and ``collapsed_ns``
    (``uncertainty`` wide); ``collapsed_after_completion`` counts from the
    destination's completion to ``collapsed_ns``.
    """

    status: str
    peak_split: Metric
    peak_split_ns: int | None
    completed_ns: int | None
    split_at_completion: Metric
    last_split_ns: int | None
    collapsed_ns: int | None
    collapsed_after_completion: Metric
    uncertainty: Metric
    final_level: str | None
    final: dict[str, Any] | None


class HgmMapping(_Model):
    """The destination's guest RAM mapping over time, from ``dst/smaps.jsonl``.

    ``samples`` counts every sample, ``found`` those that found the guest RAM
    VMA; ``hgm_counters`` says whether the kernel printed the HGM series'
    ``HugetlbP*Mapped`` counters (without them a page is mapped whole).
    """

    samples: int
    found: int
    vma: str | None
    page_size_kib: int | None
    hgm_counters: bool
    timeline: list[HgmMappingSpan]
    collapse: HgmCollapse
    source: str


class HgmSection(_Model):
    """HGM: the run's decision next to the granularity that really happened.

    ``mode`` is the scenario's ``vm.hgm`` (None for runs recorded before it
    existed); ``decided_by`` says where ``enabled`` was read; ``hosts`` holds
    each role's probed support (empty when nothing was probed).
    """

    mode: str | None
    enabled: bool
    reason: str
    decided_by: str
    hosts: dict[str, dict[str, Any]]
    blocks: list[HgmBlock]
    mapping: HgmMapping | None
    notes: list[str]


class PauseRecord(_Model):
    """One post-copy pause: why, when, how it was mended, and what the guest saw through it.

    Times are Metrics in s since the ``migrate`` mark (t = 0 of the HTML
    plots; a run without one counts from its start, as their source says), on
    the controller's clock (timeline marks, QMP event arrival); the
    ``*_ns`` fields hold the same instants on the host wall clock.  The pause
    window runs from ``began`` to ``recovered`` (to the end of the run when it
    was never recovered).  ``guest_gap`` is the longest gap between guest
    heartbeat arrivals that overlaps the window (it may start before the pause
    or outlast it: ``guest_gap_start_ns`` and its length say where it lies);
    ``probe_stall`` the longest stall the guest probe reported by its own clock
    that overlaps it.
    """

    number: int = Field(description="1 for the run's first pause")
    cause: str
    fault: int | None = Field(
        None, description="index of the [[faults]] entry injected last before the pause began")
    began_ns: int
    began: Metric
    both_paused_ns: int | None = None
    both_paused: Metric
    recovered_ns: int | None = None
    recovered: Metric
    duration: Metric
    attempts: Metric = Field(description="resume attempts (migrate with resume) made")
    result: Literal["recovered", "not recovered"]
    note: str = ""
    guest_gap: Metric
    guest_gap_start_ns: int | None = None
    guest_gap_open: bool = Field(
        False, description="no heartbeat came after the gap began: its length is a lower bound")
    probe_stall: Metric
    probe_stall_start_ns: int | None = None
    probe_stall_vcpu: int | None = None

    @field_validator("attempts", mode="before")
    @classmethod
    def _attempts_of_older_reports(cls, value: object) -> object:
        # report.json written before attempts named their source held a bare count.
        if isinstance(value, int):
            return {"value": value, "unit": "attempts",
                    "source": "not recorded (report written before attempts had a source)"}
        return value


class FaultRecord(_Model):
    """One ``[[faults]]`` entry of the scenario and what became of it (timeline marks).

    ``status``: ``injected``, ``cleared`` (injected and undone after its
    duration), ``not injected`` (``reason`` says why) or ``not recorded`` (in
    the scenario, but the timeline has no mark of it).  Times are Metrics in s
    since the ``migrate`` mark, as in :class:`PauseRecord`.
    """

    index: int
    kind: str
    target: str
    at: str | None = Field(None, description="the phase the fault waited for")
    after_ms: int | None = None
    duration_s: float | None = None
    status: Literal["injected", "cleared", "not injected", "not recorded"]
    injected_ns: int | None = None
    injected: Metric
    cleared_ns: int | None = None
    cleared: Metric
    reason: str | None = None

    @property
    def due(self) -> str:
        """When the fault was due: its phase plus ``after_ms`` ("-" for a fault with none)."""
        return "-" if self.at is None else f"{self.at} + {self.after_ms or 0:,} ms"


class ThreadCpu(_Model):
    """Host CPU time of one QEMU thread, or of one kind of thread, on one side."""

    side: str
    """``src`` or ``dst``."""
    thread: str
    """"vCPU N", "migration", "return path", "post-copy fault", "post-copy listen",
    "multifd", "main loop" or "other" (``qemu.threads.thread_kind``)."""
    precopy: Metric
    postcopy: Metric
    sampled: Metric
    """Over the whole sampled span."""


class PlacedThread(_Model):
    """One QEMU thread under ``[placement.*]``: the CPUs it should have, those it had."""

    side: str
    name: str
    tid: int
    role: str
    """``vcpu``, ``migration``, ``main loop`` or ``other``."""
    wanted: str
    """CPU list it should have (the host's default where nothing was asked for it)."""
    cpus: str
    """CPU list it had: ``Cpus_allowed_list``, last read back while the run went on."""
    pinned: bool
    """migrator set it (False: the thread had it already, inherited from QEMU's start)."""


class RamBinding(_Model):
    """The guest RAM's NUMA policy and pages per node, read back on one side."""

    side: str
    node: int
    policy: str | None
    pages: dict[str, int]
    page_kib: int | None


class PlacementSection(_Model):
    """CPU and NUMA placement as the QEMUs had it (see ``metrics.placement``)."""

    source: str
    threads: list[PlacedThread]
    memory: list[RamBinding]


class Report(_Model):
    """Everything derived from one run directory."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    scenario: str
    outcome: str
    # Optional (as recoveries and faults) so that report.json files written before they
    # existed still load.
    statement: str | None = Field(
        None, description="run.json's one line on how the run ended and which side holds what")
    error: str | None = None
    environment: dict[str, Any]
    phases: list[Phase]
    timings: dict[str, Metric]
    transfer: dict[str, Metric]
    freeze: Freeze | None
    fetch: list[BlockFetch]
    # Optional so that report.json files written before it existed still load.
    hgm: HgmSection | None = None
    blocktime: dict[str, Metric]
    qemu_latency: dict[str, Metric]
    qemu_latency_dist: dict[str, Any] | None = None
    latency_dist_comparison: LatencyDistComparison | None = None
    guest_stalls: list[GuestVcpuStalls]
    worst_guest_stalls: list[Stall]
    # Optional so that report.json files written before it existed still load.
    guest_clock_steps: GuestClockSteps | None = Field(
        None, description="None when the guest probe never reported ready")
    outside_stalls: OutsideStalls | None
    integrity: dict[str, Any]
    comparisons: list[Comparison]
    warnings: list[str]
    recoveries: list[PauseRecord] = Field(
        default_factory=list, description="every post-copy pause, recovered or not, in order")
    faults: list[FaultRecord] = Field(
        default_factory=list, description="every [[faults]] entry, by index")
    thread_cpu: list[ThreadCpu] = Field(
        default_factory=list,
        description="host CPU time per QEMU thread kind and side (SIDE/threads.jsonl)")
    placement: PlacementSection | None = Field(
        None, description="each QEMU thread's CPUs and the guest RAM's node, as asked by "
                          "[placement.*] and read back (None: no placement)")
