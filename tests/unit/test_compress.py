"""A QEMU's file compressed on its host once QEMU is done (the local host's real zstd), and
the preflight that wants zstd where the trace is written."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zstandard

from migrator.config import parse_scenario
from migrator.errors import HostError, PreflightError
from migrator.hosts.base import CommandResult
from migrator.hosts.compress import compress_in_place, compressed_when_done
from migrator.hosts.fake import FakeHost
from migrator.hosts.local import LocalHost
from migrator.preflight import Need, PreflightReport, check_hosts, raise_unmet

LINE = b"18917@1795630006.940943:postcopy_place_page host=0x7f992008b000\n"


def names(directory: Path) -> list[str]:
    """What ``directory`` holds."""
    return sorted(p.name for p in directory.iterdir())


def decompressed(path: Path) -> tuple[bytes, bool]:
    """The bytes of a one-frame zstd file, and whether its frame was ended."""
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    data = decompressor.decompress(path.read_bytes())
    return data, decompressor.eof


async def test_a_file_becomes_its_zst_and_nothing_else(tmp_path: Path) -> None:
    trace = tmp_path / "trace.log"
    await asyncio.to_thread(trace.write_bytes, LINE * 100_000)
    made = await compress_in_place(LocalHost(), trace)
    assert made == tmp_path / "trace.log.zst"
    assert names(tmp_path) == ["trace.log.zst"]
    assert decompressed(made) == (LINE * 100_000, True)
    assert made.stat().st_size * 20 < len(LINE) * 100_000


async def test_the_file_is_compressed_when_its_writer_is_done(tmp_path: Path) -> None:
    trace = tmp_path / "trace.log"
    async with compressed_when_done(LocalHost(), trace):
        await asyncio.to_thread(trace.write_bytes, LINE * 10)
        assert names(tmp_path) == ["trace.log"]  # plain while it is written
    assert names(tmp_path) == ["trace.log.zst"]
    assert decompressed(tmp_path / "trace.log.zst") == (LINE * 10, True)


async def test_a_crashed_writers_file_is_compressed_all_the_same(tmp_path: Path) -> None:
    trace = tmp_path / "trace.log"

    async def crash_mid_line() -> None:
        async with compressed_when_done(LocalHost(), trace):
            await asyncio.to_thread(trace.write_bytes, LINE * 10 + LINE[:20])
            raise RuntimeError("QEMU died")

    with pytest.raises(RuntimeError, match="QEMU died"):
        await crash_mid_line()
    assert decompressed(tmp_path / "trace.log.zst") == (LINE * 10 + LINE[:20], True)


async def test_no_file_no_compression(tmp_path: Path) -> None:
    async with compressed_when_done(LocalHost(), tmp_path / "trace.log"):
        pass  # QEMU never started
    assert names(tmp_path) == []


async def test_a_failing_zstd_is_an_error_with_its_words() -> None:
    host = FakeHost("b")
    host.set_text("/r/dst/trace.log", "x\n")
    host.commands["zstd"] = lambda argv: CommandResult(
        argv, 1, "", "zstd: error 70 : Write error : cannot write block : No space left on "
                     "device\n")
    with pytest.raises(HostError, match=r"compressing /r/dst/trace\.log on b failed: zstd -q "
                                        r"-1 -f --rm /r/dst/trace\.log -o /r/dst/trace\.log\.zst "
                                        r"\(exit 1\): .*No space left on device"):
        await compress_in_place(host, Path("/r/dst/trace.log"))


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
