"""Hugepage pools and hugetlbfs mounts: take what a run needs, give it all back.

The kernel keeps one pool per page size under
``/sys/kernel/mm/hugepages/hugepages-<size>kB/``.  A reservation grows a pool by
exactly the shortfall (never writes an absolute value it did not compute from
what it read) and shrinks it by exactly what it added, so concurrent users of
the pool and the machine's own configuration are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from migrator.errors import HugepageShortfall, MissingResource
from migrator.hosts.base import Host

__all__ = [
    "HugepagePool",
    "find_hugetlbfs_mount",
    "hugetlbfs_dir",
    "read_pool",
    "reserve_hugepages",
]

log = logging.getLogger(__name__)

SYSFS = Path("/sys/kernel/mm/hugepages")


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


def _pool_dir(page_size_kib: int) -> Path:
    return SYSFS / f"hugepages-{page_size_kib}kB"


async def _read_int(host: Host, path: Path) -> int:
    return int((await host.read_text(path)).strip())


async def read_pool(host: Host, page_size_kib: int) -> HugepagePool:
    """Read one pool; :class:`MissingResource` if the kernel has no such page size."""
    base = _pool_dir(page_size_kib)
    if not await host.exists(base):
        raise MissingResource(
            f"{base}: this kernel offers no {page_size_kib} kB hugepages on {host.name}"
        )
    return HugepagePool(
        page_size_kib,
        total=await _read_int(host, base / "nr_hugepages"),
        free=await _read_int(host, base / "free_hugepages"),
        reserved=await _read_int(host, base / "resv_hugepages"),
        surplus=await _read_int(host, base / "surplus_hugepages"),
    )


async def _set_total(host: Host, page_size_kib: int, total: int) -> None:
    await host.write_file(_pool_dir(page_size_kib) / "nr_hugepages", f"{total}\n".encode())


@asynccontextmanager
async def reserve_hugepages(host: Host, page_size_kib: int, needed: int) -> AsyncIterator[int]:
    """Make ``needed`` pages of this size available; yields how many pages were added.

    On exit the pool shrinks by what was added.  Raises :class:`HugepageShortfall`
    (after giving back any partial growth) when the kernel cannot supply them.
    """
    pool = await read_pool(host, page_size_kib)
    shortfall = max(0, needed - pool.available)
    added = 0
    try:
        if shortfall:
            try:
                await _set_total(host, page_size_kib, pool.total + shortfall)
            except PermissionError:
                raise HugepageShortfall(page_size_kib, needed, pool.available) from None
            grown = await read_pool(host, page_size_kib)
            added = grown.total - pool.total
            log.info(
                "%s: hugepages-%dkB grown %d -> %d (asked +%d)",
                host.name, page_size_kib, pool.total, grown.total, shortfall,
            )
            if grown.available < needed:
                raise HugepageShortfall(page_size_kib, needed, grown.available)
        yield added
    finally:
        if added:
            now = await read_pool(host, page_size_kib)
            await _set_total(host, page_size_kib, max(0, now.total - added))
            log.info("%s: hugepages-%dkB given back: %d pages", host.name, page_size_kib, added)


def _pagesize_kib_of_mount(options: str) -> int | None:
    for option in options.split(","):
        if option.startswith("pagesize="):
            value = option.removeprefix("pagesize=")
            units = {"K": 1, "M": 1024, "G": 1024 * 1024}
            return int(value[:-1]) * units[value[-1].upper()]
    return None


async def find_hugetlbfs_mount(
    host: Host, page_size_kib: int, default_kib: int = 2048
) -> Path | None:
    """A hugetlbfs mount point for this page size, or None if there is none."""
    for line in (await host.read_text(Path("/proc/mounts"))).splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        size = _pagesize_kib_of_mount(fields[3]) or default_kib
        if size == page_size_kib:
            # /proc/mounts escapes spaces as \040.
            return Path(fields[1].replace("\\040", " "))
    return None


@asynccontextmanager
async def hugetlbfs_dir(host: Host, page_size_kib: int, run_id: str) -> AsyncIterator[Path]:
    """A private directory on a hugetlbfs of this page size, for QEMU's ``mem-path``.

    Uses an existing mount or mounts one under ``/run/migrator`` for the run; the
    directory (and any file QEMU left in it) and a mount made here are removed
    on exit.  QEMU given a directory creates its file there and unlinks it at
    once, so a killed QEMU leaves nothing behind either.
    """
    mount = await find_hugetlbfs_mount(host, page_size_kib)
    mounted_here: Path | None = None
    if mount is None:
        mounted_here = Path("/run/migrator") / f"hugetlbfs-{page_size_kib}k-{run_id}"
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
            await host.run(["umount", str(mounted_here)])
            await host.remove_tree(mounted_here)
