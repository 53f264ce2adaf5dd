"""The microguest on the host's QEMU under TCG: boot, heartbeats, a QMP stop, verify.

Needs qemu-system-x86_64, a kernel in /boot, gcc and busybox-static.  Uses
plain anonymous guest RAM (no hugepages) and no network.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import logging
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import ConnectError, QMPClient

from migrator.guest.build import GuestArtifacts, ensure_guest, kernel_cmdline
from migrator.guest.console import GuestConsole, serial_chardev_args
from migrator.guest.protocol import Boot, Heartbeat, Hist, ProbeError, Ready, Verify

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestArtifacts:
    return asyncio.run(ensure_guest(tmp_path_factory.mktemp("guest-cache")))


@dataclass
class Vm:
    proc: asyncio.subprocess.Process
    console: GuestConsole
    qmp_sock: Path
    launched_ns: int


@asynccontextmanager
async def booted(
    guest: GuestArtifacts, workdir: Path, append: str, mem_mib: int = 512
) -> AsyncIterator[Vm]:
    """Launch QEMU (TCG, 2 vCPUs) with its console attached; kill it on the way out."""
    qmp_sock = workdir / "qmp.sock"
    argv = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", str(mem_mib),
        "-smp", "2",
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", append,
        *serial_chardev_args(workdir / "serial.sock", workdir / "serial.log"),
        "-qmp", f"unix:{qmp_sock},server=on,wait=off",
    ]  # fmt: skip
    stderr = workdir / "qemu.stderr"
    with stderr.open("wb") as err:
        launched_ns = time.time_ns()
        proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stderr=err)
    try:
        async with GuestConsole(
            workdir / "serial.sock", workdir / "console.jsonl", side="src"
        ) as console:
            yield Vm(proc, console, qmp_sock, launched_ns)
    except BaseException:
        # Whatever failed, QEMU's own complaint is the first thing to read.
        log.error("qemu stderr: %s", stderr.read_text(errors="replace")[-2000:])
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def qmp_connect(sock: Path) -> QMPClient:
    client = QMPClient("test-guest-boot")
    # QEMU creates its chardevs, the monitor's included, before the guest
    # runs; the retry only covers a slow start.
    async with asyncio.timeout(10):
        while True:
            try:
                await client.connect(str(sock))
            except ConnectError:
                await asyncio.sleep(0.05)
            else:
                return client


def cmdline(**overrides: object) -> str:
    args: dict[str, object] = {
        "working_set_mib": 64,
        "write_pct": 50,
        "pattern": "random",
        "stall_threshold_us": 2000,
        "heartbeat_ms": 100,
    }
    args.update(overrides)
    return kernel_cmdline(**args)  # type: ignore[arg-type]


async def test_boot_heartbeat_stop_and_verify(guest: GuestArtifacts, tmp_path: Path) -> None:
    async with booted(guest, tmp_path, cmdline()) as vm:
        console = vm.console
        boot = await console.wait_for(Boot, 60)
        assert boot.event.kernel == guest.kernel_release
        assert boot.event.nproc == 2
        ready = await console.wait_for(Ready, 60)
        assert ready.event.threads == 2
        assert ready.event.pages == 64 * 256
        log.info("launch to ready: %.2f s", (ready.host_ns - vm.launched_ns) / 1e9)

        # Heartbeats arrive at about hb_ms on the host clock.
        await asyncio.sleep(2.0)
        beats = console.received("hb")
        arrivals = [b.host_ns for b in beats]
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert len(gaps) >= 10
        assert 70e6 < statistics.median(gaps) < 130e6

        # Pause the whole VM: the host sees a hole in the heartbeats, the
        # guest clock (stopped by QEMU together with the vCPUs) may not.
        qmp = await qmp_connect(vm.qmp_sock)
        try:
            before = console.mark()
            await qmp.execute("stop")
            await asyncio.sleep(1.5)
            await qmp.execute("cont")
        finally:
            await qmp.disconnect()
        for _ in range(5):
            await console.wait_for("hb", 5, since=console.mark())
        after = [
            (b.host_ns, b.event)
            for b in console.received("hb")
            if b.seq >= before and isinstance(b.event, Heartbeat)
        ]
        last_before = next(
            (b.host_ns, b.event)
            for b in reversed(console.received("hb"))
            if b.seq < before and isinstance(b.event, Heartbeat)
        )
        series = [last_before, *after]
        host_gap, guest_gap, seq_a, seq_b = max(
            (hb - ha, eb.guest_ns - ea.guest_ns, ea.seq, eb.seq)
            for (ha, ea), (hb, eb) in itertools.pairwise(series)
        )
        log.info(
            "1.5 s QMP stop: host gap %.3f s, guest gap %.3f s", host_gap / 1e9, guest_gap / 1e9
        )
        assert host_gap >= 1.4e9
        assert seq_b == seq_a + 1, "the probe skipped heartbeats across the pause"

        mark = await console.send("verify")
        verify = await console.wait_for(Verify, 60, since=mark)
        assert verify.event.pages == 64 * 256
        assert verify.event.bad_pages == 0, verify.event.first_bad
        assert verify.event.read_mismatches == 0
        hists = [h.event for h in console.received("hist") if h.seq >= mark]
        assert sorted(h.cpu for h in hists if isinstance(h, Hist)) == [0, 1]
        # Heartbeats go on after verify.
        await console.wait_for("hb", 5, since=console.mark())

        # The checker is not vacuous: one flipped bit in one page is found.
        await console.send("corrupt 1234")
        mark = await console.send("verify")
        corrupted = await console.wait_for(Verify, 60, since=mark)
        assert corrupted.event.bad_pages == 1
        assert corrupted.event.first_bad == (1234,)

        await console.send("poweroff")
        async with asyncio.timeout(30):
            assert await vm.proc.wait() == 0


async def test_mode_boot_powers_off(guest: GuestArtifacts, tmp_path: Path) -> None:
    async with booted(guest, tmp_path, cmdline(mode="boot"), mem_mib=256) as vm:
        boot = await vm.console.wait_for(Boot, 60)
        assert boot.event.mode == "boot"
        async with asyncio.timeout(20):
            assert await vm.proc.wait() == 0
        log.info("mode=boot, launch to QEMU exit: %.2f s", (time.time_ns() - vm.launched_ns) / 1e9)
        assert not vm.console.received("ready")


async def test_oversized_working_set_reports_and_powers_off(
    guest: GuestArtifacts, tmp_path: Path
) -> None:
    async with booted(guest, tmp_path, cmdline(working_set_mib=4096), mem_mib=256) as vm:
        error = await vm.console.wait_for(ProbeError, 60)
        assert "does not fit" in error.event.msg
        async with asyncio.timeout(20):
            assert await vm.proc.wait() == 0


def test_guest_build_is_cached_and_complete(guest: GuestArtifacts) -> None:
    again = asyncio.run(ensure_guest(guest.initrd.parent.parent))
    assert again == guest
    # Reuse means no rebuild: the published directory is the same one.
    assert again.initrd.stat().st_mtime_ns == guest.initrd.stat().st_mtime_ns
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"],
        input=gzip.decompress(guest.initrd.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = set(listing.split())
    assert {"init", "bin/busybox", "bin/migrator-probe", "bin/sh", "dev/console"} <= names
    assert os.access(guest.kernel, os.R_OK)
