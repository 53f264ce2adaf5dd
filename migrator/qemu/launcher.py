"""How to start a QEMU: the words around QEMU's own arguments, as data.

A QEMU from the host's packages starts as ``BINARY ARGS...``.  A QEMU that lives
in a separate root filesystem (``vm.qemu_root``, e.g. a Debian sid root made by
``scripts/make-qemu-root``, see docs/qemu-notes.md section 2A) is started from
outside the root, without chroot or mounts, as::

    env QEMU_MODULE_DIR=ROOT/usr/lib/x86_64-linux-gnu/qemu \\
        ROOT/lib64/ld-linux-x86-64.so.2 \\
        --library-path ROOT/usr/lib/x86_64-linux-gnu:ROOT/lib/x86_64-linux-gnu \\
        ROOT/usr/bin/qemu-system-x86_64 ARGS... \\
        -L ROOT/usr/share/qemu -L ROOT/usr/share/seabios

The root's own loader and libraries run the root's binary as an ordinary host
process, so every host path (hugetlbfs directories, sockets, trace files, the
guest kernel) works unchanged.  ``QEMU_MODULE_DIR`` and the ``-L`` firmware
directories keep it from silently loading the HOST's modules and firmware at
its compiled-in paths; source and destination get the same ``-L`` so their ROM
RAMBlocks match.  The environment is an ``env`` argv prefix because
:meth:`Host.start` runs an argv (never a shell string) and takes no environment.

:func:`qemu_launcher` is the one place that builds a :class:`QemuLauncher`;
every QEMU migrator starts (the capability probe, the KVM probe, the source and
destination VMs) gets its argv from :meth:`QemuLauncher.argv`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = [
    "ROOT_BINARY_DIR",
    "ROOT_FIRMWARE_DIRS",
    "ROOT_LIBRARY_DIRS",
    "ROOT_LOADER",
    "ROOT_MODULE_DIR",
    "QemuLauncher",
    "binary_in_root",
    "qemu_launcher",
]

# Where a Debian root keeps what its QEMU needs (x86_64 multiarch layout).
ROOT_LOADER = "lib64/ld-linux-x86-64.so.2"
ROOT_LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
ROOT_MODULE_DIR = "usr/lib/x86_64-linux-gnu/qemu"
ROOT_FIRMWARE_DIRS = ("usr/share/qemu", "usr/share/seabios")
# A QEMU named without a path is looked for here inside the root.
ROOT_BINARY_DIR = "usr/bin"


@dataclass(frozen=True)
class QemuLauncher:
    """How to start one QEMU executable on its host.

    ``env`` becomes an ``env NAME=VALUE...`` prefix, ``loader`` (a dynamic loader
    and its options) goes right before ``binary``, and ``trailing`` after QEMU's
    own arguments.  All paths are paths on the QEMU's host.
    """

    binary: str
    env: tuple[tuple[str, str], ...] = ()
    loader: tuple[str, ...] = ()
    trailing: tuple[str, ...] = ()

    @property
    def prefix(self) -> tuple[str, ...]:
        """Everything before QEMU's own arguments, the binary included."""
        env = ("env", *(f"{name}={value}" for name, value in self.env)) if self.env else ()
        return (*env, *self.loader, self.binary)

    def argv(self, args: Sequence[str]) -> list[str]:
        """The full argv that runs this QEMU with ``args``."""
        return [*self.prefix, *args, *self.trailing]


def binary_in_root(root: str, binary: str) -> str:
    """Host path of the QEMU ``binary`` (a name or a path inside the root) in ``root``."""
    inside = binary.lstrip("/") if "/" in binary else f"{ROOT_BINARY_DIR}/{binary}"
    return str(PurePosixPath(root) / inside)


def qemu_launcher(binary: str, root: str | None = None) -> QemuLauncher:
    """The launcher of ``binary`` (a host path), run with the loader of ``root`` if given."""
    if root is None:
        return QemuLauncher(binary)
    base = PurePosixPath(root)
    return QemuLauncher(
        binary,
        env=(("QEMU_MODULE_DIR", str(base / ROOT_MODULE_DIR)),),
        loader=(str(base / ROOT_LOADER), "--library-path",
                ":".join(str(base / d) for d in ROOT_LIBRARY_DIRS)),
        trailing=tuple(arg for d in ROOT_FIRMWARE_DIRS for arg in ("-L", str(base / d))),
    )
