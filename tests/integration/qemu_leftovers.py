"""What a local run must not leave behind: QEMU and zstd processes, sockets, mounts,
hugepages."""

from __future__ import annotations

from pathlib import Path

__all__ = ["POOL", "assert_released", "processes_mentioning", "qemu_processes_mentioning"]

POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")


def processes_mentioning(program: str, text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``program`` and ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if program in cmdline and text in cmdline:
            found.append(int(proc.name))
    return found


def qemu_processes_mentioning(text: str) -> list[int]:
    """PIDs of live QEMU processes whose command line contains ``text``."""
    return processes_mentioning("qemu-system", text)


def assert_released(run_dir: Path, pool_before: str) -> None:
    """No QEMU, trace compressor, socket, mount, hugetlbfs file or extra hugepage outlives
    the run."""
    assert qemu_processes_mentioning(run_dir.name) == []
    assert processes_mentioning("zstd", run_dir.name) == []
    assert not list(run_dir.glob("**/*.sock"))
    assert POOL.read_text() == pool_before
    mounts = Path("/proc/mounts").read_text()
    assert run_dir.name not in mounts
    for line in mounts.splitlines():
        fields = line.split()
        if fields[2] == "hugetlbfs":
            assert not list(Path(fields[1]).glob(f"migrator-{run_dir.name}*"))
