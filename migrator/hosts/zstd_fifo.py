"""A FIFO on a host whose bytes a ``zstd`` process compresses into a file as they arrive.

For a writer that only takes a file name, such as QEMU's ``-D`` trace log: it
opens the FIFO as it would a file, and the zstd stream is written on the
writer's own host while it writes; the plain file never exists.

How :func:`zstd_fifo` keeps both ends in step:

- the FIFO is made (mode 0600) and ``zstd -c FIFO`` started, its output into
  the output file, *before* the writer starts: zstd waits in ``open`` until a
  writer opens the FIFO, and a writer waits the same for zstd;
- once the writer has opened it, :meth:`ZstdFifo.unlink` removes the FIFO's
  name: both ends stay open, and a controller that dies from then on leaves no
  FIFO behind (zstd itself dies with the controller, as every process a
  :class:`~migrator.hosts.base.Host` starts does);
- when the writer closes its end (it exits, or crashes: the kernel closes it),
  zstd reads end-of-file, ends the frame and exits 0.  Leaving the block, which
  the caller does after stopping the writer, waits for that exit;
- a writer that never opened the FIFO (it failed first) leaves zstd waiting in
  ``open``: the FIFO is then opened for writing without blocking and closed at
  once (``dd ... oflag=nonblock``), which gives zstd an empty input, as often as
  needed (zstd may not have reached its ``open`` yet);
- a zstd still running :data:`EXIT_TIMEOUT_S` later is killed and
  :class:`HostError` raised; its output is readable up to its last whole block
  (:func:`migrator.rundir.open_artifact`).

A zstd that fails (a full disk) is a :class:`HostError` with its stderr, kept
beside the FIFO until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from migrator.errors import HostError
from migrator.hosts.base import Host, HostProcess
from migrator.rundir import ZSTD_LEVEL

__all__ = ["EXIT_TIMEOUT_S", "ZstdFifo", "zstd_fifo"]

#: How long zstd may take to finish once its writer has gone (it compresses at most a
#: block, ~128 KiB, then ends the frame: milliseconds).
EXIT_TIMEOUT_S = 10.0
#: How long zstd may still be running before it is woken (see :meth:`ZstdFifo.finish`).
WAKE_PERIOD_S = 0.2
#: How long a SIGTERM'd zstd has before SIGKILL.
KILL_GRACE_S = 2.0


@dataclass
class ZstdFifo:
    """A running :func:`zstd_fifo`: the FIFO to hand the writer, and its compressor."""

    host: Host
    fifo: Path
    output: Path
    process: HostProcess
    stderr: Path

    async def unlink(self) -> None:
        """Remove the FIFO's name once the writer has it open (see module docstring)."""
        await self.host.remove_tree(self.fifo)

    async def finish(self) -> None:
        """Wait for zstd to end (the writer is gone); kill it and raise if it does not."""
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                status = await self._wait_waking()
        except TimeoutError:
            await self._kill()
            raise HostError(f"zstd compressing into {self.output} on {self.host.name} did not "
                            f"end within {EXIT_TIMEOUT_S:g} s of its writer and was killed; "
                            "the stream is readable up to its last whole block",
                            argv=self.process.argv) from None
        if status != 0:
            raise HostError(f"zstd compressing into {self.output} on {self.host.name} failed",
                            argv=self.process.argv, status=status,
                            output=await self._stderr_text())

    async def _wait_waking(self) -> int:
        """zstd's exit status, waking it each :data:`WAKE_PERIOD_S` it is still running.

        A zstd that never had a writer waits in ``open``, or is about to (just
        started): an open for writing that does not block, closed at once, gives it
        end-of-file.  Where zstd has no FIFO open, or the FIFO is gone, it fails
        harmlessly (``nocreat``: no file is made in its place).
        """
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAKE_PERIOD_S):
                    return await self.process.wait()
            with contextlib.suppress(HostError):
                await self.host.run(["dd", "if=/dev/null", f"of={self.fifo}", "oflag=nonblock",
                                     "conv=nocreat,notrunc", "status=none"], timeout=30)

    async def _kill(self) -> None:
        await self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(KILL_GRACE_S):
                await self.process.wait()
        except TimeoutError:
            await self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def _stderr_text(self) -> str:
        try:
            return (await self.host.read_text(self.stderr)).strip()
        except FileNotFoundError:
            return ""


@contextlib.asynccontextmanager
async def zstd_fifo(host: Host, fifo: Path, output: Path) -> AsyncIterator[ZstdFifo]:
    """A FIFO at ``fifo`` on ``host`` compressed into ``output`` there (see module docstring).

    On exit the compressor has ended (:meth:`ZstdFifo.finish`) and the FIFO and
    zstd's stderr file are gone.
    """
    stderr = fifo.with_name(fifo.name + ".zstd-stderr")
    await host.remove_tree(fifo)  # a FIFO left by a controller killed before unlink()
    (await host.run(["mkfifo", "-m", "0600", str(fifo)])).check(
        f"making the FIFO {fifo} on {host.name}")
    try:
        process = await host.start(
            ["zstd", "-q", f"-{ZSTD_LEVEL}", "-c", str(fifo)], stdout=output, stderr=stderr)
        sink = ZstdFifo(host, fifo, output, process, stderr)
        try:
            yield sink
        finally:
            await sink.finish()
    finally:
        await host.remove_tree(fifo)
        await host.remove_tree(stderr)
