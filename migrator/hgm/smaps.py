"""The guest RAM mapping of a QEMU process as ``/proc/PID/smaps`` shows it, sampled over time.

Format (``show_smap()`` in ``fs/proc/task_mmu.c``; ``Documentation/filesystems/
proc.rst``).  Each VMA is a header line
``start-end perms offset major:minor inode [pathname]`` (the pathname is padded
to a column and ends in `` (deleted)`` once the file is unlinked, as QEMU does
with its hugetlbfs file) followed by ``Label: value [kB]`` lines and a final
``VmFlags: rd wr sh ... ht`` line.  A hugetlb VMA has ``ht`` in VmFlags, and its
memory is counted in ``Shared_Hugetlb``/``Private_Hugetlb`` (never in ``Rss``).

The HGM series ("mm: smaps: add stats for HugeTLB mapping size", v1/v2, never
merged) adds ``HugetlbPudMapped:``, ``HugetlbPmdMapped:`` and
``HugetlbPteMapped:`` (kB of hugetlb memory mapped by page-table entries of
that level; a folded level is not printed) and the VmFlags mnemonic ``hm``
(``VM_HUGETLB_HGM``, set by ``MADV_SPLIT``), and widens every label column by
two characters.  So lines are parsed by label, never by column, and each of
the three counters is ``None`` when the kernel does not print it.

Without HGM a hugetlb page can only be mapped whole, so its level is implied by
the page size (x86-64: 2 MiB -> PMD, 1 GiB -> PUD); with HGM, post-copy maps 4
KiB pieces (PTE level) until QEMU collapses them after completion
(``MADV_COLLAPSE`` in 1 GiB chunks, trace event ``ramblock_rebuild_huge_mappings``).
:func:`sample_smaps` records that over time and :func:`collapse_summary` says
when and how fast the pieces went back to huge mappings.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from migrator.aio import paced
from migrator.errors import ArtifactError, HostError
from migrator.hosts.base import Host
from migrator.rundir import JsonlWriter, open_artifact_text

__all__ = [
    "CollapseSummary",
    "Granularity",
    "GuestRamFilter",
    "SmapsSample",
    "Vma",
    "collapse_summary",
    "find_guest_ram",
    "granularity",
    "load_samples",
    "parse_smaps",
    "sample_smaps",
]

log = logging.getLogger(__name__)

PUD_KB: Final = 1 << 20
PMD_KB: Final = 2048
_UFFD_FLAGS: Final = frozenset({"um", "uw", "ui"})

_HEADER = re.compile(
    r"(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+(?P<perms>\S{4})\s+(?P<offset>[0-9a-f]+)\s+"
    r"(?P<dev>[0-9a-f]+:[0-9a-f]+)\s+(?P<inode>\d+)(?:\s+(?P<path>.*))?"
)
_FIELD = re.compile(r"(?P<label>[A-Za-z_][A-Za-z0-9_]*):\s*(?P<value>.*)")
_DELETED = " (deleted)"
_HEADER_START = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ", re.MULTILINE)


@dataclass(frozen=True)
class Vma:
    """One VMA of smaps: its header and its counters (kB unless the kernel prints no unit).

    ``pathname`` is without the `` (deleted)`` suffix; ``deleted`` says whether
    it was there.  ``fields`` maps every numeric label to its value.
    """

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    pathname: str
    deleted: bool
    fields: Mapping[str, int] = field(hash=False)
    vmflags: frozenset[str]

    @property
    def length(self) -> int:
        """Bytes of address space."""
        return self.end - self.start

    @property
    def size_kb(self) -> int:
        """``Size`` (address space, kB)."""
        return self.fields.get("Size", self.length >> 10)

    @property
    def rss_kb(self) -> int | None:
        """``Rss`` (kB); hugetlb memory is never counted here."""
        return self.fields.get("Rss")

    @property
    def kernel_page_kb(self) -> int | None:
        """``KernelPageSize``: the hugetlb page size of a hugetlb VMA (kB)."""
        return self.fields.get("KernelPageSize")

    @property
    def hugetlb(self) -> bool:
        """A hugetlb VMA (VmFlags ``ht``)."""
        return "ht" in self.vmflags

    @property
    def shared(self) -> bool:
        """MAP_SHARED (``s`` in perms)."""
        return self.perms[3:4] == "s"

    @property
    def hugetlb_kb(self) -> int:
        """Hugetlb memory mapped in this VMA (``Shared_Hugetlb + Private_Hugetlb``, kB)."""
        return self.fields.get("Shared_Hugetlb", 0) + self.fields.get("Private_Hugetlb", 0)

    @property
    def pud_kb(self) -> int | None:
        """``HugetlbPudMapped`` (kB); None when the kernel does not print it."""
        return self.fields.get("HugetlbPudMapped")

    @property
    def pmd_kb(self) -> int | None:
        """``HugetlbPmdMapped`` (kB); None when the kernel does not print it."""
        return self.fields.get("HugetlbPmdMapped")

    @property
    def pte_kb(self) -> int | None:
        """``HugetlbPteMapped`` (kB); None when the kernel does not print it."""
        return self.fields.get("HugetlbPteMapped")

    @property
    def hm(self) -> bool:
        """MADV_SPLIT took effect on this VMA (VmFlags ``hm``, HGM kernels only)."""
        return "hm" in self.vmflags

    @property
    def uffd_registered(self) -> bool:
        """Registered with userfaultfd (VmFlags ``um``/``uw``/``ui``)."""
        return not self.vmflags.isdisjoint(_UFFD_FLAGS)

    @property
    def range_text(self) -> str:
        """``start-end`` as smaps prints it."""
        return f"{self.start:x}-{self.end:x}"


def _value(text: str) -> int | None:
    parts = text.split()
    if not parts or not parts[0].isdigit():
        return None
    return int(parts[0])


def _parse_block(lines: list[str]) -> Vma | None:
    header = _HEADER.fullmatch(lines[0].rstrip())
    if header is None:
        return None
    fields: dict[str, int] = {}
    flags: frozenset[str] = frozenset()
    for line in lines[1:]:
        item = _FIELD.fullmatch(line.strip())
        if item is None:
            continue
        if item["label"] == "VmFlags":
            flags = frozenset(item["value"].split())
        else:
            value = _value(item["value"])
            if value is not None:
                fields[item["label"]] = value
    path = (header["path"] or "").strip()
    deleted = path.endswith(_DELETED)
    return Vma(
        start=int(header["start"], 16),
        end=int(header["end"], 16),
        perms=header["perms"],
        offset=int(header["offset"], 16),
        dev=header["dev"],
        inode=int(header["inode"]),
        pathname=path.removesuffix(_DELETED) if deleted else path,
        deleted=deleted,
        fields=fields,
        vmflags=flags,
    )


def parse_smaps(text: str, *, hugetlb_only: bool = False) -> list[Vma]:
    """Every VMA of a ``/proc/PID/smaps`` text, in address order as printed.

    ``hugetlb_only`` skips, unparsed, every VMA without ``ht`` in VmFlags: a
    QEMU has ~300 VMAs and the sampler wants one or two, so this makes a
    sample many times cheaper.  Lines that are neither a header nor ``Label: value``
    are skipped (smaps of a live process is read while it changes; the kernel
    keeps each VMA whole).
    """
    if hugetlb_only:
        blocks = _hugetlb_blocks(text)
    else:
        starts = [m.start() for m in _HEADER_START.finditer(text)]
        ends = [*starts[1:], len(text)] if starts else []
        blocks = (text[a:b] for a, b in zip(starts, ends, strict=True))
    vmas = []
    for block in blocks:
        vma = _parse_block(block.splitlines())
        if vma is not None:
            vmas.append(vma)
    return vmas


def _hugetlb_blocks(text: str) -> Iterator[str]:
    """The text of every VMA with ``ht`` in VmFlags.

    ``show_smap()`` ends every VMA with its VmFlags line, so a VMA is the text
    between two of them: plain ``str.find`` instead of a regex over every line.
    """
    begin = 0
    while (at := text.find("\nVmFlags:", begin)) != -1:
        eol = text.find("\n", at + 1)
        eol = len(text) if eol < 0 else eol
        if "ht" in text[at + 9 : eol].split():
            yield text[begin:eol]
        begin = eol + 1


@dataclass(frozen=True)
class GuestRamFilter:
    """Which VMA of a QEMU process is the guest RAM: a shared hugetlb mapping, and optionally
    of this size (the RAMBlock's, bytes), at this address (the RAMBlock's HVA), or with a
    file under this directory (the backend's ``mem-path``)."""

    size_bytes: int | None = None
    start: int | None = None
    path_prefix: str | None = None

    def matches(self, vma: Vma) -> bool:
        """Whether ``vma`` can be the guest RAM."""
        if not (vma.hugetlb and vma.shared):
            return False
        if self.size_bytes is not None and vma.length != self.size_bytes:
            return False
        if self.start is not None and vma.start != self.start:
            return False
        prefix = self.path_prefix
        return prefix is None or vma.pathname.startswith(prefix.rstrip("/") + "/")


def find_guest_ram(vmas: Iterable[Vma], vma_filter: GuestRamFilter) -> Vma | None:
    """The guest RAM VMA among ``vmas``, or None.

    A HGM destination QEMU maps the same hugetlbfs file twice (the guest's
    mapping and a "mirror" it copies pages into before ``UFFDIO_CONTINUE``), so
    several VMAs can match by size and file.  The guest's is the one split by
    MADV_SPLIT (``hm``) and registered with userfaultfd; the mirror is neither.
    Ties go to the lowest address.  Give ``start`` when the HVA is known to make
    the choice exact.
    """
    candidates = [v for v in vmas if vma_filter.matches(v)]
    if not candidates:
        return None
    return min(candidates, key=lambda v: (not v.hm, not v.uffd_registered, v.start))


Level = Literal["unmapped", "pud", "pmd", "pte", "mixed"]


@dataclass(frozen=True)
class Granularity:
    """How one hugetlb VMA is mapped: kB at PUD, PMD and PTE level.

    ``pud_kb``/``pmd_kb``/``pte_kb`` are the kernel's HGM counters, None when it
    prints none (``measured`` False: no HGM, so everything mapped is mapped at
    the page's own level, which ``level`` then reports).  ``split_kb`` is memory
    mapped below the page's own level (PTE, and PMD inside 1 GiB pages): what
    ``MADV_COLLAPSE`` has to put back.
    """

    size_kb: int
    page_kb: int | None
    hugetlb_kb: int
    pud_kb: int | None
    pmd_kb: int | None
    pte_kb: int | None
    hm: bool

    @property
    def measured(self) -> bool:
        """The kernel printed HGM counters (a kernel with the HGM series)."""
        return any(v is not None for v in (self.pud_kb, self.pmd_kb, self.pte_kb))

    @property
    def split_kb(self) -> int | None:
        """kB mapped below the page's own level; None without HGM counters."""
        if not self.measured:
            return None
        below = self.pte_kb or 0
        if self.page_kb is not None and self.page_kb > PMD_KB:
            below += self.pmd_kb or 0
        return below

    @property
    def level(self) -> Level:
        """The one level everything is mapped at, ``mixed``, or ``unmapped``."""
        if not self.measured:
            if self.hugetlb_kb == 0:
                return "unmapped"
            # A kernel without HGM maps a hugetlb page whole (x86-64 page sizes).
            return "pud" if (self.page_kb or 0) >= PUD_KB else "pmd"
        counted: tuple[tuple[Level, int | None], ...] = (
            ("pud", self.pud_kb), ("pmd", self.pmd_kb), ("pte", self.pte_kb)
        )
        levels = [name for name, kb in counted if kb]
        if not levels:
            return "unmapped"
        return levels[0] if len(levels) == 1 else "mixed"

    def describe(self) -> str:
        """One line for reports."""
        page = f"{self.page_kb} kB pages" if self.page_kb else "hugetlb"
        if not self.measured:
            return (
                f"{self.hugetlb_kb} of {self.size_kb} kB mapped ({page}); no HGM counters: "
                f"all at the page's own level ({self.level.upper()})"
            )
        return (
            f"{self.hugetlb_kb} of {self.size_kb} kB mapped ({page}): PUD {self.pud_kb} kB, "
            f"PMD {self.pmd_kb} kB, PTE {self.pte_kb} kB" + (", hm" if self.hm else "")
        )


def granularity(vma: Vma) -> Granularity:
    """Summarise how much of ``vma`` is mapped at PUD/PMD/PTE level."""
    return Granularity(
        size_kb=vma.size_kb,
        page_kb=vma.kernel_page_kb,
        hugetlb_kb=vma.hugetlb_kb,
        pud_kb=vma.pud_kb,
        pmd_kb=vma.pmd_kb,
        pte_kb=vma.pte_kb,
        hm=vma.hm,
    )


@dataclass(frozen=True)
class SmapsSample:
    """One sample of the guest RAM VMA (one line of the smaps JSONL artifact).

    ``host_ns`` is the controller's wall clock when the read started (the run's
    shared timeline); ``vma`` is None when no VMA matched (not mapped yet).
    """

    host_ns: int
    pud_kb: int | None = None
    pmd_kb: int | None = None
    pte_kb: int | None = None
    hm: bool | None = None
    vma: str | None = None
    page_kb: int | None = None
    hugetlb_kb: int | None = None
    size_kb: int | None = None

    @classmethod
    def of(cls, host_ns: int, vma: Vma | None) -> SmapsSample:
        """The sample for ``vma`` (or for no match) read at ``host_ns``."""
        if vma is None:
            return cls(host_ns)
        g = granularity(vma)
        return cls(
            host_ns,
            pud_kb=g.pud_kb,
            pmd_kb=g.pmd_kb,
            pte_kb=g.pte_kb,
            hm=g.hm,
            vma=vma.range_text,
            page_kb=g.page_kb,
            hugetlb_kb=g.hugetlb_kb,
            size_kb=g.size_kb,
        )

    @property
    def found(self) -> bool:
        """A guest RAM VMA was found in this sample."""
        return self.vma is not None

    @property
    def granularity(self) -> Granularity | None:
        """The sample as a :class:`Granularity`; None when nothing was found."""
        if self.vma is None:
            return None
        return Granularity(
            size_kb=self.size_kb or 0,
            page_kb=self.page_kb,
            hugetlb_kb=self.hugetlb_kb or 0,
            pud_kb=self.pud_kb,
            pmd_kb=self.pmd_kb,
            pte_kb=self.pte_kb,
            hm=bool(self.hm),
        )

    def to_record(self) -> dict[str, Any]:
        """The JSONL record."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SmapsSample:
        """Inverse of :meth:`to_record`; unknown keys (e.g. ``error``) are ignored."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in record.items() if k in names})


# The host's side of the sampler: a shell loop that runs one awk per request line
# (an awk reading requests itself would wait for a whole input buffer: mawk, Debian's
# awk, does unless told -W interactive, which other awks refuse).  The awk reads the
# smaps file ($1) and answers with the number of lines it read (-1 when the file
# cannot be opened, 0 for a zombie's empty smaps), a tab, then only the hugetlb VMAs
# (``ht`` in VmFlags), their lines joined by tabs.  Filtering there keeps a sample to
# a few hundred bytes instead of a whole smaps (about 230 kB for a QEMU) over SSH,
# and the page-table walk that reading smaps costs (2 to 30 ms under TCG) to a
# process of its own instead of the controller.
SMAPS_FILTER = r"""BEGIN {
    n = 0; out = ""; block = ""
    while ((got = (getline line < f)) > 0) {
        n++; block = block line "	"
        if (line ~ /^VmFlags:/) { if (line ~ / ht( |$)/) out = out block; block = "" }
    }
    print ((got < 0 && n == 0) ? -1 : n) "	" out
}"""
_SMAPS_LOOP = 'while read -r _; do awk -v f="$1" "$2" </dev/null; done'


async def sample_smaps(
    host: Host, pid: int, out: JsonlWriter, hz: float, vma_filter: GuestRamFilter
) -> None:
    """Sample the guest RAM VMA of process ``pid`` on ``host`` into ``out`` at ``hz``.

    Runs until cancelled or until the process is gone (its smaps vanished or
    is empty, as for a zombie).  Once a VMA matched, later samples follow that
    VMA (same start) while it exists, so the guest's mapping and a same-sized
    mirror are never mixed up.  A read error other than "gone" is recorded as
    ``{"host_ns", "error"}`` and ends sampling.  The host filters (see
    :data:`SMAPS_FILTER`).
    """
    path = Path(f"/proc/{pid}/smaps")
    locked: int | None = None
    try:
        async with host.exchange_lines(["sh", "-c", _SMAPS_LOOP, "sh", str(path),
                                        SMAPS_FILTER]) as smaps:
            async for _ in paced(hz):
                host_ns = time.time_ns()
                count, _, blocks = (await smaps.ask("sample")).partition("\t")
                if count == "-1":
                    if await host.exists(path.parent):
                        raise HostError(f"{host.name}: {path} exists but cannot be read")
                    log.debug("%s: pid %d gone, smaps sampler stops", host.name, pid)
                    return
                if count == "0":
                    log.debug("%s: pid %d has no mappings left, smaps sampler stops",
                              host.name, pid)
                    return
                vmas = parse_smaps(blocks.replace("\t", "\n"), hugetlb_only=True)
                vma = None
                if locked is not None:
                    vma = next((v for v in vmas if v.start == locked and vma_filter.matches(v)),
                               None)
                if vma is None:
                    vma = find_guest_ram(vmas, vma_filter)
                locked = vma.start if vma is not None else locked
                out.write(SmapsSample.of(host_ns, vma).to_record())
    except HostError as error:
        out.write({"host_ns": time.time_ns(), "error": f"reading {path}: {error}"})
        log.warning("%s: smaps sampler stops: cannot read %s: %s", host.name, path, error)


def load_samples(path: Path) -> list[SmapsSample]:
    """The samples of a smaps JSONL artifact, plain or compressed (error records are skipped).

    A last line without its newline that does not parse was cut short by a run
    killed mid-write and is skipped; any other bad line is an :class:`ArtifactError`.
    """
    samples = []
    try:
        with open_artifact_text(path) as opened:
            text = opened.read()
    except OSError as error:
        raise ArtifactError(f"{path}: cannot read smaps samples: {error}") from error
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "error" in record:
                continue
            samples.append(SmapsSample.from_record(record))
        except (json.JSONDecodeError, TypeError, AttributeError) as error:
            if number == len(lines) and not text.endswith("\n"):
                log.debug("%s:%d: torn last line skipped", path, number)
                continue
            raise ArtifactError(f"{path}:{number}: not a smaps sample: {error}") from error
    return samples


CollapseStatus = Literal["no-samples", "no-hgm-stats", "never-split", "collapsed", "not-collapsed"]


@dataclass(frozen=True)
class CollapseSummary:
    """When memory mapped below huge-page level (PTE pieces) went back to huge mappings.

    ``status``: ``no-samples`` (the VMA was never found), ``no-hgm-stats`` (the
    kernel prints no HGM counters: nothing can have been split), ``never-split``,
    ``collapsed`` or ``not-collapsed`` (still split at the last sample).
    ``last_split_ns`` is the last sample with split memory and ``collapsed_ns``
    the first sample after it with none: the collapse happened in between
    (``uncertainty_ns`` wide, about one sampling period).
    ``after_completion_ns`` = ``collapsed_ns - completed_ns`` when the
    migration's completion time was given.  ``final`` is the last sample.
    """

    status: CollapseStatus
    samples: int  # samples in which the guest RAM VMA was found
    peak_split_kb: int | None
    peak_split_ns: int | None
    completed_ns: int | None
    split_kb_at_completion: int | None
    last_split_ns: int | None
    collapsed_ns: int | None
    after_completion_ns: int | None
    uncertainty_ns: int | None
    final: Granularity | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``final`` with its derived level)."""
        out = asdict(self)
        if self.final is not None:
            out["final"]["level"] = self.final.level
            out["final"]["split_kb"] = self.final.split_kb
        return out


def collapse_summary(
    samples: Iterable[SmapsSample], completed_ns: int | None = None
) -> CollapseSummary:
    """Summarise the split/collapse history of the guest RAM from smaps samples.

    ``completed_ns`` is the migration's completion on the same clock (e.g. the
    destination's ``MIGRATION completed`` event); without it only the collapse
    time itself is known.
    """
    found = sorted((s for s in samples if s.found), key=lambda s: s.host_ns)
    points = [(s.host_ns, g.split_kb, g) for s in found if (g := s.granularity) is not None]
    final = points[-1][2] if points else None
    measured = [(t, kb) for t, kb, _ in points if kb is not None]
    if not measured:
        return CollapseSummary(
            "no-hgm-stats" if points else "no-samples",
            len(found), None, None, completed_ns, None, None, None, None, None, final,
        )
    peak_ns, peak_kb = max(measured, key=lambda p: (p[1], -p[0]))
    at_completion = None
    if completed_ns is not None:
        before = [kb for t, kb in measured if t <= completed_ns]
        at_completion = before[-1] if before else None
    split = [t for t, kb in measured if kb > 0]
    status: CollapseStatus
    last_split: int | None
    collapsed: int | None
    if not split:
        status, last_split, collapsed = "never-split", None, None
    else:
        last_split = split[-1]
        collapsed = next((t for t, kb in measured if t > last_split and kb == 0), None)
        status = "collapsed" if collapsed is not None else "not-collapsed"
    return CollapseSummary(
        status=status,
        samples=len(found),
        peak_split_kb=peak_kb,
        peak_split_ns=peak_ns if peak_kb else None,
        completed_ns=completed_ns,
        split_kb_at_completion=at_completion,
        last_split_ns=last_split,
        collapsed_ns=collapsed,
        after_completion_ns=(
            collapsed - completed_ns if collapsed is not None and completed_ns is not None else None
        ),
        uncertainty_ns=(
            collapsed - last_split if collapsed is not None and last_split is not None else None
        ),
        final=final,
    )
