"""Hugepage pools and hugetlbfs mounts: take what a run needs, give it all back.

The kernel keeps one pool per page size under
``/sys/kernel/mm/hugepages/hugepages-<size>kB/``.  A reservation grows a pool by
exactly the shortfall (never writes an absolute value it did not compute from
what it read) and shrinks it by exactly what it added, so concurrent users of
the pool and the machine's own configuration are left alone.

**NUMA nodes.**  Each node also has its own pool of each size, under
``/sys/devices/system/node/nodeN/hugepages/``; the global pool is their sum.  A
reservation for guest RAM bound to one node (``[placement.*] memory_node``)
grows and shrinks that node's pool, since the kernel takes a bound mapping's
pages from the node alone.  A node's pool does not show its reserved pages, so
the whole kernel's reserved count is taken from its free ones (never too few).

**Claims.**  Two "hosts" can share one kernel, hence one pool: two network
namespaces on one machine (the test hosts), two runs driven by one controller,
or two migrator processes started side by side.  The pool's free count does not
show pages that a reservation has been promised but that no QEMU has mapped
yet, so each reservation also *claims* its pages: in a process-wide table keyed
by the kernel's identity (``/proc/sys/kernel/random/boot_id``, read through the
:class:`Host`, so the same kernel reached as two hosts is recognised) and the
page size, and in a claim file on the host that other migrator processes see
(:mod:`migrator.hosts.pool_claims`).  A new reservation counts only
``available - claimed`` as free.  This is conservative: pages a claimant's QEMU
has already mapped are out of ``available`` *and* still claimed, so the pool may
be grown by more than was strictly needed (and shrunk back by the same amount on
exit), never by less.  Pages that a claimant maps while the pool grows (post-copy
placing pages it had discarded) leave the free count after it was read: the pool
is then grown again by what is missing (:data:`GROW_ROUNDS`).  Reading the pool,
growing it and recording the claim happen under one lock per kernel and page size
in this process and under the host's pool lock across processes, so no two
reservations count the same free pages or lose each other's write to
``nr_hugepages``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from secrets import token_hex

from migrator.errors import HostError, HugepageShortfall, MigratorError, MissingResource
from migrator.hosts.base import Host
from migrator.hosts.identity import kernel_identity
from migrator.hosts.pool_claims import hold_claim, hold_pool_lock, other_processes_claims
from migrator.hosts.topology import NODES

__all__ = [
    "HugepagePool",
    "claimed_hugepages",
    "find_hugetlbfs_mount",
    "hugetlbfs_dir",
    "read_pool",
    "reserve_hugepages",
]

log = logging.getLogger(__name__)

SYSFS = Path("/sys/kernel/mm/hugepages")

# (kernel identity, page size in kB): one hugepage pool.
_PoolKey = tuple[str, int]

# Pages promised to the reservations now open in this process, per pool.  Only
# changed between two awaits (never across one), so one event loop needs no lock
# for the table itself.
_claimed: dict[_PoolKey, int] = {}

# asyncio locks belong to the event loop that first waited on them; a process can
# run several loops one after another (asyncio.run per command, per test), so the
# locks are kept per loop and vanish with it.
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_PoolKey, asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def _pool_lock(key: _PoolKey) -> asyncio.Lock:
    """The lock that serialises reading, resizing and claiming one pool in this event loop."""
    per_loop = _locks.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(key, asyncio.Lock())


@dataclass(frozen=True)
class HugepagePool:
    """One page size's pool as the kernel reports it."""

    page_size_kib: int
    total: int
    free: int
    reserved: int
    surplus: int

    @property
    def available(self) -> int:
        """Pages a new mapping could still get without growing the pool."""
        return self.free - self.reserved


def _pool_dir(page_size_kib: int, node: int | None = None) -> Path:
    base = SYSFS if node is None else NODES / f"node{node}" / "hugepages"
    return base / f"hugepages-{page_size_kib}kB"


async def _read_int(host: Host, path: Path) -> int:
    return int((await host.read_text(path)).strip())


async def read_pool(host: Host, page_size_kib: int, node: int | None = None) -> HugepagePool:
    """Read one pool, of the whole kernel or of NUMA ``node``; :class:`MissingResource` if
    the kernel (or node) has no such page size.

    A node's ``reserved`` is the whole kernel's (see the module docstring).
    """
    base = _pool_dir(page_size_kib, node)
    if not await host.exists(base):
        where = "this kernel" if node is None else f"NUMA node {node}"
        raise MissingResource(
            f"{base}: {where} offers no {page_size_kib} kB hugepages on {host.name}"
        )
    return HugepagePool(
        page_size_kib,
        total=await _read_int(host, base / "nr_hugepages"),
        free=await _read_int(host, base / "free_hugepages"),
        reserved=await _read_int(host, _pool_dir(page_size_kib) / "resv_hugepages"),
        surplus=await _read_int(host, base / "surplus_hugepages"),
    )


