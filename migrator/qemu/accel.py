"""Choosing the accelerator by booting, not by looking for /dev/kvm.

A /dev/kvm that opens and creates VMs can still be unable to run an ordinary
guest (a paravirtual KVM: SeaBIOS runs, then the guest hangs).  ``auto``
therefore boots the microguest in its ``boot`` mode under KVM and takes KVM only
if the guest's boot line arrives in time; otherwise TCG.  The verdict is cached
per (host, QEMU binary and version, kernel release), because the probe of a
KVM that hangs costs its whole timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from migrator.config.models import Accel
from migrator.errors import GuestError, MigratorError
from migrator.guest.build import GuestArtifacts, kernel_cmdline
from migrator.guest.console import GuestConsole, serial_chardev_args
from migrator.hosts.base import Host
from migrator.qemu.probe import QemuFacts
from migrator.qemu.process import QemuProcess

__all__ = ["AccelDecision", "decide_accel"]

log = logging.getLogger(__name__)

KVM_BOOT_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class AccelDecision:
    """Which accelerator runs the VMs, and how that was decided."""

    requested: str
    accel: str
    method: str  # "explicit", "probe" or "cache"
    reason: str
    probe_seconds: float | None = None


async def _kvm_boots(host: Host, facts: QemuFacts, guest: GuestArtifacts) -> tuple[bool, str]:
    if not await host.exists(Path("/dev/kvm")):
        return False, "/dev/kvm does not exist"
    with tempfile.TemporaryDirectory(prefix="migrator-accel-") as scratch:
        workdir = Path(scratch)
        qmp = workdir / "qmp.sock"
        serial = workdir / "serial.sock"
        argv = [
            facts.binary, "-accel", "kvm", "-machine", "pc", "-m", "256M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", kernel_cmdline(working_set_mib=16, write_pct=0, pattern="sequential",
                                      stall_threshold_us=1000, heartbeat_ms=100, mode="boot"),
            *serial_chardev_args(serial, workdir / "serial.log"),
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]
        try:
            async with (
                QemuProcess(host, "kvm-probe", argv, qmp, workdir, start_timeout=10) as qemu,
                GuestConsole(serial, workdir / "console.jsonl", side="src") as console,
            ):
                try:
                    await console.wait_for("boot", timeout=KVM_BOOT_TIMEOUT_S)
                except GuestError:
                    return False, (
                        f"a guest under KVM printed nothing in {KVM_BOOT_TIMEOUT_S:g} s "
                        "(KVM present but not usable)"
                    )
                del qemu
                return True, "a guest booted under KVM"
        except MigratorError as error:
            return False, f"KVM guest did not start: {error}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cache: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return cache


def _write_cache(path: Path, cache: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache, indent=1) + "\n")


def _cache_key(host: Host, facts: QemuFacts, kernel_release: str) -> str:
    return f"{host.name}|{facts.binary}|{facts.version}|{kernel_release}"


async def decide_accel(
    host: Host, requested: Accel, facts: QemuFacts, guest: GuestArtifacts, cache_file: Path
) -> AccelDecision:
    """Pick the accelerator for ``requested`` (see module docstring)."""
    if requested is not Accel.AUTO:
        return AccelDecision(requested.value, requested.value, "explicit", "asked for by name")
    kernel_release = (await host.run(["uname", "-r"])).stdout.strip()
    key = _cache_key(host, facts, kernel_release)
    cache = await asyncio.to_thread(_read_cache, cache_file)
    if key in cache:
        cached = cache[key]
        return AccelDecision("auto", cached["accel"], "cache",
                             f"{cached['reason']} (probed {cached['when']})")
    began = time.monotonic()
    usable, reason = await _kvm_boots(host, facts, guest)
    decision = AccelDecision("auto", "kvm" if usable else "tcg", "probe", reason,
                             round(time.monotonic() - began, 2))
    log.info("accelerator: %s (%s)", decision.accel, reason)
    cache[key] = {**asdict(decision), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    await asyncio.to_thread(_write_cache, cache_file, cache)
    return decision
