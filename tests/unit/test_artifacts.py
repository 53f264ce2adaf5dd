"""Raw artifacts plain or compressed: the writer, the one opener, and reports from either form."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import zstandard

from migrator import rundir
from migrator.errors import ArtifactError
from migrator.metrics.events import read_jsonl
from migrator.metrics.summary import build_report
from migrator.rundir import (
    ZST,
    ZSTD_LEVEL,
    JsonlWriter,
    artifact_path,
    open_artifact,
    open_artifact_text,
)

DATA = Path(__file__).resolve().parents[1] / "data"
RUNS = DATA / "runs"

RECORDS = [{"side": "src" if n % 2 else "dst", "host_ns": 10**18 + n, "seq": n,
            "reply": {"status": "postcopy-active", "ram": {"remaining": 4096 * (500 - n)}}}
           for n in range(500)]


def write(path: Path, records: list[dict[str, Any]], *, compress: bool) -> Path:
    writer = JsonlWriter(path, compress=compress)
    for record in records:
        writer.write(record)
    writer.close()
    return writer.path


def compress_file(path: Path) -> Path:
    """``path`` replaced by ``path.zst``, compressed as a run would write it."""
    target = path.with_name(path.name + ZST)
    target.write_bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(path.read_bytes()))
    path.unlink()
    return target


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_records_read_back_by_the_plain_name_in_either_form(tmp_path: Path,
                                                            compress: bool) -> None:
    written = write(tmp_path / "samples.jsonl", RECORDS, compress=compress)
    assert written.name == ("samples.jsonl.zst" if compress else "samples.jsonl")
    assert [p.name for p in tmp_path.iterdir()] == [written.name]
    assert artifact_path(tmp_path / "samples.jsonl") == written
    assert list(read_jsonl(tmp_path / "samples.jsonl")) == RECORDS


async def test_compressed_is_a_zstd_stream_much_smaller_than_the_text(tmp_path: Path) -> None:
    # In an event loop, as in a run: records written within a second share a block.
    plain = write(tmp_path / "a.jsonl", RECORDS, compress=False)
    packed = write(tmp_path / "b.jsonl", RECORDS, compress=True)
    # What zstdcat shows: the very bytes of the plain form.
    assert zstandard.ZstdDecompressor().stream_reader(packed.read_bytes()).read() == \
        plain.read_bytes()
    assert packed.stat().st_size * 10 < plain.stat().st_size


def test_a_writer_opened_again_appends_a_frame(tmp_path: Path) -> None:
    write(tmp_path / "s.jsonl", RECORDS[:10], compress=True)
    write(tmp_path / "s.jsonl", RECORDS[10:20], compress=True)
    assert list(read_jsonl(tmp_path / "s.jsonl")) == RECORDS[:20]


async def test_a_record_reaches_the_file_within_the_flush_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rundir, "FLUSH_INTERVAL_S", 0.05)
    writer = JsonlWriter(tmp_path / "s.jsonl", compress=True)
    try:
        for record in RECORDS[:3]:
            writer.write(record)
        # Not yet: a block per record would cost ratio and CPU.
        assert list(read_jsonl(tmp_path / "s.jsonl")) == []
        await asyncio.sleep(0.3)
        # The frame is not ended (the writer is still open), yet every record is readable:
        # what a controller killed now would leave.
        assert list(read_jsonl(tmp_path / "s.jsonl")) == RECORDS[:3]
        writer.write(RECORDS[3])
        await asyncio.sleep(0.3)
        assert list(read_jsonl(tmp_path / "s.jsonl")) == RECORDS[:4]
    finally:
        writer.close()


def test_without_an_event_loop_each_record_is_flushed(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path / "s.jsonl", compress=True)
    writer.write(RECORDS[0])
    assert list(read_jsonl(tmp_path / "s.jsonl")) == RECORDS[:1]
    writer.close()


def test_a_cut_stream_reads_whole_records_up_to_the_cut(tmp_path: Path) -> None:
    # Flushed every record (no event loop), so a cut anywhere loses only what follows it.
    data = write(tmp_path / "whole.jsonl", RECORDS, compress=True).read_bytes()
    cut = tmp_path / "cut.jsonl.zst"
    seen = []
    for end in range(0, len(data), 97):
        cut.write_bytes(data[:end])
        records = list(read_jsonl(tmp_path / "cut.jsonl"))
        assert records == RECORDS[:len(records)], end
        seen.append(len(records))
    assert seen == sorted(seen)
    assert seen[-1] >= len(RECORDS) - 5


def test_a_cut_stream_gives_the_lines_up_to_its_last_whole_block(tmp_path: Path) -> None:
    text = b"".join(b"%d@1795630006.%06d:postcopy_place_page host=0x7f%010x\n" % (7, n, n << 12)
                    for n in range(200_000))
    trace = tmp_path / "trace.log"
    trace.write_bytes(text)
    data = compress_file(trace).read_bytes()
    (tmp_path / "trace.log.zst").write_bytes(data[:len(data) // 2])
    with open_artifact(tmp_path / "trace.log") as stream:
        head = stream.read()
    # A prefix, cut at a block boundary (128 KiB), not empty: the reader stops at the cut.
    assert 0 < len(head) < len(text)
    assert text.startswith(head)
    assert len(head) % (128 << 10) == 0


def test_garbage_is_an_artifact_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl.zst").write_bytes(b"not zstd at all\n" * 8)
    with pytest.raises(ArtifactError, match=r"s\.jsonl\.zst: not a readable zstd stream"):
        list(read_jsonl(tmp_path / "s.jsonl"))


def test_the_opener_finds_either_form_and_says_when_neither_exists(tmp_path: Path) -> None:
    assert artifact_path(tmp_path / "trace.log") is None
    with pytest.raises(FileNotFoundError, match=r"trace\.log: no such artifact \(nor "
                                                r"trace\.log\.zst\)"):
        open_artifact(tmp_path / "trace.log")
    assert list(read_jsonl(tmp_path / "absent.jsonl")) == []
    (tmp_path / "trace.log").write_text("a\n")
    compressed = compress_file(tmp_path / "trace.log")
    with open_artifact_text(tmp_path / "trace.log") as by_plain_name:
        assert by_plain_name.read() == "a\n"
    with open_artifact(compressed) as by_own_name:
        assert by_own_name.read() == b"a\n"
    # A plain file is read as it is, even beside a compressed one.
    (tmp_path / "trace.log").write_text("b\n")
    with open_artifact_text(tmp_path / "trace.log") as plain:
        assert plain.read() == "b\n"


def _threads(run: Path) -> None:
    """A ``threads.jsonl`` per side over the run's timeline (the recorded runs predate it)."""
    stamps = [int(json.loads(line)["host_ns"])
              for line in (run / "timeline.jsonl").read_text().splitlines()]
    first, last = min(stamps), max(stamps)
    for side in ("src", "dst"):
        lines: list[dict[str, Any]] = [{"host_ns": first, "clock_ticks_per_s": 100}]
        for n in range(21):
            lines.append({"host_ns": first + (last - first) * n // 20,
                          "threads": [[100, "CPU 0/TCG", 5 * n, n], [101, "live_migration", n,
                                                                        2 * n]]})
        (run / side / "threads.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize("name", ["hugetlb-1g", "hugetlb-2m", "crashed-memfd-4k",
                                  "recovery/link-down-twice"])
