"""QEMU 11.1's postcopy-latency-dist against the trace, on recorded real 11.1 migrations.

``tests/data/qemu-11.1/*``: the destination trace and the destination's final
query-migrate of three real post-copy migrations (see that directory's README).
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO

import pytest
from rich.console import Console

from migrator.metrics.histogram import Histogram
from migrator.metrics.latency_dist import compare_latency_dist, qemu_bucket, rebin
from migrator.metrics.ramblock import RamBlock, load_ramblocks
from migrator.metrics.summary import build_report
from migrator.metrics.trace import analyze_trace, iter_resolved_faults
from migrator.metrics.trace_results import TraceAnalysis
from migrator.model import LatencyDistComparison
from migrator.report.terminal import render_report

DATA = Path(__file__).resolve().parents[1] / "data"
QEMU_11 = DATA / "qemu-11.1"
RUNS = ("memfd-4k", "hugetlbfs-2m", "hugetlbfs-1g")


def _trace(run: str) -> BinaryIO | Path:
    plain = QEMU_11 / run / "dst-trace.log"
    if plain.exists():
        return plain
    return io.BytesIO(gzip.decompress((QEMU_11 / run / "dst-trace.log.gz").read_bytes()))


def _blocks(run: str) -> list[RamBlock]:
    return load_ramblocks(QEMU_11 / run / "info-ramblock-dst.txt")


def _final_dst(run: str) -> dict[str, object]:
    replies = [json.loads(line) for line in (QEMU_11 / run / "query-migrate.jsonl").open()]
    final: dict[str, object] = [r["return"] for r in replies if r["side"] == "dst"][-1]
    assert final["status"] == "completed"
    return final


def _compare(run: str) -> tuple[LatencyDistComparison, TraceAnalysis]:
    analysis = analyze_trace(_trace(run), _blocks(run))
    counts = _final_dst(run)["postcopy-latency-dist"]
    assert isinstance(counts, list)
    return compare_latency_dist(counts, analysis.latency, analysis.faults,
                                qemu_source="QEMU", trace_source="trace"), analysis


@pytest.mark.parametrize(("run", "faults"), [("memfd-4k", 777), ("hugetlbfs-2m", 254),
                                             ("hugetlbfs-1g", 1)])
def test_totals_match_the_trace_request_count(run: str, faults: int) -> None:
    dist, _ = _compare(run)
    assert len(dist.rows) == 24
    assert dist.qemu_total == dist.trace_total == dist.trace_requests == faults


def test_huge_page_latencies_land_in_the_same_buckets() -> None:
    # Latencies of ms and s: the trace's few tens of us of extra time rarely cross a bucket.
    two_mib, _ = _compare("hugetlbfs-2m")
    assert two_mib.faults_in_other_buckets == 1
    worst = two_mib.largest_disagreement
    assert worst is not None
    assert (worst.bucket_us_low, worst.bucket_us_high) == (4096, 8192)
    assert (worst.qemu_count, worst.trace_count) == (240, 239)
    one_gib, _ = _compare("hugetlbfs-1g")
    assert one_gib.largest_disagreement is None
    assert [r.bucket_us_low for r in one_gib.rows if r.qemu_count] == [1 << 21]


def test_small_page_latencies_are_shifted_up_in_the_trace() -> None:
    dist, _ = _compare("memfd-4k")
    # From 256 us on the two agree bucket for bucket ...
    assert all(r.qemu_count == r.trace_count for r in dist.rows if r.bucket_us_low >= 256)
    # ... below they do not, and always the same way: the trace's latencies are longer
    # (its cumulative count never runs ahead of QEMU's).
    assert dist.faults_in_other_buckets == 178
    worst = dist.largest_disagreement
    assert worst is not None
    assert (worst.bucket_us_low, worst.qemu_count, worst.trace_count) == (4, 160, 0)
    qemu_cdf = list(accumulate(r.qemu_count for r in dist.rows))
    trace_cdf = list(accumulate(r.trace_count for r in dist.rows))
    assert all(t <= q for t, q in zip(trace_cdf, qemu_cdf, strict=True))


def test_rebinning_the_histogram_equals_binning_every_sample() -> None:
    _, analysis = _compare("memfd-4k")
    exact = [0] * 24
    for fault in iter_resolved_faults(_trace("memfd-4k"), _blocks("memfd-4k")):
        exact[qemu_bucket(fault.latency_ns, 24)] += 1
    assert rebin(analysis.latency, 24) == exact


@pytest.mark.parametrize(("ns", "bucket"), [
    (0, 0), (999, 0), (1999, 0), (2000, 1), (3999, 1), (4000, 2),
    (511_999, 8), (512_000, 9), ((1 << 23) * 1000 - 1, 22), ((1 << 23) * 1000, 23),
    (3600 * 10**9, 23),
])
def test_qemu_bucket_cuts_to_whole_microseconds_first(ns: int, bucket: int) -> None:
    assert qemu_bucket(ns, 24) == bucket


def test_a_histogram_too_coarse_to_rebin_exactly_is_refused() -> None:
    coarse = Histogram("ns", sub_bucket_bits=3)
    coarse.record(1950)  # its bucket [1920, 2047] holds both 1 us and 2 us latencies
    with pytest.raises(ValueError, match="straddles"):
        rebin(coarse, 24)


def test_report_carries_and_prints_the_comparison(tmp_path: Path) -> None:
    # A recorded run directory whose destination trace, RAMBlocks and final replies are
    # those of the real 11.1 hugetlbfs-2m migration.
    run = tmp_path / "run"
    shutil.copytree(DATA / "runs" / "hugetlb-2m", run)
    shutil.copy(QEMU_11 / "hugetlbfs-2m" / "dst-trace.log", run / "dst" / "trace.log")
    shutil.copy(QEMU_11 / "hugetlbfs-2m" / "info-ramblock-dst.txt", run / "dst" / "ramblocks.txt")
    (run / "final-query-migrate.json").write_text(json.dumps({"src": {}, "dst": _final_dst(
        "hugetlbfs-2m")}))
    report = build_report(run)
    dist = report.latency_dist_comparison
    assert dist is not None
    assert dist.qemu_total == dist.trace_total == 254
    assert "postcopy-latency-dist" in dist.qemu_source
    assert "postcopy_ram_fault_thread_request" in dist.trace_source
    console = Console(record=True, width=160)
    render_report(report, console)
    text = console.export_text()
    assert "Fault latency buckets: QEMU vs trace" in text
    assert "4.1 ms - 8.19 ms" in text
    assert "totals: QEMU 254, trace 254 resolved of 254 requests" in text
