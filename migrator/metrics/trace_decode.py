"""Decoding the destination QEMU's trace bytes into post-copy events.

:class:`TraceDecoder` cuts the bytes into chunks of whole lines, finds the
record lines (:func:`~migrator.metrics.trace_text.find_records`), and decodes
the events the analysis uses (argument text from ``migration/trace-events``,
see :mod:`migrator.metrics.trace`): placements, fault requests and vCPU
blocktime begins become :class:`DecodedEvents`, RAMBlock ranges and vCPU thread
ids are handed on as they are, every other event is counted by name.  The
common events are decoded with numpy over the whole chunk; only rare ones
(ranges, tid maps, unknown events, lines that fail the fast path) go through
``re``.

:class:`ReorderWindow` then hands the events on in time order: QEMU takes a
line's time before it takes the log lock, so two threads' lines can be
written out of time order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from migrator.errors import ArtifactError
from migrator.metrics.block_map import POSITION_BITS
from migrator.metrics.trace_text import (
    I64,
    U64,
    Bools,
    Lines,
    RecordHeaders,
    TraceFormat,
    ends_with,
    find_records,
    parse_hex,
    pattern_words,
    tail_int,
    text_word,
)

__all__ = [
    "DecodedChunk",
    "DecodedEvents",
    "EventSpan",
    "RangeLine",
    "ReorderWindow",
    "TraceDecoder",
]

# Line numbers of a chunk share the matcher's uint64 sort keys.
_MAX_LINES = (1 << POSITION_BITS) - 2
# A line longer than this cannot be a trace record; it is dropped as malformed.
_MAX_LINE = 1 << 20
# At most this many events wait for the reorder window.
_MAX_DEFERRED = 1 << 20

# Event texts matched at the name position, up to and including "0x" of the
# first hex argument.
_EV_PLACE = b"postcopy_place_page host=0x"
_EV_ZERO = b"postcopy_place_page_zero host=0x"
_EV_REQUEST = b"postcopy_ram_fault_thread_request Request for HVA=0x"
_EV_BT_END_72 = b"mark_postcopy_blocktime_end "
_EV_BEGIN_72 = b"mark_postcopy_blocktime_begin addr: 0x"
_EV_BEGIN_10 = b"postcopy_blocktime_begin addr: 0x"

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
# The slow path's events with arguments, by the start of their text (first match wins).
_SLOW_EVENTS = (
    (b"postcopy_place_page", _RE_PLACE),
    (b"postcopy_ram_fault_thread_request ", _RE_REQUEST),
    (b"mark_postcopy_blocktime_begin ", _RE_BEGIN_72),
    (b"postcopy_blocktime_begin ", _RE_BEGIN_10),
    (b"postcopy_blocktime_tid_cpu_map ", _RE_TID_MAP),
)


@dataclass
class EventSpan:
    """Earliest and latest time seen (ns since the epoch); ``None`` before any."""

    first: int | None = None
    last: int | None = None

    def see(self, lo: int, hi: int) -> None:
        """Widen the span to include ``lo..hi``."""
        self.first = lo if self.first is None else min(self.first, lo)
        self.last = hi if self.last is None else max(self.last, hi)


class DecodedEvents(NamedTuple):
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
    def empty(cls) -> DecodedEvents:
        """No events."""
        i, u, b = np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.bool_)
        return cls(i, i, u, b, i, i, u, i, i, i, u, i)

    @classmethod
    def of_records(
        cls,
        seq: I64,
        ts: I64,
        place: tuple[I64, U64, Bools],
        req: tuple[I64, U64, I64],
        begin: tuple[I64, U64, I64],
    ) -> DecodedEvents:
        """Events at the records ``place[0]``, ``req[0]`` and ``begin[0]`` (indices into
        ``seq``/``ts``), each with its two arguments."""
        (p, addr, zero), (r, hva, pid), (b, begin_addr, cpu) = place, req, begin
        return cls(
            seq[p], ts[p], addr, zero, seq[r], ts[r], hva, pid, seq[b], ts[b], begin_addr, cpu
        )

    def events(self) -> int:
        """How many events (not columns: this is a tuple of columns)."""
        return int(self.place_seq.size + self.req_seq.size + self.begin_seq.size)

    def join(self, other: DecodedEvents) -> DecodedEvents:
        """These events followed by ``other``'s."""
        return DecodedEvents._make(np.concatenate([a, b]) for a, b in zip(self, other, strict=True))

    def split(self, upto: int) -> tuple[DecodedEvents, DecodedEvents]:
        """(events with time <= upto, the others)."""
        early: list[Any] = []
        late: list[Any] = []
        for i, column in enumerate(self):
            # Columns come in groups of four per event kind; column 1 is its time.
            mask = self[i - i % 4 + 1] <= upto
            early.append(column[mask])
            late.append(column[~mask])
        return DecodedEvents._make(early), DecodedEvents._make(late)

    def count_before(self, t: int) -> int:
        """How many events have a time earlier than ``t``."""
        return int(
            np.count_nonzero(self.place_ts < t)
            + np.count_nonzero(self.req_ts < t)
            + np.count_nonzero(self.begin_ts < t)
        )