def test_a_report_from_compressed_artifacts_equals_the_plain_one(tmp_path: Path,
                                                                  name: str) -> None:
    source = DATA / name if "/" in name else RUNS / name
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    shutil.copytree(source, plain)
    (plain / "report.json").unlink(missing_ok=True)
    if name == "hugetlb-1g":
        # Every sampled artifact a run compresses, smaps and thread samples too.
        shutil.copy(DATA / "hgm" / "smaps-samples-hgm-1g.jsonl", plain / "dst" / "smaps.jsonl")
        _threads(plain)
    shutil.copytree(plain, packed)
    # Every line artifact, even those a run keeps plain: no reader may open one by itself.
    compressed = [compress_file(path) for path in sorted(packed.rglob("*"))
                  if path.name.endswith((".jsonl", ".log"))]
    assert compressed
    assert not list(packed.rglob("*.jsonl"))
    assert not list(packed.rglob("trace.log"))
    report = build_report(packed)
    assert report == build_report(plain)
    assert not list(packed.rglob("report.json"))
    if name == "hugetlb-1g":
        assert report.hgm is not None
        assert report.hgm.mapping is not None
        assert report.thread_cpu
    if name.startswith("hugetlb"):
        assert report.fetch
        assert all(block.faults is not None for block in report.fetch)
