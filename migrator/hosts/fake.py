"""A scripted in-memory host for unit tests of logic that talks to a :class:`Host`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from migrator.errors import HostError
from migrator.hosts.base import CommandResult, Host, HostProcess, LineExchange

__all__ = ["FakeHost"]

CommandHandler = Callable[[tuple[str, ...]], CommandResult]
DialogueHandler = Callable[[tuple[str, ...], str], str]
"""(argv, question line) -> answer line."""


class _Dialogue:
    """Both ends of a scripted exchange: each line written is answered at once."""

    def __init__(self, argv: tuple[str, ...], answer: DialogueHandler) -> None:
        self._argv = argv
        self._answer = answer
        self._answers: list[bytes] = []

    def write(self, data: bytes) -> None:
        for line in data.decode().splitlines():
            self._answers.append(self._answer(self._argv, line).encode() + b"\n")

    async def readline(self) -> bytes:
        return self._answers.pop(0) if self._answers else b""


def _echo(_argv: tuple[str, ...], line: str) -> str:
    return line


class FakeHost(Host):
    """Files live in a dict; commands are answered by handlers matched on argv[0].

    ``on_write`` hooks let a test emulate kernel knobs (writing ``nr_hugepages``
    changes ``free_hugepages``).  ``dialogues`` answer :meth:`exchange_lines`
    by argv[0]; a command without one is "not found".  ``flock`` is there from
    the start: a fake host's locks are always free (its holder echoes each line,
    as :mod:`migrator.hosts.pool_claims` expects).  Every command, write and
    exchange is logged in ``calls``.
    """

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.files: dict[Path, bytes] = {}
        self.dirs: set[Path] = set()
        self.commands: dict[str, CommandHandler] = {}
        self.on_write: dict[Path, Callable[[bytes], None]] = {}
        self.dialogues: dict[str, DialogueHandler] = {"flock": _echo}
        self.calls: list[tuple[str, ...]] = []

    def set_text(self, path: str | Path, text: str) -> None:
        """Put a file on the fake host."""
        self.files[Path(path)] = text.encode()

    def text(self, path: str | Path) -> str:
        """A file's content."""
        return self.files[Path(path)].decode()

    async def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, stdin: bytes | None = None
    ) -> CommandResult:
        args = tuple(argv)
        self.calls.append(("run", *args))
        handler = self.commands.get(args[0])
        if handler is None:
            return CommandResult(args, 0, "", "")
        return handler(args)

    async def start(
        self, argv: Sequence[str], *, stdout: Path, stderr: Path, cwd: Path | None = None
    ) -> HostProcess:
        raise NotImplementedError("FakeHost does not run processes")

    @contextlib.asynccontextmanager
    async def exchange_lines(self, argv: Sequence[str]) -> AsyncIterator[LineExchange]:
        args = tuple(argv)
        self.calls.append(("exchange", *args))
        answer = self.dialogues.get(args[0])
        if answer is None:
            raise HostError(f"{args[0]}: command not found on {self.name}", argv=args)
        dialogue = _Dialogue(args, answer)

        async def ended() -> HostError:
            return HostError(f"{args[0]} on {self.name} stopped answering", argv=args)

        yield LineExchange(self.name, args, dialogue, dialogue, ended)

    async def read_file(self, path: Path) -> bytes:
        try:
            return self.files[path]
        except KeyError:
            raise FileNotFoundError(path) from None

    async def write_file(self, path: Path, data: bytes) -> None:
        self.calls.append(("write", str(path), data.decode(errors="replace").strip()))
        self.files[path] = data
        if path in self.on_write:
            self.on_write[path](data)

    async def exists(self, path: Path) -> bool:
        return path in self.files or path in self.dirs or any(
            p.is_relative_to(path) for p in (*self.files, *self.dirs)
        )

    async def make_private_dir(self, path: Path) -> None:
        self.calls.append(("mkdir", str(path)))
        self.dirs.add(path)

    async def remove_tree(self, path: Path) -> None:
        self.calls.append(("rm", str(path)))
        self.dirs = {d for d in self.dirs if not d.is_relative_to(path)}
        self.files = {f: v for f, v in self.files.items() if not f.is_relative_to(path)}

    async def get(self, remote: Path, local: Path) -> None:
        data = await self.read_file(remote)
        await asyncio.to_thread(local.write_bytes, data)

    async def put(self, local: Path, remote: Path) -> None:
        self.calls.append(("put", str(local), str(remote)))
        self.files[remote] = await asyncio.to_thread(local.read_bytes)

    @contextlib.asynccontextmanager
    async def forward_unix_socket(self, path: Path) -> AsyncIterator[Path]:
        yield path


