"""Fakes for the HGM tests: the MADV_SPLIT probe on a fake kernel, QEMUs, scripted smaps.

The texts under ``tests/data/hgm`` are read with :func:`text`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from migrator.hosts.base import CommandResult
from migrator.hosts.fake import FakeHost
from migrator.qemu.probe import QemuFacts

__all__ = ["DATA", "POOL", "QEMU_72", "QEMU_RFC", "RELEASE", "Probe", "ScriptedSmaps", "kernel",
           "probe_report", "text"]

DATA = Path(__file__).resolve().parents[1] / "data" / "hgm"
"""Recorded and written HGM texts (see its README)."""
POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
"""The 2 MiB pool's sysfs directory, as :func:`kernel` fakes it."""
RELEASE = "6.18.44-fc-v669"
"""The kernel release the fake hosts and probe reports give."""
QEMU_72 = QemuFacts(
    "/usr/bin/qemu-system-x86_64",
    "7.2.22",
    "Debian 1:7.2+dfsg-7+deb12u18+b3",
    ("events", "postcopy-blocktime", "postcopy-preempt", "postcopy-ram", "return-path"),
)
QEMU_RFC = QemuFacts(
    "/opt/qemu-doublemap/bin/qemu-system-x86_64",
    "7.2.50",
    "",
    ("events", "hugetlb-doublemap", "postcopy-ram"),
)


def text(name: str) -> str:
    """A fixture's text (gunzipped when it ends in .gz)."""
    path = DATA / name
    raw = path.read_bytes()
    return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode()


def probe_report(**fields: Any) -> dict[str, Any]:
    """What the probe script prints on a stock kernel, with ``fields`` changed."""
    report: dict[str, Any] = {
        "release": RELEASE,
        "page_bytes": 2 << 20,
        "advice": 26,
        "addr": "0x7f6c18200000",
        "madvise_errno": "EINVAL",
        "madvise_error": "EINVAL (Invalid argument)",
        "vma": {
            "header": "7f6c18200000-7f6c18400000 rw-s 00000000 00:11 160862 "
            "/anon_hugepage (deleted)",
            "kernel_page_kb": 2048,
            "vmflags": ["rd", "wr", "sh", "mr", "mw", "me", "ms", "de", "ht"],
        },
    }
    report.update(fields)
    return report


Probe = Callable[[tuple[str, ...]], CommandResult]


def kernel(
    probe: Probe | Sequence[dict[str, Any]],
    *,
    total: int = 0,
    free: int = 0,
    limit: int = 8,
    release: str | None = RELEASE,
) -> FakeHost:
    """A fake host with a 2 MiB pool (growable up to ``limit``) and a scripted python3.

    ``probe`` is a python3 handler or the reports successive probe runs print.
    """
    host = FakeHost()
    state = {"total": total, "used": total - free}

    def publish() -> None:
        host.set_text(POOL / "nr_hugepages", f"{state['total']}\n")
        host.set_text(POOL / "free_hugepages", f"{state['total'] - state['used']}\n")

    def on_write(data: bytes) -> None:
        state["total"] = max(state["used"], min(int(data), limit))
        publish()

    publish()
    host.set_text(POOL / "resv_hugepages", "0\n")
    host.set_text(POOL / "surplus_hugepages", "0\n")
    host.on_write[POOL / "nr_hugepages"] = on_write
    if release is not None:
        host.commands["uname"] = lambda argv: CommandResult(argv, 0, release + "\n", "")
    else:
        host.commands["uname"] = lambda argv: CommandResult(argv, 1, "", "uname: broken\n")
    if callable(probe):
        host.commands["python3"] = probe
    else:
        reports = list(probe)

        def run(argv: tuple[str, ...]) -> CommandResult:
            # The page must be free while the probe runs.
            assert int(host.text(POOL / "free_hugepages")) >= 1
            return CommandResult(argv, 0, json.dumps(reports.pop(0)) + "\n", "")

        host.commands["python3"] = run
    return host


class ScriptedSmaps(FakeHost):
    """Each sample of ``path`` answers with the next text, as the host's awk would.

    An exception stands for a file the awk cannot open (it answers -1); the process
    still exists unless it is a FileNotFoundError.  The texts are not filtered to
    hugetlb VMAs as the awk does: the sampler filters again (the real awk runs in
    tests/integration/test_hgm_probe.py).
    """

    def __init__(self, path: Path, reads: list[str | BaseException]) -> None:
        super().__init__()
        self.path = path
        self.reads = reads
        self.process_exists = True
        self.dialogues["sh"] = self._sample

    def _sample(self, argv: tuple[str, ...], line: str) -> str:
        assert argv[4] == str(self.path)  # sh -c LOOP sh PATH FILTER
        if not self.reads:
            self.process_exists = False
            return "-1\t"
        item = self.reads.pop(0)
        if isinstance(item, BaseException):
            self.process_exists = not isinstance(item, FileNotFoundError)
            return "-1\t"
        lines = item.splitlines()
        return f"{len(lines)}\t" + "\t".join(lines)

    async def exists(self, path: Path) -> bool:
        if path == self.path.parent:
            return self.process_exists
        return await super().exists(path)
