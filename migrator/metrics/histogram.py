"""Streaming log-linear (HDR-style) histogram of non-negative integer samples.

The one place migrator keeps a distribution: fault latencies, stalls and the
like are recorded here and never kept as a list of samples, so memory does not
grow with the number of samples.

Bucket scheme ("log-linear", as HdrHistogram uses it), with ``k`` sub-bucket
bits and ``S = 2**k``:

* values ``0 .. S-1`` each have their own bucket (exact);
* above that every power-of-two range ``[2**e, 2**(e+1))`` is cut into ``S``
  equal sub-buckets, so a bucket ``[lower, upper]`` has a width of at most
  ``lower / S``.

A quantile is reported as the midpoint of the bucket that holds the sample of
that rank, clamped to the exact ``min``/``max``; it is therefore within a
relative error of ``2**-(k+1)`` of that sample (``max_relative_error``).  The
default ``k = 7`` gives 128 sub-buckets per octave (a bucket ratio of at most
1 + 1/128, finer than 2**(1/16)) and an error bound of 0.39 %.  ``count``,
``min``, ``max``, ``sum`` and ``mean`` are exact.

Counts live in one dense ``int64`` numpy array of at most
``(64 - k) * S`` buckets (about 58 KiB for ``k = 7``), grown on demand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from migrator.errors import ArtifactError

__all__ = ["Bucket", "Histogram", "bucket_bounds", "bucket_index"]

SCHEME = "log-linear"
DEFAULT_SUB_BUCKET_BITS = 7
# Values are stored as int64; the largest accepted sample is 2**63 - 1.
_MAX_VALUE = (1 << 63) - 1


@dataclass(frozen=True)
class Bucket:
    """One non-empty bucket: samples ``lower <= v <= upper`` (inclusive), ``count`` of them."""

    lower: int
    upper: int
    count: int


def bucket_index(values: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
    """Bucket index of every value (all ``>= 0``) with ``k`` sub-bucket bits.

    The scheme of the module docstring, computed exactly in integers for every
    int64; indices grow with the values.  :func:`bucket_bounds` is its inverse.
    """
    sub = 1 << k
    # bit_length(v) from the float exponent, then corrected: float64 rounding can
    # push a value just below a power of two up to it (values above 2**53).
    _, exp = np.frexp(values.astype(np.float64))
    bits = exp.astype(np.int64)
    too_big = (values >> np.clip(bits - 1, 0, 62)) == 0
    bits = np.where(too_big & (values > 0), bits - 1, bits)
    shift = np.maximum(bits - k - 1, 0)
    mantissa = values >> shift
    # Below S the shift is 0 and the index is the value itself.
    return np.asarray(shift * sub + mantissa, dtype=np.int64)


def bucket_bounds(index: int, k: int) -> tuple[int, int]:
    """Inclusive ``(lower, upper)`` of bucket ``index`` with ``k`` sub-bucket bits.

    Consecutive buckets tile the integers without gaps; a bucket's width is at
    most ``lower / 2**k`` (1 below ``2**(k+1)``).  Serialised histograms store
    these bounds, and reading one checks them against this function.
    """
    sub = 1 << k
    if index < 2 * sub:
        return index, index
    shift = index // sub - 1
    mantissa = index - shift * sub
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class Histogram:
    """Log-linear histogram of integer samples ``>= 0`` in one ``unit`` (e.g. ``"ns"``).

    ``record``/``record_many`` add samples; ``merge`` adds another histogram of
    the same unit and scheme.  See the module docstring for the error bound.
    """

    def __init__(self, unit: str = "ns", *, sub_bucket_bits: int = DEFAULT_SUB_BUCKET_BITS) -> None:
        if not 1 <= sub_bucket_bits <= 16:
            raise ValueError(f"sub_bucket_bits must be 1..16, not {sub_bucket_bits}")
        self.unit = unit
        self.sub_bucket_bits = sub_bucket_bits
        self._counts: npt.NDArray[np.int64] = np.zeros(4 << sub_bucket_bits, dtype=np.int64)
        self._count = 0
        self._sum = 0
        self._min: int | None = None
        self._max: int | None = None

    # -- recording ---------------------------------------------------------

    def record(self, value: int) -> None:
        """Add one sample."""
        self.record_many(np.array([value], dtype=np.int64))

    def record_many(self, values: npt.ArrayLike) -> None:
        """Add every sample of an integer array (vectorised)."""
        arr = np.asarray(values)
        if arr.size == 0:
            return
        if arr.dtype.kind not in "iu":
            raise TypeError(f"histogram samples must be integers, not {arr.dtype}")
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > _MAX_VALUE:
            raise ValueError(f"histogram sample above {_MAX_VALUE}")
        flat = arr.astype(np.int64, copy=False).ravel()
        lo = int(flat.min())
        if lo < 0:
            raise ValueError(f"histogram samples must be >= 0, got {lo}")
        hi = int(flat.max())
        index = bucket_index(flat, self.sub_bucket_bits)
        need = int(index.max()) + 1
        if need > self._counts.size:
            grown = np.zeros(max(need, 2 * self._counts.size), dtype=np.int64)
            grown[: self._counts.size] = self._counts
            self._counts = grown
        self._counts += np.bincount(index, minlength=self._counts.size)
        self._count += int(flat.size)
        # Exact sum in Python ints, summing in slices small enough that no int64
        # partial sum can overflow.
        step = max(1, _MAX_VALUE // max(hi, 1))
        self._sum += sum(int(flat[i : i + step].sum()) for i in range(0, flat.size, step))
        self._min = lo if self._min is None else min(self._min, lo)
        self._max = hi if self._max is None else max(self._max, hi)

    def merge(self, other: Histogram) -> None:
        """Add all samples of ``other`` (same unit and bucket scheme) to this histogram."""
        if other.unit != self.unit or other.sub_bucket_bits != self.sub_bucket_bits:
            raise ValueError(
                f"cannot merge histogram ({other.unit}, k={other.sub_bucket_bits}) "
                f"into ({self.unit}, k={self.sub_bucket_bits})"
            )
        if other._count == 0:
            return
        if other._counts.size > self._counts.size:
            grown = np.zeros(other._counts.size, dtype=np.int64)
            grown[: self._counts.size] = self._counts
            self._counts = grown
        self._counts[: other._counts.size] += other._counts
        self._count += other._count
        self._sum += other._sum
        assert other._min is not None
        assert other._max is not None
        self._min = other._min if self._min is None else min(self._min, other._min)
        self._max = other._max if self._max is None else max(self._max, other._max)

    # -- exact statistics -----------------------------------------------------

    @property
    def count(self) -> int:
        """Number of samples recorded."""
        return self._count

    @property
    def sum(self) -> int:
        """Exact sum of all samples."""
        return self._sum

    @property
    def min(self) -> int | None:
        """Smallest sample (exact), ``None`` when empty."""
        return self._min

    @property
    def max(self) -> int | None:
        """Largest sample (exact), ``None`` when empty."""
        return self._max

    @property
    def mean(self) -> float | None:
        """Exact mean (from the exact sum), ``None`` when empty."""
        return self._sum / self._count if self._count else None

    @property
    def max_relative_error(self) -> float:
        """Bound on ``|quantile - true sample| / true sample`` for this scheme."""
        return 2.0 ** -(self.sub_bucket_bits + 1)

    # -- approximate statistics -------------------------------------------------

    def quantile(self, q: float) -> int | None:
        """Value at quantile ``q`` in ``[0, 1]`` (``None`` when empty).

        The sample of rank ``ceil(q * count)`` (at least 1) is located by the
        cumulative bucket counts (``numpy.searchsorted`` on their cumulative
        sum), i.e. the "inverted CDF" definition; its bucket's midpoint is
        returned, clamped to the exact min and max (ranks 1 and ``count`` are
        the exact min and max).
        """
        return self._quantiles(np.array([q], dtype=np.float64))[0]

    def percentiles(self, ps: Sequence[float] = (50, 90, 99, 99.9)) -> dict[float, int | None]:
        """``{p: value}`` for percentiles ``p`` in ``[0, 100]``."""
        values = self._quantiles(np.asarray(ps, dtype=np.float64) / 100.0)
        return dict(zip((float(p) for p in ps), values, strict=True))

    def _quantiles(self, qs: npt.NDArray[np.float64]) -> list[int | None]:
        if np.any((qs < 0) | (qs > 1)) or np.any(np.isnan(qs)):
            raise ValueError(f"quantiles must be within [0, 1]: {qs.tolist()}")
        if self._count == 0:
            return [None] * len(qs)
        assert self._min is not None
        assert self._max is not None
        ranks = np.maximum(np.ceil(qs * self._count), 1).astype(np.int64)
        cumulative = np.cumsum(self._counts)
        indices = np.searchsorted(cumulative, ranks, side="left")
        out: list[int | None] = []
        for rank, index in zip(ranks.tolist(), indices.tolist(), strict=True):
            # The extreme ranks are known exactly.
            if rank == 1:
                out.append(self._min)
            elif rank >= self._count:
                out.append(self._max)
            else:
                lower, upper = bucket_bounds(int(index), self.sub_bucket_bits)
                mid = lower + (upper - lower) // 2
                out.append(min(max(mid, self._min), self._max))
        return out

    # -- views and serialisation ---------------------------------------------------

    def buckets(self) -> list[Bucket]:
        """Non-empty buckets in increasing order, for rendering."""
        out = []
        for index in np.flatnonzero(self._counts).tolist():
            lower, upper = bucket_bounds(int(index), self.sub_bucket_bits)
            out.append(Bucket(lower, upper, int(self._counts[index])))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: unit, scheme, exact statistics and the sparse non-empty buckets."""
        return {
            "unit": self.unit,
            "scheme": {
                "type": SCHEME,
                "sub_bucket_bits": self.sub_bucket_bits,
                "max_relative_error": self.max_relative_error,
            },
            "count": self._count,
            "sum": self._sum,
            "min": self._min,
            "max": self._max,
            "buckets": [[b.lower, b.upper, b.count] for b in self.buckets()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """Rebuild a histogram written by :meth:`to_dict`; malformed input is an ArtifactError."""
        try:
            scheme = data["scheme"]
            if scheme["type"] != SCHEME:
                raise ArtifactError(f"histogram: unknown bucket scheme {scheme['type']!r}")
            hist = cls(str(data["unit"]), sub_bucket_bits=int(scheme["sub_bucket_bits"]))
            rows: Iterable[Sequence[int]] = data["buckets"]
            total = 0
            for lower, upper, count in rows:
                index = int(
                    bucket_index(np.array([lower], dtype=np.int64), hist.sub_bucket_bits)[0]
                )
                if bucket_bounds(index, hist.sub_bucket_bits) != (lower, upper) or count < 0:
                    raise ArtifactError(
                        f"histogram: bucket [{lower}, {upper}] is not of its scheme"
                    )
                if index >= hist._counts.size:
                    grown = np.zeros(max(index + 1, 2 * hist._counts.size), dtype=np.int64)
                    grown[: hist._counts.size] = hist._counts
                    hist._counts = grown
                hist._counts[index] += int(count)
                total += int(count)
            hist._count = int(data["count"])
            hist._sum = int(data["sum"])
            hist._min = None if data["min"] is None else int(data["min"])
            hist._max = None if data["max"] is None else int(data["max"])
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"histogram: malformed serialised form: {exc!r}") from exc
        if total != hist._count:
            raise ArtifactError(
                f"histogram: buckets hold {total} samples, count says {hist._count}"
            )
        return hist

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Histogram(unit={self.unit!r}, count={self._count}, min={self._min}, "
            f"max={self._max}, k={self.sub_bucket_bits})"
        )
