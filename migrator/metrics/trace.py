"""Streaming analysis of the destination QEMU's post-copy trace log.

Input is the file QEMU writes with ``-trace EVENT ... -D FILE`` (timestamps need
``-msg timestamp=on``), plain or as the zstd stream a run keeps
(``trace.log.zst``, read through :func:`migrator.rundir.open_artifact`).  Two line formats exist:

* QEMU <= 10.0 (``scripts/tracetool/backend/log.py`` printing
  ``"%d@%zu.%06zu:" name " " fmt``): ``TID@EPOCH_SEC.USEC:event args``, e.g.
  ``18917@1795630006.940943:postcopy_place_page host=0x7f992008b000``;
* QEMU >= 10.1 (``qemu_log()`` adds ``g_date_time_format_iso8601()``):
  ``2026-11-25T17:52:44.805385Z event args``; glib drops the fraction when the
  microseconds are exactly zero (``2026-11-25T17:52:44Z event args``).

Events used (argument text from ``migration/trace-events``):

* ``postcopy_ram_fault_thread_request Request for HVA=0x%lx rb=%s offset=0x%zx pid=%u``:
  a thread faulted on a missing page; HVA is the kernel's fault address,
  ``offset`` the RAMBlock offset already rounded down to the block's page size;
* ``postcopy_place_page host=%p`` / ``postcopy_place_page_zero host=%p``: a host
  page was placed at its base address.  A zero page on a block without
  UFFDIO_ZEROPAGE (hugetlbfs) is traced twice, first as ``_zero`` and then as a
  normal placement of the same page; the second is counted as a duplicate.
  Extra arguments (a HGM-patched QEMU prints ``id=... offset=...``) are ignored;
* ``mark_postcopy_blocktime_begin addr: 0x.., dd: %p, time: %u, cpu: %d,
  already_received: %d`` (7.2) and ``postcopy_blocktime_begin addr: 0x..,
  time: %lu, cpu: %d, exist: %d`` (>= 10.1): which vCPU took a fault;
* ``postcopy_init_range``/``postcopy_nhp_range``/``postcopy_cleanup_range
  NAME: %p offset=0x%zx length=0x%zx``: a RAMBlock's host base address.
* ``mark_postcopy_blocktime_end`` (one per placement in 7.2),
  ``postcopy_blocktime_end``, ``_end_one``, ``_tid_cpu_map`` and every other
  event are counted by name and otherwise ignored: the end of a fault is its
  placement.

Semantics.  Events are matched in time order (line time, file order breaking
ties), not file order: QEMU takes a line's time before it takes the log lock,
so two threads' lines can be written out of time order (real 7.2 traces: ~1 %
of lines, up to 3.3 ms; a request line often follows the placement line that
resolved it).  Events wait in a bounded reorder window (50 ms of trace time by
default) until no later-written line can be older; lines later than that are
counted (``late_events``).  A fault request is resolved by the first
placement, in time order, of the host page that contains its HVA; the host
page size is the RAMBlock's (from ``info ramblock``), and since QEMU maps every
RAMBlock at an address aligned to its page size the page is ``HVA`` rounded
down to it.  Latency is placement time minus request time; the backlog of a
request is the number of placement lines (of any block known when they are
matched; placements held back, see below, are not counted) in time order
strictly between it and the placement that resolved it: pages already queued
in the migration stream ahead of the requested one.  A request whose
page was placed before it (the fault raced the page), a second request while
one is outstanding (a duplicate, still resolved with its own latency), a
request never resolved (trace cut short) and a placement nobody asked for
(background) are all counted.  A HGM run places 4 KiB pieces of a huge page: a
block whose placements are not all page-aligned switches to sub-page
resolution (a fault is resolved by the placement of its 4 KiB piece; the
switch applies from the chunk of trace where the first such placement is), and
its ``placement_granularity`` shows the spacing of placed addresses.  Blocks'
base addresses come from ``info ramblock`` (newer QEMU prints HVA), from
``postcopy_*_range`` lines, or from the first request of a block (``(HVA
rounded to the page) - offset``); placements seen before their block is known
are held back (bounded) until it is, and counted as unattributed if it never
is.  Per-vCPU blocktime is the time each vCPU had at least one fault
outstanding (its blocktime begin line to the placement of the page).

Speed.  Lines are never handled one by one in Python: each chunk of bytes is
cut into lines with numpy and the fixed-position fields (header, event name,
hex addresses, decimal tails, timestamps) are decoded with SWAR arithmetic on
unaligned 64-bit loads; fault matching is a sort plus ``searchsorted`` per
chunk.  Only rare events (ranges, tid maps, unknown events, lines that fail
the fast path) go through ``re``.  State is a placed-page map per block
(bounded by the guest's size), the outstanding faults, the reorder window and
the histograms: memory does not grow with the length of the trace.

Modules.  This one composes the pieces: :mod:`~migrator.metrics.trace_text`
(the bytes of a chunk of lines: headers, hex and decimal fields),
:mod:`~migrator.metrics.trace_decode` (lines to events, the reorder window),
:mod:`~migrator.metrics.block_map` (host addresses to RAMBlock pages),
:mod:`~migrator.metrics.fault_matching` (requests to the placements that
resolve them) and :mod:`~migrator.metrics.trace_results` (what comes out).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from migrator.errors import ArtifactError
from migrator.metrics.block_map import BlockMap, SubpagePolicy
from migrator.metrics.fault_matching import FaultMatcher
from migrator.metrics.histogram import Histogram
from migrator.metrics.ramblock import RamBlock
from migrator.metrics.trace_decode import ReorderWindow, TraceDecoder
from migrator.metrics.trace_results import FaultBatch, ResolvedFault, TraceAnalysis
from migrator.metrics.trace_text import Lines
from migrator.rundir import open_artifact

__all__ = [
    "TraceAnalyzer",
    "analyze_trace",
    "iter_fault_batches",
    "iter_resolved_faults",
]

DEFAULT_CHUNK = 4 << 20
# How far back in time a line may be written after a later-stamped one and still
# be matched in time order (real QEMU 7.2 traces: up to 3.3 ms).
DEFAULT_REORDER_WINDOW_NS = 50_000_000


class TraceAnalyzer:
    """Incremental analyser: :meth:`feed` bytes in any pieces, then :meth:`finish`.

    Lines may be split anywhere between two pieces.  Resolved faults come back
    from :meth:`feed` (and the last ones from :meth:`close`) once their events
    have left the reorder window (``reorder_window_ns`` of trace time).

    ``ramblocks`` (from ``info ramblock`` of the destination) give each block's
    page size, length and, on newer QEMU, host address; a block that appears
    in the trace but not in the table is assumed to have 4 KiB pages (logged,
    and ``page_size_known`` is False).  ``subpage`` selects how a huge-page
    block resolves faults: ``"auto"`` switches to 4 KiB pieces once a
    placement not aligned to the block's page size is seen (HGM),
    ``"always"``/``"never"`` force it.
    """

    def __init__(
        self,
        ramblocks: Iterable[RamBlock] = (),
        *,
        subpage: SubpagePolicy = "auto",
        reorder_window_ns: int = DEFAULT_REORDER_WINDOW_NS,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        if chunk_size < 4096 or chunk_size > (8 << 20):
            raise ValueError("chunk_size must be within 4 KiB .. 8 MiB")
        if reorder_window_ns < 0:
            raise ValueError("reorder_window_ns must be >= 0")
        self._blocks = BlockMap(ramblocks, subpage)
        self._decoder = TraceDecoder(chunk_size)
        self._window = ReorderWindow(reorder_window_ns)
        self._matcher = FaultMatcher(self._blocks)
        self._finished = False

    @property
    def chunk_size(self) -> int:
        """Most bytes decoded at once (besides a carried partial line)."""
        return self._decoder.chunk_size

    @property
    def subpage(self) -> SubpagePolicy:
        """How huge-page blocks resolve faults (see the class docstring)."""
        return self._blocks.subpage

    @property
    def reorder_window_ns(self) -> int:
        """How long (trace time) events wait for older lines written after them."""
        return self._window.window_ns

    @property
    def outstanding(self) -> int:
        """Fault requests and vCPU blocktime begins matched so far that still wait
        for their page (events in the reorder window are not matched yet)."""
        return self._matcher.outstanding

    def feed(self, data: bytes) -> FaultBatch:
        """Analyse more trace bytes; returns the faults resolved by the events this released."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        batches = [self._process(lines) for lines in self._decoder.split(data)]
        return FaultBatch.concat(self._blocks.names, batches)

    def close(self) -> FaultBatch:
        """End of input: match the events still held back; returns the faults they resolve.

        An unterminated last line is counted as torn and ignored.
        """
        if self._finished:
            return FaultBatch.empty(self._blocks.names)
        self._finished = True
        self._decoder.end_of_input()
        return self._matcher.match(self._window.drain())

    def finish(self) -> TraceAnalysis:
        """:meth:`close` (if not yet done) and return the analysis."""
        self.close()
        dec = self._decoder
        if dec.records == 0 and dec.untimestamped:
            raise ArtifactError(
                f"trace has {dec.untimestamped} event lines but no timestamps; "
                "run the destination QEMU with -msg timestamp=on"
            )
        blocks = self._matcher.block_analyses()
        total = Histogram("ns")
        for blk in blocks:
            total.merge(blk.latency)
        blocktime = self._matcher.blocktime
        return TraceAnalysis(
            format=dec.format,
            lines=dec.lines,
            records=dec.records,
            malformed_lines=dec.malformed,
            other_lines=dec.other,
            untimestamped_lines=dec.untimestamped,
            truncated_last_line=dec.truncated,
            late_events=self._window.late,
            ignored_events=dict(sorted(dec.ignored.items())),
            unattributed_placements=self._matcher.unattributed_placements,
            unattributed_faults=self._matcher.unattributed_faults,
            first_event_ns=dec.span.first,
            last_event_ns=dec.span.last,
            blocks=blocks,
            latency=total,
            vcpu_blocktime_ns=dict(sorted(blocktime.blocked_ns.items())),
            vcpu_faults=dict(sorted(blocktime.faults.items())),
            non_vcpu_faults=blocktime.non_vcpu_faults,
            tid_to_vcpu=dict(sorted(dec.tid_to_vcpu.items())),
        )

    def _process(self, lines: Lines) -> FaultBatch:
        chunk = self._decoder.decode(lines)
        if chunk is None:
            return FaultBatch.empty(self._blocks.names)
        for rng in chunk.ranges:
            self._blocks.learn_range(rng.name, rng.host, rng.length)
        self._blocks.learn_from_requests(chunk.events.req_hva, chunk.request_block)
        ready = self._window.release(chunk.events, chunk.newest_ns)
        return self._matcher.match(ready)


