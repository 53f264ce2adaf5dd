"""A fake kernel's 1 GiB hugepage pool, shared by any number of fake hosts running on it."""

from __future__ import annotations

from pathlib import Path

from migrator.hosts.fake import FakeHost
from migrator.hosts.identity import BOOT_ID
from migrator.hosts.pool_claims import CLAIMS_DIR

__all__ = ["POOL", "FakeKernel", "pool_writes", "writes_besides_claims"]

POOL = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB")
"""The 1 GiB pool's sysfs directory."""


class FakeKernel:
    """One kernel's 1 GiB pool (growable to ``limit`` pages), seen by any number of hosts."""

    def __init__(self, total: int, free: int, limit: int, boot_id: str | None = None) -> None:
        self.total = total
        self.used = total - free
        self.limit = limit
        self.boot_id = boot_id
        self.hosts: list[FakeHost] = []

    def host(self, name: str = "fake") -> FakeHost:
        """A host running on this kernel (e.g. one network namespace of it)."""
        host = FakeHost(name)
        if self.boot_id is not None:
            host.set_text(BOOT_ID, self.boot_id + "\n")
        host.set_text(POOL / "resv_hugepages", "0\n")
        host.set_text(POOL / "surplus_hugepages", "0\n")
        host.on_write[POOL / "nr_hugepages"] = self._write
        self.hosts.append(host)
        self._publish()
        return host

    def map_pages(self, pages: int) -> None:
        """A process maps ``pages`` of the pool (as a QEMU starting on a reservation does)."""
        self.used += pages
        self._publish()

    def unmap_pages(self, pages: int) -> None:
        """A process unmaps ``pages`` (its QEMU stopped): they are free again."""
        self.used -= pages
        self._publish()

    def _write(self, data: bytes) -> None:
        self.total = max(self.used, min(int(data), self.limit))
        self._publish()

    def _publish(self) -> None:
        for host in self.hosts:
            host.files[POOL / "nr_hugepages"] = f"{self.total}\n".encode()
            host.files[POOL / "free_hugepages"] = f"{self.total - self.used}\n".encode()


def pool_writes(host: FakeHost) -> list[str]:
    """What was written to the host's hugepage pool knobs (sysfs), in order."""
    return [call[2] for call in host.calls
            if call[0] == "write" and call[1].startswith("/sys/kernel/mm/hugepages/")]


def writes_besides_claims(host: FakeHost) -> list[tuple[str, ...]]:
    """Every write to the host but a reservation's own claim file (its bookkeeping)."""
    return [call for call in host.calls
            if call[0] == "write" and not call[1].startswith(f"{CLAIMS_DIR}/")]
