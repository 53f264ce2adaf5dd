"""Hugepage pools: grow by the shortfall, give back exactly what was added."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrator.errors import HugepageShortfall, MissingResource
from migrator.hosts.fake import FakeHost
from migrator.hosts.hugepages import find_hugetlbfs_mount, hugetlbfs_dir, reserve_hugepages

POOL = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB")


def kernel_with_pool(total: int, free: int, limit: int) -> FakeHost:
    """A fake kernel whose pool can grow to ``limit`` pages at most."""
    host = FakeHost()
    state = {"total": total, "used": total - free}

    def publish() -> None:
        host.files[POOL / "nr_hugepages"] = f"{state['total']}\n".encode()
        host.files[POOL / "free_hugepages"] = f"{state['total'] - state['used']}\n".encode()

    def on_write(data: bytes) -> None:
        state["total"] = max(state["used"], min(int(data), limit))
        publish()

    publish()
    host.set_text(POOL / "resv_hugepages", "0\n")
    host.set_text(POOL / "surplus_hugepages", "0\n")
    host.on_write[POOL / "nr_hugepages"] = on_write
    return host


async def test_grows_by_shortfall_and_gives_back() -> None:
    host = kernel_with_pool(total=3, free=1, limit=10)
    async with reserve_hugepages(host, 1048576, 2) as added:
        assert added == 1
        assert host.text(POOL / "nr_hugepages").strip() == "4"
    assert host.text(POOL / "nr_hugepages").strip() == "3"


async def test_enough_free_pages_touches_nothing() -> None:
    host = kernel_with_pool(total=4, free=4, limit=4)
    async with reserve_hugepages(host, 1048576, 2) as added:
        assert added == 0
    assert not [c for c in host.calls if c[0] == "write"]


async def test_shortfall_names_counts_and_restores() -> None:
    host = kernel_with_pool(total=0, free=0, limit=1)
    with pytest.raises(HugepageShortfall) as caught:
        async with reserve_hugepages(host, 1048576, 2):
            pytest.fail("must not get here")
    assert "need 2 free 1 GiB pages, only 1" in str(caught.value)
    assert host.text(POOL / "nr_hugepages").strip() == "0"


async def test_unknown_page_size() -> None:
    with pytest.raises(MissingResource, match="no 4 kB hugepages"):
        async with reserve_hugepages(FakeHost(), 4, 1):
            pass


async def test_mount_discovery_and_private_dir() -> None:
    host = FakeHost()
    host.set_text("/proc/mounts", "none /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n"
                                  "none /mnt/huge\\0401g hugetlbfs rw,pagesize=1024M 0 0\n")
    assert await find_hugetlbfs_mount(host, 2048) == Path("/dev/hugepages")
    assert await find_hugetlbfs_mount(host, 1048576) == Path("/mnt/huge 1g")
    async with hugetlbfs_dir(host, 2048, "run1") as directory:
        assert directory == Path("/dev/hugepages/migrator-run1")
        assert directory in host.dirs
    assert directory not in host.dirs
    assert not [c for c in host.calls if c[:2] == ("run", "mount")]


async def test_mounts_when_missing_and_unmounts() -> None:
    host = FakeHost()
    host.set_text("/proc/mounts", "proc /proc proc rw 0 0\n")
    async with hugetlbfs_dir(host, 1048576, "r2") as directory:
        assert directory.parent == Path("/run/migrator/hugetlbfs-1048576k-r2")
    runs = [c[1:] for c in host.calls if c[0] == "run"]
    assert runs[0][:4] == ("mount", "-t", "hugetlbfs", "-o")
    assert runs[-1] == ("umount", "/run/migrator/hugetlbfs-1048576k-r2")
