"""HGM detection and smaps sampling on this machine's real kernel and QEMU.

This kernel has no HGM (the series was never merged), so the real MADV_SPLIT
probe must answer EINVAL, and QEMU 7.2 has no ``hugetlb-doublemap``.  The smaps
sampler is run against a real process that maps a 2 MiB hugetlbfs file.
Hugepage pools are shared with whoever else runs on the machine: the tests
check that their own changes to a pool add up to nothing and that nothing of
theirs stays mounted.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from migrator.errors import PreflightError
from migrator.hgm import (
    GuestRamFilter,
    collapse_summary,
    decide_hgm,
    detect_hgm,
    find_guest_ram,
    granularity,
    load_samples,
    parse_smaps,
    sample_smaps,
)
from migrator.hgm.detect import NOT_SUPPORTED
from migrator.hosts.base import CommandResult
from migrator.hosts.hugepages import hugetlbfs_dir, read_pool, reserve_hugepages
from migrator.hosts.local import LocalHost
from migrator.qemu.probe import probe_qemu
from migrator.rundir import JsonlWriter
from tests.integration.conftest import host_qemu_version

PAGE_KIB = 2048
NR_HUGEPAGES = Path(f"/sys/kernel/mm/hugepages/hugepages-{PAGE_KIB}kB/nr_hugepages")


class RecordingHost(LocalHost):
    """The local machine, remembering every command and every pool write it was asked for."""

    def __init__(self) -> None:
        super().__init__("local")
        self.commands: list[tuple[str, ...]] = []
        self.pool_writes: list[int] = []

    async def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, stdin: bytes | None = None
    ) -> CommandResult:
        self.commands.append(tuple(argv))
        return await super().run(argv, timeout=timeout, stdin=stdin)

    async def write_file(self, path: Path, data: bytes) -> None:
        if path == NR_HUGEPAGES:
            self.pool_writes.append(int(data))
        await super().write_file(path, data)


def hugetlbfs_mounts() -> set[str]:
    return {
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[2] == "hugetlbfs"
    }


def assert_pool_writes_cancel_out(before_total: int, writes: list[int]) -> None:
    """Our pool writes were (grow by the shortfall, shrink back to where it was) pairs."""
    assert len(writes) % 2 == 0, writes
    for grow, shrink in zip(writes[::2], writes[1::2], strict=True):
        assert shrink == before_total < grow, writes


async def test_real_probe_on_this_kernel_says_not_supported() -> None:
    host = RecordingHost()
    qemu = await probe_qemu(host, "qemu-system-x86_64")
    before = await read_pool(host, PAGE_KIB)

    support = await detect_hgm(host, qemu)

    after = await read_pool(host, PAGE_KIB)
    assert support.host == "local"
    assert support.kernel_release == os.uname().release
    assert support.madv_split == NOT_SUPPORTED
    # The probe really mapped a shared 2 MiB hugetlb page and got EINVAL for advice 26.
    assert "madvise(0x" in support.probe_detail
    assert ", 2 MiB, 26) on a MAP_SHARED|MAP_HUGETLB 2 MiB page failed: EINVAL" in (
        support.probe_detail
    )
    assert "smaps: KernelPageSize 2048 kB, VmFlags " in support.probe_detail
    flags = support.probe_detail.split("VmFlags ")[1].split()
    assert {"sh", "ht"} <= set(flags)
    assert "hm" not in flags
    assert support.kernel_config in (False, None)
    if support.kernel_config is False:
        assert support.kernel_config_source in (
            f"/boot/config-{os.uname().release}", "/proc/config.gz"
        )
    assert qemu.version == host_qemu_version()
    assert support.qemu_doublemap is False
    assert not support.supported

    with pytest.raises(PreflightError) as caught:
        decide_hgm("require", support)
    message = str(caught.value)
    assert message.startswith(
        f"hgm = require: local: kernel {os.uname().release} lacks MADV_SPLIT "
        "(madvise(26) returned EINVAL"
    )
    assert f"and QEMU {qemu.version} has no hugetlb-doublemap capability" in message
    assert "\n" not in message

    decision = decide_hgm("auto", support)
    assert not decision.enabled
    assert decision.reason == f"hgm = auto: disabled on local: {support.reason}"

    # The pool is as it was; the probe mounted nothing (anonymous MAP_HUGETLB needs no mount).
    assert (after.total, after.surplus) == (before.total, before.surplus)
    assert_pool_writes_cancel_out(before.total, host.pool_writes)
    assert not [c for c in host.commands if c[0] in ("mount", "umount")]
    python3 = [c for c in host.commands if c[0] == "python3"]
    assert len(python3) == 1
    assert python3[0][1:3] == ("-I", "-c")


# A stand-in for QEMU: maps a 2 MiB file on hugetlbfs MAP_SHARED, touches it, unlinks the
# file (as QEMU does), prints the address and waits for stdin to close.
CHILD = r"""
import ctypes, mmap, os, sys
path = os.path.join(sys.argv[1], "guest-ram")
fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, 2 << 20)
ram = mmap.mmap(fd, 2 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
ram[0] = 1
os.unlink(path)
os.close(fd)
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(ram))), flush=True)
sys.stdin.read()
"""


async def test_sampler_on_a_real_process_mapping_hugetlbfs(tmp_path: Path) -> None:
    host = RecordingHost()
    before = await read_pool(host, PAGE_KIB)
    run_id = f"hgm-test-{os.getpid()}"
    async with asyncio.timeout(60):
        async with reserve_hugepages(host, PAGE_KIB, 1), hugetlbfs_dir(
            host, PAGE_KIB, run_id
        ) as directory:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-c", CHILD, str(directory),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert child.stdout is not None
                assert child.stdin is not None
                line = await child.stdout.readline()
                assert line, "the child could not map its hugetlbfs file"
                address = int(line, 16)

                smaps = await host.read_text(Path(f"/proc/{child.pid}/smaps"))
                wanted = GuestRamFilter(size_bytes=2 << 20, path_prefix=str(directory))
                vma = find_guest_ram(parse_smaps(smaps), wanted)
                assert vma is not None
                assert vma.start == address
                assert vma.pathname == f"{directory}/guest-ram"
                assert vma.deleted
                assert (vma.kernel_page_kb, vma.hugetlb_kb, vma.rss_kb) == (2048, 2048, 0)
                # No HGM here: the counters are absent, which the summary must handle.
                assert (vma.pud_kb, vma.pmd_kb, vma.pte_kb, vma.hm) == (None, None, None, False)
                g = granularity(vma)
                assert (g.measured, g.level, g.split_kb) == (False, "pmd", None)

                out = JsonlWriter(tmp_path / "smaps.jsonl")
                sampler = asyncio.create_task(sample_smaps(host, child.pid, out, 50.0, wanted))
                await asyncio.sleep(0.3)
                assert not sampler.done()
                closed_ns = time.time_ns()
                child.stdin.close()
                await child.wait()
                # The sampler ends by itself once the process is gone.
                await asyncio.wait_for(sampler, 5)
                out.close()
            finally:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
    recorded = load_samples(tmp_path / "smaps.jsonl")
    # While the process exits its mapping goes before its smaps does: the last samples may
    # find no guest RAM (recorded as such), but once gone it never comes back.
    found = [s.found for s in recorded]
    assert found == sorted(found, reverse=True)
    samples = [s for s in recorded if s.host_ns < closed_ns]
    assert len(samples) >= 5
    assert all(s.vma == f"{address:x}-{address + (2 << 20):x}" for s in samples)
    assert all((s.pud_kb, s.pmd_kb, s.pte_kb, s.hm) == (None, None, None, False) for s in samples)
    assert all(s.hugetlb_kb == 2048 and s.page_kb == 2048 for s in samples)
    summary = collapse_summary(samples)
    assert summary.status == "no-hgm-stats"
    assert summary.final is not None
    assert summary.final.level == "pmd"

    after = await read_pool(host, PAGE_KIB)
    assert after.total == before.total
    assert_pool_writes_cancel_out(before.total, host.pool_writes)
    # hugetlbfs_dir mounts here when no 2 MiB hugetlbfs was mounted already.
    made_here = f"/run/migrator/hugetlbfs-{PAGE_KIB}k-{run_id}-"
    assert not [mount for mount in hugetlbfs_mounts() if mount.startswith(made_here)]
    left = await host.run(["find", "/run/migrator", "-maxdepth", "1", "-name",
                           f"hugetlbfs-{PAGE_KIB}k-{run_id}-*"])
    assert left.stdout.strip() == ""
    assert not await host.exists(directory)
