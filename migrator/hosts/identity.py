"""What identifies a host's running kernel and a binary on it: the key of hugepage claims
(one pool per kernel) and of cached host facts.

A fact found by probing (what a QEMU binary offers, whether the kernel has HGM) stays
true until the host reboots or the binary changes.  The key is the kernel's boot id
and, for each file, its device, inode, size, mtime and ctime: any rewrite or
replacement of the file (a package upgrade, a rebuilt QEMU) changes its ctime.  The
file's content hash would say the same, but hashing a 28 MB QEMU costs more than
the probe it would save (``time sha256sum /usr/bin/qemu-system-x86_64``: 88 ms for QEMU
10.0.2's 28 MB binary on the test machine, against 58 ms for the probe), while this is one
``stat``.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from migrator.errors import HostError
from migrator.hosts.base import Host

__all__ = ["BOOT_ID", "host_key", "kernel_identity"]

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
"""A random UUID the kernel draws at boot: equal on two hosts means one running kernel."""

# Each Host object's boot id, once read: a kernel does not change under a connection.
_boot_ids: weakref.WeakKeyDictionary[Host, str] = weakref.WeakKeyDictionary()
_UNIDENTIFIED = "unidentified:"

# "$@" are the files: one identity line each.
_STAT = 'stat -L --format=%d:%i:%s:%.9Y:%.9Z -- "$@"'


async def kernel_identity(host: Host) -> str:
    """What identifies ``host``'s running kernel: its boot_id (see :data:`BOOT_ID`).

    Read once per :class:`Host` object.  A host without one (not Linux, or a test
    double) is taken to be a kernel of its own: its hugepage claims are then shared
    only by reservations on the same :class:`Host` object.
    """
    if (known := _boot_ids.get(host)) is not None:
        return known
    try:
        boot_id = (await host.read_text(BOOT_ID)).strip()
    except FileNotFoundError:
        boot_id = ""
    if not boot_id:
        return f"{_UNIDENTIFIED}{host.name}:{id(host)}"
    _boot_ids[host] = boot_id
    return boot_id


async def host_key(host: Host, *files: str) -> str | None:
    """``host``'s boot id and the identity of each of ``files`` on it, as one string.

    None when any of it cannot be read (a host without a boot id or without GNU
    stat): the caller then probes every time rather than trust a weaker key.
    """
    boot_id = await kernel_identity(host)
    if boot_id.startswith(_UNIDENTIFIED):
        return None
    identities: list[str] = []
    if files:
        try:
            result = await host.run(["sh", "-c", _STAT, "sh", *files], timeout=30)
        except HostError:
            return None
        identities = result.stdout.split()
        if result.status != 0 or len(identities) != len(files):
            return None
    return "|".join([host.name, boot_id, *identities])
