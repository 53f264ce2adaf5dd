"""QEMU's own post-copy latency distribution next to the trace's, bucket by bucket.

QEMU >= 10.1 reports ``postcopy-latency-dist`` on the destination after
completion (capability ``postcopy-blocktime``): element N counts remote faults
resolved within [2^N us, 2^(N+1) us), where the latency is first cut to whole
microseconds; 0 us goes to bucket 0 and everything beyond the last bucket's
lower bound (2^23 us, ~8.4 s, with 24 buckets) into the last.  The trace's
fetch-latency :class:`Histogram` (ns, log-linear) is re-binned into the same
buckets here.

The re-binning is exact, not an approximation: QEMU's boundaries in ns are
``1000 * 2^N = 125 * 2^(N+3)``, which lies in the octave [2^(N+9), 2^(N+10)),
where a log-linear bucket with ``k`` sub-bucket bits is 2^(N+9-k) ns wide.  For
``k >= 6`` (the trace uses 7) every boundary is a multiple of that width, so no
trace bucket straddles a QEMU bucket; :func:`rebin` checks it anyway.

The two sources do not time the same interval (see :data:`SHIFT_NOTE`), so their
counts can differ by a bucket where latencies are a few microseconds even though
both count the same faults.
"""

from __future__ import annotations

from collections.abc import Sequence

from migrator.metrics.histogram import Histogram
from migrator.model import LatencyBucket, LatencyDistComparison

__all__ = ["SHIFT_NOTE", "bucket_bounds_us", "compare_latency_dist", "qemu_bucket", "rebin"]

NS_PER_US = 1000

SHIFT_NOTE = (
    "both count the same faults, but the trace times each from its request line to its "
    "placement line, QEMU from its blocktime begin (after the fault thread has written the "
    "request line and taken page_request_mutex) to its blocktime end (before the placement "
    "line is written): trace latencies are longer by the time it takes to write those lines "
    "(median 5 us with 4 KiB pages, 28 us with 2 MiB in recorded 11.1 runs), so latencies of "
    "a few to a hundred us fall a bucket or two higher in the trace"
)


def qemu_bucket(latency_ns: int, buckets: int) -> int:
    """QEMU's bucket of one latency: floor(log2(whole us)), 0 us in bucket 0, capped at the last."""
    micros = latency_ns // NS_PER_US
    return 0 if micros == 0 else min(micros.bit_length() - 1, buckets - 1)


def bucket_bounds_us(index: int, buckets: int) -> tuple[int, int | None]:
    """``(low, high)`` of QEMU bucket ``index`` in us; bucket 0 starts at 0, the last has no end."""
    low = 0 if index == 0 else 1 << index
    return low, None if index == buckets - 1 else 1 << (index + 1)


def rebin(trace: Histogram, buckets: int) -> list[int]:
    """The trace histogram's counts in QEMU's ``buckets`` power-of-two microsecond buckets."""
    if trace.unit != "ns":
        raise ValueError(f"the trace histogram must be in ns, not {trace.unit}")
    counts = [0] * buckets
    for bucket in trace.buckets():
        index = qemu_bucket(bucket.lower, buckets)
        if qemu_bucket(bucket.upper, buckets) != index:
            raise ValueError(
                f"trace bucket [{bucket.lower}, {bucket.upper}] ns straddles a QEMU bucket "
                f"boundary (the histogram needs >= 6 sub-bucket bits, it has "
                f"{trace.sub_bucket_bits})"
            )
        counts[index] += bucket.count
    return counts


def compare_latency_dist(
    qemu_counts: Sequence[int], trace: Histogram, trace_requests: int, *,
    qemu_source: str, trace_source: str,
) -> LatencyDistComparison:
    """QEMU's ``postcopy-latency-dist`` against the trace histogram re-binned to its buckets.

    ``trace`` holds one latency per resolved fault request (all RAMBlocks), and
    ``trace_requests`` counts every request line, resolved or not: QEMU's total
    equals it when every fault was resolved within the trace.
    """
    buckets = len(qemu_counts)
    if buckets == 0:
        raise ValueError("QEMU's latency distribution has no buckets")
    trace_counts = rebin(trace, buckets)
    rows = [
        LatencyBucket(bucket_us_low=low, bucket_us_high=high, qemu_count=int(qemu),
                      trace_count=theirs)
        for index, (qemu, theirs) in enumerate(zip(qemu_counts, trace_counts, strict=True))
        for low, high in [bucket_bounds_us(index, buckets)]
    ]
    worst = max(rows, key=lambda row: abs(row.trace_count - row.qemu_count))
    qemu_total = sum(row.qemu_count for row in rows)
    differences = sum(abs(row.trace_count - row.qemu_count) for row in rows)
    return LatencyDistComparison(
        qemu_source=qemu_source,
        trace_source=f"{trace_source}, re-binned to QEMU's buckets",
        rows=rows,
        qemu_total=qemu_total,
        trace_total=trace.count,
        trace_requests=trace_requests,
        largest_disagreement=worst if worst.trace_count != worst.qemu_count else None,
        # A fault counted in another bucket shows up twice in the sum of differences; what
        # the totals differ by shows up once.
        faults_in_other_buckets=(differences - abs(trace.count - qemu_total)) // 2,
        note=SHIFT_NOTE,
    )
