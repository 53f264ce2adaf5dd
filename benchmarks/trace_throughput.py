"""Throughput and peak memory of the destination trace analyser (migrator.metrics.trace).

Generates QEMU 7.2-format destination traces of increasing size (streamed to a
temporary directory, never held in memory), analyses each in a fresh Python
process and prints events/s and that process's peak RSS, so that a flat memory
profile is visible as the trace grows.  Each trace is then compressed as a run
keeps it (``zstd -1``, ``trace.log.zst``: see migrator/rundir.py) and analysed
again from the zstd stream, so both figures are printed side by side.  The
temporary files are deleted.

The synthetic trace looks like a real ``-trace postcopy_ram_fault_thread_request
-trace postcopy_place_page* -trace '*postcopy_blocktime*'`` run of QEMU 7.2 on
the destination: mostly background placements in migration-bitmap order, each
followed by its ``mark_postcopy_blocktime_end`` line; some fault requests (with
their ``mark_postcopy_blocktime_begin``) resolved by a placement a little later,
a few duplicate and already-placed requests, zero pages, and RAMBlocks of 4 KiB
and 2 MiB pages.  The last requests are never resolved (the trace is cut).

Usage: python benchmarks/trace_throughput.py [--sizes 1e6 5e6 1e7] [--repeat 1] [--keep DIR]

``--repeat N`` analyses each file N times (each in a fresh process) and keeps the
fastest, for figures less at the mercy of whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator.rundir import ZST, ZSTD_LEVEL

# (name, page size, bytes, share of placements)
BLOCKS = (
    ("ram0", 4096, 0, 0.80),  # sized from the event count
    ("ram-huge", 2 << 20, 64 << 30, 0.05),
    ("0000:00:02.0/vga.vram", 4096, 16 << 20, 0.10),
    ("pc.bios", 4096, 256 << 10, 0.025),
    ("/rom@etc/acpi/tables", 4096, 128 << 10, 0.025),
)
PAGE_SIZES = {4096: "4 KiB", 2 << 20: "2 MiB"}


@dataclass
class Layout:
    """Where each block sits in the host address space, as QEMU would map it."""

    names: list[str]
    page_sizes: list[int]
    sizes: list[int]
    bases: list[int]

    def ramblock_text(self) -> str:
        """The destination's ``info ramblock`` output for this layout (QEMU 7.2 columns)."""
        out = [f"{'Block Name':>24} {'PSize':>8}  {'Offset':>18} {'Used':>18} {'Total':>18}"]
        offset = 0
        for name, psize, size in zip(self.names, self.page_sizes, self.sizes, strict=True):
            out.append(
                f"{name:>24} {PAGE_SIZES[psize]:>8}  0x{offset:016x} 0x{size:016x} 0x{size:016x}"
            )
            offset += size
        return "\r\n".join(out) + "\r\n"


def make_layout(events: int) -> Layout:
    """Blocks sized so that the 4 KiB RAM block has a page for each of its placements."""
    names, psizes, sizes, bases = [], [], [], []
    base = 0x7F0000000000
    for name, psize, size, share in BLOCKS:
        if size == 0:
            size = max(1 << 30, int(events * share / 2) * psize * 2)
        names.append(name)
        psizes.append(psize)
        sizes.append(size)
        bases.append(base)
        # QEMU's mappings are aligned to their page size; keep 1 GiB alignment.
        base += (size + (2 << 30) - 1) // (1 << 30) * (1 << 30)
    return Layout(names, psizes, sizes, bases)