async def _set_total(host: Host, page_size_kib: int, total: int, node: int | None) -> None:
    await host.write_file(_pool_dir(page_size_kib, node) / "nr_hugepages",
                          f"{total}\n".encode())


COMPACT_MEMORY = Path("/proc/sys/vm/compact_memory")
# The kernel grows a pool only where it finds whole aligned free (or movable) ranges: for
# 1 GiB pages, right after another run gave its pages back, a first try can find fewer than
# asked (measured: 1 of 2, once in 6 main jobs run back to back) and a later one all.
GROW_RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0)
# A claimant's QEMU may map pages of its claim while the pool grows (post-copy places
# pages that it had discarded, and so free): they leave the free count, yet were already
# subtracted as claimed, so a pool grown by the shortfall first read can come out short of
# it.  It is grown again by what is missing; the whole claim mapped at once bounds that.
GROW_ROUNDS = 4


async def _grow(host: Host, page_size_kib: int, before: int, total: int,
                node: int | None) -> HugepagePool:
    """Ask for ``total`` pages in the pool, retrying with memory compaction; the pool after.

    Interrupted or failing between the first write and the return (the retries
    take seconds), it sets the pool back to ``before``: the caller only learns how
    much it added from the return value, so it could not give the pages back.
    """
    try:
        await _set_total(host, page_size_kib, total, node)
        grown = await read_pool(host, page_size_kib, node)
        for delay in GROW_RETRY_DELAYS_S:
            if grown.total >= total:
                break
            log.info("%s: hugepages-%dkB grew to %d of %d; compacting memory and asking again",
                     host.name, page_size_kib, grown.total, total)
            # Best effort: compaction makes contiguous ranges; without it the retry may do.
            with contextlib.suppress(OSError, MigratorError):
                await host.write_file(COMPACT_MEMORY, b"1\n")
            await asyncio.sleep(delay)
            await _set_total(host, page_size_kib, total, node)
            grown = await read_pool(host, page_size_kib, node)
    except BaseException:
        with contextlib.suppress(Exception):
            await _set_total(host, page_size_kib, before, node)
        raise
    return grown


async def claimed_hugepages(host: Host, page_size_kib: int) -> int:
    """Pages of this size that open reservations of this process hold on ``host``'s kernel."""
    return _claimed.get((await kernel_identity(host), page_size_kib), 0)


def _release(key: _PoolKey, pages: int) -> None:
    left = _claimed.get(key, 0) - pages
    if left > 0:
        _claimed[key] = left
    else:
        _claimed.pop(key, None)


@asynccontextmanager
async def reserve_hugepages(host: Host, page_size_kib: int, needed: int,
                            node: int | None = None) -> AsyncIterator[int]:
    """Make ``needed`` pages of this size available; yields how many pages were added.

    With ``node``, on that NUMA node: its own pool is read, grown and shrunk.

    Pages claimed by other open reservations on the same kernel, of this process
    or of other migrator processes (:mod:`migrator.hosts.pool_claims`), do not
    count as available.  The claim holds until exit; on exit the pool also
    shrinks by what was added.  Raises :class:`HugepageShortfall` (after giving
    back any partial growth) when the kernel cannot supply them.
    """
    key = (await kernel_identity(host), page_size_kib)
    added = 0
    claimed = False
    # Holds this reservation's claim file until after the pool has shrunk back.
    async with AsyncExitStack() as claim:
        try:
            async with _pool_lock(key), hold_pool_lock(host):
                pool = await read_pool(host, page_size_kib, node)
                others = _claimed.get(key, 0) + await other_processes_claims(host, page_size_kib)
                for _ in range(GROW_ROUNDS):
                    shortfall = max(0, needed - (pool.available - others))
                    if not shortfall:
                        break
                    try:
                        grown = await _grow(host, page_size_kib, pool.total,
                                            pool.total + shortfall, node)
                    except PermissionError:
                        raise HugepageShortfall(page_size_kib, needed,
                                                max(0, pool.available - others),
                                                claimed=others) from None
                    added += grown.total - pool.total
                    log.info("%s: hugepages-%dkB%s grown %d -> %d (asked +%d; %d claimed by "
                             "other reservations)", host.name, page_size_kib, _on(node),
                             pool.total, grown.total, shortfall, others)
                    complete = grown.total >= pool.total + shortfall
                    pool = grown
                    if not complete:
                        break  # the kernel found no more: asking again will not help
                if pool.available - others < needed:
                    raise HugepageShortfall(page_size_kib, needed,
                                            max(0, pool.available - others), claimed=others)
                await claim.enter_async_context(hold_claim(host, page_size_kib, needed))
                _claimed[key] = _claimed.get(key, 0) + needed
                claimed = True
            yield added
        finally:
            try:
                if added:
                    async with _pool_lock(key), hold_pool_lock(host):
                        now = await read_pool(host, page_size_kib, node)
                        await _set_total(host, page_size_kib, max(0, now.total - added), node)
                    log.info("%s: hugepages-%dkB%s given back: %d pages",
                             host.name, page_size_kib, _on(node), added)
            finally:
                # Dropped only after the shrink (a reservation that reads the pool in
                # between over-counts, never under-counts), and without awaiting, so a
                # second cancellation cannot leave the claim behind.
                if claimed:
                    _release(key, needed)


