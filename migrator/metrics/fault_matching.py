"""Matching fault requests with the placements that resolve them: per-page fetch latency.

Events arrive in rounds, each later in time than everything matched before
(see :class:`~migrator.metrics.trace_decode.ReorderWindow`).  Within a round
events are ranked by (time, line); a fault request (or a vCPU blocktime begin)
waits until the first placement, in that order, of the page that contains its
address (:mod:`migrator.metrics.block_map` says which page that is).  Matching
is a sort of the round's placements by (page, rank) plus one ``searchsorted``
for all the waiters, old and new.  The semantics of every count are in
:mod:`migrator.metrics.trace`.

State is a placed-page map per block (bounded by the guest's size), the
outstanding waiters, the placements held back until their block is known
(bounded) and the histograms: memory does not grow with the length of the trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from migrator.errors import ArtifactError
from migrator.metrics.block_map import (
    MAX_UNITS,
    POSITION_BITS,
    SMALL_PAGE,
    BlockMap,
    MappedBlock,
    distinct,
    key_positions,
    page_keys,
    sort_keys,
)
from migrator.metrics.histogram import Histogram
from migrator.metrics.trace_decode import DecodedEvents, EventSpan
from migrator.metrics.trace_results import BlockAnalysis, FaultBatch
from migrator.metrics.trace_text import I64, U64, Bools

__all__ = ["FaultMatcher", "VcpuBlocktime"]

# Placements whose RAMBlock is not known yet are held back, at most this many.
_MAX_HELD = 1 << 21


@dataclass
class _BlockTally:
    """What the matcher has seen of one RAMBlock: its placed pages and its counts."""

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
    span: EventSpan = field(default_factory=EventSpan)
    latency: Histogram = field(default_factory=lambda: Histogram("ns"))
    backlog: Histogram = field(default_factory=lambda: Histogram("placements"))

    def ensure_units(self, count: int) -> None:
        """Grow the placed-page map to at least ``count`` pages."""
        if count > self.placed.size:
            grown = np.zeros(max(count, 2 * self.placed.size), dtype=np.bool_)
            grown[: self.placed.size] = self.placed
            self.placed = grown

    def analysis(self, blk: MappedBlock, unresolved: int) -> BlockAnalysis:
        """The public result for block ``blk``."""
        gran: int | None = None
        if self.any_placement:
            low = self.offsets_or & -self.offsets_or
            gran = min(low, blk.page_size) if low else blk.page_size
        return BlockAnalysis(
            name=blk.name,
            page_size=blk.page_size,
            page_size_known=blk.page_size_known,
            host_base=blk.base,
            subpage_resolution=blk.subpage,
            faults=self.faults,
            resolved=self.resolved,
            unresolved=unresolved,
            already_placed=self.already_placed,
            duplicate_requests=self.duplicate_requests,
            negative_latencies=self.negative_latencies,
            placements=self.placements,
            pages_placed=self.pages_placed,
            pages_requested=self.pages_requested,
            pages_background=self.pages_placed - self.pages_requested,
            zero_pages=self.zero_pages,
            duplicate_placements=self.placements - self.pages_placed,
            placement_granularity=gran,
            latency=self.latency,
            backlog=self.backlog,
            first_event_ns=self.span.first,
            last_event_ns=self.span.last,
        )


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


class _HeldPlacements:
    """Placements seen before their RAMBlock's address is known, in trace order (bounded)."""

    def __init__(self) -> None:
        self._held: list[tuple[U64, I64, Bools]] = []
        self.count = 0
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, addr: U64, ts: I64, zero: Bools) -> None:
        """Keep these placements (drop and count those beyond the bound)."""
        room = _MAX_HELD - self.count
        if room < addr.size:
            self.dropped += int(addr.size) - max(room, 0)
            addr, ts, zero = addr[: max(room, 0)], ts[: max(room, 0)], zero[: max(room, 0)]
        if addr.size:
            self._held.append((addr, ts, zero))
            self.count += int(addr.size)

    def release(self, blocks: BlockMap) -> tuple[U64, I64, Bools, I64] | None:
        """(address, block, zero, time) of the held placements whose block is now known."""
        if not self._held or not blocks.any_base_known:
            return None
        addr = np.concatenate([a for a, _, _ in self._held])
        ts = np.concatenate([t for _, t, _ in self._held])
        zero = np.concatenate([z for _, _, z in self._held])
        blk = blocks.lookup(addr)
        now = blk >= 0
        if not np.any(now):
            return None
        keep = ~now
        self._held = [(addr[keep], ts[keep], zero[keep])] if np.any(keep) else []
        self.count = int(np.count_nonzero(keep))
        return addr[now], blk[now], zero[now], ts[now]


