"""HugeTLB high-granularity mapping (HGM): detect it on a host, decide, and watch it work.

HGM (an unmerged kernel series plus an unmerged QEMU RFC, named in
:mod:`migrator.hgm.detect`) lets a post-copy destination map 4 KiB pieces of
hugetlb pages.
:mod:`migrator.hgm.detect` finds out whether a host can (kernel config, a real
``MADV_SPLIT`` probe, QEMU's ``hugetlb-doublemap`` capability) and applies the
scenario's ``hgm = auto | require | off``; :mod:`migrator.hgm.smaps` parses and
samples the destination QEMU's ``/proc/PID/smaps`` to show at which page-table
level guest RAM is mapped over time and how long the collapse back took.
"""

from migrator.hgm.detect import (
    DOUBLEMAP_CAPABILITY,
    MADV_SPLIT,
    HgmDecision,
    HgmMode,
    HgmSupport,
    decide_hgm,
    decide_hgm_between,
    detect_hgm,
    detect_hgm_for_sides,
    hgm_not_applicable,
    kernel_config_enables_hgm,
    probe_madv_split,
    read_kernel_config,
)
from migrator.hgm.smaps import (
    CollapseSummary,
    Granularity,
    GuestRamFilter,
    SmapsSample,
    Vma,
    collapse_summary,
    find_guest_ram,
    granularity,
    load_samples,
    parse_smaps,
    sample_smaps,
)

__all__ = [
    "DOUBLEMAP_CAPABILITY",
    "MADV_SPLIT",
    "CollapseSummary",
    "Granularity",
    "GuestRamFilter",
    "HgmDecision",
    "HgmMode",
    "HgmSupport",
    "SmapsSample",
    "Vma",
    "collapse_summary",
    "decide_hgm",
    "decide_hgm_between",
    "detect_hgm",
    "detect_hgm_for_sides",
    "find_guest_ram",
    "granularity",
    "hgm_not_applicable",
    "kernel_config_enables_hgm",
    "load_samples",
    "parse_smaps",
    "probe_madv_split",
    "read_kernel_config",
    "sample_smaps",
]
