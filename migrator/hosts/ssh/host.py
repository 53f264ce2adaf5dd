"""A machine reached over SSH (asyncssh), behind the same :class:`Host` interface.

How commands run there, and why none outlives its channel, is
:mod:`migrator.hosts.ssh.supervisor`; how the connection is made and its
failures worded, :mod:`migrator.hosts.ssh.connection`.  Closing an
:class:`SSHHost` ends every process it started the same way, and waits for them.

Files go over one SFTP session per connection; ``read_file`` reads until EOF
rather than trusting the size SFTP reports (0 for /proc, 4096 for sysfs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import cast

import asyncssh

from migrator.aio import finish_even_if_cancelled
from migrator.errors import HostError
from migrator.hosts.base import CommandResult, Host, HostProcess, LineExchange
from migrator.hosts.ssh.connection import SSHTarget, open_connection, translate_errors
from migrator.hosts.ssh.supervisor import (
    SSHProcess,
    channel_returncode,
    close_channel,
    end_channel,
    not_found_error,
    remote_command,
    started_pid,
)

__all__ = ["SSHHost"]

log = logging.getLogger(__name__)

# Bytes per SFTP read request when reading or copying a remote file.
COPY_BLOCK = 1 << 18


class SSHHost(Host):
    """Commands and files on a machine reached over SSH (see module docstring).

    Use as ``async with SSHHost(target) as host``; leaving the block ends every
    process this host started and closes the connection.
    """

    def __init__(
        self, target: SSHTarget, *, kill_grace: float = 2.0, keepalive_interval: float = 5.0,
        keepalive_count_max: int = 3,
    ) -> None:
        self.target = target
        self.name = target.label
        self.kill_grace = kill_grace
        self._keepalive = (keepalive_interval, keepalive_count_max)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_lock = asyncio.Lock()
        self._started: list[SSHProcess] = []

    # Connection life cycle.

    async def __aenter__(self) -> SSHHost:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connection(self) -> asyncssh.SSHClientConnection:
        """The live asyncssh connection; :class:`HostError` when not connected."""
        if self._conn is None:
            raise HostError(f"{self.name}: not connected (use `async with SSHHost(...)`)")
        return self._conn

    async def connect(self) -> None:
        """Open the SSH connection; every failure is one clear :class:`HostError`."""
        self._conn = await open_connection(
            self.target, keepalive_interval=self._keepalive[0],
            keepalive_count_max=self._keepalive[1])

    async def close(self) -> None:
        """End every process started here, then close SFTP and the connection."""
        live = [p for p in self._started if p.returncode is None]
        for process in live:
            log.warning("%s: ending %s (pid %d) as the host closes",
                        self.name, process.argv[0], process.pid)
            process.detach()
        if live:
            # The supervisors escalate to SIGKILL after kill_grace; their channels close
            # once the processes are gone, so this wait confirms nothing is left.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.kill_grace + 3.0):
                    await asyncio.gather(*(p.wait_closed() for p in live))
        self._started.clear()
        if self._sftp is not None:
            self._sftp.exit()
            with contextlib.suppress(Exception):
                await self._sftp.wait_closed()
            self._sftp = None
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await self._conn.wait_closed()
            self._conn = None

    async def sever(self) -> None:
        """Drop the connection abruptly, as a network failure would, then connect afresh.

        For fault injection.  Every process started here ends with the old
        connection (its supervisor sees the channel close); the new one serves
        whatever comes next, such as the clean-up.
        """
        connection = self.connection
        log.warning("%s: dropping the SSH connection (fault injection)", self.name)
        connection.abort()
        with contextlib.suppress(Exception):
            await connection.wait_closed()
        self._started.clear()
        self._sftp = None
        self._conn = None
        # Finished even if the caller is cancelled meanwhile (the run failing because the
        # QEMU here just ended): the clean-up that follows needs the connection.
        await finish_even_if_cancelled(self.connect())

    # Commands.

    async def _open(self, command: str) -> asyncssh.SSHClientProcess[bytes]:
        with translate_errors(self.name, "opening an SSH session"):
            process: asyncssh.SSHClientProcess[bytes] = await self.connection.create_process(
                command, encoding=None
            )
            return process

    async def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, stdin: bytes | None = None
    ) -> CommandResult:
        """Run ``argv`` remotely; a timeout kills it there and raises :class:`HostError`."""
        data = stdin or b""
        command = remote_command(argv, stdin_bytes=len(data), kill_grace=self.kill_grace)
        process = await self._open(command)
        try:
            with translate_errors(self.name, f"running {argv[0]}"):
                async with asyncio.timeout(timeout):
                    if data:
                        # No EOF afterwards: the open channel is the supervisor's lifeline.
                        process.stdin.write(data)
                    out, err = await asyncio.gather(process.stdout.read(), process.stderr.read())
                    await process.wait_closed()
        except TimeoutError:
            await end_channel(process, self.kill_grace)
            raise HostError(
                f"{argv[0]} on {self.name} did not finish within {timeout:g} s and was killed",
                argv=argv,
            ) from None
        except BaseException:
            # Cancelled: no waiting here; closing the channel is what kills the command.
            close_channel(process)
            raise
        status = channel_returncode(process)
        if status is None:
            raise HostError(f"{self.name}: SSH connection lost while running {argv[0]}", argv=argv)
        missing = not_found_error(self.name, argv, status, err)
        if missing is not None:
            raise missing
        return CommandResult(
            tuple(argv), status, out.decode("utf-8", errors="replace"),
            err.decode("utf-8", errors="replace"),
        )

    async def start(
        self, argv: Sequence[str], *, stdout: Path, stderr: Path, cwd: Path | None = None
    ) -> HostProcess:
        """Start ``argv`` with output appended to remote files; it dies with the channel."""
        command = remote_command(
            argv, mode="start", kill_grace=self.kill_grace, cwd=cwd, stdout=stdout, stderr=stderr
        )
        process = await self._open(command)
        pid = await started_pid(self.name, process, argv)
        started = SSHProcess(self.name, process, argv, pid)
        self._started = [p for p in self._started if p.returncode is None] + [started]
        log.debug("%s: started %s as pid %d", self.name, shlex.join(argv), started.pid)
        return started

    @contextlib.asynccontextmanager
    async def exchange_lines(self, argv: Sequence[str]) -> AsyncIterator[LineExchange]:
        """A dialogue with ``argv`` over one channel; closing it ends the command there."""
        process = await self._open(remote_command(argv, mode="talk", kill_grace=self.kill_grace))
        await started_pid(self.name, process, argv)

        async def ended() -> HostError:
            output = b""
            with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
                async with asyncio.timeout(self.kill_grace + 3.0):
                    output = await process.stderr.read()
                    await process.wait_closed()
            status = channel_returncode(process)
            return HostError(f"{argv[0]} on {self.name} stopped answering", argv=argv,
                             status=status, output=output.decode("utf-8", errors="replace"))

        try:
            yield LineExchange(self.name, argv, process.stdin, process.stdout, ended)
        finally:
            await end_channel(process, self.kill_grace)

    # Files.

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        async with self._sftp_lock:
            if self._sftp is None:
                # Finished (and kept) even if the caller is cancelled meanwhile: a session
                # started and then dropped would hold one of sshd's few channels.
                await finish_even_if_cancelled(self._start_sftp())
            assert self._sftp is not None
            return self._sftp

    async def _start_sftp(self) -> None:
        with translate_errors(self.name, "starting SFTP"):
            self._sftp = await self.connection.start_sftp_client()

    async def _chunks(self, path: Path, what: str) -> AsyncGenerator[bytes, None]:
        """A remote file's bytes, block by block, until EOF.

        Until EOF rather than a stat'ed size: /proc and sysfs files report a size
        (0, 4096) that is not theirs.  One plain request per block (``block_size=0``):
        asyncssh otherwise splits each read into parallel request tasks, which it
        abandons when the read is cancelled (a QEMU's stderr is often being read as a
        run fails), and the abandoned ones end in "Task exception was never
        retrieved" tracebacks at exit.
        """
        sftp = await self._sftp_client()
        with translate_errors(self.name, what):
            async with sftp.open(str(path), "rb", block_size=0) as remote:
                offset = 0
                # Opened in binary mode ("rb"): reads return bytes; b"" at EOF.
                while chunk := cast(bytes, await remote.read(COPY_BLOCK, offset)):
                    yield chunk
                    offset += len(chunk)

    async def read_file(self, path: Path) -> bytes:
        return b"".join([chunk async for chunk in self._chunks(path, f"reading {path}")])

    async def write_file(self, path: Path, data: bytes) -> None:
        sftp = await self._sftp_client()
        with translate_errors(self.name, f"writing {path}"):
            async with sftp.open(str(path), "wb") as remote:
                # Finished even if cancelled: asyncssh writes in parallel requests (see _chunks).
                await finish_even_if_cancelled(remote.write(data, 0))

    async def exists(self, path: Path) -> bool:
        sftp = await self._sftp_client()
        with translate_errors(self.name, f"checking {path}"):
            return await sftp.exists(str(path))

    async def make_private_dir(self, path: Path) -> None:
        sftp = await self._sftp_client()
        with translate_errors(self.name, f"creating {path}"):
            await sftp.makedirs(str(path), exist_ok=True)
            await sftp.chmod(str(path), 0o700)

    async def remove_tree(self, path: Path) -> None:
        if not path.is_absolute() or path == Path("/"):
            raise HostError(f"{self.name}: refusing to remove {str(path)!r}: not a subtree")
        (await self.run(["rm", "-rf", "--", str(path)])).check(f"removing {path} on {self.name}")

    async def get(self, remote: Path, local: Path) -> None:
        async with contextlib.aclosing(self._chunks(remote, f"copying {remote}")) as chunks:
            # The remote file is opened first: a missing one leaves no empty local copy.
            first = await anext(chunks, b"")
            with local.open("wb") as out:
                await asyncio.to_thread(out.write, first)
                async for chunk in chunks:
                    await asyncio.to_thread(out.write, chunk)

    async def put(self, local: Path, remote: Path) -> None:
        sftp = await self._sftp_client()
        with translate_errors(self.name, f"copying {local} to {remote}"):
            await sftp.put(str(local), str(remote))

    @contextlib.asynccontextmanager
    async def forward_unix_socket(self, path: Path) -> AsyncIterator[Path]:
        """Forward a local socket in a fresh 0700 directory to ``path`` on the host."""
        local_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="migrator-fwd-"))
        # sun_path holds 108 bytes; the remote name is only a hint for humans.
        local = local_dir / (path.name[:48] or "socket")
        try:
            with translate_errors(self.name, f"forwarding {path}"):
                listener = await self.connection.forward_local_path(str(local), str(path))
            try:
                yield local
            finally:
                listener.close()
                await listener.wait_closed()
        finally:
            await asyncio.to_thread(shutil.rmtree, local_dir, True)
