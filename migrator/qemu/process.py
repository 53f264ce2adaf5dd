"""One QEMU process: launch, QMP connection, and a shutdown that always happens.

The contract follows qemu.machine: start-up failures carry the command line
and QEMU's stderr; shutdown escalates ``quit`` -> SIGTERM -> SIGKILL with a
deadline at each step and runs from ``__aexit__`` whatever happened inside.

A QEMU's files live in two places: what the controller records (argv, the
copy-pasteable command line, QMP events) in a local ``workdir``, and what QEMU
itself writes (stdout, stderr) in ``host_dir`` on the QEMU's host.

QMP runs over a unix socket, never TCP.  A QEMU on the controller's own machine
connects to a socket migrator listens on before starting it, so it is connected
the moment it has started, or has failed to.  A QEMU on a remote host listens
itself, and migrator connects through :meth:`Host.forward_unix_socket` once the
socket is there (over SSH).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from qemu.qmp import ConnectError

from migrator.aio import guarded
from migrator.errors import HostError, QemuExitedError, QemuLaunchError
from migrator.hosts.base import Host, HostProcess
from migrator.qemu.cmdline import LaunchSpec, qemu_argv, shell_line
from migrator.qemu.monitor import Monitor

__all__ = ["QemuProcess"]

log = logging.getLogger(__name__)


class QemuProcess:
    """A QEMU on ``host``: controller-side files in ``workdir``, QEMU's own in ``host_dir``.

    ``qmp_socket`` is a path on ``host``; ``host_dir`` defaults to ``workdir``
    (right for a host that shares the controller's filesystem).  ``argv``'s
    ``-qmp`` must connect to ``qmp_socket`` on the controller's machine and listen
    on it elsewhere (:func:`~migrator.qemu.cmdline.qmp_args` with
    ``qemu_connects=host.is_controller_machine``).
    """

    def __init__(
        self, host: Host, name: str, argv: list[str], qmp_socket: Path, workdir: Path, *,
        host_dir: Path | None = None, start_timeout: float = 30.0, incoming: bool = False,
    ) -> None:
        self.host = host
        self.incoming = incoming
        """Started with ``-incoming``: the migration's destination."""
        self.name = name
        self.argv = argv
        self.qmp_socket = qmp_socket
        self.workdir = workdir
        self.host_dir = host_dir or workdir
        self.start_timeout = start_timeout
        self.monitor = Monitor(name, workdir / "events.jsonl")
        self.log = logging.getLogger(f"{__name__}.{name}")
        self._process: HostProcess | None = None
        # The QMP socket's forwarding, held open for as long as the monitor talks through it.
        self._forwarding = AsyncExitStack()
        self.started_ns = 0
        self.exited_ns: int | None = None

    @classmethod
    def from_spec(
        cls, host: Host, spec: LaunchSpec, workdir: Path, *, host_dir: Path | None = None,
        start_timeout: float = 30.0,
    ) -> QemuProcess:
        """A QEMU launched from a VM :class:`LaunchSpec`, its QMP direction set by ``host``."""
        spec = replace(spec, qmp_connects=host.is_controller_machine)
        return cls(host, spec.name, qemu_argv(spec), spec.qmp_socket, workdir,
                   host_dir=host_dir, start_timeout=start_timeout, incoming=spec.incoming)

    @property
    def stderr_path(self) -> Path:
        """QEMU's stderr on its host, a raw artifact."""
        return self.host_dir / "stderr.log"

    @property
    def pid(self) -> int | None:
        """Host pid once started."""
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        """Exit status once exited."""
        return self._process.returncode if self._process else None

    async def stderr_text(self) -> str:
        """What QEMU wrote to stderr so far (empty if nothing)."""
        try:
            return await self.host.read_text(self.stderr_path)
        except FileNotFoundError:
            return ""

    async def start(self) -> None:
        """Launch QEMU and connect QMP; :class:`QemuLaunchError` if it does not come up."""
        (self.workdir / "argv.json").write_text(json.dumps(self.argv, indent=1) + "\n")
        (self.workdir / "cmdline.sh").write_text(shell_line(self.argv) + "\n")
        # A remote QEMU keeps listening itself, reached through a forwarded socket: to
        # connect to migrator instead it would need sshd to listen on its host (a remote
        # stream-local forward), which hosts allow separately from the local forwards
        # (AllowStreamLocalForwarding) that migrator needs already.
        listening = self.host.is_controller_machine
        if listening:
            await self._listen()
        self.log.info("starting: %s", shell_line(self.argv))
        self.started_ns = time.time_ns()
        self._process = await self.host.start(
            self.argv, stdout=self.host_dir / "stdout.log", stderr=self.stderr_path
        )
        try:
            async with asyncio.timeout(self.start_timeout):
                if listening:
                    await self._accept()
                else:
                    await self._connect_when_listening()
        except TimeoutError:
            raise QemuLaunchError(
                f"QMP socket {self.qmp_socket} not ready after {self.start_timeout:g} s",
                name=self.name, argv=self.argv, stderr=await self.stderr_text(),
            ) from None

    async def _listen(self) -> None:
        """Listen on :attr:`qmp_socket` for the QEMU about to start."""
        # A socket left by a killed QEMU would refuse the bind; QEMU itself, listening,
        # replaces one the same way.
        await self.host.remove_tree(self.qmp_socket)
        try:
            await self.monitor.listen(self.qmp_socket)
        except ConnectError as error:
            raise QemuLaunchError(f"cannot listen on QMP socket {self.qmp_socket}: {error}",
                                  name=self.name, argv=self.argv) from None

    async def _accept(self) -> None:
        """Wait for QEMU's QMP connection, failing at once if QEMU exits first."""
        assert self._process is not None
        process = self._process

        async def fail_if_exits() -> None:
            raise await self._exited_during_start_up(await process.wait())

        try:
            await guarded(self.monitor.accept(), [fail_if_exits()])
        except ConnectError as error:
            # QEMU hung up during the greeting: it is on its way out; say how it ended.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await process.wait()
            if process.returncode is not None:
                raise await self._exited_during_start_up(process.returncode) from None
            raise QemuLaunchError(
                f"QMP connection on {self.qmp_socket} failed during start-up: {error}",
                name=self.name, argv=self.argv, stderr=await self.stderr_text(),
            ) from None

    async def _exited_during_start_up(self, status: int) -> QemuLaunchError:
        """The error for a QEMU that exited before QMP was up: its status and stderr."""
        return QemuLaunchError("exited during start-up", name=self.name, argv=self.argv,
                               status=status, stderr=await self.stderr_text())

    async def _connect_when_listening(self) -> None:
        """Connect to a remote QEMU's socket through a forward once it is there, retrying."""
        assert self._process is not None
        local_socket: Path | None = None
        while True:
            if self._process.returncode is not None:
                raise await self._exited_during_start_up(self._process.returncode)
            if await self.host.exists(self.qmp_socket):
                if local_socket is None:
                    local_socket = await self._forwarding.enter_async_context(
                        self.host.forward_unix_socket(self.qmp_socket))
                try:
                    await self.monitor.connect(local_socket)
                    return
                except ConnectError:
                    # The socket exists a moment before QEMU listens on it.  The failed
                    # attempt left the monitor half set up (its event listener stays
                    # registered); reset it so the next attempt starts clean.
                    await self.monitor.close()
            await asyncio.sleep(0.02)

    async def wait_exit(self) -> int:
        """Wait until QEMU exits; returns its status.

        :class:`QemuExitedError` when the connection to its host dropped instead:
        QEMU then ends with it (nothing migrator starts outlives its connection).
        """
        assert self._process is not None
        try:
            status = await self._process.wait()
        except HostError as error:
            self.exited_ns = self.exited_ns or time.time_ns()
            raise QemuExitedError(
                f"ended with the connection to {self.host.name} ({error})", name=self.name,
                argv=self.argv) from error
        self.exited_ns = self.exited_ns or time.time_ns()
        return status

    async def fail_if_exits(self) -> None:
        """Raise :class:`QemuExitedError` when QEMU exits (run beside work that needs it)."""
        status = await self.wait_exit()
        raise QemuExitedError(
            "QEMU exited unexpectedly", name=self.name, argv=self.argv, status=status,
            stderr=await self.stderr_text(),
        )

    async def stop(self, *, grace: float = 5.0) -> int | None:
        """Shut QEMU down: quit, then SIGTERM, then SIGKILL, each with a deadline.

        Straight to SIGKILL for a destination whose post-copy was abandoned (quit
        and SIGTERM cannot work there); after a lost host connection, wait until
        the process is gone.
        """
        process = self._process
        if process is None:
            await self.monitor.close()
            if self.host.is_controller_machine:
                # Listened on for a QEMU that never started.
                await self.host.remove_tree(self.qmp_socket)
            return None
        try:
            if process.returncode is None and self._abandoned_postcopy():
                # Its vCPUs wait on pages that will never come, and both quit and SIGTERM
                # need them stopped: each would only run out its deadline.
                self.log.warning("post-copy paused and abandoned: sending SIGKILL")
                await process.send_signal(signal.SIGKILL)
            elif process.returncode is None:
                await self.monitor.quit(timeout=grace)
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        async with asyncio.timeout(grace):
                            await process.wait()
                        break
                    except TimeoutError:
                        self.log.warning("did not exit in %g s, sending %s", grace, sig.name)
                        await process.send_signal(sig)
            await process.wait()
        except HostError as error:
            # The connection to the host dropped: the process ends with it, by its
            # supervisor's hand; make sure it has before saying it is stopped.
            self.log.warning("lost with its host connection: %s", error)
            await self._wait_gone(process.pid, grace)
        finally:
            await self.monitor.close()
            await self._forwarding.aclose()
            await self.host.remove_tree(self.qmp_socket)
        self.exited_ns = self.exited_ns or time.time_ns()
        self.log.info("exited with status %s", process.returncode)
        return process.returncode

    def _abandoned_postcopy(self) -> bool:
        """A destination left paused or recovering: the guest's memory will never be whole."""
        return self.incoming and self.monitor.migration_status() in (
            "postcopy-paused", "postcopy-recover", "postcopy-recover-setup")

    async def _wait_gone(self, pid: int, grace: float) -> None:
        """Wait (a few ``grace`` periods) until ``pid`` is gone from the host, then kill it.

        After a lost connection its supervisor ends it; should that not happen
        (the host never noticed the connection go), SIGKILL over the new one.
        """
        with contextlib.suppress(TimeoutError, HostError):
            async with asyncio.timeout(3 * grace):
                while True:
                    probe = await self.host.run(["kill", "-0", str(pid)], timeout=10)
                    if probe.status != 0:
                        return
                    await asyncio.sleep(0.1)
        self.log.warning("pid %d still there %g s after its connection dropped: SIGKILL",
                         pid, 3 * grace)
        try:
            await self.host.run(["kill", "-KILL", str(pid)], timeout=10)
        except HostError as error:
            self.log.warning("could not SIGKILL pid %d: %s", pid, error)

    async def __aenter__(self) -> QemuProcess:
        try:
            await self.start()
        except BaseException:
            await self.stop(grace=2.0)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
