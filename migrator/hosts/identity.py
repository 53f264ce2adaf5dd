"""What identifies a host's running kernel and a binary on it: the key of cached host facts.

A fact found by probing (what a QEMU binary offers, whether the kernel has HGM) stays
true until the host reboots or the binary changes.  The key is the kernel's boot id
and, for each file, its device, inode, size, mtime and ctime: any rewrite or
replacement of the file (a package upgrade, a rebuilt QEMU) changes its ctime.  The
file's content hash would say the same, but hashing a 28 MB QEMU costs more than
the probe it would save (sha256sum: about 90 ms), while this is one ``stat``.
"""

from __future__ import annotations

from migrator.errors import HostError
from migrator.hosts.base import Host

__all__ = ["host_key"]

# $1.. are the files; prints the boot id, then one identity line per file.
_IDENTITY = ('cat /proc/sys/kernel/random/boot_id && '
             '{ [ $# -eq 0 ] || stat -L --format=%d:%i:%s:%.9Y:%.9Z -- "$@"; }')


async def host_key(host: Host, *files: str) -> str | None:
    """``host``'s boot id and the identity of each of ``files`` on it, as one string.

    None when any of it cannot be read (a host without ``/proc`` boot ids or GNU
    stat): the caller then probes every time rather than trust a weaker key.
    """
    try:
        result = await host.run(["sh", "-c", _IDENTITY, "sh", *files], timeout=30)
    except HostError:
        return None
    lines = result.stdout.split()
    if result.status != 0 or len(lines) != 1 + len(files):
        return None
    return "|".join([host.name, *lines])
