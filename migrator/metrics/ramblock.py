"""Parse the HMP ``info ramblock`` table into :class:`RamBlock` records.

QEMU prints one row per RAMBlock (``ram_block_format()`` in ``system/physmem.c``).
QEMU 7.2 (``"%24s %8s  0x%016lx 0x%016lx 0x%016lx"``)::

                  Block Name    PSize              Offset               Used              Total
                        ram0    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000

Later QEMU appends two columns, ``HVA`` (``0x%016lx``, the block's host address)
and ``RO`` (``ro``/``rw``), e.g. ``... 0x0000000008000000 0x00007f684fe00000  rw``.

The name is right-aligned in 24 columns but longer names (``0000:00:05.0/
virtio-net-pci.rom``) simply push the row right, so rows are parsed by their
shape, not by column positions.  ``PSize`` comes from QEMU's ``size_to_str()``
(``"%0.3g %sB"`` with binary prefixes): ``4 KiB``, ``2 MiB``, ``1 GiB``.
Output fetched through QMP ``human-monitor-command`` ends lines with ``\\r\\n``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from migrator.errors import ArtifactError

__all__ = ["RamBlock", "load_ramblocks", "parse_info_ramblock", "parse_size"]

_UNITS = {"B": 0, "KiB": 10, "MiB": 20, "GiB": 30, "TiB": 40, "PiB": 50, "EiB": 60}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*(B|[KMGTPE]iB)\s*$")

_ROW = re.compile(
    r"^\s*(?P<name>\S.*?)\s+"
    r"(?P<psize>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\s*(?:B|[KMGTPE]iB))\s+"
    r"0x(?P<offset>[0-9a-fA-F]+)\s+0x(?P<used>[0-9a-fA-F]+)\s+0x(?P<total>[0-9a-fA-F]+)"
    r"(?:\s+0x(?P<hva>[0-9a-fA-F]+))?"
    r"(?:\s+(?P<ro>ro|rw))?\s*$"
)


@dataclass(frozen=True)
class RamBlock:
    """One RAMBlock as ``info ramblock`` shows it; sizes and addresses in bytes.

    ``offset`` is the block's place in QEMU's ram_addr space (not a guest
    physical address); ``used`` is its current length and ``total`` its
    maximum.  ``hva`` (host virtual address of the block's start) and
    ``readonly`` are only printed by QEMU versions newer than 7.2.
    """

    name: str
    page_size: int
    offset: int
    used: int
    total: int
    hva: int | None = None
    readonly: bool | None = None


def parse_size(text: str) -> int:
    """Bytes in a QEMU ``size_to_str()`` string such as ``"4 KiB"`` or ``"2 MiB"``."""
    match = _SIZE.match(text)
    if match is None:
        raise ArtifactError(f"info ramblock: cannot parse size {text!r}")
    number, unit = match.groups()
    value = float(number) * (1 << _UNITS[unit])
    # "%0.3g" keeps three significant digits; a page size is a power of two and
    # prints exactly, anything that does not land on a whole byte is garbage.
    if value != int(value) or value <= 0:
        raise ArtifactError(f"info ramblock: {text!r} is not a whole number of bytes")
    return int(value)


def parse_info_ramblock(text: str) -> list[RamBlock]:
    """Every RAMBlock row of an ``info ramblock`` output, in printed order.

    Raises ArtifactError when there is no header line or a row has an
    unexpected shape.
    """
    blocks: list[RamBlock] = []
    seen_header = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if not seen_header:
            if "Block Name" in line and "PSize" in line:
                seen_header = True
            continue
        match = _ROW.match(line)
        if match is None:
            raise ArtifactError(f"info ramblock line {number}: unexpected row {line.strip()!r}")
        hva = match["hva"]
        ro = match["ro"]
        blocks.append(
            RamBlock(
                name=match["name"],
                page_size=parse_size(match["psize"]),
                offset=int(match["offset"], 16),
                used=int(match["used"], 16),
                total=int(match["total"], 16),
                hva=int(hva, 16) if hva is not None else None,
                readonly=None if ro is None else ro == "ro",
            )
        )
    if not seen_header:
        raise ArtifactError("info ramblock: no 'Block Name ... PSize' header; not its output")
    return blocks


def load_ramblocks(path: Path) -> list[RamBlock]:
    """Parse an ``info ramblock`` output saved as a run artifact."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read info ramblock output: {exc}") from exc
    try:
        return parse_info_ramblock(text)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc
