"""Log-linear histogram: quantiles within the stated bound, exact statistics, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from migrator.errors import ArtifactError
from migrator.metrics.histogram import Histogram, bucket_bounds, bucket_index

PERCENTILES = [0, 1, 10, 25, 50, 75, 90, 99, 99.9, 100]


@pytest.mark.parametrize("k", [4, 7, 10])
@pytest.mark.parametrize("dist", ["lognormal", "uniform", "pareto", "small"])
def test_quantiles_within_bound_of_numpy(dist: str, k: int) -> None:
    rng = np.random.default_rng(abs(hash((dist, k))) % 2**32)
    n = 200_000
    data = {
        "lognormal": rng.lognormal(10, 2.5, n),  # ns: microseconds to seconds
        "uniform": rng.uniform(0, 1e9, n),
        "pareto": (rng.pareto(1.2, n) + 1) * 1000,
        "small": rng.integers(0, 300, n),  # exact buckets below 2**k
    }[dist].astype(np.int64)
    hist = Histogram("ns", sub_bucket_bits=k)
    # Recorded in uneven batches, one sample at a time for a few.
    for part in np.array_split(data, 7):
        hist.record_many(part)
    bound = hist.max_relative_error
    assert bound == 2.0 ** -(k + 1)
    for p in PERCENTILES:
        exact = float(np.percentile(data, p, method="inverted_cdf"))
        got = hist.percentiles([p])[float(p)]
        assert got is not None
        assert abs(got - exact) <= bound * exact + 0.5, (p, got, exact)
    assert hist.count == n
    assert hist.min == int(data.min())
    assert hist.max == int(data.max())
    assert hist.sum == int(data.sum())
    assert hist.mean == pytest.approx(float(np.mean(data)), rel=1e-12)


def test_default_scheme_is_finer_than_a_sixteenth_octave() -> None:
    hist = Histogram()
    assert 1 + 2 * hist.max_relative_error <= 2 ** (1 / 16)


def test_buckets_cover_every_int64_exactly() -> None:
    for k in (1, 7):
        values = np.array(
            [0, 1, 2, 3, (1 << k) - 1, 1 << k, (2 << k) - 1, 2 << k, 12345, 2**53 - 1, 2**53,
             2**53 + 1, 2**62 + 12345, 2**63 - 2, 2**63 - 1],
            dtype=np.int64,
        )  # fmt: skip
        values = np.sort(values)
        index = bucket_index(values, k)
        assert np.all(np.diff(index) >= 0)
        for v, i in zip(values.tolist(), index.tolist(), strict=True):
            lower, upper = bucket_bounds(i, k)
            assert lower <= v <= upper
            assert (upper - lower + 1) <= max(1, lower >> k)
    # Consecutive buckets tile the line.
    for i in range(1, 5000):
        assert bucket_bounds(i, 7)[0] == bucket_bounds(i - 1, 7)[1] + 1


def test_record_and_record_many_agree() -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 10**7, 1000)
    one, many = Histogram(), Histogram()
    for v in data.tolist():
        one.record(v)
    many.record_many(data)
    assert one == many


def test_merge() -> None:
    rng = np.random.default_rng(4)
    a_data, b_data = rng.integers(0, 10**6, 500), rng.integers(10**6, 10**9, 700)
    a, b, both = Histogram(), Histogram(), Histogram()
    a.record_many(a_data)
    b.record_many(b_data)
    both.record_many(np.concatenate([a_data, b_data]))
    a.merge(b)
    assert a == both
    empty = Histogram()
    empty.merge(Histogram())
    assert empty.count == 0
    assert empty.min is None


def test_merge_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        Histogram("ns").merge(Histogram("us"))
    with pytest.raises(ValueError, match="cannot merge"):
        Histogram(sub_bucket_bits=7).merge(Histogram(sub_bucket_bits=8))


def test_round_trip_through_json() -> None:
    rng = np.random.default_rng(5)
    hist = Histogram("ns", sub_bucket_bits=9)
    hist.record_many(rng.lognormal(12, 3, 50_000).astype(np.int64))
    hist.record(0)
    hist.record(2**62)
    d = json.loads(json.dumps(hist.to_dict()))
    assert d["unit"] == "ns"
    assert d["scheme"]["type"] == "log-linear"
    assert d["scheme"]["sub_bucket_bits"] == 9
    assert all(lo <= up and c > 0 for lo, up, c in d["buckets"])
    back = Histogram.from_dict(d)
    assert back == hist
    assert back.percentiles() == hist.percentiles()
    assert [tuple(b.__dict__.values()) for b in back.buckets()] == [tuple(b) for b in d["buckets"]]


def test_empty_histogram() -> None:
    hist = Histogram()
    assert hist.quantile(0.5) is None
    assert hist.percentiles([50, 99]) == {50.0: None, 99.0: None}
    assert hist.mean is None
    assert hist.buckets() == []
    assert Histogram.from_dict(hist.to_dict()) == hist


def test_memory_is_independent_of_sample_count() -> None:
    hist = Histogram()
    rng = np.random.default_rng(6)
    hist.record_many(rng.integers(0, 10**9, 10_000))
    size = hist._counts.nbytes
    for _ in range(20):
        hist.record_many(rng.integers(0, 10**9, 100_000))
    assert hist._counts.nbytes == size
    assert hist.count == 2_010_000


@pytest.mark.parametrize("bad", [[-1], [1.5], np.array([2**64 - 1], dtype=np.uint64)])
def test_bad_samples(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        Histogram().record_many(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("count"),
        lambda d: d["scheme"].update(type="hdr"),
        lambda d: d.update(count=d["count"] + 1),
        lambda d: d["buckets"].append([1000, 1003, 1]),  # not a bucket of k=7
        lambda d: d.update(buckets="nonsense"),
    ],
)
def test_from_dict_rejects_malformed(mutate: object) -> None:
    hist = Histogram()
    hist.record_many(np.arange(1, 5000))
    d = hist.to_dict()
    mutate(d)  # type: ignore[operator]
    with pytest.raises(ArtifactError):
        Histogram.from_dict(d)


def test_quantile_range_checked() -> None:
    with pytest.raises(ValueError, match="within"):
        Histogram().quantile(1.5)