def generate(path: Path, events: int, seed: int = 1) -> Layout:
    """Write a 7.2-format trace of about ``events`` lines to ``path``."""
    rng = random.Random(seed)
    layout = make_layout(events)
    shares = [share for *_, share in BLOCKS]
    cursor = [0] * len(BLOCKS)
    npages = [s // p for s, p in zip(layout.sizes, layout.page_sizes, strict=True)]
    usec = 1_795_630_006_000_000
    listen, fault = 18918, 18917
    vcpus = [18912, 18913]
    scheduled: dict[int, list[tuple[int, int]]] = {}  # step -> placements due then
    recent: list[tuple[int, int]] = []
    # Pages sent because they were requested are skipped by the background walk.
    urgent: set[tuple[int, int]] = set()
    buf: list[str] = []

    def stamp(tid: int) -> str:
        return f"{tid}@{usec // 1_000_000}.{usec % 1_000_000:06d}:"

    def place(b: int, page: int) -> None:
        host = layout.bases[b] + page * layout.page_sizes[b]
        head = stamp(listen)
        zero = rng.random() < 0.3
        if zero:
            buf.append(f"{head}postcopy_place_page_zero host=0x{host:x}\n")
        buf.append(
            f"{head}mark_postcopy_blocktime_end addr: 0x{host:x}, dd: 0x55bf60e40860, "
            f"time: {usec // 1000 % 100000}, affected_cpu: 0\n"
        )
        if not zero or layout.page_sizes[b] > 4096:
            # hugetlbfs has no UFFDIO_ZEROPAGE: QEMU places a zero page again as a page.
            buf.append(f"{head}postcopy_place_page host=0x{host:x}\n")
        recent.append((b, page))
        if len(recent) > 64:
            del recent[:32]

    def request(b: int, page: int, tid: int) -> None:
        size = layout.page_sizes[b]
        # The kernel reports the faulting address rounded to 4 KiB.
        hva = layout.bases[b] + page * size + rng.randrange(0, size, 4096)
        head = stamp(fault)
        buf.append(
            f"{head}postcopy_ram_fault_thread_request Request for HVA=0x{hva:x} "
            f"rb={layout.names[b]} offset=0x{page * size:x} pid={tid}\n"
        )
        buf.append(
            f"{head}mark_postcopy_blocktime_begin addr: 0x{hva:x}, dd: 0x55bf60e40860, "
            f"time: {usec // 1000 % 100000}, cpu: {vcpus.index(tid)}, already_received: 0\n"
        )

    # QEMU traces each block's range when post-copy is set up (postcopy_init_range
    # is in the postcopy_* glob); leave one block out so its placements stay
    # unattributed, as they would without that event.
    offset = 0
    for name, base, size in zip(layout.names, layout.bases, layout.sizes, strict=True):
        if name != layout.names[-1]:
            buf.append(
                f"{stamp(listen)}postcopy_init_range {name}: 0x{base:x} offset=0x{offset:x} "
                f"length=0x{size:x}\n"
            )
        offset += size
    written = 0
    step = 0
    with path.open("w", encoding="ascii") as out:
        while written + len(buf) < events:
            step += 1
            usec += rng.randint(1, 3)
            due = scheduled.pop(step, None)
            if due:
                for b, page in due:
                    place(b, page)
            elif rng.random() < 0.04:
                b = 0 if rng.random() < 0.9 else 1
                roll = rng.random()
                if roll < 0.03 and recent:
                    request(*recent[-1], rng.choice(vcpus))  # its page was just placed
                    continue
                page = rng.randrange(cursor[b], npages[b]) if cursor[b] < npages[b] else 0
                request(b, page, rng.choice(vcpus))
                if roll > 0.98:
                    request(b, page, vcpus[0])  # another thread faults on it meanwhile
                delay = 1 + int(rng.lognormvariate(2.5, 1.0))
                scheduled.setdefault(step + delay, []).append((b, page))
                urgent.add((b, page))
            else:
                b = rng.choices(range(len(BLOCKS)), weights=shares)[0]
                while cursor[b] < npages[b] and (b, cursor[b]) in urgent:
                    cursor[b] += 1
                if cursor[b] >= npages[b]:
                    b = 0
                place(b, cursor[b] % npages[b])
                cursor[b] += 1
            if len(buf) >= 10000:
                written += len(buf)
                out.write("".join(buf))
                buf.clear()
        out.write("".join(buf))
    return layout


def child(path: Path, ramblock: Path) -> None:
    """Analyse one trace in this (fresh) process and print a JSON line of measurements."""
    from migrator.metrics.ramblock import load_ramblocks
    from migrator.metrics.trace import analyze_trace

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    blocks = load_ramblocks(ramblock)
    t0 = time.perf_counter()
    analysis = analyze_trace(path, blocks)
    elapsed = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "lines": analysis.lines,
                "seconds": elapsed,
                "rss_kib": rss,
                "rss_import_kib": rss_before,
                "faults": analysis.faults,
                "resolved": analysis.resolved,
                "malformed": analysis.malformed_lines,
                "p50_us": (analysis.latency.quantile(0.5) or 0) / 1000,
            }
        )
    )


def measure(trace: Path, ramblock: Path, repeat: int) -> dict[str, Any]:
    """:func:`child`'s measurements of one trace file (plain or .zst), each in a fresh
    process: the fastest of ``repeat``."""
    runs = []
    for _ in range(repeat):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(trace), str(ramblock)],
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    fastest: dict[str, Any] = min(runs, key=lambda r: r["seconds"])
    return fastest


def main() -> int:
    """Generate, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 5e6, 1e7])
    parser.add_argument("--repeat", type=int, default=1,
                        help="analyses per file, the fastest kept")
    parser.add_argument("--keep", type=Path, help="write traces here and keep them")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    with tempfile.TemporaryDirectory(prefix="trace-bench-") as tmp:
        where = args.keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        print(
            f"{'events':>11} {'MiB':>7} {'gen s':>6} {'analyse s':>9} {'events/s':>11} "
            f"{'peak RSS MiB':>12} {'(after import)':>14} {'faults':>8} {'resolved':>8} "
            f"{'.zst MiB':>8} {'analyse .zst s':>14} {'events/s .zst':>13} "
            f"{'peak RSS .zst':>13}"
        )
        for size in args.sizes:
            events = int(size)
            trace = where / f"dst-{events}.trace"
            ramblock = where / f"ramblock-{events}.txt"
            t0 = time.perf_counter()
            layout = generate(trace, events)
            ramblock.write_text(layout.ramblock_text(), encoding="ascii")
            gen = time.perf_counter() - t0
            r = measure(trace, ramblock, args.repeat)
            compressed = trace.with_name(trace.name + ZST)
            subprocess.run(["zstd", "-q", "-f", f"-{ZSTD_LEVEL}", str(trace), "-o",
                            str(compressed)], check=True)
            z = measure(compressed, ramblock, args.repeat)
            if (z["lines"], z["faults"], z["resolved"]) != (r["lines"], r["faults"],
                                                           r["resolved"]):
                raise SystemExit(f"the .zst trace analysed differently: {z} vs {r}")
            mib = trace.stat().st_size / (1 << 20)
            print(
                f"{r['lines']:>11,} {mib:>7.0f} {gen:>6.1f} {r['seconds']:>9.2f} "
                f"{r['lines'] / r['seconds']:>11,.0f} {r['rss_kib'] / 1024:>12.0f} "
                f"{r['rss_import_kib'] / 1024:>14.0f} {r['faults']:>8,} {r['resolved']:>8,} "
                f"{compressed.stat().st_size / (1 << 20):>8.1f} {z['seconds']:>14.2f} "
                f"{z['lines'] / z['seconds']:>13,.0f} {z['rss_kib'] / 1024:>13.0f}",
                flush=True,
            )
            if args.keep is None:
                trace.unlink()
                compressed.unlink()
                ramblock.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
