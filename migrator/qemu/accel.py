"""Choosing the accelerator by booting, not by looking for /dev/kvm.

A /dev/kvm that opens and creates VMs can still be unable to run an ordinary
guest (a paravirtual KVM: SeaBIOS runs, then the guest hangs).  ``auto``
therefore boots the microguest in its ``boot`` mode under KVM and takes KVM only
if the guest's boot line arrives in time; otherwise TCG.  The verdict is cached
per (host, QEMU binary and version, kernel release), because the probe of a
KVM that hangs costs its whole timeout.

The probe guest runs on the host being decided for, from a private temporary
directory there that holds its kernel, initramfs, sockets and logs, and is
removed afterwards; what the controller records (argv, console) stays in a
local temporary directory.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from migrator.aio import first_error
from migrator.config.models import Accel
from migrator.errors import GuestError, MigratorError
from migrator.guest.build import GuestArtifacts, kernel_cmdline
from migrator.guest.console import GuestConsole, serial_chardev_args
from migrator.hosts.base import Host
from migrator.qemu.cmdline import qmp_args
from migrator.qemu.launcher import QemuLauncher
from migrator.qemu.probe import QemuFacts
from migrator.qemu.process import QemuProcess
from migrator.rundir import atomic_write

__all__ = ["AccelDecision", "decide_accel", "decide_accel_between", "kvm_probe_argv",
           "stage_guest"]

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


async def stage_guest(host: Host, guest: GuestArtifacts, directory: Path) -> GuestArtifacts:
    """Copy the guest's kernel and initramfs into ``directory`` (made 0700) on ``host``.

    Returns the same guest with its paths on ``host``, for QEMU's ``-kernel``/``-initrd``.
    """
    await host.make_private_dir(directory)
    staged = replace(guest, kernel=directory / guest.kernel.name,
                     initrd=directory / guest.initrd.name)
    await host.put(guest.kernel, staged.kernel)
    await host.put(guest.initrd, staged.initrd)
    return staged


def kvm_probe_argv(
    launcher: QemuLauncher, guest: GuestArtifacts, host_dir: Path, *, qmp_connects: bool
) -> list[str]:
    """The probe QEMU's argv: the microguest in ``boot`` mode under KVM, files in ``host_dir``.

    Started by ``launcher`` (the host's QEMU or one in a root filesystem), so the
    probe decides for the very QEMU the run will use.  ``qmp_connects``: QEMU
    connects to its QMP socket (see :func:`qmp_args`).
    """
    return launcher.argv([
        "-accel", "kvm", "-machine", "pc", "-m", "256M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", kernel_cmdline(working_set_mib=16, write_pct=0, pattern="sequential",
                                  stall_threshold_us=1000, heartbeat_ms=100, mode="boot"),
        *serial_chardev_args(host_dir / "serial.sock", host_dir / "serial.log"),
        *qmp_args(host_dir / "qmp.sock", qemu_connects=qmp_connects),
    ])


async def _kvm_boots(host: Host, facts: QemuFacts, guest: GuestArtifacts) -> tuple[bool, str]:
    if not await host.exists(Path("/dev/kvm")):
        return False, "/dev/kvm does not exist"
    with tempfile.TemporaryDirectory(prefix="migrator-accel-") as scratch:
        workdir = Path(scratch)
        async with host.temp_dir("migrator-accel-") as host_dir:
            staged = await stage_guest(host, guest, host_dir)
            argv = kvm_probe_argv(facts.launcher, staged, host_dir,
                                  qmp_connects=host.is_controller_machine)
            try:
                async with (
                    QemuProcess(host, "kvm-probe", argv, host_dir / "qmp.sock", workdir,
                                host_dir=host_dir, start_timeout=10) as qemu,
                    host.forward_unix_socket(host_dir / "serial.sock") as serial,
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


def _store(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one verdict to the cache file.

    Read, merged and written under a lock: two hosts probed at once finish their
    probes at the same moment (both time out), and neither verdict may be lost.
    Replaced atomically, as readers (the runs of a parallel suite) take no lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = _read_cache(path)
        cache[key] = entry
        atomic_write(path, json.dumps(cache, indent=1) + "\n")


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
    entry = {**asdict(decision), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    await asyncio.to_thread(_store, cache_file, key, entry)
    return decision


async def decide_accel_between(
    requested: Accel, qemus: Mapping[Host, QemuFacts], guest: GuestArtifacts, cache_file: Path
) -> tuple[AccelDecision, list[AccelDecision]]:
    """One accelerator for every QEMU: KVM only if it really runs a guest on every host.

    ``qemus`` holds each distinct host once, with the QEMU it runs.  Returns the
    accelerator chosen and each host's own decision, in the order of ``qemus``.
    """
    # Probed concurrently: a KVM that does not work costs each probe its whole timeout.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(decide_accel(host, requested, qemu, guest, cache_file))
                     for host, qemu in qemus.items()]
    except BaseExceptionGroup as error:
        raise first_error(error) from None
    decisions = [task.result() for task in tasks]
    chosen = next((d for d in decisions if d.accel != "kvm"), decisions[0])
    return chosen, decisions