class RangeLine(NamedTuple):
    """A ``postcopy_*_range`` line: a RAMBlock's host address and length."""

    name: str
    host: int
    length: int


class DecodedChunk(NamedTuple):
    """What one chunk of lines with at least one record says.

    ``ranges`` in line order; ``newest_ns``: the latest record time.
    """

    events: DecodedEvents
    ranges: list[RangeLine]
    newest_ns: int
    lines: Lines
    seq_base: int

    def request_block(self, i: int) -> tuple[str, int] | None:
        """RAMBlock name and offset of fault request ``i`` (None if its line has none)."""
        pos = int(self.events.req_seq[i]) - self.seq_base - 1
        line = self.lines.text(int(self.lines.starts[pos]), int(self.lines.ends[pos]))
        m = _RE_REQUEST.search(line)
        return None if m is None else (m[2].decode(errors="replace"), int(m[3], 16))


class TraceDecoder:
    """Incremental decoder: :meth:`split` bytes into chunks, :meth:`decode` each.

    Counts what it saw of the trace itself (lines, records, malformed lines,
    other lines, ignored events by name, ...) and keeps the vCPU thread map.
    """

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.format: TraceFormat | None = None
        self.lines = 0
        self.records = 0
        self.malformed = 0
        self.other = 0
        self.untimestamped = 0
        self.truncated = False
        self.ignored: Counter[str] = Counter()
        self.tid_to_vcpu: dict[int, int] = {}
        self.span = EventSpan()
        self._carry = b""
        self._seq = 0

    def split(self, data: bytes) -> Iterator[Lines]:
        """The whole lines of the input so far, in chunks; a partial last line is carried."""
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            self._carry += data
            if len(self._carry) > _MAX_LINE:
                # No trace record is this long: drop it rather than grow without bound.
                self.malformed += 1
                self.lines += 1
                self._carry = b""
            return
        view = memoryview(data)
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
            yield Lines(pieces)
            start = end
        self._carry = bytes(view[cut:])

    def end_of_input(self) -> None:
        """No more bytes: an unterminated last line is counted as torn and ignored."""
        if self._carry.strip():
            # QEMU ends every record with '\n'; a line without one was cut off
            # mid-write and its last field cannot be trusted.
            self.truncated = True
            self.malformed += 1
            self.lines += 1
        self._carry = b""

    def decode(self, lines: Lines) -> DecodedChunk | None:
        """The events of a chunk of lines; None if it has no record."""
        nlines = int(lines.ends.size)
        if nlines > _MAX_LINES:
            raise ArtifactError(f"trace: {nlines} lines in one chunk; use a smaller chunk_size")
        self.lines += nlines
        if nlines == 0:
            return None
        records = find_records(lines)
        if self.format is None:
            self.format = records.format
        self.untimestamped += records.untimestamped
        self.malformed += records.malformed
        self.records += int(records.line_pos.size)
        seq_base = self._seq
        ranges: list[RangeLine] = []
        events = self._events(lines, seq_base + records.line_pos, records, ranges)
        self._seq += nlines
        if records.line_pos.size == 0:
            return None
        hi = int(records.ts.max())
        self.span.see(int(records.ts.min()), hi)
        return DecodedChunk(events, ranges, hi, lines, seq_base)

    def _events(
        self, lines: Lines, seq: I64, records: RecordHeaders, ranges: list[RangeLine]
    ) -> DecodedEvents:
        """Decode the events of the record lines; rare ones go through re."""
        words = lines.words
        name_pos, eol = records.name_pos, records.eol
        # Dispatch on the first 16 bytes of the event name, then verify the rest
        # of each candidate's fixed text with loads of its own.
        g0 = words[name_pos]
        g1 = words[name_pos + 8]
        postcopy = g0 == text_word(b"postcopy")

        # Keyed by id(group); the group is kept in the value so that its id is not
        # reused by a later group while this cache lives.
        loads: dict[tuple[int, int], tuple[I64, U64]] = {}

        def verify(sel: I64, text: bytes) -> I64:
            """The lines of ``sel`` whose text from the name on starts with ``text``."""
            keep = np.ones(sel.size, dtype=np.bool_)
            for i, (value, mask) in enumerate(pattern_words(text)):
                if i >= 2:
                    # Candidates of one group share their loads.
                    key = (id(sel), i)
                    if key not in loads:
                        loads[key] = (sel, words[name_pos[sel] + 8 * i])
                    keep &= (loads[key][1] & mask) == value
            return sel[keep]

        place_group = np.flatnonzero(postcopy & (g1 == text_word(b"_place_p")))
        place = verify(place_group, _EV_PLACE)
        zero = verify(place_group, _EV_ZERO)
        req = verify(np.flatnonzero(postcopy & (g1 == text_word(b"_ram_fau"))), _EV_REQUEST)
        mark_group = np.flatnonzero((g0 == text_word(b"mark_pos")) & (g1 == text_word(b"tcopy_bl")))
        bt_end = verify(mark_group, _EV_BT_END_72)
        begin72 = verify(mark_group, _EV_BEGIN_72)
        bt_group = np.flatnonzero(postcopy & (g1 == text_word(b"_blockti")))
        begin10 = verify(bt_group, _EV_BEGIN_10)
        if bt_end.size:
            self.ignored["mark_postcopy_blocktime_end"] += int(bt_end.size)
        # Candidates whose arguments do not decode are handed to the slow path below.
        handled = np.zeros(seq.size, dtype=np.bool_)
        for part in (place, zero, req, bt_end, begin72, begin10):
            handled[part] = True

        # Placements: host=%p is the last field (or followed by HGM's extra args).
        is_zero = np.zeros(seq.size, dtype=np.bool_)
        is_zero[zero] = True
        place = np.concatenate([place, zero])
        hex_at = name_pos[place] + np.where(is_zero[place], len(_EV_ZERO), len(_EV_PLACE))
        addr, ok = parse_hex(lines, hex_at, eol[place])
        slow_parts = [place[~ok]]
        place, addr = place[ok], addr[ok]
        # Requests: "HVA=0x%lx rb=%s offset=0x%zx pid=%u".
        hva, ok = parse_hex(lines, name_pos[req] + len(_EV_REQUEST), None)
        pid, pid_ok, _ = tail_int(lines, eol[req], b"pid=")
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
            a, ok = parse_hex(lines, name_pos[sel] + len(text), None)
            flag, flag_ok, flag_at = tail_int(lines, eol[sel], flag_marker)
            ok &= flag_ok & ends_with(lines, flag_at, between)
            cpu, cpu_ok, _ = tail_int(lines, flag_at - len(between), b", cpu: ", signed=True)
            ok &= cpu_ok
            slow_parts.append(sel[~ok])
            # 7.2's already_received=1: the page arrived meanwhile and QEMU drops
            # the begin itself.
            use = ok & ((flag == 0) | (text is _EV_BEGIN_10))
            b_sel.append(sel[use])
            b_addr.append(a[use])
            b_cpu.append(cpu[use])

        slow = np.concatenate([np.flatnonzero(~handled), *slow_parts])
        extra = self._slow_events(lines, seq, records, slow, ranges)
        begins = np.concatenate(b_sel)
        fast = DecodedEvents.of_records(
            seq,
            records.ts,
            (place, addr, is_zero[place]),
            (req, hva, pid),
            (begins, np.concatenate(b_addr), np.concatenate(b_cpu)),
        )
        return fast.join(extra)

    def _slow_events(
        self, lines: Lines, seq: I64, records: RecordHeaders, which: I64, ranges: list[RangeLine]
    ) -> DecodedEvents:
        """Decode the records ``which`` one by one with re."""
        place: list[tuple[int, int, bool]] = []
        reqs: list[tuple[int, int, int]] = []
        begins: list[tuple[int, int, int]] = []
        for i in which.tolist():
            text = lines.text(int(records.name_pos[i]), int(records.eol[i]))
            if text.startswith(b"("):
                prefix = _RE_THREAD_INFO.match(text)
                if prefix is not None:
                    text = text[prefix.end() :]
            if not text.startswith(_EVENT_STARTS):
                if not self._count_ignored(text):
                    self.other += 1
                continue
            pattern = next((p for start, p in _SLOW_EVENTS if text.startswith(start)), None)
            if pattern is None:
                if (m := _RE_RANGE.match(text)) is not None:
                    ranges.append(
                        RangeLine(m[1].decode(errors="replace"), int(m[2], 16), int(m[4], 16))
                    )
                elif not self._count_ignored(text):
                    self.malformed += 1
                continue
            m = pattern.match(text)
            if m is None:
                self.malformed += 1
            elif pattern is _RE_PLACE:
                place.append((i, int(m[2], 16), m[1].endswith(b"_zero")))
            elif pattern is _RE_REQUEST:
                reqs.append((i, int(m[1], 16), int(m[4])))
            elif pattern is _RE_TID_MAP:
                self.tid_to_vcpu[int(m[2])] = int(m[1])
            elif pattern is _RE_BEGIN_10 or m[3] == b"0":
                # 7.2's already_received=1: QEMU itself drops such a begin.
                begins.append((i, int(m[1], 16), int(m[2])))

        def col(rows: list[tuple[int, int, Any]], i: int, dtype: Any) -> Any:
            return np.array([r[i] for r in rows], dtype=dtype)

        return DecodedEvents.of_records(
            seq,
            records.ts,
            (col(place, 0, np.int64), col(place, 1, np.uint64), col(place, 2, np.bool_)),
            (col(reqs, 0, np.int64), col(reqs, 1, np.uint64), col(reqs, 2, np.int64)),
            (col(begins, 0, np.int64), col(begins, 1, np.uint64), col(begins, 2, np.int64)),
        )

    def _count_ignored(self, text: bytes) -> bool:
        """Count ``text`` as an event that is not analysed; False if it names no event."""
        event = _RE_EVENT.match(text)
        if event is None:
            return False
        self.ignored[event[1].decode()] += 1
        return True


