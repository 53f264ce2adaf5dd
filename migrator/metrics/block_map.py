"""The RAMBlock address map: which block, and which page of it, a host address is in.

Blocks come from ``info ramblock`` (page size, length and, on QEMU newer than
7.2, the host address).  A block's host base address is learned from, in this
order of trust: ``info ramblock``'s HVA, a ``postcopy_*_range`` trace line, or
the first fault request that names the block (``(HVA rounded down to the page)
- offset``: QEMU maps every RAMBlock at an address aligned to its page size).
A block that appears in the trace but not in the table is assumed to have
4 KiB pages (logged, and ``page_size_known`` is False).

A page is identified by (block index, page index within the block); the page
unit is the block's page size, or 4 KiB once the block resolves at sub-page
granularity (a HGM run that places 4 KiB pieces of huge pages).  The matcher
sorts pages and trace positions by one ``uint64`` key (:func:`page_keys`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from migrator.errors import ArtifactError
from migrator.metrics.ramblock import RamBlock
from migrator.metrics.trace_text import I64, U64

__all__ = [
    "MAX_UNITS",
    "POSITION_BITS",
    "SMALL_PAGE",
    "BlockMap",
    "MappedBlock",
    "SubpagePolicy",
    "distinct",
    "key_positions",
    "page_keys",
    "sort_keys",
]

log = logging.getLogger(__name__)

SMALL_PAGE = 4096
# The matcher's uint64 sort key: 8 bits of block, 32 bits of page index,
# POSITION_BITS bits of position (rank of the event in its round).
POSITION_BITS = 24
MAX_UNITS = 1 << 32
_MAX_BLOCKS = 255

SubpagePolicy = Literal["auto", "always", "never"]


def distinct(small: I64) -> list[int]:
    """The distinct values of an array of small non-negative ints (block or vCPU
    indices), ascending."""
    if small.size == 0:
        return []
    return np.flatnonzero(np.bincount(small)).tolist()


def page_keys(blk: I64, units: I64) -> U64:
    """One ``uint64`` per page: block index in the high bits, page index below."""
    return (blk.astype(np.uint64) << np.uint64(32)) | units.astype(np.uint64)


def sort_keys(keys: U64, pos: I64) -> U64:
    """Page keys with the position of their event appended (sorts by page, then time)."""
    return (keys << np.uint64(POSITION_BITS)) | pos.astype(np.uint64)


def key_positions(keys: U64) -> I64:
    """The event positions that :func:`sort_keys` appended."""
    return (keys & np.uint64((1 << POSITION_BITS) - 1)).astype(np.int64)


@dataclass
class MappedBlock:
    """One RAMBlock as the map knows it; ``base``/``length`` are None until learned."""

    index: int
    name: str
    page_size: int
    page_size_known: bool
    base: int | None = None
    length: int | None = None
    subpage: bool = False

    @property
    def unit(self) -> int:
        """Bytes per page index: the page size, or 4 KiB when resolving sub-pages."""
        return SMALL_PAGE if self.subpage and self.page_size > SMALL_PAGE else self.page_size


class BlockMap:
    """The RAMBlocks of a trace, in the order they became known, and their addresses.

    ``subpage`` selects how a huge-page block resolves faults: ``"auto"``
    switches to 4 KiB pieces once a placement not aligned to the block's page
    size is seen (HGM), ``"always"``/``"never"`` force it.
    """

    def __init__(self, ramblocks: Iterable[RamBlock], subpage: SubpagePolicy) -> None:
        self.subpage = subpage
        self._blocks: list[MappedBlock] = []
        self._by_name: dict[str, MappedBlock] = {}
        for rb in ramblocks:
            if rb.page_size <= 0 or rb.page_size & (rb.page_size - 1):
                raise ArtifactError(
                    f"RAMBlock {rb.name}: page size {rb.page_size} is no power of 2"
                )
            blk = self._add(rb.name, rb.page_size, known=True)
            blk.length = rb.used
            if rb.hva is not None:
                blk.base = rb.hva
        self._index_bases: U64 = np.zeros(0, np.uint64)
        self._index_ends: U64 = np.zeros(0, np.uint64)
        self._index_ids: I64 = np.zeros(0, np.int64)
        self._reindex()

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, index: int) -> MappedBlock:
        return self._blocks[index]

    def __iter__(self) -> Iterator[MappedBlock]:
        return iter(self._blocks)

    @property
    def names(self) -> tuple[str, ...]:
        """Block names by index."""
        return tuple(b.name for b in self._blocks)

    @property
    def any_base_known(self) -> bool:
        """Whether any address can be attributed yet."""
        return bool(self._index_bases.size)

    # -- learning ---------------------------------------------------------------------------

    def _add(self, name: str, page_size: int, *, known: bool) -> MappedBlock:
        if len(self._blocks) >= _MAX_BLOCKS:
            raise ArtifactError(f"trace: more than {_MAX_BLOCKS} RAMBlocks")
        blk = MappedBlock(len(self._blocks), name, page_size, known)
        self._blocks.append(blk)
        self._by_name[name] = blk
        return blk

    def block_for_name(self, name: str) -> MappedBlock:
        """The block called ``name``; a new one with 4 KiB pages if the table lacks it."""
        blk = self._by_name.get(name)
        if blk is None:
            log.warning(
                "RAMBlock %r is in the trace but not in info ramblock; assuming %d-byte pages",
                name,
                SMALL_PAGE,
            )
            blk = self._add(name, SMALL_PAGE, known=False)
        return blk

    def _set_base(self, blk: MappedBlock, base: int) -> None:
        if blk.base is None:
            blk.base = base
            self._reindex()
        elif blk.base != base:
            log.warning(
                "RAMBlock %s: base 0x%x from the trace, 0x%x known", blk.name, base, blk.base
            )

    def learn_range(self, name: str, host: int, length: int) -> None:
        """A ``postcopy_*_range`` line: block ``name`` starts at ``host``."""
        blk = self.block_for_name(name)
        if blk.length is None:
            blk.length = length
        self._set_base(blk, host)

    def learn_from_requests(
        self, hva: U64, describe: Callable[[int], tuple[str, int] | None]
    ) -> None:
        """Learn the base of every block a request names but whose base is unknown.

        ``describe(i)`` gives the block name and offset printed in request ``i``.
        """
        if hva.size == 0:
            return
        unknown = np.flatnonzero(self.lookup(hva) < 0)
        # Few lines: the first request of each block whose base was unknown.
        seen: set[int] = set()
        for i in unknown.tolist():
            addr = int(hva[i])
            if self.lookup(np.array([addr], dtype=np.uint64))[0] >= 0 or addr in seen:
                continue
            seen.add(addr)
            named = describe(i)
            if named is None:
                continue
            blk = self.block_for_name(named[0])
            offset = named[1]
            page_base = addr & ~(blk.page_size - 1)
            if blk.base is None and page_base >= offset:
                self._set_base(blk, page_base - offset)

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

    # -- addresses --------------------------------------------------------------------------

    def lookup(self, addr: U64) -> I64:
        """Block index of every address; -1 where no known block contains it."""
        if self._index_bases.size == 0 or addr.size == 0:
            return np.full(addr.size, -1, dtype=np.int64)
        slot = np.searchsorted(self._index_bases, addr, side="right") - 1
        safe = np.maximum(slot, 0)
        inside = (slot >= 0) & (addr < self._index_ends[safe])
        return np.where(inside, self._index_ids[safe], -1)

    def offsets(self, addr: U64, blk: I64) -> U64:
        """Offset of every address within its block (``blk``: block indices)."""
        bases = np.array([b.base or 0 for b in self._blocks], dtype=np.uint64)
        return addr - bases[blk]

    def units(self, addr: U64, blk: I64) -> I64:
        """Page index of every address within its block, in the block's current unit."""
        shifts = np.array([b.unit.bit_length() - 1 for b in self._blocks], dtype=np.uint64)
        return (self.offsets(addr, blk) >> shifts[blk]).astype(np.int64)

    def switch_to_subpage(self, addr: U64, blk: I64) -> list[int]:
        """Switch huge-page blocks placed at ``addr`` to 4 KiB units as the policy says.

        Returns the indices of the blocks that switched just now.
        """
        switched: list[int] = []
        if self.subpage == "never":
            return switched
        for b in distinct(blk):
            block = self._blocks[b]
            if block.subpage or block.page_size <= SMALL_PAGE:
                continue
            if self.subpage == "always":
                misaligned = True
            else:
                off = addr[blk == b] - np.uint64(block.base or 0)
                misaligned = bool(np.any(off & np.uint64(block.page_size - 1)))
            if misaligned:
                # A HGM run: placements are 4 KiB pieces of huge pages.
                block.subpage = True
                switched.append(b)
                log.info("RAMBlock %s: sub-page placements seen, resolving at 4 KiB", block.name)
        return switched
