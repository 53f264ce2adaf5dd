"""Destination trace analysis: both line formats, fault matching, streaming, against a model.

The vectorised analyser is checked three ways: on a real QEMU 7.2 trace, on
small hand-written traces with known answers, and against a slow line-by-line
reference model (below) on random traces full of edge cases, fed in random
pieces.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from migrator.errors import ArtifactError
from migrator.metrics.histogram import Histogram
from migrator.metrics.ramblock import RamBlock, load_ramblocks
from migrator.metrics.trace import TraceAnalyzer, analyze_trace, iter_resolved_faults
from migrator.metrics.trace_results import TraceAnalysis

DATA = Path(__file__).parent.parent / "data" / "trace"
KIB4 = 4096
MIB2 = 2 << 20
EPOCH_US = 1_795_630_006_000_000  # 2026-11-25T..., as the recorded traces


# ---------------------------------------------------------------------------
# Writing trace lines


def head72(us: int, tid: int = 100) -> str:
    """QEMU <= 10.0 prefix: ``TID@SEC.USEC:``."""
    return f"{tid}@{us // 1_000_000}.{us % 1_000_000:06d}:"


def head_iso(us: int, tid: int = 100) -> str:
    """QEMU >= 10.1 prefix; glib omits the fraction when it is zero."""
    stamp = datetime.fromtimestamp(us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f".{us % 1_000_000:06d}" if us % 1_000_000 else ""
    return f"{stamp}{frac}Z "


def request(hva: int, rb: str, offset: int, pid: int) -> str:
    return (
        f"postcopy_ram_fault_thread_request Request for HVA=0x{hva:x} rb={rb} "
        f"offset=0x{offset:x} pid={pid}"
    )


def place(host: int, *, zero: bool = False, extra: str = "") -> str:
    name = "postcopy_place_page_zero" if zero else "postcopy_place_page"
    return f"{name} host=0x{host:x}{extra}"


def begin72(addr: int, cpu: int, received: int = 0) -> str:
    return (
        f"mark_postcopy_blocktime_begin addr: 0x{addr:x}, dd: 0x55bf60e40860, time: 12, "
        f"cpu: {cpu}, already_received: {received}"
    )


def begin10(addr: int, cpu: int, exist: int = 0) -> str:
    return (
        f"postcopy_blocktime_begin addr: 0x{addr:x}, time: 1795630006000, cpu: {cpu}, "
        f"exist: {exist}"
    )


def init_range(name: str, host: int, offset: int, length: int) -> str:
    return f"postcopy_init_range {name}: 0x{host:x} offset=0x{offset:x} length=0x{length:x}"


class Trace:
    """Builds a trace text with a clock that advances per line."""

    def __init__(self, fmt: str = "72", start_us: int = EPOCH_US) -> None:
        self.fmt = fmt
        self.us = start_us
        self.lines: list[str] = []

    def add(self, body: str, *, dt: int = 1, tid: int = 100) -> int:
        self.us += dt
        head = head72(self.us, tid) if self.fmt == "72" else head_iso(self.us, tid)
        self.lines.append(head + body)
        return self.us

    def raw(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def analyse(text: str | bytes, blocks: list[RamBlock], **kw: Any) -> TraceAnalysis:
    data = text.encode() if isinstance(text, str) else text
    return analyze_trace(io.BytesIO(data), blocks, **kw)


RAM = 0x7F0000000000
HUGE = 0x7F4000000000
BLOCKS = [
    RamBlock("ram0", KIB4, 0, 1 << 30, 1 << 30),
    RamBlock("mem-huge", MIB2, 1 << 30, 1 << 30, 1 << 30),
]


# ---------------------------------------------------------------------------
# The reference model: one line at a time, dicts and sets, obviously right.

HDR72 = re.compile(r"(\d{1,7})@(\d{10})\.(\d{6}):(.*)\Z")
HDRISO = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{6}))?Z (.*)\Z")
THREAD = re.compile(r"\(\d+:[^)]*\): ")
R_PLACE = re.compile(r"postcopy_place_page(_zero)? host=0x([0-9a-f]{1,16})(?:[ ,\r].*)?\Z")
R_REQ = re.compile(
    r"postcopy_ram_fault_thread_request Request for HVA=0x([0-9a-f]{1,16})[ ,].*pid=(\d{1,7})\Z"
)
R_REQ_FULL = re.compile(
    r"postcopy_ram_fault_thread_request Request for HVA=0x([0-9a-f]+) rb=(\S+) "
    r"offset=0x([0-9a-f]+) pid=(\d+)\Z"
)
R_B72 = re.compile(
    r"mark_postcopy_blocktime_begin addr: 0x([0-9a-f]{1,16})[ ,].*, cpu: (-?\d{1,7}), "
    r"already_received: (\d{1,7})\Z"
)
R_B10 = re.compile(
    r"postcopy_blocktime_begin addr: 0x([0-9a-f]{1,16})[ ,].*, cpu: (-?\d{1,7}), exist: (\d{1,7})\Z"
)
R_RANGE = re.compile(
    r"postcopy_(?:init|nhp|cleanup)_range (.+): 0x([0-9a-f]+) offset=0x([0-9a-f]+) "
    r"length=0x([0-9a-f]+)\Z"
)
R_TID = re.compile(r"postcopy_blocktime_tid_cpu_map cpu: (-?\d+), tid: (\d+)\Z")
R_EVENT = re.compile(r"([a-z][a-z0-9_]*)(?: |\Z)")


@dataclass
class RefBlock:
    name: str
    page: int
    known: bool
    base: int | None = None
    length: int | None = None
    placed: set[int] = field(default_factory=set)
    c: dict[str, int] = field(default_factory=dict)
    lat: list[int] = field(default_factory=list)
    backlog: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    offsets_or: int = 0
    any_place: bool = False
    requested_pages: set[int] = field(default_factory=set)

    def inc(self, key: str, n: int = 1) -> None:
        self.c[key] = self.c.get(key, 0) + n


class Reference:
    """Line-by-line model of the semantics documented in migrator.metrics.trace."""

    def __init__(self, blocks: list[RamBlock], subpage: str = "never") -> None:
        self.subpage = subpage
        self.blocks: dict[str, RefBlock] = {}
        for rb in blocks:
            blk = RefBlock(rb.name, rb.page_size, True, rb.hva, rb.used)
            self.blocks[rb.name] = blk
        self.pending: list[dict[str, Any]] = []  # waiters in arrival order
        self.placed_lines = 0  # placement lines of known blocks so far, in time order
        self.buffered: list[tuple[int, int, bool]] = []
        self.cpu_level: dict[int, int] = {}
        self.cpu_last: dict[int, int] = {}
        self.cpu_blocked: dict[int, int] = {}
        self.cpu_faults: dict[int, int] = {}
        self.non_vcpu = 0
        self.malformed = self.other = self.untimestamped = 0
        self.ignored: dict[str, int] = {}
        self.unattributed_faults = 0
        self.tid: dict[int, int] = {}
        self.ts_all: list[int] = []
        self.seq = 0
        self.events: list[tuple[int, int, str, Any]] = []

    def run(self) -> None:
        """Apply the collected events in time order, file order breaking ties."""
        for _, _, kind, args in sorted(self.events, key=lambda e: (e[0], e[1])):
            getattr(self, "do_" + kind)(*args)

    def unit(self, b: RefBlock) -> int:
        return KIB4 if self.subpage == "always" and b.page > KIB4 else b.page

    def lookup(self, addr: int) -> RefBlock | None:
        known = sorted((b.base, b) for b in self.blocks.values() if b.base is not None)
        for i, (base, b) in enumerate(known):
            nxt = known[i + 1][0] if i + 1 < len(known) else 1 << 64
            end = min(base + b.length, nxt) if b.length else nxt
            if base <= addr < end:
                return b
        return None

    def block(self, name: str) -> RefBlock:
        if name not in self.blocks:
            self.blocks[name] = RefBlock(name, KIB4, False)
        return self.blocks[name]

    def set_base(self, b: RefBlock, base: int) -> None:
        if b.base is None:
            b.base = base
            keep = []
            for addr, ts, zero in self.buffered:
                if self.lookup(addr) is not None:
                    self.placement(addr, ts, zero, held_back=True)
                else:
                    keep.append((addr, ts, zero))
            self.buffered = keep

    def key(self, b: RefBlock, addr: int) -> int:
        assert b.base is not None
        return (addr - b.base) // self.unit(b)

    def sweep(self, cpu: int, t: int, delta: int) -> None:
        level = self.cpu_level.get(cpu, 0)
        last = self.cpu_last.get(cpu, t)
        if level > 0:
            self.cpu_blocked[cpu] = self.cpu_blocked.get(cpu, 0) + max(t - last, 0)
        self.cpu_last[cpu] = t
        self.cpu_level[cpu] = level + delta
        if delta > 0:
            self.cpu_faults[cpu] = self.cpu_faults.get(cpu, 0) + 1

    def do_request(self, hva: int, ts: int, full: re.Match[str] | None) -> None:
        b = self.lookup(hva)
        if b is None:
            if full:
                nb = self.block(full[2])
                page_base = hva & ~(nb.page - 1)
                if nb.base is None and page_base >= int(full[3], 16):
                    self.set_base(nb, page_base - int(full[3], 16))
            b = self.lookup(hva)
        if b is None:
            self.unattributed_faults += 1
            return
        b.inc("faults")
        b.times.append(ts)
        k = self.key(b, hva)
        if k in b.placed:
            b.inc("already_placed")
            return
        if any(
            w["kind"] == "req" and w["block"] is b and self.key(b, w["hva"]) == k
            for w in self.pending
        ):
            b.inc("duplicate_requests")
        self.pending.append(
            {"kind": "req", "block": b, "hva": hva, "ts": ts, "before": self.placed_lines}
        )

    def do_begin(self, addr: int, cpu: int, ts: int) -> None:
        b = self.lookup(addr)
        if b is None or self.key(b, addr) in b.placed:
            return
        if cpu < 0:
            self.non_vcpu += 1
        else:
            self.sweep(cpu, ts, +1)
        self.pending.append({"kind": "begin", "block": b, "hva": addr, "ts": ts, "cpu": cpu})

    def do_range(self, name: str, host: int, length: int) -> None:
        b = self.block(name)
        if b.length is None:
            b.length = length
        self.set_base(b, host)

    def do_placement(self, addr: int, ts: int, zero: bool) -> None:
        self.placement(addr, ts, zero)

    def placement(self, addr: int, ts: int, zero: bool, *, held_back: bool = False) -> None:
        """One placement line; held-back ones (flushed by set_base) are in no backlog."""
        b = self.lookup(addr)
        if b is None:
            self.buffered.append((addr, ts, zero))
            return
        assert b.base is not None
        ahead = self.placed_lines
        self.placed_lines += not held_back
        k = self.key(b, addr)
        b.inc("placements")
        b.times.append(ts)
        b.any_place = True
        b.offsets_or |= addr - b.base
        if k in b.placed:
            return
        b.placed.add(k)
        b.inc("pages_placed")
        if zero:
            b.inc("zero_pages")
        keep = []
        for w in self.pending:
            if w["block"] is b and self.key(b, w["hva"]) == k:
                if w["kind"] == "req":
                    lat = ts - w["ts"]
                    b.inc("resolved")
                    if lat < 0:
                        b.inc("negative")
                    b.lat.append(max(lat, 0))
                    b.backlog.append(ahead - w["before"])
                    b.requested_pages.add(k)
                else:
                    self.sweep(w["cpu"], ts, -1)
            else:
                keep.append(w)
        self.pending = keep

    def feed_line(self, line: str) -> None:
        """Parse one line; its event is applied later, in time order (see run)."""
        self.seq += 1
        line = line.rstrip("\r")
        if not line:
            return
        m = HDR72.match(line)
        if m:
            ts = (int(m[2]) * 1_000_000 + int(m[3])) * 1000
            rest = m[4]
        else:
            m = HDRISO.match(line)
            if not m:
                if line.startswith(("postcopy", "mark_pos")):
                    self.untimestamped += 1
                else:
                    self.malformed += 1
                return
            d = datetime(
                int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]), tzinfo=UTC
            )
            ts = (int(d.timestamp()) * 1_000_000 + int(m[7] or 0)) * 1000
            rest = m[8]
        self.ts_all.append(ts)
        t = THREAD.match(rest)
        if t:
            rest = rest[t.end() :]
        if rest.startswith("mark_postcopy_blocktime_end "):
            self.ignored["mark_postcopy_blocktime_end"] = (
                self.ignored.get("mark_postcopy_blocktime_end", 0) + 1
            )
            return
        if rest.startswith("postcopy_place_page"):
            p = R_PLACE.match(rest)
            if not p:
                self.malformed += 1
                return
            self.events.append((ts, self.seq, "placement", (int(p[2], 16), ts, bool(p[1]))))
        elif rest.startswith("postcopy_ram_fault_thread_request "):
            q = R_REQ.match(rest) or R_REQ_FULL.match(rest)
            if not q:
                self.malformed += 1
                return
            self.events.append(
                (ts, self.seq, "request", (int(q[1], 16), ts, R_REQ_FULL.match(rest)))
            )
        elif rest.startswith(("mark_postcopy_blocktime_begin ", "postcopy_blocktime_begin ")):
            q = R_B72.match(rest) or R_B10.match(rest)
            if not q:
                self.malformed += 1
                return
            if rest.startswith("mark") and q[3] != "0":
                return
            self.events.append((ts, self.seq, "begin", (int(q[1], 16), int(q[2]), ts)))
        elif R_TID.match(rest):
            q = R_TID.match(rest)
            assert q
            self.tid[int(q[2])] = int(q[1])
        elif R_RANGE.match(rest):
            q = R_RANGE.match(rest)
            assert q
            self.events.append((ts, self.seq, "range", (q[1], int(q[2], 16), int(q[4], 16))))
        else:
            e = R_EVENT.match(rest)
            if e is None:
                self.other += 1 if not rest.startswith(("postcopy_", "mark_postcopy_")) else 0
                self.malformed += 1 if rest.startswith(("postcopy_", "mark_postcopy_")) else 0
            else:
                self.ignored[e[1]] = self.ignored.get(e[1], 0) + 1

    def backlogs(self) -> dict[str, Any]:
        """Per block, the backlog histogram (placements ahead of each resolved request)."""
        out = {}
        for b in self.blocks.values():
            hist = Histogram("placements")
            hist.record_many(b.backlog)
            out[b.name] = hist.to_dict()
        return out

    def summary(self) -> dict[str, Any]:
        blocks = {}
        for b in self.blocks.values():
            hist = Histogram("ns")
            hist.record_many(b.lat) if b.lat else None
            c = b.c
            unresolved = sum(1 for w in self.pending if w["kind"] == "req" and w["block"] is b)
            low = b.offsets_or & -b.offsets_or
            blocks[b.name] = {
                "page_size": b.page,
                "host_base": b.base,
                "faults": c.get("faults", 0),
                "resolved": c.get("resolved", 0),
                "unresolved": unresolved,
                "already_placed": c.get("already_placed", 0),
                "duplicate_requests": c.get("duplicate_requests", 0),
                "negative_latencies": c.get("negative", 0),
                "placements": c.get("placements", 0),
                "pages_placed": c.get("pages_placed", 0),
                "pages_requested": len(b.requested_pages),
                "zero_pages": c.get("zero_pages", 0),
                "placement_granularity": (min(low, b.page) if low else b.page)
                if b.any_place
                else None,
                "latency": hist.to_dict(),
                "first_event_ns": min(b.times) if b.times else None,
                "last_event_ns": max(b.times) if b.times else None,
            }
        return {
            "blocks": blocks,
            "malformed_lines": self.malformed,
            "other_lines": self.other,
            "untimestamped_lines": self.untimestamped,
            "ignored_events": dict(sorted(self.ignored.items())),
            "unattributed_placements": len(self.buffered),
            "unattributed_faults": self.unattributed_faults,
            "vcpu_blocktime_ns": dict(sorted(self.cpu_blocked.items())),
            "vcpu_faults": dict(sorted(self.cpu_faults.items())),
            "non_vcpu_faults": self.non_vcpu,
            "tid_to_vcpu": dict(sorted(self.tid.items())),
            "first_event_ns": min(self.ts_all) if self.ts_all else None,
            "last_event_ns": max(self.ts_all) if self.ts_all else None,
            "late_events": 0,
        }


def summarise(a: TraceAnalysis) -> dict[str, Any]:
    """The analyser's result in the reference model's shape."""
    keys = (
        "page_size", "host_base", "faults", "resolved", "unresolved", "already_placed",
        "duplicate_requests", "negative_latencies", "placements", "pages_placed",
        "pages_requested", "zero_pages", "placement_granularity", "first_event_ns",
        "last_event_ns",
    )  # fmt: skip
    blocks = {}
    for b in a.blocks:
        d = {k: getattr(b, k) for k in keys}
        d["latency"] = b.latency.to_dict()
        blocks[b.name] = d
    return {
        "blocks": blocks,
        "malformed_lines": a.malformed_lines,
        "other_lines": a.other_lines,
        "untimestamped_lines": a.untimestamped_lines,
        "ignored_events": a.ignored_events,
        "unattributed_placements": a.unattributed_placements,
        "unattributed_faults": a.unattributed_faults,
        "vcpu_blocktime_ns": a.vcpu_blocktime_ns,
        "vcpu_faults": a.vcpu_faults,
        "non_vcpu_faults": a.non_vcpu_faults,
        "tid_to_vcpu": a.tid_to_vcpu,
        "first_event_ns": a.first_event_ns,
        "last_event_ns": a.last_event_ns,
        "late_events": a.late_events,
    }


def backlogs(a: TraceAnalysis) -> dict[str, Any]:
    """The analyser's backlog histograms in the reference model's shape."""
    return {b.name: b.backlog.to_dict() for b in a.blocks}


def run_reference(text: str, blocks: list[RamBlock], subpage: str = "never") -> Reference:
    ref = Reference(blocks, subpage)
    lines = text.split("\n")
    for line in lines[:-1]:  # the last piece has no newline: torn or empty
        ref.feed_line(line)
    if lines[-1].strip():
        ref.malformed += 1
    ref.run()
    return ref


def reference(text: str, blocks: list[RamBlock], subpage: str = "never") -> dict[str, Any]:
    return run_reference(text, blocks, subpage).summary()


# ---------------------------------------------------------------------------
# Random traces full of edge cases


def random_trace(
    seed: int, fmt: str, n: int = 3000, *, known_bases: bool = False
) -> tuple[str, list[RamBlock]]:
    """A trace and its info ramblock; ``known_bases``: the same trace, every block's
    address known from the start (info ramblock with HVAs, "ghost" included)."""
    rng = random.Random(seed)
    # ram0 (4 KiB, base from info ramblock HVA), huge (2 MiB, base from a request),
    # vram (4 KiB, base from postcopy_init_range), rom (never known: held back),
    # "ghost" (not in info ramblock at all: learned from its requests).
    blocks = [
        RamBlock("ram0", KIB4, 0, 96 * KIB4, 96 * KIB4, hva=RAM),
        RamBlock("huge", MIB2, 1 << 30, 8 * MIB2, 8 * MIB2),
        RamBlock("vram", KIB4, 2 << 30, 16 * KIB4, 16 * KIB4),
        RamBlock("rom", KIB4, 3 << 30, 4 * KIB4, 4 * KIB4),
    ]
    bases = {"ram0": RAM, "huge": HUGE, "vram": 0x7F8000000000, "rom": 0x7F9000000000,
             "ghost": 0x7FA000000000}  # fmt: skip
    pages = {"ram0": (64, KIB4), "huge": (8, MIB2), "vram": (16, KIB4), "rom": (4, KIB4),
             "ghost": (8, KIB4)}  # fmt: skip
    t = Trace(fmt, EPOCH_US + rng.randrange(0, 10**6))
    vram_known = False
    requested: dict[str, bool] = {"huge": False, "ghost": False}
    for _ in range(n):
        roll = rng.random()
        name = rng.choice(["ram0", "ram0", "huge", "vram", "rom", "ghost"])
        count, size = pages[name]
        page = rng.randrange(count)
        host = bases[name] + page * size
        dt = rng.choice([0, 1, 1, 2, 5, 30]) if rng.random() > 0.02 else -3  # a little jitter
        if roll < 0.40:
            if name in requested and not requested[name] and rng.random() < 0.5:
                continue
            t.add(place(host, zero=rng.random() < 0.3), dt=dt)
            if size > KIB4 and rng.random() < 0.2:
                t.add(place(host), dt=0)  # hugetlbfs zero page traced twice
        elif roll < 0.70:
            if name == "rom":
                continue  # never requested: its base stays unknown
            if name == "ram0" and rng.random() < 0.05:
                page = 64 + rng.randrange(32)  # never placed: stays unresolved
                host = bases[name] + page * size
            hva = host + rng.randrange(0, size, 8)
            hva &= ~(KIB4 - 1) if rng.random() < 0.8 else ~0
            tid = rng.choice([11, 12, 13])
            t.add(request(hva, name, page * size, tid), dt=dt)
            if name in requested:
                requested[name] = True
            if name == "ram0" and rng.random() < 0.05:
                # Written after the request but stamped before it: in time order
                # the page was there first (QEMU takes the time before the lock).
                t.add(place(host), dt=-2)
            if rng.random() < 0.7:
                cpu = {11: 0, 12: 1, 13: -1}[tid]
                if fmt == "72":
                    if cpu >= 0:
                        t.add(begin72(hva, cpu, int(rng.random() < 0.1)), dt=0)
                else:
                    t.add(begin10(hva, cpu, int(rng.random() < 0.2)), dt=0)
        elif roll < 0.72 and not vram_known:
            t.add(init_range("vram", bases["vram"], 2 << 30, 16 * KIB4))
            vram_known = True
        elif roll < 0.80:
            t.add(
                f"mark_postcopy_blocktime_end addr: 0x{host:x}, dd: 0x1, time: 0, affected_cpu: 1"
            )
        elif roll < 0.82:
            t.add(
                rng.choice(
                    ["postcopy_ram_enable_notify", "postcopy_page_req_add new page req 0x1 total 1"]
                )
            )
        elif roll < 0.83:
            t.raw(rng.choice(["", "garbage line", "qemu-system-x86_64: warning: something", "\r"]))
        elif roll < 0.84:
            # Known events with broken arguments.
            t.add(rng.choice([
                "postcopy_place_page host=0xZZ",
                "postcopy_ram_fault_thread_request Request for HVA=0x12 rb=ram0",
                "mark_postcopy_blocktime_begin addr: 0x1, cpu: x",
            ]))  # fmt: skip
        elif roll < 0.85 and fmt == "iso":
            t.add("qemu-system-x86_64: terminating on signal 15")
        elif roll < 0.86:
            t.add(
                f"postcopy_blocktime_tid_cpu_map cpu: {rng.randrange(4)}, tid: {rng.randrange(9)}"
            )
    text = t.text()
    if rng.random() < 0.5:
        text += head72(t.us + 1) + "postcopy_place_page host=0x7f00"  # torn last line
    if known_bases:
        blocks = [replace(rb, hva=bases[rb.name]) for rb in blocks]
        blocks.append(RamBlock("ghost", KIB4, 4 << 30, 8 * KIB4, 8 * KIB4, hva=bases["ghost"]))
    return text, blocks


def feed_in_pieces(text: str, blocks: list[RamBlock], seed: int, **kw: Any) -> TraceAnalysis:
    rng = random.Random(seed)
    data = text.encode()
    an = TraceAnalyzer(blocks, **kw)
    i = 0
    while i < len(data):
        step = rng.choice([1, 2, 7, 64, 999, 4096, 30000])
        an.feed(data[i : i + step])
        i += step
    return an.finish()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("fmt", ["72", "iso"])
def test_matches_reference_model(seed: int, fmt: str) -> None:
    text, blocks = random_trace(seed, fmt)
    expected = reference(text, blocks)
    assert summarise(analyse(text, blocks, subpage="never")) == expected
    pieces = feed_in_pieces(text, blocks, seed, subpage="never", chunk_size=4096)
    assert summarise(pieces) == expected


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_model_resolving_4k_pieces(seed: int) -> None:
    text, blocks = random_trace(100 + seed, "72")
    expected = reference(text, blocks, subpage="always")
    assert summarise(analyse(text, blocks, subpage="always")) == expected


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fmt", ["72", "iso"])
def test_backlog_matches_reference_model(seed: int, fmt: str) -> None:
    """Backlogs of random traces, whole and in pieces matched over many rounds.

    Every block is known from the start: a placement held back until its block
    is known is in no backlog, and the analyser knows a block from the chunk of
    trace that names it, the model only from that line on.  A 20 us reorder
    window releases events every few lines, so requests wait across rounds.
    """
    text, blocks = random_trace(seed, fmt, known_bases=True)
    ref = run_reference(text, blocks)
    expected = (ref.summary(), ref.backlogs())
    whole = analyse(text, blocks, subpage="never")
    pieces = feed_in_pieces(
        text, blocks, seed, subpage="never", chunk_size=4096, reorder_window_ns=20_000
    )
    for a in (whole, pieces):
        assert (summarise(a), backlogs(a)) == expected
    ram0 = whole.block("ram0")
    assert ram0.backlog.count == ram0.resolved > 0
    assert ram0.backlog.max


def test_random_traces_exercise_the_edge_cases() -> None:
    """The model comparison above is only worth something if the cases occur."""
    text, blocks = random_trace(0, "72")
    a = analyse(text, blocks, subpage="never")
    ram0, huge = a.block("ram0"), a.block("huge")
    assert ram0.resolved
    assert ram0.already_placed
    assert ram0.duplicate_requests
    assert ram0.unresolved
    assert huge.resolved
    assert huge.duplicate_placements
    assert huge.zero_pages
    assert a.block("ghost").page_size_known is False
    assert a.block("ghost").faults
    assert a.block("vram").host_base == 0x7F8000000000
    assert a.unattributed_placements > 0  # rom
    assert a.malformed_lines
    assert a.vcpu_blocktime_ns
    assert a.tid_to_vcpu
    assert a.ignored_events["postcopy_ram_enable_notify"]


# ---------------------------------------------------------------------------
# Hand-written traces with known answers


def test_real_qemu72_trace() -> None:
    """A complete destination trace recorded with QEMU 7.2 (32 MiB memfd guest, TCG)."""
    blocks = load_ramblocks(DATA / "qemu-7.2-memfd-32m.ramblock.txt")
    with gzip.open(DATA / "qemu-7.2-memfd-32m.trace.gz", "rb") as f:
        a = analyze_trace(f, blocks)  # type: ignore[arg-type]
    assert a.format == "tid@epoch"
    assert (a.lines, a.records, a.malformed_lines, a.truncated_last_line) == (
        25036,
        25036,
        0,
        False,
    )
    ram0 = a.block("ram0")
    # postcopy_init_range gave every block's base.
    assert ram0.host_base == 0x7FB78847C000
    assert a.unattributed_placements == 0
    assert (ram0.faults, ram0.resolved, ram0.unresolved, ram0.already_placed) == (152, 152, 0, 0)
    # Each 4 KiB page at most once (the rest of the 32 MiB came during precopy).
    assert ram0.pages_placed == ram0.placements == 7954
    assert ram0.duplicate_placements == 0
    assert ram0.pages_requested == 152
    assert ram0.placement_granularity == 4096
    assert a.latency.count == 152
    assert 10_000 <= (a.latency.quantile(0.5) or 0) <= 1_000_000  # tens of microseconds
    # QEMU 7.2 itself reported "total blocktime 0": it truncates each fault to whole ms.
    assert a.vcpu_faults == {0: 152}
    assert 10_000_000 < a.vcpu_blocktime_ns[0] < 20_000_000
    assert a.ignored_events["mark_postcopy_blocktime_end"] == 12196
    assert sum(b.placements for b in a.blocks) == 12196  # one end line per placement
    json.dumps(a.to_dict())


def two_format_trace(fmt: str) -> str:
    t = Trace(fmt)
    t.add(request(RAM + 0x5000, "ram0", 0x5000, 11))  # resolved after 10 us
    t.add(place(RAM + 0x1000, zero=True))  # background zero page
    t.add(place(RAM + 0x5000), dt=10)
    t.add(request(HUGE + 3 * MIB2 + 0x7000, "mem-huge", 3 * MIB2, 12))  # mid huge page
    t.add(request(HUGE + 3 * MIB2 + 0x9000, "mem-huge", 3 * MIB2, 13), dt=5)  # same page
    t.add(place(HUGE + 3 * MIB2), dt=100)  # the 2 MiB-aligned base resolves both
    t.add(request(RAM + 0x1000, "ram0", 0x1000, 11))  # already placed
    t.add(request(RAM + 0x9000, "ram0", 0x9000, 11))  # never resolved
    return t.text()


@pytest.mark.parametrize("fmt", ["72", "iso"])
def test_both_formats_hand_written(fmt: str) -> None:
    a = analyse(two_format_trace(fmt), BLOCKS)
    assert a.format == ("tid@epoch" if fmt == "72" else "iso8601")
    ram0, huge = a.block("ram0"), a.block("mem-huge")
    assert (ram0.faults, ram0.resolved, ram0.already_placed, ram0.unresolved) == (3, 1, 1, 1)
    assert ram0.host_base == RAM
    assert huge.host_base == HUGE
    assert ram0.latency.min == ram0.latency.max == 11_000
    assert (ram0.pages_placed, ram0.pages_requested, ram0.pages_background) == (2, 1, 1)
    assert ram0.zero_pages == 1
    assert (huge.faults, huge.resolved, huge.duplicate_requests) == (2, 2, 1)
    stream = iter_resolved_faults(io.BytesIO(two_format_trace(fmt).encode()), BLOCKS)
    assert sorted(f.latency_ns for f in stream) == [11_000, 100_000, 105_000]
    assert huge.placement_granularity == MIB2
    assert a.first_event_ns == (EPOCH_US + 1) * 1000


def test_iso_timestamp_without_fraction() -> None:
    """glib prints no fraction when the microseconds are exactly zero."""
    t = Trace("iso", start_us=EPOCH_US - 1)
    t.add(request(RAM, "ram0", 0, 5))  # lands on a whole second
    t.add(place(RAM), dt=7)
    stamp = t.lines[0].split(" ")[0]
    assert stamp == "2026-11-25T18:06:46Z"
    a = analyse(t.text(), BLOCKS)
    assert a.block("ram0").latency.max == 7000
    assert a.first_event_ns == EPOCH_US * 1000


def test_iso_timestamps_are_utc_epoch() -> None:
    a = analyse("2026-11-25T17:52:44.805385Z postcopy_place_page host=0x7f0000000000\n", BLOCKS[:1])
    expected = datetime(2026, 11, 25, 17, 52, 44, tzinfo=UTC).timestamp()
    assert a.first_event_ns == (int(expected) * 1_000_000 + 805385) * 1000


def test_line_split_across_every_boundary() -> None:
    text = two_format_trace("72").encode()
    whole = summarise(analyse(text, BLOCKS))
    for cut in range(1, len(text)):
        an = TraceAnalyzer(BLOCKS)
        an.feed(text[:cut])
        an.feed(text[cut:])
        assert summarise(an.finish()) == whole, cut


def test_truncated_last_line_is_ignored_and_counted() -> None:
    text = two_format_trace("72")
    # The torn line would resolve the outstanding request with a wrong address.
    torn = text + head72(EPOCH_US + 500) + f"postcopy_place_page host=0x{RAM + 0x9000:x}"[:-2]
    a = analyse(torn, BLOCKS)
    assert a.truncated_last_line
    assert a.malformed_lines == 1
    assert a.block("ram0").unresolved == 1
    complete = analyse(torn + "00\n", BLOCKS)
    assert not complete.truncated_last_line
    assert complete.block("ram0").unresolved == 0


def test_garbage_and_messages() -> None:
    t = Trace("72")
    t.raw("")
    t.raw("\x00\xff binary junk")
    t.raw("12345@not-a-time:postcopy_place_page host=0x1")
    t.add("postcopy_place_page host=0x")  # known event, bad argument
    t.add("some_other_event x=1")
    t.raw("2026-11-25T18:06:25.989728Z qemu-system-x86_64: terminating on signal 15")
    t.add(place(RAM))
    a = analyse(t.text(), [RamBlock("ram0", KIB4, 0, 1 << 20, 1 << 20, hva=RAM)])
    assert a.malformed_lines == 3
    assert a.other_lines == 1
    assert a.ignored_events == {"some_other_event": 1}
    assert a.block("ram0").placements == 1
    assert a.lines == 7
    assert a.records == 4


def test_untimestamped_trace_is_refused() -> None:
    text = "postcopy_place_page host=0x7f0000000000\npostcopy_place_page_zero host=0x7f0000001000\n"
    with pytest.raises(ArtifactError, match="-msg timestamp=on"):
        analyse(text, BLOCKS)


def test_hugetlb_zero_page_traced_twice() -> None:
    t = Trace()
    t.add(request(HUGE + 0x1000, "mem-huge", 0, 7))
    t.add(place(HUGE, zero=True), dt=3)
    t.add(place(HUGE), dt=2)  # postcopy_place_page_zero falls back to place_page on hugetlbfs
    huge = analyse(t.text(), BLOCKS).block("mem-huge")
    assert (huge.placements, huge.pages_placed, huge.duplicate_placements, huge.zero_pages) == (
        2,
        1,
        1,
        1,
    )
    assert huge.latency.max == 3000  # resolved by the first of the two lines


def test_hgm_placements_of_4k_pieces() -> None:
    """A HGM run places 4 KiB pieces of a huge page, with extra arguments."""
    t = Trace()
    t.add(request(HUGE + 0x3000, "mem-huge", 0, 7))
    t.add(request(HUGE + 0x5000, "mem-huge", 0, 8))
    t.add(place(HUGE + 0x1000, extra=" id=1 offset=0x1000"), dt=2)
    t.add(place(HUGE + 0x3000, extra=" id=1 offset=0x3000"), dt=2)
    t.add(place(HUGE, extra=" id=1 offset=0x0"), dt=2)
    a = analyse(t.text(), BLOCKS)
    huge = a.block("mem-huge")
    assert huge.subpage_resolution
    assert huge.placement_granularity == KIB4
    assert (huge.resolved, huge.unresolved, huge.pages_placed) == (1, 1, 3)
    assert huge.latency.max == 5000
    # Without sub-page resolution the aligned piece would resolve both.
    whole = analyse(t.text(), BLOCKS, subpage="never").block("mem-huge")
    assert (whole.resolved, whole.placement_granularity) == (2, KIB4)


def test_base_from_init_range_and_held_back_placements() -> None:
    vram = RamBlock("0000:00:02.0/vga.vram", KIB4, 0x10080000, 16 * KIB4, 16 * KIB4)
    base = 0x7FD1D1A00000
    t = Trace()
    t.add(place(base + 0x2000))  # block not known yet: held back
    t.add(init_range(vram.name, base, vram.offset, vram.used))
    t.add(request(base + 0x2000, vram.name, 0x2000, 9))  # already placed
    t.add(place(base + 0x3000))
    a = analyse(t.text(), [vram])
    b = a.block(vram.name)
    assert b.host_base == base
    assert (b.faults, b.already_placed, b.pages_placed) == (1, 1, 2)
    assert a.unattributed_placements == 0


def test_block_missing_from_info_ramblock() -> None:
    t = Trace()
    t.add(request(0x7E0000003000, "pc.bios", 0x3000, 1))
    t.add(place(0x7E0000003000), dt=4)
    a = analyse(t.text(), BLOCKS)
    bios = a.block("pc.bios")
    assert not bios.page_size_known
    assert bios.page_size == KIB4
    assert bios.host_base == 0x7E0000000000
    assert bios.resolved == 1


def test_blocktime_per_vcpu_72() -> None:
    t = Trace()
    t.add(request(RAM + 0x1000, "ram0", 0x1000, 11))
    t.add(begin72(RAM + 0x1000, 0), dt=0)
    t.add(request(RAM + 0x2000, "ram0", 0x2000, 12), dt=10)
    t.add(begin72(RAM + 0x2000, 1), dt=0)
    t.add(place(RAM + 0x1000), dt=20)  # cpu0 blocked 30 us
    t.add(request(RAM + 0x3000, "ram0", 0x3000, 11), dt=5)
    t.add(begin72(RAM + 0x3000, 0, received=1), dt=0)  # QEMU drops it
    t.add(place(RAM + 0x2000), dt=10)  # cpu1 blocked 35 us
    a = analyse(t.text(), BLOCKS)
    assert a.vcpu_blocktime_ns == {0: 30_000, 1: 35_000}
    assert a.vcpu_faults == {0: 1, 1: 1}


def test_blocktime_per_vcpu_10_overlapping_faults() -> None:
    """Two faults outstanding on one vCPU count once (the union of the intervals)."""
    t = Trace("iso")
    t.raw(head_iso(EPOCH_US) + "postcopy_blocktime_tid_cpu_map cpu: 0, tid: 4242")
    t.add(begin10(RAM + 0x1000, 0))
    t.add(begin10(RAM + 0x2000, 0), dt=10)
    t.add(begin10(RAM + 0x3000, -1), dt=0)  # a non-vCPU thread
    t.add(place(RAM + 0x2000), dt=10)
    t.add("postcopy_blocktime_end_one cpu: 0, left_faults: 1", dt=0)
    t.add(place(RAM + 0x1000), dt=10)
    t.add(
        "postcopy_blocktime_end addr: 0x7f0000001000, time: 1, affected_cpus: 1, "
        "affected_non_cpus: 0"
    )
    a = analyse(t.text(), [RamBlock("ram0", KIB4, 0, 1 << 20, 1 << 20, hva=RAM)])
    assert a.vcpu_blocktime_ns == {0: 30_000}
    assert a.vcpu_faults == {0: 2}
    assert a.non_vcpu_faults == 1
    assert a.tid_to_vcpu == {4242: 0}
    assert a.ignored_events == {"postcopy_blocktime_end": 1, "postcopy_blocktime_end_one": 1}


def test_lines_are_matched_in_time_order() -> None:
    """QEMU takes a line's time before the log lock, so lines of two threads can be
    written out of time order (real 7.2 traces: ~1 % of lines, up to 3.3 ms)."""
    t = Trace()
    t.add(place(RAM + 0x1000), dt=10)  # written first ...
    t.add(request(RAM + 0x1000, "ram0", 0x1000, 1), dt=-6)  # ... but stamped 6 us later
    t.add(request(RAM + 0x2000, "ram0", 0x2000, 1), dt=20)
    t.add(place(RAM + 0x2000), dt=-4)  # placed before that request was stamped
    t.add(request(RAM + 0x3000, "ram0", 0x3000, 1), dt=30)
    t.add(place(RAM + 0x3000), dt=6)
    t.add(place(RAM + 0x8000), dt=-3)  # written after that page, stamped before it: ahead
    t.add(place(RAM + 0x9000), dt=-7)  # stamped before the request: not ahead of it
    ram0 = analyse(t.text(), BLOCKS).block("ram0")
    assert (ram0.faults, ram0.resolved, ram0.already_placed) == (3, 2, 1)
    assert ram0.latency.max == 6000
    assert ram0.negative_latencies == 0
    assert [(b.lower, b.count) for b in ram0.backlog.buckets()] == [(0, 1), (1, 1)]


# Blocks with their addresses known from the start (info ramblock of newer QEMU).
KNOWN = [replace(BLOCKS[0], hva=RAM), replace(BLOCKS[1], hva=HUGE)]


def backlog_trace() -> str:
    """Requests answered after 3, 1 and 0 other placements, one already placed."""
    t = Trace()
    t.add(request(RAM + 0x1000, "ram0", 0x1000, 11))
    t.add(place(RAM + 0x5000), dt=5)
    t.add(request(RAM + 0x5000, "ram0", 0x5000, 12))  # already placed: no sample
    t.add(place(HUGE), dt=5)  # a page of another block is ahead too
    t.add(request(RAM + 0x1000, "ram0", 0x1000, 12))  # a duplicate: 1 placement ahead
    t.add(place(RAM + 0x6000, zero=True), dt=5)
    t.add(place(RAM + 0x1000), dt=5)  # 3 placements came before the first request's page
    t.add(request(RAM + 0x2000, "ram0", 0x2000, 11), dt=5)
    t.add(place(RAM + 0x2000), dt=5)  # answered at once
    t.add(place(RAM + 0x7000), dt=5)  # after every page asked for: in no backlog
    return t.text()


def test_backlog_counts_placements_ahead_of_the_page() -> None:
    a = analyse(backlog_trace(), KNOWN)
    ram0 = a.block("ram0")
    assert (ram0.resolved, ram0.already_placed, ram0.duplicate_requests) == (3, 1, 1)
    assert [(b.lower, b.count) for b in ram0.backlog.buckets()] == [(0, 1), (1, 1), (3, 1)]
    assert (ram0.backlog.unit, ram0.backlog.min, ram0.backlog.max) == ("placements", 0, 3)
    assert a.block("mem-huge").backlog.count == 0
    assert Histogram.from_dict(a.to_dict()["blocks"][0]["backlog"]) == ram0.backlog


def test_backlog_of_requests_carried_between_rounds() -> None:
    """Without a reorder window every piece is matched on its own: requests wait
    for their pages across rounds and keep the count of placements before them."""
    text = backlog_trace().encode()
    whole = analyse(text, KNOWN).block("ram0").backlog
    an = TraceAnalyzer(KNOWN, reorder_window_ns=0)
    resolved_at: list[int] = []
    for i, line in enumerate(text.splitlines(keepends=True)):
        resolved_at += [i] * len(an.feed(line))
    assert resolved_at == [6, 6, 8]  # the first request waited 6 rounds
    assert an.finish().block("ram0").backlog == whole
    for cut in range(1, len(text)):
        an = TraceAnalyzer(KNOWN, reorder_window_ns=0)
        an.feed(text[:cut])
        an.feed(text[cut:])
        assert an.finish().block("ram0").backlog == whole, cut


def test_events_later_than_the_reorder_window() -> None:
    """A line written after the window has passed is counted; its match is clamped."""
    an = TraceAnalyzer(
        [RamBlock("ram0", KIB4, 0, 1 << 20, 1 << 20, hva=RAM)], reorder_window_ns=1000
    )
    an.feed((head72(EPOCH_US + 10) + request(RAM, "ram0", 0, 1) + "\n").encode())
    an.feed((head72(EPOCH_US + 20) + place(RAM + KIB4) + "\n").encode())  # moves time on
    an.feed((head72(EPOCH_US + 6) + place(RAM) + "\n").encode())  # 4 us too old
    a = an.finish()
    ram0 = a.block("ram0")
    assert a.late_events == 1
    assert (ram0.resolved, ram0.negative_latencies, ram0.latency.max) == (1, 1, 0)


def test_thread_info_prefix_is_tolerated() -> None:
    t = Trace("iso")
    t.add("(4242:postcopy/fault): " + request(RAM + 0x1000, "ram0", 0x1000, 4242))
    t.add("(4243:mig/dst/listen): " + place(RAM + 0x1000), dt=9)
    ram0 = analyse(t.text(), BLOCKS).block("ram0")
    assert ram0.resolved == 1
    assert ram0.latency.max == 9000


def test_resolved_fault_stream() -> None:
    text = two_format_trace("72")
    an = TraceAnalyzer(BLOCKS)
    faults = list(iter_resolved_faults(io.BytesIO(text.encode()), analyzer=an))
    assert [(f.block, f.pid, f.latency_ns) for f in faults] == [
        ("ram0", 11, 11_000), ("mem-huge", 12, 105_000), ("mem-huge", 13, 100_000),
    ]  # fmt: skip
    assert faults[0].placed_ns - faults[0].request_ns == faults[0].latency_ns
    assert an.finish().resolved == 3


def test_memory_does_not_keep_faults() -> None:
    """Resolved faults leave no per-fault state behind."""
    t = Trace()
    for i in range(2000):
        t.add(request(RAM + i * KIB4, "ram0", i * KIB4, 1))
        t.add(place(RAM + i * KIB4))
    # A window of 0 matches every event fed so far, so the check below sees them.
    an = TraceAnalyzer(BLOCKS, reorder_window_ns=0)
    assert len(an.feed(t.text().encode())) == 2000
    assert an.outstanding == 0
    t.lines.clear()
    t.add(request(RAM + 2000 * KIB4, "ram0", 2000 * KIB4, 1))
    an.feed(t.text().encode())
    assert an.outstanding == 1
    assert an.finish().resolved == 2000


def test_to_dict_is_json() -> None:
    a = analyse(two_format_trace("iso"), BLOCKS)
    d = json.loads(json.dumps(a.to_dict()))
    assert d["format"] == "iso8601"
    assert Histogram.from_dict(d["blocks"][0]["latency"]) == a.block("ram0").latency


def test_feed_after_finish() -> None:
    an = TraceAnalyzer(BLOCKS)
    an.finish()
    with pytest.raises(RuntimeError):
        an.feed(b"x\n")


def test_page_size_must_be_power_of_two() -> None:
    with pytest.raises(ArtifactError):
        TraceAnalyzer([RamBlock("odd", 3000, 0, 3000, 3000)])


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        analyze_trace(tmp_path / "absent.log", BLOCKS)


# ---------------------------------------------------------------------------
# Runs recorded with real QEMU 7.2 and 11.1 (tests/data/qemu-*/, see their README)

RECORDED = sorted(p.parent for p in DATA.parent.glob("qemu-*/*/info-ramblock-dst.txt"))


def open_recorded_trace(run: Path) -> Any:
    plain = run / "dst-trace.log"
    return plain.open("rb") if plain.exists() else gzip.open(run / "dst-trace.log.gz", "rb")


@pytest.mark.parametrize("run", RECORDED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recorded_runs(run: Path) -> None:
    """Agrees with the recorder's own analysis (summary.json) of the same trace."""
    summary = json.loads((run / "summary.json").read_text())
    stored = summary["stored_trace"]
    with open_recorded_trace(run) as f:
        a = analyze_trace(f, load_ramblocks(run / "info-ramblock-dst.txt"))
    assert a.format == ("tid@epoch" if run.parent.name == "qemu-7.2" else "iso8601")
    assert (a.malformed_lines, a.other_lines, a.late_events) == (0, 0, 0)
    assert a.faults == stored["faults_requested"]
    # The recorder calls a request with no later placement unresolved; this
    # analyser tells those whose page was placed before the request apart.
    assert a.resolved == stored["faults_resolved"]
    already = sum(b.already_placed for b in a.blocks)
    assert sum(b.unresolved for b in a.blocks) + already == stored["faults_unresolved"]
    assert a.latency.max is not None
    assert a.latency.mean is not None
    assert abs(a.latency.max / 1e6 - stored["latency_ms_max"]) < 0.001
    assert abs(a.latency.mean / 1e6 - stored["latency_ms_mean"]) < 0.001
    ram0 = a.block("ram0")
    assert ram0.placement_granularity == ram0.page_size
    assert ram0.negative_latencies == 0
    # The base learned from the trace is where QEMU mapped the RAM (/proc/PID/maps).
    dst_maps = next(
        json.loads(line)["ram_maps"][0]
        for line in (run / "host.jsonl").read_text().splitlines()
        if json.loads(line)["side"] == "dst"
    )
    assert ram0.host_base == int(dst_maps.split("-")[0], 16)
    if run.parent.name == "qemu-11.1":
        # One vCPU: its blocked time is QEMU's system-wide postcopy-blocktime (ms).
        qemu_ms = summary["full"]["dst_final"]["postcopy-blocktime"]
        ours_ms = sum(a.vcpu_blocktime_ns.values()) / 1e6
        assert abs(ours_ms - qemu_ms) <= 5 + 0.01 * qemu_ms
        assert a.tid_to_vcpu
        assert set(a.tid_to_vcpu.values()) == {0}


@pytest.mark.parametrize("version", ["qemu-7.2", "qemu-11.1"])
def test_recorded_trace_without_timestamps_is_refused(version: str) -> None:
    path = DATA.parent / version / "trace-format" / "dst-trace-without-msg-timestamp.log"
    if not path.exists():
        pytest.skip(f"{path} not recorded")
    with pytest.raises(ArtifactError, match="-msg timestamp=on"):
        analyze_trace(path, [])