class ReorderWindow:
    """Hands decoded events on in time order, holding back the newest.

    QEMU takes a line's time before the log lock, so a thread can write a line
    after another thread's later one (real 7.2 traces show up to ~3 ms).  Events
    within ``window_ns`` of the newest time seen wait for the next chunk; events
    that arrive older than what was already handed on are counted in ``late``.
    """

    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self.late = 0
        self._deferred = DecodedEvents.empty()
        self._max_ts: int | None = None
        self._released_upto: int | None = None

    def release(self, events: DecodedEvents, newest_ns: int) -> DecodedEvents:
        """Take the events of one chunk; returns those no later line can precede."""
        self._max_ts = newest_ns if self._max_ts is None else max(self._max_ts, newest_ns)
        if self._released_upto is not None:
            self.late += events.count_before(self._released_upto)
        upto = self._max_ts - self.window_ns
        if self._deferred.events() + events.events() > _MAX_DEFERRED:
            upto = self._max_ts  # time ran backwards a lot: stop waiting
        ready, self._deferred = self._deferred.join(events).split(upto)
        self._released_upto = (
            upto if self._released_upto is None else max(self._released_upto, upto)
        )
        return ready

    def drain(self) -> DecodedEvents:
        """End of input: every event still held back."""
        deferred, self._deferred = self._deferred, DecodedEvents.empty()
        return deferred
