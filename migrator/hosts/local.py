"""The machine migrator itself runs on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from migrator.errors import HostError
from migrator.hosts.base import CommandResult, Host, HostProcess, LineExchange

__all__ = ["LocalHost", "LocalProcess"]

# A child started through setpriv gets SIGKILL when migrator dies, however it dies
# (even SIGKILL), so no local QEMU can outlive the controller.
_DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "SIGKILL", "--")


class LocalProcess(HostProcess):
    """A background process on the local machine."""

    def __init__(self, process: asyncio.subprocess.Process, argv: Sequence[str]) -> None:
        self._process = process
        self.argv = tuple(argv)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        return await self._process.wait()

    async def send_signal(self, sig: signal.Signals) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(sig)


class LocalHost(Host):
    """Commands and files on the machine migrator runs on."""

    is_controller_machine = True

    def __init__(self, name: str = "local") -> None:
        self.name = name

    async def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, stdin: bytes | None = None
    ) -> CommandResult:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise HostError(f"{argv[0]}: command not found on {self.name}", argv=argv) from None
        try:
            async with asyncio.timeout(timeout):
                out, err = await process.communicate(stdin)
        except BaseException as error:
            # Timeout or cancellation: the command must not outlive the call.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            if isinstance(error, TimeoutError):
                raise HostError(f"{argv[0]} on {self.name} did not finish within {timeout:g} s",
                                argv=argv) from None
            raise
        assert process.returncode is not None
        return CommandResult(
            tuple(argv),
            process.returncode,
            out.decode("utf-8", errors="replace"),
            err.decode("utf-8", errors="replace"),
        )

    async def start(
        self, argv: Sequence[str], *, stdout: Path, stderr: Path, cwd: Path | None = None
    ) -> HostProcess:
        full = [*_DIE_WITH_PARENT, *argv] if shutil.which("setpriv") else list(argv)
        out, err = await asyncio.to_thread(lambda: (open(stdout, "ab"), open(stderr, "ab")))  # noqa: SIM115
        with out, err:
            try:
                process = await asyncio.create_subprocess_exec(
                    *full,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=cwd,
                    # Own process group: a Ctrl-C at the terminal reaches migrator only,
                    # which then shuts QEMU down in order instead of racing it.
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise HostError(f"{argv[0]}: command not found on {self.name}", argv=argv) from None
        return LocalProcess(process, argv)

    @contextlib.asynccontextmanager
    async def exchange_lines(self, argv: Sequence[str]) -> AsyncIterator[LineExchange]:
        # Looked up first: under setpriv a missing command would only show as
        # setpriv's exit status once the first question went unanswered.
        if shutil.which(argv[0]) is None:
            raise HostError(f"{argv[0]}: command not found on {self.name}", argv=argv)
        full = [*_DIE_WITH_PARENT, *argv] if shutil.which("setpriv") else list(argv)
        process = await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        stderr = process.stderr

        async def ended() -> HostError:
            status: int | None = None
            output = b""
            # Bounded: a command can close its stdout and still run.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    status = await process.wait()
                    output = await stderr.read()
            return HostError(f"{argv[0]} on {self.name} stopped answering", argv=argv,
                             status=status, output=output.decode(errors="replace"))

        try:
            yield LineExchange(self.name, argv, process.stdin, process.stdout, ended)
        finally:
            process.stdin.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await process.wait()
            # The whole process group (its own session): neither a command that ignores
            # the end of its input nor a child it left behind may outlive the block, and
            # a child holding the output pipes would also keep wait() from returning.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    async def read_file(self, path: Path) -> bytes:
        return await asyncio.to_thread(path.read_bytes)

    async def write_file(self, path: Path, data: bytes) -> None:
        await asyncio.to_thread(path.write_bytes, data)

    async def exists(self, path: Path) -> bool:
        return await asyncio.to_thread(path.exists)

    async def make_private_dir(self, path: Path) -> None:
        def make() -> None:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)

        await asyncio.to_thread(make)

    async def remove_tree(self, path: Path) -> None:
        def remove() -> None:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

        await asyncio.to_thread(remove)

    async def get(self, remote: Path, local: Path) -> None:
        await asyncio.to_thread(_copy, remote, local)

    async def put(self, local: Path, remote: Path) -> None:
        await asyncio.to_thread(_copy, local, remote)

    @contextlib.asynccontextmanager
    async def forward_unix_socket(self, path: Path) -> AsyncIterator[Path]:
        yield path


def _copy(source: Path, target: Path) -> None:
    """Copy a file's content; copying a file onto itself is a no-op, not an error."""
    if target.exists() and os.path.samefile(source, target):
        return
    shutil.copyfile(source, target)
