"""A FIFO compressed by zstd on a host (the local host's real mkfifo, zstd and dd), and the
preflight that wants zstd where the trace is written."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard

from migrator.config import parse_scenario
from migrator.errors import HostError, PreflightError
from migrator.hosts import zstd_fifo as module
from migrator.hosts.base import CommandResult
from migrator.hosts.fake import FakeHost
from migrator.hosts.local import LocalHost
from migrator.hosts.zstd_fifo import ZstdFifo, zstd_fifo
from migrator.preflight import Need, PreflightReport, check_hosts, raise_unmet

LINE = b"18917@1795630006.940943:postcopy_place_page host=0x7f992008b000\n"


def frames(path: Path) -> tuple[bytes, bool]:
    """The decompressed bytes of a one-frame zstd file, and whether its frame was ended."""
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    data = decompressor.decompress(path.read_bytes())
    return data, decompressor.eof


def names(directory: Path) -> list[str]:
    """What ``directory`` holds."""
    return sorted(p.name for p in directory.iterdir())


def zstd_processes(fifo: Path) -> list[int]:
    """Live zstd processes reading ``fifo``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"zstd" in argv and str(fifo).encode() in argv:
            found.append(int(proc.name))
    return found


async def test_the_writers_bytes_are_compressed_and_nothing_is_left(tmp_path: Path) -> None:
    fifo, out = tmp_path / "trace.fifo", tmp_path / "trace.log.zst"
    data = LINE * 50_000
    async with zstd_fifo(LocalHost(), fifo, out) as sink:
        assert stat.S_ISFIFO(fifo.stat().st_mode)
        assert stat.S_IMODE(fifo.stat().st_mode) == 0o600
        # As QEMU opens its -D file: this blocks until zstd has the FIFO open too.
        writer = await asyncio.to_thread(open, fifo, "wb")
        await sink.unlink()
        assert not fifo.exists()  # both ends are open; the name is not needed any more
        with writer:
            await asyncio.to_thread(writer.write, data)
    assert frames(out) == (data, True)
    assert sink.process.returncode == 0
    assert names(tmp_path) == [out.name]
    assert zstd_processes(fifo) == []


async def test_a_writer_that_never_came_leaves_an_empty_stream(tmp_path: Path) -> None:
    fifo, out = tmp_path / "trace.fifo", tmp_path / "trace.log.zst"
    async with zstd_fifo(LocalHost(), fifo, out) as sink:
        pass  # QEMU failed before it opened its trace
    # zstd was woken and ended by itself (a kill would have raised).
    assert sink.process.returncode == 0
    assert frames(out) == (b"", True)
    assert names(tmp_path) == [out.name]


async def test_a_writer_killed_mid_write_leaves_a_whole_readable_stream(tmp_path: Path) -> None:
    fifo, out = tmp_path / "trace.fifo", tmp_path / "trace.log.zst"
    async with zstd_fifo(LocalHost(), fifo, out) as sink:
        writer = await asyncio.create_subprocess_exec(
            "sh", "-c", 'exec yes "$1" > "$0"', str(fifo), LINE.decode().rstrip("\n"))
        await asyncio.sleep(0.3)
        writer.send_signal(signal.SIGKILL)  # a QEMU that crashed
        await writer.wait()
    data, ended = frames(out)
    assert ended  # zstd saw end-of-file and ended the frame: nothing of it is cut
    assert sink.process.returncode == 0
    lines = data.split(b"\n")
    assert len(lines) > 1000
    assert set(lines[:-1]) == {LINE.rstrip(b"\n")}
    assert LINE.startswith(lines[-1])  # a last line cut by the kill, if any