def _read_chunks(source: Path | BinaryIO, size: int) -> Iterator[bytes]:
    if isinstance(source, Path):
        try:
            handle = open_artifact(source)
        except OSError as exc:
            raise ArtifactError(f"{source}: cannot read trace: {exc}") from exc
        with handle:
            yield from _read_ahead(handle, size)
    else:
        yield from _read_ahead(source, size)


def _read_ahead(handle: BinaryIO, size: int) -> Iterator[bytes]:
    """``handle``'s chunks, each next one read in a thread while this one is analysed.

    Reading a zstd stream is decompressing it, which costs a fraction of the analysis
    (``benchmarks/trace_throughput.py`` prints both forms' events/s); zstandard releases
    the GIL meanwhile, so on a second core it is hidden.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="trace-read") as reader:
        pending = reader.submit(handle.read, size)
        while chunk := pending.result():
            pending = reader.submit(handle.read, size)
            yield chunk


def iter_fault_batches(
    source: Path | BinaryIO,
    ramblocks: Iterable[RamBlock] = (),
    *,
    analyzer: TraceAnalyzer | None = None,
) -> Iterator[FaultBatch]:
    """Stream the resolved faults of a trace, one numpy batch per chunk.

    Pass ``analyzer`` to get its :meth:`TraceAnalyzer.finish` result afterwards.
    """
    an = analyzer if analyzer is not None else TraceAnalyzer(ramblocks)
    for chunk in _read_chunks(source, an.chunk_size):
        batch = an.feed(chunk)
        if len(batch):
            yield batch
    batch = an.close()
    if len(batch):
        yield batch


def iter_resolved_faults(
    source: Path | BinaryIO,
    ramblocks: Iterable[RamBlock] = (),
    *,
    analyzer: TraceAnalyzer | None = None,
) -> Iterator[ResolvedFault]:
    """Stream every resolved fault of a trace without storing them."""
    for batch in iter_fault_batches(source, ramblocks, analyzer=analyzer):
        yield from batch


def analyze_trace(
    source: Path | BinaryIO,
    ramblocks: Iterable[RamBlock] = (),
    *,
    subpage: SubpagePolicy = "auto",
    reorder_window_ns: int = DEFAULT_REORDER_WINDOW_NS,
) -> TraceAnalysis:
    """Analyse a whole destination trace log (see the module docstring).

    ``source`` is an open binary stream or a path by the plain name (``trace.log``),
    read in whichever form exists (:func:`migrator.rundir.open_artifact`).
    """
    an = TraceAnalyzer(ramblocks, subpage=subpage, reorder_window_ns=reorder_window_ns)
    for _ in iter_fault_batches(source, analyzer=an):
        pass
    return an.finish()