class VcpuBlocktime:
    """Per-vCPU time with at least one fault outstanding: a sweep over begin/end events.

    A vCPU's fault begins at its blocktime begin line and ends at the placement
    of its page.  ``blocked_ns`` and ``faults`` are per vCPU index;
    ``non_vcpu_faults`` counts begins of threads that are no vCPU (cpu -1).
    """

    def __init__(self) -> None:
        self.blocked_ns: dict[int, int] = {}
        self.faults: dict[int, int] = {}
        self.non_vcpu_faults = 0
        # Sweep state: outstanding faults and time of the last event, per vCPU.
        self._level: dict[int, int] = {}
        self._last: dict[int, int] = {}

    def sweep(
        self,
        kind: npt.NDArray[np.int8],
        cpu: I64,
        pos: I64,
        ts: I64,
        is_new: Bools,
        placed_before: Bools,
        resolved: Bools,
        placement_of: Callable[[I64], tuple[I64, I64]],
    ) -> None:
        """Account one round of waiters; ``placement_of(w)`` gives the position and
        time of the placements that resolved the waiters ``w``."""
        begin = kind == 1
        if not np.any(begin):
            return
        new_begin = begin & is_new & ~placed_before
        vcpu = cpu >= 0
        self.non_vcpu_faults += int(np.count_nonzero(new_begin & ~vcpu))
        starts = np.flatnonzero(new_begin & vcpu)
        ends = np.flatnonzero(begin & vcpu & resolved)
        ev_cpu = np.concatenate([cpu[starts], cpu[ends]])
        if ev_cpu.size == 0:
            return
        end_pos, end_ts = placement_of(ends)
        ev_pos = np.concatenate([pos[starts], end_pos])
        ev_ts = np.concatenate([ts[starts], end_ts])
        ev_delta = np.concatenate([np.ones(starts.size, np.int64), -np.ones(ends.size, np.int64)])
        for c in distinct(ev_cpu):
            sel = np.flatnonzero(ev_cpu == c)
            # Begins sort before ends at the same line (they cannot share one).
            o = sel[np.lexsort((-ev_delta[sel], ev_pos[sel]))]
            t, d = ev_ts[o], ev_delta[o]
            level0 = self._level.get(c, 0)
            last = self._last.get(c, int(t[0]))
            levels = level0 + np.cumsum(d)
            before = np.concatenate([[level0], levels[:-1]])
            prev_t = np.concatenate([[last], t[:-1]])
            blocked = int(np.sum(np.where(before > 0, np.maximum(t - prev_t, 0), 0)))
            self.blocked_ns[c] = self.blocked_ns.get(c, 0) + blocked
            self._level[c] = max(int(levels[-1]), 0)
            self._last[c] = int(t[-1])
            self.faults[c] = self.faults.get(c, 0) + int(np.count_nonzero(d > 0))


