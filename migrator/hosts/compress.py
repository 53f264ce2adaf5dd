"""A file on a host compressed in place by ``zstd`` once its writer is done with it.

For what a QEMU writes itself, the destination trace above all: QEMU writes the
plain file as it always did, and when the block of :func:`compressed_when_done`
ends (after the QEMU has stopped, and before a remote host's files are fetched
back) ``zstd`` on the same host turns ``FILE`` into ``FILE.zst`` and removes
``FILE``.  The compression costs nothing while the migration is measured.  Not
as a stream while QEMU writes: with ``-D`` on a FIFO read by zstd, every trace
line wakes the reader, and on the test machine the 4 KiB-page fetch p50 went
from 0.024 ms to 0.054 ms (medians of 6 runs each; ``docs/qemu-notes.md``).

If zstd fails or is stopped, the plain file stays (``--rm`` removes it only once
the compressed one is whole), and readers prefer it to a partial ``FILE.zst``
(:func:`migrator.rundir.open_artifact`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from migrator.hosts.base import Host
from migrator.rundir import ZST, ZSTD_LEVEL

__all__ = ["COMPRESS_TIMEOUT_S", "compress_in_place", "compressed_when_done"]

#: How long compressing one file may take: zstd -1 does hundreds of MB/s, and a trace is
#: tens of MB per GiB of 4 KiB pages.
COMPRESS_TIMEOUT_S = 600.0


async def compress_in_place(host: Host, path: Path) -> Path:
    """``path`` on ``host`` compressed into ``path.zst``, ``path`` removed; the new path.

    :class:`HostError` (with zstd's words) when it fails; ``path`` is then kept.
    """
    target = path.with_name(path.name + ZST)
    result = await host.run(["zstd", "-q", f"-{ZSTD_LEVEL}", "-f", "--rm", str(path), "-o",
                             str(target)], timeout=COMPRESS_TIMEOUT_S)
    result.check(f"compressing {path} on {host.name}")
    return target


@contextlib.asynccontextmanager
async def compressed_when_done(host: Host, path: Path) -> AsyncIterator[None]:
    """Compress ``path`` on ``host`` in place when the block ends, if it exists then.

    Enter it before starting the file's writer, so that it is released after the
    writer has stopped (see module docstring).
    """
    try:
        yield
    finally:
        if await host.exists(path):
            await compress_in_place(host, path)
