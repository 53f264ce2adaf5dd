"""Hugepage pools: grow by the shortfall, give back exactly what was added."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from migrator.errors import HugepageShortfall, MissingResource
from migrator.hosts import hugepages
from migrator.hosts.fake import FakeHost
from migrator.hosts.hugepages import (
    claimed_hugepages,
    find_hugetlbfs_mount,
    hugetlbfs_dir,
    reserve_hugepages,
)
from tests.unit.fake_kernel import POOL, FakeKernel, writes_besides_claims


def kernel_with_pool(total: int, free: int, limit: int) -> FakeHost:
    """A fake host on a kernel (without a boot_id) whose pool can grow to ``limit`` pages."""
    return FakeKernel(total, free, limit).host()


def writes(host: FakeHost) -> list[str]:
    """The values ``host`` wrote to nr_hugepages, in order."""
    return [c[2] for c in host.calls if c[:2] == ("write", str(POOL / "nr_hugepages"))]


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
    assert not writes_besides_claims(host)


class TransientKernel(FakeKernel):
    """A kernel that finds fewer free ranges than asked the first ``misses`` times."""

    def __init__(self, misses: int, total: int, free: int, limit: int) -> None:
        super().__init__(total, free, limit)
        self.misses = misses
        self.found = total + 1  # while it misses, the pool grows to this at most

    def _write(self, data: bytes) -> None:
        asked = int(data)
        if asked > self.found and self.misses:
            self.misses -= 1
            asked = self.found
        super()._write(str(asked).encode())


async def test_a_pool_that_grows_short_at_first_is_asked_again() -> None:
    kernel = TransientKernel(misses=1, total=0, free=0, limit=8)
    host = kernel.host()
    async with reserve_hugepages(host, 1048576, 2) as added:
        assert added == 2
    assert writes(host) == ["2", "2", "0"]
    compactions = [c for c in host.calls if c[:2] == ("write", "/proc/sys/vm/compact_memory")]
    assert len(compactions) == 1


async def test_a_pool_that_stays_short_is_a_shortfall_after_the_retries() -> None:
    kernel = TransientKernel(misses=99, total=0, free=0, limit=8)
    host = kernel.host()
    with pytest.raises(HugepageShortfall):
        async with reserve_hugepages(host, 1048576, 2):
            pass
    assert len(writes(host)) == 1 + len(hugepages.GROW_RETRY_DELAYS_S) + 1  # + give-back
    assert host.text(POOL / "nr_hugepages").strip() == "0"


async def test_shortfall_names_counts_and_restores() -> None:
    host = kernel_with_pool(total=0, free=0, limit=1)
    with pytest.raises(HugepageShortfall) as caught:
        async with reserve_hugepages(host, 1048576, 2):
            pytest.fail("must not get here")
    assert "need 2 free 1 GiB pages, only 1" in str(caught.value)
    assert host.text(POOL / "nr_hugepages").strip() == "0"


async def test_hosts_on_one_kernel_do_not_count_the_same_free_pages_twice() -> None:
    # Two namespaces of one machine: 3 pages free, each host needs 2.
    kernel = FakeKernel(total=3, free=3, limit=10, boot_id="0f1e-same")
    a, b = kernel.host("a"), kernel.host("b")
    async with reserve_hugepages(a, 1048576, 2) as added_a:
        assert added_a == 0
        assert await claimed_hugepages(b, 1048576) == 2
        async with reserve_hugepages(b, 1048576, 2) as added_b:
            # b sees 3 available, 2 of them claimed by a: it grows the pool by 1.
            assert added_b == 1
            assert kernel.total == 4
            assert await claimed_hugepages(a, 1048576) == 4
        assert kernel.total == 3
        assert await claimed_hugepages(a, 1048576) == 2
    assert await claimed_hugepages(a, 1048576) == 0
    assert writes(a) == []
    assert writes(b) == ["4", "3"]


async def test_shortfall_on_a_shared_kernel_names_the_claim() -> None:
    kernel = FakeKernel(total=2, free=2, limit=3, boot_id="same")
    a, b = kernel.host("a"), kernel.host("b")
    async with reserve_hugepages(a, 1048576, 2):
        with pytest.raises(HugepageShortfall) as caught:
            async with reserve_hugepages(b, 1048576, 2):
                pytest.fail("must not get here")
        assert caught.value.free == 1
        assert caught.value.claimed == 2
        assert "2 more are claimed by this controller's other reservations" in str(caught.value)
        # The partial growth was given back, and b's failed claim left nothing behind.
        assert kernel.total == 2
        assert await claimed_hugepages(a, 1048576) == 2
    assert await claimed_hugepages(a, 1048576) == 0


async def test_concurrent_reservations_on_one_kernel_are_serialised() -> None:
    kernel = FakeKernel(total=0, free=0, limit=10, boot_id="same")
    a, b = kernel.host("a"), kernel.host("b")
    both_in = asyncio.Barrier(3)

    async def hold(host: FakeHost) -> int:
        async with reserve_hugepages(host, 1048576, 2) as added:
            await both_in.wait()
            await both_in.wait()
        return added

    tasks = [asyncio.create_task(hold(a)), asyncio.create_task(hold(b))]
    await both_in.wait()
    # Neither lost the other's write: the pool holds both reservations.
    assert kernel.total == 4
    await both_in.wait()
    assert sorted([await task for task in tasks]) == [2, 2]
    assert kernel.total == 0


async def test_pages_already_mapped_by_a_claimant_count_conservatively() -> None:
    kernel = FakeKernel(total=0, free=0, limit=10, boot_id="same")
    a, b = kernel.host("a"), kernel.host("b")
    async with reserve_hugepages(a, 1048576, 2):
        kernel.map_pages(2)  # a's QEMU maps its pages: they leave "free", the claim stays
        async with reserve_hugepages(b, 1048576, 2) as added_b:
            assert added_b == 4  # more than strictly needed, never less
        assert kernel.total == 2
        kernel.map_pages(-2)
    assert kernel.total == 0


class PlacingKernel(FakeKernel):
    """A kernel where a claimant's QEMU maps pages of its claim as the pool grows.

    As a post-copy destination does: it discarded pages (they went back to the
    pool's free count) and places them again as they arrive.
    """

    def __init__(self, placed_per_write: int, **pool: int) -> None:
        super().__init__(boot_id="placing", **pool)
        self.placed_per_write = placed_per_write
        self.to_place = 0

    def _write(self, data: bytes) -> None:
        super()._write(data)
        placed = min(self.placed_per_write, self.to_place)
        self.to_place -= placed
        self.map_pages(placed)


async def test_pages_a_claimant_maps_while_the_pool_grows_are_grown_again() -> None:
    kernel = PlacingKernel(placed_per_write=2, total=0, free=0, limit=20)
    a, b = kernel.host("a"), kernel.host("b")
    async with reserve_hugepages(a, 1048576, 4):
        kernel.map_pages(2)  # a's QEMU holds 2 of its 4 pages; 2 are discarded (free)
        kernel.to_place = 2
        async with reserve_hugepages(b, 1048576, 4) as added_b:
            # Read: 2 available, 4 claimed: grown by 6.  Meanwhile a placed its 2 pages,
            # so 2 more are needed: grown again.
            assert added_b == 8
            assert kernel.total - kernel.used >= 4  # b's pages are there
        assert kernel.total == 4
        kernel.unmap_pages(4)
    assert kernel.total == 0


async def test_hosts_on_different_kernels_claim_independently() -> None:
    first = FakeKernel(total=2, free=2, limit=2, boot_id="boot-1")
    second = FakeKernel(total=2, free=2, limit=2, boot_id="boot-2")
    a, b = first.host("a"), second.host("b")
    async with reserve_hugepages(a, 1048576, 2), reserve_hugepages(b, 1048576, 2) as added:
        assert added == 0
        assert await claimed_hugepages(a, 1048576) == 2
        assert await claimed_hugepages(b, 1048576) == 2
    assert writes(a) == writes(b) == []


async def test_a_host_without_boot_id_is_a_kernel_of_its_own() -> None:
    kernel = FakeKernel(total=2, free=2, limit=2)
    a, b = kernel.host("a"), kernel.host("b")
    async with reserve_hugepages(a, 1048576, 2):
        assert await claimed_hugepages(a, 1048576) == 2
        assert await claimed_hugepages(b, 1048576) == 0


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


async def test_another_runs_own_mount_is_not_used() -> None:
    # That run unmounts it when it ends, under whatever a second run keeps there.
    host = FakeHost()
    host.set_text("/proc/mounts",
                  "none /run/migrator/hugetlbfs-2048k-other-run hugetlbfs rw,pagesize=2M 0 0\n")
    assert await find_hugetlbfs_mount(host, 2048) is None
    host.set_text("/proc/mounts",
                  "none /run/migrator/hugetlbfs-2048k-other-run hugetlbfs rw,pagesize=2M 0 0\n"
                  "none /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n")
    assert await find_hugetlbfs_mount(host, 2048) == Path("/dev/hugepages")


async def test_mounts_when_missing_and_unmounts() -> None:
    host = FakeHost()
    host.set_text("/proc/mounts", "proc /proc proc rw 0 0\n")
    async with hugetlbfs_dir(host, 1048576, "r2") as directory:
        mount = directory.parent
        assert mount.parent == Path("/run/migrator")
        assert mount.name.startswith("hugetlbfs-1048576k-r2-")
        # Each call its own mount point: two hosts of one run may share /run.
        async with hugetlbfs_dir(host, 1048576, "r2") as second:
            assert second.parent != mount
    runs = [c[1:] for c in host.calls if c[0] == "run"]
    assert runs[0][:4] == ("mount", "-t", "hugetlbfs", "-o")
    assert runs[-1] == ("umount", str(mount))


async def test_a_reservation_cancelled_while_the_pool_grows_gives_the_growth_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The first try finds 1 of 2 pages; Ctrl-C comes while it waits to try again.
    monkeypatch.setattr(hugepages, "GROW_RETRY_DELAYS_S", (10.0,))
    kernel = TransientKernel(misses=5, total=0, free=0, limit=8)
    host = kernel.host()

    async def reserve() -> None:
        async with reserve_hugepages(host, 1048576, 2):
            raise AssertionError("the reservation cannot complete")

    task = asyncio.create_task(reserve())
    await asyncio.sleep(0.1)  # inside the retry delay
    assert kernel.total == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert kernel.total == 0
    assert writes(host) == ["2", "0"]


NODE1 = Path("/sys/devices/system/node/node1/hugepages/hugepages-2048kB")
GLOBAL_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


def two_node_host(node1_total: int, node1_free: int) -> FakeHost:
    """A host whose 2 MiB pool has 8 free pages on node 0 and what is given on node 1."""
    host = FakeHost("numa")
    state = {"total": node1_total, "used": node1_total - node1_free}

    def publish() -> None:
        host.set_text(NODE1 / "nr_hugepages", f"{state['total']}\n")
        host.set_text(NODE1 / "free_hugepages", f"{state['total'] - state['used']}\n")
        host.set_text(GLOBAL_2M / "nr_hugepages", f"{8 + state['total']}\n")
        host.set_text(GLOBAL_2M / "free_hugepages", f"{8 + state['total'] - state['used']}\n")

    def write(data: bytes) -> None:
        state["total"] = max(state["used"], int(data))
        publish()

    host.set_text(NODE1 / "surplus_hugepages", "0\n")
    host.set_text(GLOBAL_2M / "resv_hugepages", "0\n")
    host.set_text(GLOBAL_2M / "surplus_hugepages", "0\n")
    host.on_write[NODE1 / "nr_hugepages"] = write
    publish()
    return host


async def test_a_node_s_own_pool_grows_for_ram_bound_to_it() -> None:
    # 9 pages free in the whole kernel, but only 1 on node 1: node 1's pool grows by 2.
    host = two_node_host(node1_total=1, node1_free=1)
    async with reserve_hugepages(host, 2048, 3, node=1) as added:
        assert added == 2
        assert host.text(NODE1 / "nr_hugepages").strip() == "3"
    assert host.text(NODE1 / "nr_hugepages").strip() == "1"
    # The global pool was never written: only node 1's.
    pool_writes = [c[1] for c in host.calls if c[0] == "write" and "hugepages-" in c[1]]
    assert pool_writes == [str(NODE1 / "nr_hugepages")] * 2


async def test_a_node_without_the_page_size_is_a_missing_resource() -> None:
    host = two_node_host(node1_total=0, node1_free=0)
    with pytest.raises(MissingResource, match="NUMA node 3 offers no 2048 kB hugepages"):
        async with reserve_hugepages(host, 2048, 1, node=3):
            pytest.fail("must not get here")
