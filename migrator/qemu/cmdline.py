"""QEMU command lines as pure functions of a launch spec.

Nothing here starts a process: :func:`qemu_argv` turns a :class:`LaunchSpec`
into an argv list, and :func:`shell_line` renders it copy-pasteable for logs and
the run directory.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from migrator.config.models import Backing
from migrator.qemu.launcher import QemuLauncher

__all__ = ["RAM_BACKEND_ID", "TRACE_EVENTS", "LaunchSpec", "qemu_argv", "qmp_args", "shell_line"]

RAM_BACKEND_ID = "ram0"

# Destination-side trace events for per-page fetch latency and blocktime.  QEMU 7.2
# names the blocktime events mark_postcopy_blocktime_*, QEMU >= 10.1 postcopy_blocktime_*;
# the glob covers both.  postcopy_init_range gives each RAMBlock's host base address (one
# line per block), so placements in blocks nobody faulted on are still attributed.
TRACE_EVENTS = (
    "postcopy_init_range",
    "postcopy_ram_fault_thread_request",
    "postcopy_place_page",
    "postcopy_place_page_zero",
    "*postcopy_blocktime*",
)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything that decides one QEMU's command line."""

    launcher: QemuLauncher
    name: str
    memory_mib: int
    vcpus: int
    backing: Backing
    accel: str
    machine: str
    kernel: Path
    initrd: Path
    append: str
    qmp_socket: Path
    serial_args: tuple[str, ...]
    mem_path: Path | None = None
    incoming: bool = False
    trace_file: Path | None = None
    trace_events: tuple[str, ...] = TRACE_EVENTS
    extra: tuple[str, ...] = field(default_factory=tuple)
    qmp_connects: bool = False
    """QEMU connects to ``qmp_socket``, where migrator listens, instead of listening there."""
    cpus: str | None = None
    """A CPU list QEMU is started under (``taskset -c``): every thread it makes inherits it."""
    memory_node: int | None = None
    """The host NUMA node the guest RAM is bound to (``host-nodes=N,policy=bind``)."""


def _memory_backend(spec: LaunchSpec) -> str:
    size = f"size={spec.memory_mib}M"
    # Every backend type takes the binding (QEMU mbind()s the mapping before any page
    # of it is touched); with prealloc=off the pages come from the node as they fault.
    bind = "" if spec.memory_node is None else f",host-nodes={spec.memory_node},policy=bind"
    # share=on: post-copy on hugetlbfs and memfd places pages into a shared mapping,
    # and the HGM (doublemap) path needs it too.
    if spec.backing is Backing.ANON_4K:
        return f"memory-backend-ram,id={RAM_BACKEND_ID},{size}{bind}"
    if spec.backing is Backing.MEMFD_4K:
        return f"memory-backend-memfd,id={RAM_BACKEND_ID},{size},share=on{bind}"
    if spec.mem_path is None:
        raise ValueError(f"{spec.backing.value} needs a hugetlbfs mem_path")
    return (
        f"memory-backend-file,id={RAM_BACKEND_ID},{size},mem-path={spec.mem_path},"
        f"share=on,prealloc=off{bind}"
    )


def qemu_argv(spec: LaunchSpec) -> list[str]:
    """The full argv for one QEMU (source or destination), under ``taskset`` if it has CPUs."""
    argv = [
        "-name", f"{spec.name},debug-threads=on",
        "-machine", f"{spec.machine},memory-backend={RAM_BACKEND_ID}",
        "-accel", spec.accel,
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib}M",
        "-object", _memory_backend(spec),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.append,
        *spec.serial_args,
        *qmp_args(spec.qmp_socket, qemu_connects=spec.qmp_connects),
        "-msg", "timestamp=on",
    ]
    if spec.trace_file is not None:
        for event in spec.trace_events:
            argv += ["-trace", f"enable={event}"]
        argv += ["-D", str(spec.trace_file)]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    argv += list(spec.extra)
    full = spec.launcher.argv(argv)
    # taskset execs QEMU (the pid stays QEMU's); every thread QEMU starts inherits it.
    return ["taskset", "-c", spec.cpus, *full] if spec.cpus is not None else full


def qmp_args(socket: Path, *, qemu_connects: bool) -> list[str]:
    """QEMU's ``-qmp`` option: connect to ``socket`` (migrator listens), or listen on it."""
    if qemu_connects:
        return ["-qmp", f"unix:{socket},server=off"]
    return ["-qmp", f"unix:{socket},server=on,wait=off"]


def shell_line(argv: Sequence[str]) -> str:
    """argv as one copy-pasteable shell command."""
    return shlex.join(argv)
