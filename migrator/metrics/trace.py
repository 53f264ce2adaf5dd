"""Streaming analysis of the destination QEMU's post-copy trace log.

Input is the file QEMU writes with ``-trace EVENT ... -D FILE`` (timestamps need
``-msg timestamp=on``).  Two line formats exist:

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
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from migrator.errors import ArtifactError
from migrator.metrics.histogram import Histogram
from migrator.metrics.ramblock import RamBlock

__all__ = [
    "BlockAnalysis",
    "FaultBatch",
    "ResolvedFault",
    "TraceAnalysis",
    "TraceAnalyzer",
    "analyze_trace",
    "iter_fault_batches",
    "iter_resolved_faults",
]

log = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]

SMALL_PAGE = 4096
DEFAULT_CHUNK = 4 << 20
# How far back in time a line may be written after a later-stamped one and still
# be matched in time order (real QEMU 7.2 traces: up to 3.3 ms).
DEFAULT_REORDER_WINDOW_NS = 50_000_000
# At most this many events wait for the reorder window.
_MAX_DEFERRED = 1 << 20
# Positions inside a chunk share a uint64 sort key with (block, page index):
# 8 bits of block, 32 bits of page index, 24 bits of line number.
_POS_BITS = 24
_MAX_LINES = (1 << _POS_BITS) - 2
_MAX_BLOCKS = 255
_MAX_UNITS = 1 << 32
# A line longer than this cannot be a trace record; it is dropped as malformed.
_MAX_LINE = 1 << 20
# Placements whose RAMBlock is not known yet are held back, at most this many.
_MAX_BUFFERED = 1 << 21
_PAD = 64

# ---------------------------------------------------------------------------
# SWAR helpers: eight bytes of text in one little-endian uint64, first char lowest.

_LOW = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)
_SEVEN = np.uint64(0x7F7F7F7F7F7F7F7F)
_ZEROS = np.uint64(0x3030303030303030)


def _const(text: bytes) -> np.uint64:
    return np.uint64(int.from_bytes(text.ljust(8, b"\0"), "little"))


def _low_bytes_mask(n: int) -> int:
    return (1 << (8 * n)) - 1 if n < 8 else (1 << 64) - 1


# _REQ_HIGH[n]: the 0x80 flag of each of the n lowest bytes.
_REQ_HIGH = np.array([int(_HIGH) & _low_bytes_mask(n) for n in range(9)], dtype=np.uint64)


def _range_flags(w: U64, lo: int, hi: int) -> U64:
    """0x80 in every byte of ``w`` that is within ``lo..hi`` (ASCII), else 0."""
    b7 = w & _SEVEN
    ge_lo = (b7 + np.uint64((0x80 - lo) * 0x0101010101010101)) & _HIGH
    ge_hi = (b7 + np.uint64((0x80 - hi - 1) * 0x0101010101010101)) & _HIGH
    return ge_lo & ~ge_hi & ~w & _HIGH


def _digit_flags(w: U64) -> U64:
    return _range_flags(w, 0x30, 0x39)


def _hex_flags(w: U64) -> U64:
    return _range_flags(w, 0x30, 0x39) | _range_flags(w, 0x61, 0x66)


def _first_flagged_byte(m: U64) -> I64:
    """Index (0..7) of the lowest byte with its 0x80 flag set in ``m``; 8 when none."""
    lowest = m & (~m + np.uint64(1))
    return (np.bitwise_count(lowest - np.uint64(1)).astype(np.int64)) >> 3


def _dec8(w: U64) -> U64:
    """Value of eight ASCII digits."""
    v = w - _ZEROS
    v = (v * np.uint64(10) + (v >> np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)
    v = (v * np.uint64(100) + (v >> np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    return (v * np.uint64(10000) + (v >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def _hex8(w: U64) -> U64:
    """Value of eight ASCII hex digits (lowercase)."""
    n = ((w & np.uint64(0x0F0F0F0F0F0F0F0F)) + np.uint64(9) * ((w >> np.uint64(6)) & _LOW)) & (
        np.uint64(0x0F0F0F0F0F0F0F0F)
    )
    n = ((n & np.uint64(0x000F000F000F000F)) << np.uint64(4)) | (
        (n >> np.uint64(8)) & np.uint64(0x000F000F000F000F)
    )
    n = ((n & np.uint64(0x000000FF000000FF)) << np.uint64(8)) | (
        (n >> np.uint64(16)) & np.uint64(0x000000FF000000FF)
    )
    return ((n & np.uint64(0xFFFF)) << np.uint64(16)) | ((n >> np.uint64(32)) & np.uint64(0xFFFF))


def _byte(w: U64, i: int) -> U64:
    return (w >> np.uint64(8 * i)) & np.uint64(0xFF)


def _present(small: I64) -> list[int]:
    """The distinct values of an array of small non-negative ints, ascending."""
    if small.size == 0:
        return []
    return np.flatnonzero(np.bincount(small)).tolist()


def _days_from_civil(y: I64, m: I64, d: I64) -> I64:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * (m + np.where(m > 2, -3, 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return np.asarray(era * 146097 + doe - 719468, dtype=np.int64)


# Event texts matched at the name position, up to and including "0x" of the
# first hex argument.
_EV_PLACE = b"postcopy_place_page host=0x"
_EV_ZERO = b"postcopy_place_page_zero host=0x"
_EV_REQUEST = b"postcopy_ram_fault_thread_request Request for HVA=0x"
_EV_BT_END_72 = b"mark_postcopy_blocktime_end "
_EV_BEGIN_72 = b"mark_postcopy_blocktime_begin addr: 0x"
_EV_BEGIN_10 = b"postcopy_blocktime_begin addr: 0x"


def _pattern_words(text: bytes) -> list[tuple[np.uint64, np.uint64]]:
    words = []
    for i in range(0, len(text), 8):
        part = text[i : i + 8]
        words.append((_const(part), np.uint64(_low_bytes_mask(len(part)))))
    return words


# Rare lines, decoded with re (after the header).
# host= comes first in stock QEMU; the hugetlb-doublemap RFC prints
# "postcopy_place_page id=%s offset=0x%zx host=%p", so it may follow other arguments.
_RE_PLACE = re.compile(
    rb"(postcopy_place_page(?:_zero)?) (?:\S+ )*?host=0x([0-9a-f]{1,16})(?:[ ,\r].*)?\Z"
)
_RE_REQUEST = re.compile(
    rb"postcopy_ram_fault_thread_request Request for HVA=0x([0-9a-f]{1,16}) "
    rb"rb=(\S+) offset=0x([0-9a-f]{1,16}) pid=(\d+)\r?\Z"
)
_RE_BEGIN_72 = re.compile(
    rb"mark_postcopy_blocktime_begin addr: 0x([0-9a-f]{1,16}), dd: \S+, time: \d+, "
    rb"cpu: (-?\d+), already_received: (\d+)\r?\Z"
)
_RE_BEGIN_10 = re.compile(
    rb"postcopy_blocktime_begin addr: 0x([0-9a-f]{1,16}), time: \d+, cpu: (-?\d+), "
    rb"exist: (\d+)\r?\Z"
)
_RE_RANGE = re.compile(
    rb"postcopy_(?:init|nhp|cleanup)_range (.+): 0x([0-9a-f]{1,16}) "
    rb"offset=0x([0-9a-f]{1,16}) length=0x([0-9a-f]{1,16})\r?\Z"
)
_RE_TID_MAP = re.compile(rb"postcopy_blocktime_tid_cpu_map cpu: (-?\d+), tid: (\d+)\r?\Z")
_RE_EVENT = re.compile(rb"([a-z][a-z0-9_]*)(?: |\r?\Z)")
# QEMU >= 10.2 can print "(TID:THREAD): " between the timestamp and the message.
_RE_THREAD_INFO = re.compile(rb"\(\d+:[^)]*\): ")
_EVENT_STARTS = (b"postcopy_", b"mark_postcopy_")

TraceFormat = Literal["tid@epoch", "iso8601"]


# ---------------------------------------------------------------------------
# Public results


class ResolvedFault(NamedTuple):
    """One resolved fault request; times are host wall clock, ns since the epoch."""

    block: str
    hva: int
    pid: int
    request_ns: int
    placed_ns: int
    latency_ns: int


@dataclass(frozen=True)
class FaultBatch:
    """The fault requests resolved within one chunk of trace, as parallel arrays.

    ``block`` indexes ``block_names``; ``pid`` is the faulting thread (-1 if the
    line did not say); ``latency_ns`` is ``placed_ns - request_ns`` clamped at 0.
    """

    block_names: tuple[str, ...]
    block: I64
    hva: U64
    pid: I64
    request_ns: I64
    placed_ns: I64
    latency_ns: I64

    def __len__(self) -> int:
        return int(self.block.size)

    def __iter__(self) -> Iterator[ResolvedFault]:
        names = self.block_names
        for b, hva, pid, req, placed, lat in zip(
            self.block.tolist(),
            self.hva.tolist(),
            self.pid.tolist(),
            self.request_ns.tolist(),
            self.placed_ns.tolist(),
            self.latency_ns.tolist(),
            strict=True,
        ):
            yield ResolvedFault(names[b], hva, pid, req, placed, lat)


@dataclass(frozen=True)
class BlockAnalysis:
    """Everything the trace says about one RAMBlock.

    Counts of fault requests: ``faults`` = ``resolved + unresolved +
    already_placed``; ``duplicate_requests`` (a request while an earlier one
    for the same page was outstanding) are included in resolved/unresolved.
    Counts of placements: ``placements`` trace lines = ``pages_placed +
    duplicate_placements``; ``pages_placed`` = ``pages_requested +
    pages_background``; ``zero_pages`` of them were placed as zero pages.
    ``placement_granularity`` is the largest power of two dividing every placed
    offset within the block, capped at ``page_size`` (``None`` before any
    placement): a HGM run that fetched 4 KiB pieces of huge pages shows 4096.
    ``latency`` holds one sample (ns) per resolved request; ``backlog`` one
    sample per resolved request too: how many placements (of any known block)
    came between the request and the placement that resolved it, i.e. how much
    of the migration stream was queued ahead of the requested page.
    ``negative_latencies`` can only come from events later than the reorder
    window (see ``TraceAnalysis.late_events``); they are recorded as 0.
    ``first_event_ns``/``last_event_ns``: earliest and latest time of a request
    or placement in this block (host wall clock, ns since the epoch).
    """

    name: str
    page_size: int
    page_size_known: bool
    host_base: int | None
    subpage_resolution: bool
    faults: int
    resolved: int
    unresolved: int
    already_placed: int
    duplicate_requests: int
    negative_latencies: int
    placements: int
    pages_placed: int
    pages_requested: int
    pages_background: int
    zero_pages: int
    duplicate_placements: int
    placement_granularity: int | None
    latency: Histogram
    backlog: Histogram
    first_event_ns: int | None
    last_event_ns: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("latency", "backlog")}
        out["latency"] = self.latency.to_dict()
        out["backlog"] = self.backlog.to_dict()
        return out


@dataclass(frozen=True)
class TraceAnalysis:
    """Per-RAMBlock results plus what the trace said about the vCPUs and itself.

    ``vcpu_blocktime_ns``: per vCPU index, the time during which that vCPU had
    at least one fault outstanding (blocktime begin line to the placement of
    its page), from the blocktime trace events when present.
    ``malformed_lines``: lines that fit no trace line format, or a known event
    whose arguments do not parse (a torn last line is counted here too).
    ``other_lines``: timestamped lines that are not trace events (messages).
    ``untimestamped_lines``: event lines without a timestamp prefix (QEMU ran
    without ``-msg timestamp=on``).
    ``late_events``: events written more than the reorder window after a line
    with a later time; they are matched in a later round than their time says
    (0 in every real trace seen so far).
    """

    format: TraceFormat | None
    lines: int
    records: int
    malformed_lines: int
    other_lines: int
    untimestamped_lines: int
    truncated_last_line: bool
    late_events: int
    ignored_events: dict[str, int]
    unattributed_placements: int
    unattributed_faults: int
    first_event_ns: int | None
    last_event_ns: int | None
    blocks: tuple[BlockAnalysis, ...]
    latency: Histogram
    vcpu_blocktime_ns: dict[int, int]
    vcpu_faults: dict[int, int]
    non_vcpu_faults: int
    tid_to_vcpu: dict[int, int]

    def block(self, name: str) -> BlockAnalysis:
        """The analysis of the RAMBlock called ``name`` (KeyError if absent)."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def faults(self) -> int:
        """Fault requests over all blocks."""
        return sum(b.faults for b in self.blocks)

    @property
    def resolved(self) -> int:
        """Resolved fault requests over all blocks."""
        return sum(b.resolved for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out: dict[str, Any] = {
            k: v for k, v in self.__dict__.items() if k not in ("blocks", "latency")
        }
        out["blocks"] = [b.to_dict() for b in self.blocks]
        out["latency"] = self.latency.to_dict()
        for key in ("vcpu_blocktime_ns", "vcpu_faults", "tid_to_vcpu"):
            out[key] = {str(k): v for k, v in out[key].items()}
        return out


# ---------------------------------------------------------------------------
# Internal state


@dataclass
class _Block:
    index: int
    name: str
    page_size: int
    page_size_known: bool
    base: int | None = None
    length: int | None = None
    subpage: bool = False
    placed: Bools = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    faults: int = 0
    resolved: int = 0
    already_placed: int = 0
    duplicate_requests: int = 0
    negative_latencies: int = 0
    placements: int = 0
    pages_placed: int = 0
    pages_requested: int = 0
    zero_pages: int = 0
    offsets_or: int = 0
    any_placement: bool = False
    first_ns: int | None = None
    last_ns: int | None = None
    latency: Histogram = field(default_factory=lambda: Histogram("ns"))
    backlog: Histogram = field(default_factory=lambda: Histogram("placements"))

    @property
    def unit(self) -> int:
        return SMALL_PAGE if self.subpage and self.page_size > SMALL_PAGE else self.page_size

    def ensure_units(self, count: int) -> None:
        if count > self.placed.size:
            grown = np.zeros(max(count, 2 * self.placed.size), dtype=np.bool_)
            grown[: self.placed.size] = self.placed
            self.placed = grown

    def see_times(self, lo: int, hi: int) -> None:
        self.first_ns = lo if self.first_ns is None else min(self.first_ns, lo)
        self.last_ns = hi if self.last_ns is None else max(self.last_ns, hi)


class _Lines:
    """One chunk of complete lines, with the views every decoder needs."""

    def __init__(self, pieces: list[memoryview]) -> None:
        n = sum(len(p) for p in pieces)
        # One copy into a buffer with zero padding, so that 8-byte loads near
        # the end of the last line stay inside it.
        self.mem: U8 = np.empty(n + _PAD, dtype=np.uint8)
        at = 0
        for piece in pieces:
            self.mem[at : at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            at += len(piece)
        self.mem[n:] = 0
        # Every byte offset as the start of an unaligned little-endian uint64.
        self.words: U64 = np.ndarray(
            (n + _PAD - 8,), dtype="<u8", buffer=self.mem, offset=0, strides=(1,)
        )
        self.ends: I64 = np.flatnonzero(self.mem[:n] == 10)
        self.starts: I64 = np.empty_like(self.ends)
        if self.ends.size:
            self.starts[0] = 0
            self.starts[1:] = self.ends[:-1] + 1

    def text(self, start: int, end: int) -> bytes:
        """The bytes ``start:end`` of the chunk."""
        return self.mem[start:end].tobytes()


@dataclass
class _Waiters:
    """Outstanding fault requests (kind 0) and vCPU blocktime begins (kind 1).

    ``placements_before``: how many known placements were matched before each.
    """

    hva: U64
    block: I64
    ts: I64
    kind: npt.NDArray[np.int8]
    cpu: I64
    pid: I64
    placements_before: I64

    @classmethod
    def empty(cls) -> _Waiters:
        return cls(
            np.zeros(0, np.uint64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int8),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )

    def __len__(self) -> int:
        return int(self.hva.size)


class _Found(NamedTuple):
    """Decoded events, each with its line's sequence number in the trace and time."""

    place_seq: I64
    place_ts: I64
    place_addr: U64
    place_zero: Bools
    req_seq: I64
    req_ts: I64
    req_hva: U64
    req_pid: I64
    begin_seq: I64
    begin_ts: I64
    begin_addr: U64
    begin_cpu: I64

    @classmethod
    def empty(cls) -> _Found:
        i, u, b = np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.bool_)
        return cls(i, i, u, b, i, i, u, i, i, i, u, i)

    def events(self) -> int:
        """How many events (not columns: this is a tuple of columns)."""
        return int(self.place_seq.size + self.req_seq.size + self.begin_seq.size)

    def join(self, other: _Found) -> _Found:
        return _Found._make(np.concatenate([a, b]) for a, b in zip(self, other, strict=True))

    def split(self, upto: int) -> tuple[_Found, _Found]:
        """(events with time <= upto, the others)."""
        early: list[Any] = []
        late: list[Any] = []
        for i, column in enumerate(self):
            # Columns come in groups of four per event kind; column 1 is its time.
            mask = self[i - i % 4 + 1] <= upto
            early.append(column[mask])
            late.append(column[~mask])
        return _Found._make(early), _Found._make(late)

    def count_before(self, t: int) -> int:
        return int(
            np.count_nonzero(self.place_ts < t)
            + np.count_nonzero(self.req_ts < t)
            + np.count_nonzero(self.begin_ts < t)
        )


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
        subpage: Literal["auto", "always", "never"] = "auto",
        reorder_window_ns: int = DEFAULT_REORDER_WINDOW_NS,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        if chunk_size < 4096 or chunk_size > (8 << 20):
            raise ValueError("chunk_size must be within 4 KiB .. 8 MiB")
        if reorder_window_ns < 0:
            raise ValueError("reorder_window_ns must be >= 0")
        self.chunk_size = chunk_size
        self.subpage = subpage
        self.reorder_window_ns = reorder_window_ns
        self._blocks: list[_Block] = []
        self._by_name: dict[str, _Block] = {}
        for rb in ramblocks:
            if rb.page_size <= 0 or rb.page_size & (rb.page_size - 1):
                raise ArtifactError(
                    f"RAMBlock {rb.name}: page size {rb.page_size} is no power of 2"
                )
            blk = self._add_block(rb.name, rb.page_size, known=True)
            blk.length = rb.used
            if rb.hva is not None:
                blk.base = rb.hva
        self._index_bases: U64 = np.zeros(0, np.uint64)
        self._index_ends: U64 = np.zeros(0, np.uint64)
        self._index_ids: I64 = np.zeros(0, np.int64)
        self._reindex()
        self._carry = b""
        self._waiters = _Waiters.empty()
        # Placements of known blocks matched so far (the backlog's running count).
        self._placements_matched = 0
        self._buffered: list[tuple[U64, I64, Bools]] = []
        self._buffered_count = 0
        self._dropped_placements = 0
        self._unattributed_faults = 0
        # Per-vCPU blocktime sweep state: outstanding faults, time of the last event.
        self._cpu_level: dict[int, int] = {}
        self._cpu_last: dict[int, int] = {}
        self._cpu_blocked: dict[int, int] = {}
        self._cpu_faults: dict[int, int] = {}
        self._non_vcpu_faults = 0
        self._tid_to_vcpu: dict[int, int] = {}
        self._ignored: Counter[str] = Counter()
        self._format: TraceFormat | None = None
        self._lines = 0
        self._records = 0
        self._malformed = 0
        self._other = 0
        self._untimestamped = 0
        self._truncated = False
        self._first_ns: int | None = None
        self._last_ns: int | None = None
        self._finished = False
        # Events held back until no line written later can carry an earlier time.
        self._deferred = _Found.empty()
        self._seq = 0
        self._max_ts: int | None = None
        self._released_upto: int | None = None
        self._late = 0

    # -- feeding ------------------------------------------------------------------

    def feed(self, data: bytes) -> FaultBatch:
        """Analyse more trace bytes; returns the faults resolved by the events this released."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            self._carry += data
            if len(self._carry) > _MAX_LINE:
                # No trace record is this long: drop it rather than grow without bound.
                self._malformed += 1
                self._lines += 1
                self._carry = b""
            return self._empty_batch()
        view = memoryview(data)
        batches = []
        start = 0
        while start < cut:
            # Chunks of at most chunk_size bytes (plus the carried partial line)
            # keep line numbers within the bit budget of the sort keys.
            end = min(cut, start + self.chunk_size)
            if end < cut:
                end = data.rfind(b"\n", start, end) + 1 or data.find(b"\n", end) + 1
            pieces = (
                [memoryview(self._carry), view[start:end]] if self._carry else [view[start:end]]
            )
            self._carry = b""
            batches.append(self._process(_Lines(pieces)))
            start = end
        self._carry = bytes(view[cut:])
        return self._concat_batches(batches)

    def close(self) -> FaultBatch:
        """End of input: match the events still held back; returns the faults they resolve.

        An unterminated last line is counted as torn and ignored.
        """
        if self._finished:
            return self._empty_batch()
        self._finished = True
        if self._carry.strip():
            # QEMU ends every record with '\n'; a line without one was cut off
            # mid-write and its last field cannot be trusted.
            self._truncated = True
            self._malformed += 1
            self._lines += 1
        self._carry = b""
        deferred, self._deferred = self._deferred, _Found.empty()
        return self._match(deferred)

    def finish(self) -> TraceAnalysis:
        """:meth:`close` (if not yet done) and return the analysis."""
        self.close()
        if self._records == 0 and self._untimestamped:
            raise ArtifactError(
                f"trace has {self._untimestamped} event lines but no timestamps; "
                "run the destination QEMU with -msg timestamp=on"
            )
        return self._result()

    # -- per-chunk pipeline ---------------------------------------------------------------

    def _process(self, lines: _Lines) -> FaultBatch:
        nlines = int(lines.ends.size)
        if nlines > _MAX_LINES:
            raise ArtifactError(f"trace: {nlines} lines in one chunk; use a smaller chunk_size")
        self._lines += nlines
        if nlines == 0:
            return self._empty_batch()
        line_pos, name_pos, ts, eol = self._headers(lines)
        seq = self._seq + line_pos
        found = self._decode(lines, seq, name_pos, ts, eol)
        self._attribute_requests(lines, found, self._seq)
        self._seq += nlines
        if line_pos.size == 0:
            return self._empty_batch()
        lo, hi = int(ts.min()), int(ts.max())
        self._first_ns = lo if self._first_ns is None else min(self._first_ns, lo)
        self._last_ns = hi if self._last_ns is None else max(self._last_ns, hi)
        # The file is not in time order: QEMU takes a line's time before the log
        # lock, so a thread can write a line after another thread's later one
        # (real 7.2 traces show up to ~3 ms).  Events are matched in time order;
        # those within the reorder window of the newest time seen wait for the
        # next chunk.
        self._max_ts = hi if self._max_ts is None else max(self._max_ts, hi)
        if self._released_upto is not None:
            self._late += found.count_before(self._released_upto)
        upto = self._max_ts - self.reorder_window_ns
        if self._deferred.events() + found.events() > _MAX_DEFERRED:
            upto = self._max_ts  # time ran backwards a lot: stop waiting
        ready, self._deferred = self._deferred.join(found).split(upto)
        self._released_upto = (
            upto if self._released_upto is None else max(self._released_upto, upto)
        )
        return self._match(ready)

    def _headers(self, lines: _Lines) -> tuple[I64, I64, I64, I64]:
        """Find record lines; returns their 1-based positions, event-name offsets, times, ends."""
        words, mem = lines.words, lines.mem
        starts, ends = lines.starts, lines.ends
        # Strip a '\r' before '\n' so the last field sees the same terminator.
        eol = ends - ((ends > starts) & (mem[np.maximum(ends - 1, 0)] == 13))
        nonblank = eol > starts
        w0 = words[starts]
        # --- "TID@SEC.USEC:" --------------------------------------------------------
        # Bytes equal to '@' become 0 after the xor.
        at_byte = _first_flagged_byte(_range_flags(w0 ^ np.uint64(0x4040404040404040), 0, 0))
        digits0 = _digit_flags(w0)
        ok72 = (
            nonblank
            & (at_byte >= 1)
            & (at_byte <= 7)
            & ((digits0 & _REQ_HIGH[np.minimum(at_byte, 8)]) == _REQ_HIGH[np.minimum(at_byte, 8)])
        )
        at = starts + at_byte
        s1 = words[at + 1]
        s3 = words[at + 3]
        t11 = words[at + 11]
        ok72 &= (
            (_digit_flags(s1) == _HIGH)
            & (_digit_flags(s3) == _HIGH)
            & (_byte(t11, 0) == 0x2E)
            & (_byte(t11, 7) == 0x3A)
            & ((_digit_flags(t11) & np.uint64(0x0080808080808000)) == np.uint64(0x0080808080808000))
            & (at + 19 <= eol)
        )
        idx72 = np.flatnonzero(ok72)
        sec = _dec8(s3[idx72]) + (
            (_byte(s1[idx72], 0) - np.uint64(48)) * np.uint64(10)
            + (_byte(s1[idx72], 1) - np.uint64(48))
        ) * np.uint64(100_000_000)
        usec = _dec8(
            ((t11[idx72] >> np.uint64(8)) & np.uint64(0xFFFFFFFFFFFF)) << np.uint64(16)
            | np.uint64(0x3030)
        )
        ts72 = (sec.astype(np.int64) * 1_000_000 + usec.astype(np.int64)) * 1000
        name72 = at[idx72] + 19
        # --- "YYYY-MM-DDTHH:MM:SS[.ffffff]Z " ------------------------------------------------
        rest = np.flatnonzero(~ok72 & nonblank)
        idx_iso, name_iso, ts_iso = self._iso_headers(words, starts[rest], eol[rest])
        idx_iso = rest[idx_iso]
        if idx72.size or idx_iso.size:
            fmt: TraceFormat = "tid@epoch" if idx72.size >= idx_iso.size else "iso8601"
            if self._format is None:
                self._format = fmt
        # --- everything else -------------------------------------------------------------------
        bad = np.ones(starts.size, dtype=np.bool_)
        bad[idx72] = False
        bad[idx_iso] = False
        bad &= nonblank
        nbad = int(np.count_nonzero(bad))
        if nbad:
            first = w0[bad]
            untimestamped = (first == _const(b"postcopy")) | (first == _const(b"mark_pos"))
            self._untimestamped += int(np.count_nonzero(untimestamped))
            self._malformed += nbad - int(np.count_nonzero(untimestamped))
        line_idx = np.concatenate([idx72, idx_iso])
        name_pos = np.concatenate([name72, name_iso])
        ts = np.concatenate([ts72, ts_iso])
        order = np.argsort(line_idx, kind="stable")
        line_idx = line_idx[order]
        self._records += int(line_idx.size)
        return line_idx + 1, name_pos[order], ts[order], eol[line_idx]

    @staticmethod
    def _iso_headers(words: U64, starts: I64, eol: I64) -> tuple[I64, I64, I64]:
        if starts.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        w0, w8, w16, w20 = words[starts], words[starts + 8], words[starts + 16], words[starts + 20]
        d0, d8, d16, d20 = _digit_flags(w0), _digit_flags(w8), _digit_flags(w16), _digit_flags(w20)

        def has(flags: U64, *positions: int) -> Bools:
            need = np.uint64(sum(0x80 << (8 * p) for p in positions))
            return np.asarray((flags & need) == need)

        ok = (
            has(d0, 0, 1, 2, 3, 5, 6)
            & (_byte(w0, 4) == 0x2D)
            & (_byte(w0, 7) == 0x2D)
            & has(d8, 0, 1, 3, 4, 6, 7)
            & (_byte(w8, 2) == 0x54)
            & (_byte(w8, 5) == 0x3A)
            & (_byte(w16, 0) == 0x3A)
            & has(d16, 1, 2)
        )
        frac = (
            (_byte(w16, 3) == 0x2E)
            & has(d20, 0, 1, 2, 3, 4, 5)
            & (_byte(w20, 6) == 0x5A)
            & (_byte(w20, 7) == 0x20)
        )
        whole = (_byte(w16, 3) == 0x5A) & (_byte(w20, 0) == 0x20)
        ok &= frac | whole
        name = starts + np.where(frac, 28, 21)
        ok &= name <= eol
        idx = np.flatnonzero(ok)
        w0, w8, w16, w20, frac = w0[idx], w8[idx], w16[idx], w20[idx], frac[idx]

        def num(w: U64, *positions: int) -> I64:
            value = np.zeros(w.size, dtype=np.int64)
            for p in positions:
                value = value * 10 + (_byte(w, p).astype(np.int64) - 48)
            return value

        days = _days_from_civil(num(w0, 0, 1, 2, 3), num(w0, 5, 6), num(w8, 0, 1))
        secs = days * 86400 + num(w8, 3, 4) * 3600 + num(w8, 6, 7) * 60 + num(w16, 1, 2)
        usec = np.where(frac, num(w20, 0, 1, 2, 3, 4, 5), 0)
        return idx, name[idx], (secs * 1_000_000 + usec) * 1000

    def _decode(self, lines: _Lines, seq: I64, name_pos: I64, ts: I64, eol: I64) -> _Found:
        """Decode the events of the record lines; rare ones go through re."""
        words = lines.words
        # Dispatch on the first 16 bytes of the event name, then verify the rest
        # of each candidate's fixed text with loads of its own.
        g0 = words[name_pos]
        g1 = words[name_pos + 8]
        postcopy = g0 == _const(b"postcopy")

        # Keyed by id(group); the group is kept in the value so that its id is not
        # reused by a later group while this cache lives.
        loads: dict[tuple[int, int], tuple[I64, U64]] = {}

        def verify(sel: I64, text: bytes) -> I64:
            """The lines of ``sel`` whose text from the name on starts with ``text``."""
            keep = np.ones(sel.size, dtype=np.bool_)
            for i, (value, mask) in enumerate(_pattern_words(text)):
                if i >= 2:
                    # Candidates of one group share their loads.
                    key = (id(sel), i)
                    if key not in loads:
                        loads[key] = (sel, words[name_pos[sel] + 8 * i])
                    keep &= (loads[key][1] & mask) == value
            return sel[keep]

        place_group = np.flatnonzero(postcopy & (g1 == _const(b"_place_p")))
        place = verify(place_group, _EV_PLACE)
        zero = verify(place_group, _EV_ZERO)
        req = verify(np.flatnonzero(postcopy & (g1 == _const(b"_ram_fau"))), _EV_REQUEST)
        mark_group = np.flatnonzero((g0 == _const(b"mark_pos")) & (g1 == _const(b"tcopy_bl")))
        bt_end = verify(mark_group, _EV_BT_END_72)
        begin72 = verify(mark_group, _EV_BEGIN_72)
        bt_group = np.flatnonzero(postcopy & (g1 == _const(b"_blockti")))
        begin10 = verify(bt_group, _EV_BEGIN_10)
        if bt_end.size:
            self._ignored["mark_postcopy_blocktime_end"] += int(bt_end.size)
        # Candidates whose arguments do not decode are handed to the slow path below.
        handled = np.zeros(seq.size, dtype=np.bool_)
        for part in (place, zero, req, bt_end, begin72, begin10):
            handled[part] = True

        # Placements: host=%p is the last field (or followed by HGM's extra args).
        is_zero = np.zeros(seq.size, dtype=np.bool_)
        is_zero[zero] = True
        place = np.concatenate([place, zero])
        hex_at = name_pos[place] + np.where(is_zero[place], len(_EV_ZERO), len(_EV_PLACE))
        addr, ok = _parse_hex(lines, hex_at, eol[place])
        slow_parts = [place[~ok]]
        place, addr = place[ok], addr[ok]
        # Requests: "HVA=0x%lx rb=%s offset=0x%zx pid=%u".
        hva, ok = _parse_hex(lines, name_pos[req] + len(_EV_REQUEST), None)
        pid, pid_ok, _ = _tail_int(lines, eol[req], b"pid=")
        ok &= pid_ok
        slow_parts.append(req[~ok])
        req, hva, pid = req[ok], hva[ok], pid[ok]
        # Blocktime begins: "addr: 0x.." first, "cpu: %d, already_received: %d"
        # (7.2) or "cpu: %d, exist: %d" (>= 10.1) last.
        b_sel, b_addr, b_cpu = [], [], []
        for sel, text, flag_marker, between in (
            (begin72, _EV_BEGIN_72, b"ceived: ", b", already_re"),
            (begin10, _EV_BEGIN_10, b" exist: ", b","),
        ):
            a, ok = _parse_hex(lines, name_pos[sel] + len(text), None)
            flag, flag_ok, flag_at = _tail_int(lines, eol[sel], flag_marker)
            ok &= flag_ok & _ends_with(lines, flag_at, between)
            cpu, cpu_ok, _ = _tail_int(lines, flag_at - len(between), b", cpu: ", signed=True)
            ok &= cpu_ok
            slow_parts.append(sel[~ok])
            # 7.2's already_received=1: the page arrived meanwhile and QEMU drops
            # the begin itself.
            use = ok & ((flag == 0) | (text is _EV_BEGIN_10))
            b_sel.append(sel[use])
            b_addr.append(a[use])
            b_cpu.append(cpu[use])

        slow = np.concatenate([np.flatnonzero(~handled), *slow_parts])
        extra = self._decode_slow(lines, seq, ts, name_pos, eol, slow)
        begins = np.concatenate(b_sel)
        fast = _Found(
            place_seq=seq[place],
            place_ts=ts[place],
            place_addr=addr,
            place_zero=is_zero[place],
            req_seq=seq[req],
            req_ts=ts[req],
            req_hva=hva,
            req_pid=pid,
            begin_seq=seq[begins],
            begin_ts=ts[begins],
            begin_addr=np.concatenate(b_addr),
            begin_cpu=np.concatenate(b_cpu),
        )
        return fast.join(extra)

    def _decode_slow(
        self, lines: _Lines, seq: I64, ts: I64, name_pos: I64, eol: I64, which: I64
    ) -> _Found:
        place: list[tuple[int, int, bool]] = []
        reqs: list[tuple[int, int, int]] = []
        begins: list[tuple[int, int, int]] = []
        for i in which.tolist():
            text = lines.text(int(name_pos[i]), int(eol[i]))
            pos = i
            if text.startswith(b"("):
                prefix = _RE_THREAD_INFO.match(text)
                if prefix is not None:
                    text = text[prefix.end() :]
            if not text.startswith(_EVENT_STARTS):
                event = _RE_EVENT.match(text)
                if event is None:
                    self._other += 1
                else:
                    self._ignored[event[1].decode()] += 1
                continue
            if text.startswith(b"postcopy_place_page"):
                m = _RE_PLACE.match(text)
                if m is None:
                    self._malformed += 1
                else:
                    place.append((pos, int(m[2], 16), m[1].endswith(b"_zero")))
            elif text.startswith(b"postcopy_ram_fault_thread_request "):
                m = _RE_REQUEST.match(text)
                if m is None:
                    self._malformed += 1
                else:
                    reqs.append((pos, int(m[1], 16), int(m[4])))
            elif text.startswith(b"mark_postcopy_blocktime_begin "):
                m = _RE_BEGIN_72.match(text)
                if m is None:
                    self._malformed += 1
                elif m[3] == b"0":
                    # already_received=1: QEMU itself drops such a begin.
                    begins.append((pos, int(m[1], 16), int(m[2])))
            elif text.startswith(b"postcopy_blocktime_begin "):
                m = _RE_BEGIN_10.match(text)
                if m is None:
                    self._malformed += 1
                else:
                    begins.append((pos, int(m[1], 16), int(m[2])))
            elif text.startswith(b"postcopy_blocktime_tid_cpu_map "):
                m = _RE_TID_MAP.match(text)
                if m is None:
                    self._malformed += 1
                else:
                    self._tid_to_vcpu[int(m[2])] = int(m[1])
            elif _RE_RANGE.match(text) is not None:
                m = _RE_RANGE.match(text)
                assert m is not None
                self._learn_range(m[1].decode(errors="replace"), int(m[2], 16), int(m[4], 16))
            else:
                event = _RE_EVENT.match(text)
                if event is None:
                    self._malformed += 1
                else:
                    self._ignored[event[1].decode()] += 1

        def col(rows: list[tuple[int, int, Any]], i: int, dtype: Any) -> Any:
            return np.array([r[i] for r in rows], dtype=dtype)

        p, r, b = col(place, 0, np.int64), col(reqs, 0, np.int64), col(begins, 0, np.int64)
        return _Found(
            place_seq=seq[p],
            place_ts=ts[p],
            place_addr=col(place, 1, np.uint64),
            place_zero=col(place, 2, np.bool_),
            req_seq=seq[r],
            req_ts=ts[r],
            req_hva=col(reqs, 1, np.uint64),
            req_pid=col(reqs, 2, np.int64),
            begin_seq=seq[b],
            begin_ts=ts[b],
            begin_addr=col(begins, 1, np.uint64),
            begin_cpu=col(begins, 2, np.int64),
        )

    # -- blocks ------------------------------------------------------------------------------

    def _add_block(self, name: str, page_size: int, *, known: bool) -> _Block:
        if len(self._blocks) >= _MAX_BLOCKS:
            raise ArtifactError(f"trace: more than {_MAX_BLOCKS} RAMBlocks")
        blk = _Block(len(self._blocks), name, page_size, known)
        self._blocks.append(blk)
        self._by_name[name] = blk
        return blk

    def _block_for_name(self, name: str) -> _Block:
        blk = self._by_name.get(name)
        if blk is None:
            log.warning(
                "RAMBlock %r is in the trace but not in info ramblock; assuming %d-byte pages",
                name,
                SMALL_PAGE,
            )
            blk = self._add_block(name, SMALL_PAGE, known=False)
        return blk

    def _set_base(self, blk: _Block, base: int) -> None:
        if blk.base is None:
            blk.base = base
            self._reindex()
        elif blk.base != base:
            log.warning(
                "RAMBlock %s: base 0x%x from the trace, 0x%x known", blk.name, base, blk.base
            )

    def _learn_range(self, name: str, host: int, length: int) -> None:
        blk = self._block_for_name(name)
        if blk.length is None:
            blk.length = length
        self._set_base(blk, host)

    def _reindex(self) -> None:
        known = sorted((b.base, b) for b in self._blocks if b.base is not None)
        bases = [base for base, _ in known]
        ends = []
        for i, (base, blk) in enumerate(known):
            nxt = bases[i + 1] if i + 1 < len(bases) else 1 << 64
            # Without a known length a block reaches up to the next one.
            ends.append(min(base + blk.length, nxt) if blk.length else nxt)
        self._index_bases = np.array(bases, dtype=np.uint64)
        self._index_ends = np.array([min(e, (1 << 64) - 1) for e in ends], dtype=np.uint64)
        self._index_ids = np.array([blk.index for _, blk in known], dtype=np.int64)

    def _lookup(self, addr: U64) -> I64:
        """Block index of every address; -1 where no known block contains it."""
        if self._index_bases.size == 0 or addr.size == 0:
            return np.full(addr.size, -1, dtype=np.int64)
        slot = np.searchsorted(self._index_bases, addr, side="right") - 1
        safe = np.maximum(slot, 0)
        inside = (slot >= 0) & (addr < self._index_ends[safe])
        return np.where(inside, self._index_ids[safe], -1)

    def _attribute_requests(self, lines: _Lines, found: _Found, seq_base: int) -> None:
        """Learn the base of every block a request names but whose base is unknown."""
        if found.req_hva.size == 0:
            return
        unknown = np.flatnonzero(self._lookup(found.req_hva) < 0)
        if unknown.size == 0:
            return
        starts = lines.starts
        # Few lines: the first request of each block whose base was unknown.
        seen: set[int] = set()
        for i in unknown.tolist():
            hva = int(found.req_hva[i])
            if self._lookup(np.array([hva], dtype=np.uint64))[0] >= 0 or hva in seen:
                continue
            seen.add(hva)
            pos = int(found.req_seq[i]) - seq_base - 1
            line = lines.text(int(starts[pos]), int(lines.ends[pos]))
            m = _RE_REQUEST.search(line)
            if m is None:
                continue
            blk = self._block_for_name(m[2].decode(errors="replace"))
            offset = int(m[3], 16)
            page_base = hva & ~(blk.page_size - 1)
            if blk.base is None and page_base >= offset:
                self._set_base(blk, page_base - offset)

    # -- matching -------------------------------------------------------------------------

    def _flush_buffered(self) -> None:
        """Account held-back placements whose block became known; they precede this chunk."""
        if not self._buffered or self._index_bases.size == 0:
            return
        addr = np.concatenate([a for a, _, _ in self._buffered])
        ts = np.concatenate([t for _, t, _ in self._buffered])
        zero = np.concatenate([z for _, _, z in self._buffered])
        blk = self._lookup(addr)
        now = blk >= 0
        if not np.any(now):
            return
        keep = ~now
        self._buffered = [(addr[keep], ts[keep], zero[keep])] if np.any(keep) else []
        self._buffered_count = int(np.count_nonzero(keep))
        self._account_placements(addr[now], blk[now], zero[now], ts[now], np.zeros(0, np.int64))

    def _units(self, addr: U64, blk: I64) -> I64:
        bases = np.array([b.base or 0 for b in self._blocks], dtype=np.uint64)
        shifts = np.array([b.unit.bit_length() - 1 for b in self._blocks], dtype=np.uint64)
        return ((addr - bases[blk]) >> shifts[blk]).astype(np.int64)

    def _maybe_switch_subpage(self, addr: U64, blk: I64) -> None:
        if self.subpage == "never":
            return
        for b in _present(blk):
            block = self._blocks[b]
            if block.subpage or block.page_size <= SMALL_PAGE:
                continue
            if self.subpage == "always":
                misaligned = True
            else:
                off = addr[blk == b] - np.uint64(block.base or 0)
                misaligned = bool(np.any(off & np.uint64(block.page_size - 1)))
            if misaligned:
                # A HGM run: placements are 4 KiB pieces of huge pages.  Re-express
                # the placed-page map in pieces so that earlier whole pages stay placed.
                ratio = block.page_size // SMALL_PAGE
                block.placed = np.repeat(block.placed, ratio)
                block.subpage = True
                log.info("RAMBlock %s: sub-page placements seen, resolving at 4 KiB", block.name)

    def _account_placements(
        self, addr: U64, blk: I64, zero: Bools, ts: I64, pos: I64
    ) -> tuple[U64, I64]:
        """Mark placements (earlier ones first) and update per-block counters.

        Returns the sorted (key << 24 | pos) of the placements and the permutation
        that sorted them, for matching waiters.  ``pos`` empty means "before this
        chunk" (buffered placements flushed).
        """
        if addr.size == 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        self._maybe_switch_subpage(addr, blk)
        units = self._units(addr, blk)
        if np.any(units >= _MAX_UNITS):
            raise ArtifactError("trace: a RAMBlock larger than 2**32 pages")
        key = (blk.astype(np.uint64) << np.uint64(32)) | units.astype(np.uint64)
        if pos.size == 0:
            pos = np.zeros(addr.size, dtype=np.int64)
        comp = (key << np.uint64(_POS_BITS)) | pos.astype(np.uint64)
        order = np.argsort(comp)
        scomp = comp[order]
        skey = scomp >> np.uint64(_POS_BITS)
        first = np.ones(skey.size, dtype=np.bool_)
        first[1:] = skey[1:] != skey[:-1]
        sblk = blk[order]
        sunits = units[order]
        szero = zero[order]
        base_arr = np.array([b.base or 0 for b in self._blocks], dtype=np.uint64)
        soff = addr[order] - base_arr[sblk]
        sts = ts[order]
        # Blocks are contiguous in key order.
        bounds = np.flatnonzero(np.diff(sblk)) + 1
        for lo, hi in zip(
            np.concatenate([[0], bounds]).tolist(),
            np.concatenate([bounds, [skey.size]]).tolist(),
            strict=True,
        ):
            block = self._blocks[int(sblk[lo])]
            u = sunits[lo:hi]
            block.ensure_units(int(u.max()) + 1)
            new = first[lo:hi] & ~block.placed[u]
            block.placed[u] = True
            n_new = int(np.count_nonzero(new))
            block.placements += hi - lo
            block.pages_placed += n_new
            block.zero_pages += int(np.count_nonzero(new & szero[lo:hi]))
            block.offsets_or |= int(np.bitwise_or.reduce(soff[lo:hi]))
            block.any_placement = True
            block.see_times(int(sts[lo:hi].min()), int(sts[lo:hi].max()))
        return scomp, order

    def _match(self, found: _Found) -> FaultBatch:
        """Match placements and waiters of ``found`` (all later than anything matched before)."""
        if found.events() == 0 and not self._buffered:
            return self._empty_batch()
        self._flush_buffered()
        # Rank every event by (time, line): positions in the sort keys below.
        n_p, n_r = found.place_seq.size, found.req_seq.size
        all_ts = np.concatenate([found.place_ts, found.req_ts, found.begin_ts])
        all_seq = np.concatenate([found.place_seq, found.req_seq, found.begin_seq])
        rank = np.empty(all_ts.size, dtype=np.int64)
        rank[np.lexsort((all_seq, all_ts))] = np.arange(1, all_ts.size + 1)
        place_pos, req_pos, begin_pos = rank[:n_p], rank[n_p : n_p + n_r], rank[n_p + n_r :]
        # Requests first: their blocks are known after _attribute_requests.
        req_blk = self._lookup(found.req_hva)
        unattributed = req_blk < 0
        if np.any(unattributed):
            self._unattributed_faults += int(np.count_nonzero(unattributed))
        ok = ~unattributed
        begin_blk = self._lookup(found.begin_addr)
        bok = begin_blk >= 0

        # Placements: attribute, hold back the unknown ones.
        p_blk = self._lookup(found.place_addr)
        p_known = p_blk >= 0
        if not np.all(p_known):
            self._hold_back(
                found.place_addr[~p_known], found.place_ts[~p_known], found.place_zero[~p_known]
            )
        p_addr = found.place_addr[p_known]
        p_blk = p_blk[p_known]
        p_pos = place_pos[p_known]
        p_ts = found.place_ts[p_known]
        # Switch to sub-page resolution before the placed map is read, so the
        # waiters' keys and the placements' keys use the same unit.
        if p_addr.size:
            self._maybe_switch_subpage(p_addr, p_blk)

        # Waiters: outstanding ones (position 0) plus this chunk's requests and begins.
        carried = self._waiters
        n_req = int(np.count_nonzero(ok))
        n_beg = int(np.count_nonzero(bok))
        w_hva = np.concatenate([carried.hva, found.req_hva[ok], found.begin_addr[bok]])
        w_blk = np.concatenate([carried.block, req_blk[ok], begin_blk[bok]])
        w_pos = np.concatenate([np.zeros(len(carried), np.int64), req_pos[ok], begin_pos[bok]])
        w_ts = np.concatenate([carried.ts, found.req_ts[ok], found.begin_ts[bok]])
        w_kind = np.concatenate([carried.kind, np.zeros(n_req, np.int8), np.ones(n_beg, np.int8)])
        w_cpu = np.concatenate([carried.cpu, np.full(n_req, -1, np.int64), found.begin_cpu[bok]])
        w_pid = np.concatenate([carried.pid, found.req_pid[ok], np.full(n_beg, -1, np.int64)])
        is_new = w_pos > 0
        # Backlog ordinals: ahead[x] = known placements of this round ranked at or
        # before x; on top of self._placements_matched of earlier rounds.
        ahead = np.zeros(all_ts.size + 1, dtype=np.int64)
        ahead[p_pos] = 1
        np.cumsum(ahead, out=ahead)
        w_before = np.concatenate(
            [carried.placements_before, self._placements_matched + ahead[w_pos[len(carried) :]]]
        )

        w_units = self._units(w_hva, w_blk) if w_hva.size else np.zeros(0, np.int64)
        # Placed before the request: in an earlier chunk (the map as it is now) ...
        placed_before = np.zeros(w_hva.size, dtype=np.bool_)
        for b in _present(w_blk[is_new]):
            block = self._blocks[b]
            sel = np.flatnonzero(is_new & (w_blk == b))
            u = w_units[sel]
            inside = u < block.placed.size
            placed_before[sel[inside]] = block.placed[u[inside]]

        scomp, order = self._account_placements(
            p_addr, p_blk, found.place_zero[p_known], p_ts, p_pos
        )
        skey = scomp >> np.uint64(_POS_BITS)
        n_place = int(skey.size)
        w_key = (w_blk.astype(np.uint64) << np.uint64(32)) | w_units.astype(np.uint64)
        w_comp = (w_key << np.uint64(_POS_BITS)) | w_pos.astype(np.uint64)
        j = np.searchsorted(scomp, w_comp, side="right")
        jc = np.minimum(j, max(n_place - 1, 0))
        if n_place:
            resolved = (j < n_place) & (skey[jc] == w_key)
            # ... or earlier in this chunk.
            jp = np.maximum(j - 1, 0)
            placed_before |= is_new & (j > 0) & (skey[jp] == w_key)
        else:
            resolved = np.zeros(w_hva.size, dtype=np.bool_)
        resolved &= ~placed_before
        # Sentinel for "not resolved in this chunk": duplicates share it.
        j = np.where(resolved, j, n_place)

        is_req = w_kind == 0
        self._count_requests(w_blk, w_key, w_pos, j, is_req, is_new, placed_before)

        # Latencies of resolved requests.
        r = np.flatnonzero(resolved & is_req)
        placed_at = order[j[r]] if r.size else np.zeros(0, np.int64)
        placed_ns = p_ts[placed_at] if r.size else np.zeros(0, np.int64)
        latency = placed_ns - w_ts[r]
        negative = latency < 0
        latency = np.maximum(latency, 0)
        # Placements strictly between the request and its page: ordinal of the page
        # (known placements ranked before it) minus those ranked before the request.
        backlog = self._placements_matched + ahead[p_pos[placed_at]] - 1 - w_before[r]
        self._placements_matched += int(p_pos.size)
        r_blk = w_blk[r]
        for b in _present(r_blk):
            sel = r_blk == b
            block = self._blocks[b]
            block.resolved += int(np.count_nonzero(sel))
            block.negative_latencies += int(np.count_nonzero(negative & sel))
            block.latency.record_many(latency[sel])
            block.backlog.record_many(backlog[sel])
        # Pages whose placement resolved at least one request.
        if r.size:
            first_use = np.zeros(p_blk.size, dtype=np.bool_)
            first_use[placed_at] = True
            counts = np.bincount(p_blk[first_use], minlength=len(self._blocks))
            for b in np.flatnonzero(counts).tolist():
                self._blocks[b].pages_requested += int(counts[b])

        # Times of new requests (placements' times were taken in _account_placements).
        nr = np.flatnonzero(is_new & is_req)
        for b in _present(w_blk[nr]):
            t = w_ts[nr][w_blk[nr] == b]
            self._blocks[b].see_times(int(t.min()), int(t.max()))

        self._blocktime(
            w_kind, w_cpu, w_pos, w_ts, is_new, placed_before, resolved, j, scomp, p_ts, order
        )

        pending = ~resolved & ~placed_before
        self._waiters = _Waiters(
            w_hva[pending],
            w_blk[pending],
            w_ts[pending],
            w_kind[pending],
            w_cpu[pending],
            w_pid[pending],
            w_before[pending],
        )
        return FaultBatch(
            block_names=tuple(b.name for b in self._blocks),
            block=r_blk,
            hva=w_hva[r],
            pid=w_pid[r],
            request_ns=w_ts[r],
            placed_ns=placed_ns,
            latency_ns=latency,
        )

    def _count_requests(
        self,
        w_blk: I64,
        w_key: U64,
        w_pos: I64,
        j: I64,
        is_req: Bools,
        is_new: Bools,
        placed_before: Bools,
    ) -> None:
        new_req = is_new & is_req
        # Duplicates: same page, no placement of it in between (same j) as an
        # earlier request that was still outstanding.
        live = np.flatnonzero(is_req & ~placed_before)
        dup = np.zeros(w_blk.size, dtype=np.bool_)
        if live.size > 1:
            order = np.lexsort((w_pos[live], w_key[live]))
            lk, lj = w_key[live][order], j[live][order]
            same = np.zeros(order.size, dtype=np.bool_)
            same[1:] = (lk[1:] == lk[:-1]) & (lj[1:] == lj[:-1])
            dup[live[order[same]]] = True
        dup &= new_req
        for b in _present(w_blk[new_req]):
            sel = new_req & (w_blk == b)
            block = self._blocks[b]
            block.faults += int(np.count_nonzero(sel))
            block.already_placed += int(np.count_nonzero(sel & placed_before))
            block.duplicate_requests += int(np.count_nonzero(sel & dup))

    def _blocktime(
        self,
        kind: npt.NDArray[np.int8],
        cpu: I64,
        pos: I64,
        ts: I64,
        is_new: Bools,
        placed_before: Bools,
        resolved: Bools,
        j: I64,
        scomp: U64,
        p_ts: I64,
        order: I64,
    ) -> None:
        """Per-vCPU time with at least one fault outstanding (a sweep over begin/end events)."""
        begin = kind == 1
        if not np.any(begin):
            return
        new_begin = begin & is_new & ~placed_before
        vcpu = cpu >= 0
        self._non_vcpu_faults += int(np.count_nonzero(new_begin & ~vcpu))
        starts = np.flatnonzero(new_begin & vcpu)
        ends = np.flatnonzero(begin & vcpu & resolved)
        ev_cpu = np.concatenate([cpu[starts], cpu[ends]])
        if ev_cpu.size == 0:
            return
        mask = np.uint64((1 << _POS_BITS) - 1)
        end_pos = (scomp[j[ends]] & mask).astype(np.int64) if ends.size else np.zeros(0, np.int64)
        end_ts = p_ts[order[j[ends]]] if ends.size else np.zeros(0, np.int64)
        ev_pos = np.concatenate([pos[starts], end_pos])
        ev_ts = np.concatenate([ts[starts], end_ts])
        ev_delta = np.concatenate([np.ones(starts.size, np.int64), -np.ones(ends.size, np.int64)])
        for c in _present(ev_cpu):
            sel = np.flatnonzero(ev_cpu == c)
            # Begins sort before ends at the same line (they cannot share one).
            o = sel[np.lexsort((-ev_delta[sel], ev_pos[sel]))]
            t, d = ev_ts[o], ev_delta[o]
            level0 = self._cpu_level.get(c, 0)
            last = self._cpu_last.get(c, int(t[0]))
            levels = level0 + np.cumsum(d)
            before = np.concatenate([[level0], levels[:-1]])
            prev_t = np.concatenate([[last], t[:-1]])
            blocked = int(np.sum(np.where(before > 0, np.maximum(t - prev_t, 0), 0)))
            self._cpu_blocked[c] = self._cpu_blocked.get(c, 0) + blocked
            self._cpu_level[c] = max(int(levels[-1]), 0)
            self._cpu_last[c] = int(t[-1])
            self._cpu_faults[c] = self._cpu_faults.get(c, 0) + int(np.count_nonzero(d > 0))

    def _hold_back(self, addr: U64, ts: I64, zero: Bools) -> None:
        room = _MAX_BUFFERED - self._buffered_count
        if room < addr.size:
            self._dropped_placements += int(addr.size) - max(room, 0)
            addr, ts, zero = addr[: max(room, 0)], ts[: max(room, 0)], zero[: max(room, 0)]
        if addr.size:
            self._buffered.append((addr, ts, zero))
            self._buffered_count += int(addr.size)

    # -- results ---------------------------------------------------------------------------

    def _empty_batch(self) -> FaultBatch:
        z = np.zeros(0, np.int64)
        return FaultBatch(
            tuple(b.name for b in self._blocks), z, np.zeros(0, np.uint64), z, z, z, z
        )

    def _concat_batches(self, batches: list[FaultBatch]) -> FaultBatch:
        if not batches:
            return self._empty_batch()
        if len(batches) == 1:
            return batches[0]
        return FaultBatch(
            block_names=tuple(b.name for b in self._blocks),
            block=np.concatenate([b.block for b in batches]),
            hva=np.concatenate([b.hva for b in batches]),
            pid=np.concatenate([b.pid for b in batches]),
            request_ns=np.concatenate([b.request_ns for b in batches]),
            placed_ns=np.concatenate([b.placed_ns for b in batches]),
            latency_ns=np.concatenate([b.latency_ns for b in batches]),
        )

    def _result(self) -> TraceAnalysis:
        pending_req = self._waiters.kind == 0
        unresolved = np.bincount(
            self._waiters.block[pending_req], minlength=len(self._blocks)
        ).tolist()
        blocks = []
        total = Histogram("ns")
        for blk in self._blocks:
            total.merge(blk.latency)
            gran: int | None = None
            if blk.any_placement:
                low = blk.offsets_or & -blk.offsets_or
                gran = min(low, blk.page_size) if low else blk.page_size
            blocks.append(
                BlockAnalysis(
                    name=blk.name,
                    page_size=blk.page_size,
                    page_size_known=blk.page_size_known,
                    host_base=blk.base,
                    subpage_resolution=blk.subpage,
                    faults=blk.faults,
                    resolved=blk.resolved,
                    unresolved=int(unresolved[blk.index]),
                    already_placed=blk.already_placed,
                    duplicate_requests=blk.duplicate_requests,
                    negative_latencies=blk.negative_latencies,
                    placements=blk.placements,
                    pages_placed=blk.pages_placed,
                    pages_requested=blk.pages_requested,
                    pages_background=blk.pages_placed - blk.pages_requested,
                    zero_pages=blk.zero_pages,
                    duplicate_placements=blk.placements - blk.pages_placed,
                    placement_granularity=gran,
                    latency=blk.latency,
                    backlog=blk.backlog,
                    first_event_ns=blk.first_ns,
                    last_event_ns=blk.last_ns,
                )
            )
        return TraceAnalysis(
            format=self._format,
            lines=self._lines,
            records=self._records,
            malformed_lines=self._malformed,
            other_lines=self._other,
            untimestamped_lines=self._untimestamped,
            truncated_last_line=self._truncated,
            late_events=self._late,
            ignored_events=dict(sorted(self._ignored.items())),
            unattributed_placements=self._buffered_count + self._dropped_placements,
            unattributed_faults=self._unattributed_faults,
            first_event_ns=self._first_ns,
            last_event_ns=self._last_ns,
            blocks=tuple(blocks),
            latency=total,
            vcpu_blocktime_ns=dict(sorted(self._cpu_blocked.items())),
            vcpu_faults=dict(sorted(self._cpu_faults.items())),
            non_vcpu_faults=self._non_vcpu_faults,
            tid_to_vcpu=dict(sorted(self._tid_to_vcpu.items())),
        )


# ---------------------------------------------------------------------------
# Field decoders shared by the fast path


def _parse_hex(lines: _Lines, at: I64, eol: I64 | None) -> tuple[U64, Bools]:
    """Hex numbers (1..16 digits, no "0x") starting at ``at``; also returns validity.

    A number ends at a space, ',', '\\r' or the end of the line.
    """
    if at.size == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.bool_)
    words = lines.words
    wa, wb = words[at], words[at + 8]
    la = _first_flagged_byte(~_hex_flags(wa) & _HIGH)
    lb = _first_flagged_byte(~_hex_flags(wb) & _HIGH)
    length = np.where(la < 8, la, 8 + lb)
    term = lines.mem[at + length]
    ok = (
        (length >= 1)
        & (length <= 16)
        & ((term == 0x20) | (term == 0x2C) | (term == 0x0D) | (term == 0x0A))
    )
    if eol is not None:
        ok &= at + length <= eol
    full = (_hex8(wa) << np.uint64(32)) | _hex8(wb)
    shift = np.uint64(4) * (np.uint64(16) - np.where(ok, length, 16).astype(np.uint64))
    return full >> shift, ok


def _tail_int(
    lines: _Lines, end: I64, marker: bytes, *, signed: bool = False
) -> tuple[I64, Bools, I64]:
    """The decimal number (1..7 digits, ``-`` allowed if ``signed``) ending at ``end``
    right after ``marker`` (at most 8 bytes).

    Returns the values, their validity and where each marker starts.
    """
    if end.size == 0:
        z = np.zeros(0, np.int64)
        return z, np.zeros(0, np.bool_), z
    w = lines.words[np.maximum(end - 8, 0)]
    nondigit = ~_digit_flags(w) & _HIGH
    # Highest non-digit byte: the float exponent of the flag word is exact here
    # because only bits 7, 15, ..., 63 can be set.
    _, exp = np.frexp(nondigit.astype(np.float64))
    top = np.where(nondigit == 0, -1, (exp.astype(np.int64) - 1) >> 3)
    ndig = 7 - top
    neg = np.zeros(end.size, dtype=np.bool_)
    if signed:
        neg = lines.mem[np.maximum(end - ndig - 1, 0)] == 0x2D
    marker_at = end - ndig - neg - len(marker)
    ok = (ndig >= 1) & (ndig <= 7) & _ends_with(lines, marker_at + len(marker), marker)
    pad = np.where(ok, 8 - ndig, 1).astype(np.uint64) * np.uint64(8)
    keep = ~((np.uint64(1) << pad) - np.uint64(1))
    value = _dec8((w & keep) | (_ZEROS & ~keep)).astype(np.int64)
    value = np.where(neg, -value, value)
    return np.where(ok, value, -1), ok, marker_at


def _ends_with(lines: _Lines, end: I64, text: bytes) -> Bools:
    """Whether the bytes just before ``end`` are ``text`` (at most 16 bytes)."""
    ok = np.ones(end.size, dtype=np.bool_)
    for i in range(0, len(text), 8):
        part = text[i : i + 8]
        at = end - len(text) + i
        word = lines.words[np.maximum(at, 0)] & np.uint64(_low_bytes_mask(len(part)))
        ok &= (word == _const(part)) & (at >= 0)
    return ok


# ---------------------------------------------------------------------------
# Entry points


def _read_chunks(source: Path | BinaryIO, size: int) -> Iterator[bytes]:
    if isinstance(source, Path):
        try:
            handle = source.open("rb")
        except OSError as exc:
            raise ArtifactError(f"{source}: cannot read trace: {exc}") from exc
        with handle:
            yield from iter(lambda: handle.read(size), b"")
    else:
        yield from iter(lambda: source.read(size), b"")


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
    subpage: Literal["auto", "always", "never"] = "auto",
    reorder_window_ns: int = DEFAULT_REORDER_WINDOW_NS,
) -> TraceAnalysis:
    """Analyse a whole destination trace log (see the module docstring)."""
    an = TraceAnalyzer(ramblocks, subpage=subpage, reorder_window_ns=reorder_window_ns)
    for chunk in _read_chunks(source, an.chunk_size):
        an.feed(chunk)
    return an.finish()