async def test_a_zstd_that_does_not_end_is_killed_and_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "EXIT_TIMEOUT_S", 0.3)
    fifo, out = tmp_path / "trace.fifo", tmp_path / "trace.log.zst"
    held: list[BinaryIO] = []
    sinks: list[ZstdFifo] = []

    async def write_and_hold() -> None:
        async with zstd_fifo(LocalHost(), fifo, out) as sink:
            sinks.append(sink)
            writer = await asyncio.to_thread(open, fifo, "wb")
            held.append(writer)
            await asyncio.to_thread(writer.write, LINE * 20_000)
            await asyncio.to_thread(writer.flush)
            await asyncio.sleep(0.3)  # zstd compresses what it has read so far
            # ... and the writer never closes its end.

    try:
        with pytest.raises(HostError, match=r"did not end within 0\.3 s of its writer and was "
                                            r"killed; the stream is readable up to its last"):
            await write_and_hold()
    finally:
        for writer in held:
            writer.close()
    assert sinks[0].process.returncode is not None
    data, ended = frames(out)
    assert not ended
    assert data == (LINE * 20_000)[:len(data)]
    assert not fifo.exists()
    assert zstd_processes(fifo) == []


async def test_a_failing_zstd_is_an_error_with_its_words(tmp_path: Path) -> None:
    fifo = tmp_path / "trace.fifo"

    async def write_to_a_full_disk() -> None:
        async with zstd_fifo(LocalHost(), fifo, Path("/dev/full")):
            with await asyncio.to_thread(open, fifo, "wb") as writer:
                await asyncio.to_thread(writer.write, os.urandom(1 << 20))

    with pytest.raises(HostError, match=r"zstd compressing into /dev/full on local failed") as info:
        await write_to_a_full_disk()
    assert "No space left" in info.value.output
    assert names(tmp_path) == []


def zstd_needs(report: PreflightReport) -> dict[str, list[Need]]:
    """The zstd needs the preflight found, by the roles of each host checked."""
    return {"+".join(host.roles): [n for n in host.needs if n.what.startswith("zstd")]
            for host in report.hosts}


def host(name: str, *, zstd: bool) -> FakeHost:
    """A host with or without the zstd command."""

    def version(argv: tuple[str, ...]) -> CommandResult:
        if not zstd:
            raise HostError(f"zstd: command not found on {name}", argv=argv)
        return CommandResult(argv, 0, "*** Zstandard CLI (64-bit) v1.5.4, by Yann Collet ***\n",
                             "")

    made = FakeHost(name)
    made.commands["zstd"] = version
    return made


def test_preflight_wants_zstd_where_the_trace_is_written() -> None:
    scenario = parse_scenario({"name": "x"})
    needs = zstd_needs(asyncio.run(check_hosts(scenario, host("a", zstd=False),
                                               host("b", zstd=True))))
    assert needs["source"] == []
    [need] = needs["destination"]
    assert need.met
    assert need.detail == "zstd 1.5.4"
    report = asyncio.run(check_hosts(scenario, host("a", zstd=True), host("b", zstd=False)))
    [need] = zstd_needs(report)["destination"]
    assert not need.met
    assert need.detail == "zstd not found on b"
    # As the run says it, alone (a fake host lacks much else): exit 3, the host, the fix.
    alone = report.model_copy(update={"hosts": [
        h.model_copy(update={"needs": [need]}) for h in report.hosts if h.host == "b"]})
    with pytest.raises(PreflightError) as caught:
        raise_unmet(alone)
    assert caught.value.exit_code == 3
    assert str(caught.value) == (
        'destination b: needs zstd (collect.compress = "zstd": the destination trace is '
        "compressed there): zstd not found on b; fix: apt install zstd on b, or set "
        'collect.compress = "none" to keep the trace plain')


@pytest.mark.parametrize("collect", [{"compress": "none"}, {"trace": False}])
def test_preflight_wants_no_zstd_without_a_compressed_trace(collect: dict[str, object]) -> None:
    scenario = parse_scenario({"name": "x", "collect": collect})
    report = asyncio.run(check_hosts(scenario, host("a", zstd=False), host("b", zstd=False)))
    assert zstd_needs(report) == {"source": [], "destination": []}
