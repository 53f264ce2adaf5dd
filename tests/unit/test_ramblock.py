"""HMP ``info ramblock`` parsing, on output of real QEMU 7.2 and 11.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrator.errors import ArtifactError
from migrator.metrics.ramblock import RamBlock, load_ramblocks, parse_info_ramblock, parse_size

DATA = Path(__file__).parent.parent / "data"


def test_qemu72_memfd() -> None:
    """Recorded from QEMU 7.2.22 via QMP human-monitor-command (CRLF line ends)."""
    path = DATA / "trace" / "qemu-7.2-memfd-32m.ramblock.txt"
    assert b"\r\n" in path.read_bytes()
    blocks = load_ramblocks(path)
    assert [b.name for b in blocks] == [
        "ram0",
        "0000:00:02.0/vga.vram",
        "/rom@etc/acpi/tables",
        "pc.bios",
        "pc.rom",
        "0000:00:02.0/vga.rom",
        "/rom@etc/table-loader",
        "/rom@etc/acpi/rsdp",
    ]
    assert blocks[0] == RamBlock("ram0", 4096, 0, 0x2000000, 0x2000000)
    tables = blocks[2]
    assert (tables.offset, tables.used, tables.total) == (0x30C0000, 0x20000, 0x200000)
    assert all(b.hva is None and b.readonly is None for b in blocks)


def test_qemu111_hugetlbfs_with_hva_and_ro() -> None:
    text = (
        "              Block Name    PSize              Offset               Used"
        "              Total                HVA  RO\r\n"
        "                    ram0    2 MiB  0x0000000000000000 0x0000000040000000"
        " 0x0000000040000000 0x00007fe7e7e00000  rw\r\n"
        "0000:00:05.0/virtio-net-pci.rom    4 KiB  0x0000000040080000 0x0000000000040000"
        " 0x0000000000040000 0x00007fe7e6400000  ro\r\n"
        "                  huge1g    1 GiB  0x0000000080000000 0x0000000040000000"
        " 0x0000000040000000 0x00007f3540000000  rw\r\n"
    )
    ram0, rom, huge = parse_info_ramblock(text)
    assert ram0 == RamBlock("ram0", 2 << 20, 0, 1 << 30, 1 << 30, 0x7FE7E7E00000, False)
    # A name longer than the 24-column field pushes the row right.
    assert rom.name == "0000:00:05.0/virtio-net-pci.rom"
    assert rom.readonly is True
    assert huge.page_size == 1 << 30


RECORDED = sorted(DATA.glob("qemu-*/*/info-ramblock-dst.txt"))


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_recorded_outputs(path: Path) -> None:
    blocks = load_ramblocks(path)
    ram0 = blocks[0]
    expected = {"memfd-4k": 4096, "hugetlbfs-2m": 2 << 20, "hugetlbfs-1g": 1 << 30}
    run = path.parent.name.removesuffix("-preempt-tcp").removesuffix("-preempt-unix")
    assert ram0.name == "ram0"
    assert ram0.page_size == expected[run]
    assert ram0.used == 1 << 30
    newer = path.parent.parent.name != "qemu-7.2"
    assert all((b.hva is not None) == newer for b in blocks)
    assert all((b.readonly is not None) == newer for b in blocks)
    assert {b.name for b in blocks} >= {"ram0", "pc.bios", "pc.rom"}


@pytest.mark.parametrize(
    ("text", "size"),
    [("4 KiB", 4096), ("64 KiB", 65536), ("2 MiB", 2 << 20), ("1 GiB", 1 << 30),
     ("16 GiB", 16 << 30), ("512 B", 512), ("1.5 KiB", 1536)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["4 KB", "KiB", "0.3 B", "-4 KiB", "4 kib", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ArtifactError):
        parse_size(text)


def test_not_info_ramblock_output() -> None:
    with pytest.raises(ArtifactError, match="header"):
        parse_info_ramblock("unknown command: 'info ramblok'\r\n")


def test_unexpected_row() -> None:
    text = "              Block Name    PSize              Offset\nram0 4 KiB nonsense\n"
    with pytest.raises(ArtifactError, match="line 2"):
        parse_info_ramblock(text)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read"):
        load_ramblocks(tmp_path / "nope.txt")