class FaultMatcher:
    """Matches each round of events; keeps the outstanding waiters between rounds.

    :meth:`match` returns the fault requests each round resolved;
    :meth:`block_analyses` the per-block counts so far.  Counts of requests and
    placements whose block was never known are ``unattributed_faults`` and
    :attr:`unattributed_placements`.
    """

    def __init__(self, blocks: BlockMap) -> None:
        self._map = blocks
        self._tallies: list[_BlockTally] = []
        self._waiters = _Waiters.empty()
        # Placements of known blocks matched so far (the backlog's running count).
        self._placements_matched = 0
        self._held = _HeldPlacements()
        self.unattributed_faults = 0
        self.blocktime = VcpuBlocktime()

    @property
    def outstanding(self) -> int:
        """Fault requests and blocktime begins still waiting for their page."""
        return len(self._waiters)

    @property
    def unattributed_placements(self) -> int:
        """Placements whose block is still unknown (held back or dropped)."""
        return self._held.count + self._held.dropped

    def _sync_tallies(self) -> None:
        """One tally per block of the map (blocks are learned while decoding)."""
        while len(self._tallies) < len(self._map):
            self._tallies.append(_BlockTally())

    def _switch_to_subpage(self, addr: U64, blk: I64) -> None:
        for b in self._map.switch_to_subpage(addr, blk):
            # Re-express the placed-page map in 4 KiB pieces so that earlier
            # whole pages stay placed.
            tally = self._tallies[b]
            tally.placed = np.repeat(tally.placed, self._map[b].page_size // SMALL_PAGE)

    def _account_placements(
        self, addr: U64, blk: I64, zero: Bools, ts: I64, pos: I64
    ) -> tuple[U64, U64, I64]:
        """Mark placements (earlier ones first) and update per-block counters.

        Returns the sorted :func:`sort_keys` of the placements, their page keys
        and the permutation that sorted them, for matching waiters.  ``pos``
        empty means "before this round" (held-back placements released).
        """
        if addr.size == 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
        self._switch_to_subpage(addr, blk)
        units = self._map.units(addr, blk)
        if np.any(units >= MAX_UNITS):
            raise ArtifactError("trace: a RAMBlock larger than 2**32 pages")
        if pos.size == 0:
            pos = np.zeros(addr.size, dtype=np.int64)
        comp = sort_keys(page_keys(blk, units), pos)
        order = np.argsort(comp)
        scomp = comp[order]
        skey = scomp >> np.uint64(POSITION_BITS)
        first = np.ones(skey.size, dtype=np.bool_)
        first[1:] = skey[1:] != skey[:-1]
        sblk = blk[order]
        sunits = units[order]
        szero = zero[order]
        soff = self._map.offsets(addr[order], sblk)
        sts = ts[order]
        # Blocks are contiguous in key order.
        bounds = np.flatnonzero(np.diff(sblk)) + 1
        for lo, hi in zip(
            np.concatenate([[0], bounds]).tolist(),
            np.concatenate([bounds, [skey.size]]).tolist(),
            strict=True,
        ):
            tally = self._tallies[int(sblk[lo])]
            u = sunits[lo:hi]
            tally.ensure_units(int(u.max()) + 1)
            new = first[lo:hi] & ~tally.placed[u]
            tally.placed[u] = True
            n_new = int(np.count_nonzero(new))
            tally.placements += hi - lo
            tally.pages_placed += n_new
            tally.zero_pages += int(np.count_nonzero(new & szero[lo:hi]))
            tally.offsets_or |= int(np.bitwise_or.reduce(soff[lo:hi]))
            tally.any_placement = True
            tally.span.see(int(sts[lo:hi].min()), int(sts[lo:hi].max()))
        return scomp, skey, order

    def _release_held(self) -> None:
        """Account held-back placements whose block became known; they precede this round."""
        released = self._held.release(self._map)
        if released is not None:
            addr, blk, zero, ts = released
            self._account_placements(addr, blk, zero, ts, np.zeros(0, np.int64))

    def match(self, found: DecodedEvents) -> FaultBatch:
        """Match placements and waiters of ``found`` (all later than anything matched before)."""
        self._sync_tallies()
        if found.events() == 0 and not self._held:
            return FaultBatch.empty(self._map.names)
        self._release_held()
        # Rank every event by (time, line): positions in the sort keys below.
        n_p, n_r = found.place_seq.size, found.req_seq.size
        all_ts = np.concatenate([found.place_ts, found.req_ts, found.begin_ts])
        all_seq = np.concatenate([found.place_seq, found.req_seq, found.begin_seq])
        rank = np.empty(all_ts.size, dtype=np.int64)
        rank[np.lexsort((all_seq, all_ts))] = np.arange(1, all_ts.size + 1)
        place_pos, req_pos, begin_pos = rank[:n_p], rank[n_p : n_p + n_r], rank[n_p + n_r :]
        # Requests first: their blocks were learned before this round.
        req_blk = self._map.lookup(found.req_hva)
        unattributed = req_blk < 0
        if np.any(unattributed):
            self.unattributed_faults += int(np.count_nonzero(unattributed))
        ok = ~unattributed
        begin_blk = self._map.lookup(found.begin_addr)
        bok = begin_blk >= 0

        # Placements: attribute, hold back the unknown ones.
        p_blk = self._map.lookup(found.place_addr)
        p_known = p_blk >= 0
        if not np.all(p_known):
            self._held.hold(
                found.place_addr[~p_known], found.place_ts[~p_known], found.place_zero[~p_known]
            )
        p_addr = found.place_addr[p_known]
        p_blk = p_blk[p_known]
        p_pos = place_pos[p_known]
        p_ts = found.place_ts[p_known]
        # Switch to sub-page resolution before the placed map is read, so the
        # waiters' keys and the placements' keys use the same unit.
        if p_addr.size:
            self._switch_to_subpage(p_addr, p_blk)

        # Waiters: outstanding ones (position 0) plus this round's requests and begins.
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

        w_units = self._map.units(w_hva, w_blk) if w_hva.size else np.zeros(0, np.int64)
        # Placed before the request: in an earlier round (the map as it is now) ...
        placed_before = np.zeros(w_hva.size, dtype=np.bool_)
        for b in distinct(w_blk[is_new]):
            tally = self._tallies[b]
            sel = np.flatnonzero(is_new & (w_blk == b))
            u = w_units[sel]
            inside = u < tally.placed.size
            placed_before[sel[inside]] = tally.placed[u[inside]]

        scomp, skey, order = self._account_placements(
            p_addr, p_blk, found.place_zero[p_known], p_ts, p_pos
        )
        n_place = int(skey.size)
        w_key = page_keys(w_blk, w_units)
        j = np.searchsorted(scomp, sort_keys(w_key, w_pos), side="right")
        jc = np.minimum(j, max(n_place - 1, 0))
        if n_place:
            resolved = (j < n_place) & (skey[jc] == w_key)
            # ... or earlier in this round.
            jp = np.maximum(j - 1, 0)
            placed_before |= is_new & (j > 0) & (skey[jp] == w_key)
        else:
            resolved = np.zeros(w_hva.size, dtype=np.bool_)
        resolved &= ~placed_before
        # Sentinel for "not resolved in this round": duplicates share it.
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
        for b in distinct(r_blk):
            sel = r_blk == b
            tally = self._tallies[b]
            tally.resolved += int(np.count_nonzero(sel))
            tally.negative_latencies += int(np.count_nonzero(negative & sel))
            tally.latency.record_many(latency[sel])
            tally.backlog.record_many(backlog[sel])
        # Pages whose placement resolved at least one request.
        if r.size:
            first_use = np.zeros(p_blk.size, dtype=np.bool_)
            first_use[placed_at] = True
            counts = np.bincount(p_blk[first_use], minlength=len(self._tallies))
            for b in np.flatnonzero(counts).tolist():
                self._tallies[b].pages_requested += int(counts[b])

        # Times of new requests (placements' times were taken in _account_placements).
        nr = np.flatnonzero(is_new & is_req)
        for b in distinct(w_blk[nr]):
            t = w_ts[nr][w_blk[nr] == b]
            self._tallies[b].span.see(int(t.min()), int(t.max()))

        def placement_of(w: I64) -> tuple[I64, I64]:
            return key_positions(scomp[j[w]]), p_ts[order[j[w]]]

        self.blocktime.sweep(
            w_kind, w_cpu, w_pos, w_ts, is_new, placed_before, resolved, placement_of
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
            block_names=self._map.names,
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
        for b in distinct(w_blk[new_req]):
            sel = new_req & (w_blk == b)
            tally = self._tallies[b]
            tally.faults += int(np.count_nonzero(sel))
            tally.already_placed += int(np.count_nonzero(sel & placed_before))
            tally.duplicate_requests += int(np.count_nonzero(sel & dup))

    def block_analyses(self) -> tuple[BlockAnalysis, ...]:
        """Per-block results, in block index order; outstanding requests are unresolved."""
        self._sync_tallies()
        pending_req = self._waiters.kind == 0
        unresolved = np.bincount(
            self._waiters.block[pending_req], minlength=len(self._tallies)
        ).tolist()
        return tuple(
            tally.analysis(blk, int(unresolved[blk.index]))
            for blk, tally in zip(self._map, self._tallies, strict=True)
        )
