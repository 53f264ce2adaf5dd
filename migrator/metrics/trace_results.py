"""What an analysis of the destination's post-copy trace returns.

:class:`TraceAnalysis` (the whole trace, per RAMBlock :class:`BlockAnalysis`)
and the stream of resolved faults (:class:`FaultBatch` per chunk, iterable as
:class:`ResolvedFault`).  The semantics of every count are in
:mod:`migrator.metrics.trace`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from migrator.metrics.histogram import Histogram
from migrator.metrics.trace_text import I64, U64, TraceFormat

__all__ = ["BlockAnalysis", "FaultBatch", "ResolvedFault", "TraceAnalysis"]


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

    @classmethod
    def empty(cls, block_names: tuple[str, ...]) -> FaultBatch:
        """No resolved faults."""
        z = np.zeros(0, np.int64)
        return cls(block_names, z, np.zeros(0, np.uint64), z, z, z, z)

    @classmethod
    def concat(cls, block_names: tuple[str, ...], batches: list[FaultBatch]) -> FaultBatch:
        """One batch of all of ``batches`` (a single batch is returned as it is)."""
        if not batches:
            return cls.empty(block_names)
        if len(batches) == 1:
            return batches[0]
        return cls(
            block_names=block_names,
            block=np.concatenate([b.block for b in batches]),
            hva=np.concatenate([b.hva for b in batches]),
            pid=np.concatenate([b.pid for b in batches]),
            request_ns=np.concatenate([b.request_ns for b in batches]),
            placed_ns=np.concatenate([b.placed_ns for b in batches]),
            latency_ns=np.concatenate([b.latency_ns for b in batches]),
        )

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