def _on(node: int | None) -> str:
    return "" if node is None else f" on node {node}"


def _pagesize_kib_of_mount(options: str) -> int | None:
    for option in options.split(","):
        if option.startswith("pagesize="):
            value = option.removeprefix("pagesize=")
            units = {"K": 1, "M": 1024, "G": 1024 * 1024}
            return int(value[:-1]) * units[value[-1].upper()]
    return None


# Where a run mounts a hugetlbfs of its own when the host has none (see hugetlbfs_dir).
RUN_MOUNTS = Path("/run/migrator")


async def find_hugetlbfs_mount(
    host: Host, page_size_kib: int, default_kib: int = 2048
) -> Path | None:
    """A lasting hugetlbfs mount point for this page size, or None if there is none.

    Another migrator run's own mount (under :data:`RUN_MOUNTS`) does not count: that
    run unmounts it when it ends, whatever runs beside it still keep there.
    """
    for line in (await host.read_text(Path("/proc/mounts"))).splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        # /proc/mounts escapes spaces as \040.
        mount = Path(fields[1].replace("\\040", " "))
        if mount.parent == RUN_MOUNTS:
            continue
        size = _pagesize_kib_of_mount(fields[3]) or default_kib
        if size == page_size_kib:
            return mount
    return None


@asynccontextmanager
async def hugetlbfs_dir(host: Host, page_size_kib: int, run_id: str) -> AsyncIterator[Path]:
    """A private directory on a hugetlbfs of this page size, for QEMU's ``mem-path``.

    Uses an existing mount or mounts one under ``/run/migrator`` for the run; the
    directory (and any file QEMU left in it) and a mount made here are removed
    on exit.  QEMU given a directory creates its file there and unlinks it at
    once, so a killed QEMU leaves nothing behind either.

    A mount made here has a name of its own (``hugetlbfs-SIZEk-RUN-XXXX``): two
    hosts of one run may share a filesystem but not a mount namespace (network
    namespaces of one machine), and removing one host's mount point would detach
    the other's mount at the same path.
    """
    mount = await find_hugetlbfs_mount(host, page_size_kib)
    mounted_here: Path | None = None
    if mount is None:
        mounted_here = RUN_MOUNTS / f"hugetlbfs-{page_size_kib}k-{run_id}-{token_hex(2)}"
        await host.make_private_dir(mounted_here)
        result = await host.run(
            ["mount", "-t", "hugetlbfs", "-o", f"pagesize={page_size_kib}K", "none",
             str(mounted_here)]
        )
        if result.status != 0:
            await host.remove_tree(mounted_here)
            raise MissingResource(
                f"cannot mount hugetlbfs (pagesize={page_size_kib}K) at {mounted_here} on "
                f"{host.name}: {result.stderr.strip()}; run as root"
            )
        mount = mounted_here
    directory = mount / f"migrator-{run_id}"
    try:
        await host.make_private_dir(directory)
        yield directory
    finally:
        await host.remove_tree(directory)
        if mounted_here is not None:
            unmounted = await host.run(["umount", str(mounted_here)])
            if unmounted.status != 0:
                # Never remove a tree across a mount that is still there.
                raise HostError(f"cannot unmount {mounted_here} on {host.name}",
                                argv=["umount", str(mounted_here)], status=unmounted.status,
                                output=unmounted.stderr)
            await host.remove_tree(mounted_here)
