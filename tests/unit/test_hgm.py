"""HGM awareness: kernel config, the MADV_SPLIT probe's interpretation, the decision, smaps.

Fixtures in ``tests/data/hgm`` (see its README): smaps, config and trace texts
written from the unmerged series' documented formats, plus a recorded stock
smaps and a recorded stock config.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from migrator.errors import HostError, PreflightError
from migrator.hgm import (
    GuestRamFilter,
    HgmSupport,
    SmapsSample,
    collapse_summary,
    decide_hgm,
    detect_hgm,
    find_guest_ram,
    granularity,
    kernel_config_enables_hgm,
    load_samples,
    parse_smaps,
    probe_madv_split,
    read_kernel_config,
    sample_smaps,
)
from migrator.hgm.detect import NOT_SUPPORTED, PROBE_SCRIPT, SUPPORTED
from migrator.hosts.base import CommandResult
from migrator.hosts.fake import FakeHost
from migrator.metrics.ramblock import load_ramblocks
from migrator.metrics.trace import analyze_trace
from migrator.rundir import JsonlWriter
from tests.unit.fake_kernel import pool_writes, writes_besides_claims
from tests.unit.hgm_fakes import (
    DATA,
    QEMU_72,
    QEMU_RFC,
    RELEASE,
    ScriptedSmaps,
    kernel,
    probe_report,
    text,
)

GIB_KB = 1 << 20


# ---------------------------------------------------------------------------
# Kernel config


def test_config_with_the_series_enables_hgm() -> None:
    assert kernel_config_enables_hgm(text("config-6.2.0-rc2-hgm-v1"))


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(text("config-6.1.0-56-cloud-amd64"), id="debian-stock-no-option"),
        pytest.param("# CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING is not set\n", id="not-set"),
        pytest.param("CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING=m\n", id="not-a-bool-y"),
        pytest.param("CONFIG_ARCH_WANT_HUGETLB_HIGH_GRANULARITY_MAPPING=y\n", id="arch-want-only"),
        pytest.param("", id="empty"),
    ],
)
def test_configs_without_hgm(config: str) -> None:
    assert not kernel_config_enables_hgm(config)


async def test_config_of_the_running_kernel_from_boot() -> None:
    host = FakeHost()
    host.set_text(f"/boot/config-{RELEASE}", text("config-6.2.0-rc2-hgm-v1"))
    config, source = await read_kernel_config(host, RELEASE)
    assert config is not None
    assert kernel_config_enables_hgm(config)
    assert source == f"/boot/config-{RELEASE}"


async def test_config_falls_back_to_proc_config_gz_never_to_another_kernel() -> None:
    host = FakeHost()
    # An installed (guest) kernel's config: not the running kernel's, must not be read.
    host.set_text("/boot/config-6.2.0-rc2-hgm-v1", text("config-6.2.0-rc2-hgm-v1"))
    stock = text("config-6.1.0-56-cloud-amd64").encode()
    host.files[Path("/proc/config.gz")] = gzip.compress(stock)
    config, source = await read_kernel_config(host, RELEASE)
    assert source == "/proc/config.gz"
    assert config is not None
    assert not kernel_config_enables_hgm(config)


async def test_unreadable_config_says_where_it_looked() -> None:
    host = FakeHost()
    host.files[Path("/proc/config.gz")] = b"not gzip"
    config, source = await read_kernel_config(host, RELEASE)
    assert config is None
    assert f"/boot/config-{RELEASE} missing" in source
    assert "/proc/config.gz: not gzip" in source


# ---------------------------------------------------------------------------
# The MADV_SPLIT probe, as seen through a fake host


def test_probe_script_is_valid_python() -> None:
    compile(PROBE_SCRIPT, "<probe>", "exec")


def probe_calls(host: FakeHost) -> list[tuple[str, ...]]:
    return [c[1:] for c in host.calls if c[:2] == ("run", "python3")]


async def test_einval_means_not_supported_and_the_pool_is_given_back() -> None:
    host = kernel([probe_report()], total=0, free=0)
    verdict, detail = await probe_madv_split(host)
    assert verdict == NOT_SUPPORTED
    assert detail.startswith(
        "madvise(0x7f6c18200000, 2 MiB, 26) on a MAP_SHARED|MAP_HUGETLB 2 MiB page failed: "
        "EINVAL (Invalid argument)"
    )
    assert "KernelPageSize 2048 kB, VmFlags rd wr sh mr mw me ms de ht" in detail
    # Grown by the shortfall (1), shrunk by exactly that.
    writes = pool_writes(host)
    assert writes == ["1", "0"]
    (argv,) = probe_calls(host)
    assert argv[:3] == ("python3", "-I", "-c")
    assert argv[3] == PROBE_SCRIPT
    assert argv[4:] == ("2097152", "26")


async def test_enough_free_pages_leave_the_pool_alone() -> None:
    host = kernel([probe_report()], total=4, free=2)
    assert (await probe_madv_split(host))[0] == NOT_SUPPORTED
    assert not writes_besides_claims(host)


async def test_success_is_supported_with_hm_as_evidence() -> None:
    report = probe_report(madvise_errno=None, madvise_error=None)
    report["vma"]["vmflags"] = [*report["vma"]["vmflags"], "hm"]
    verdict, detail = await probe_madv_split(kernel([report]))
    assert verdict == SUPPORTED
    assert "returned 0" in detail
    assert detail.endswith("ht hm")


async def test_other_errno_is_not_a_verdict() -> None:
    report = probe_report(madvise_errno="EPERM", madvise_error="EPERM (Operation not permitted)")
    verdict, _ = await probe_madv_split(kernel([report]))
    assert verdict.startswith("could not probe: madvise(0x7f6c18200000, 2 MiB, 26)")
    assert verdict.endswith("failed: EPERM (Operation not permitted)")


async def test_page_taken_by_someone_else_is_retried() -> None:
    gone = {"release": RELEASE, "page_bytes": 2 << 20, "advice": 26,
            "mmap_error": "ENOMEM (Cannot allocate memory)"}
    host = kernel([gone, gone, probe_report()])
    assert (await probe_madv_split(host))[0] == NOT_SUPPORTED
    assert len(probe_calls(host)) == 3


async def test_page_never_available() -> None:
    gone = {"release": RELEASE, "page_bytes": 2 << 20, "advice": 26,
            "mmap_error": "ENOMEM (Cannot allocate memory)"}
    host = kernel([gone, gone, gone])
    verdict, _ = await probe_madv_split(host)
    assert verdict == (
        "could not probe: mmap of a MAP_SHARED|MAP_HUGETLB 2 MiB page failed: "
        "ENOMEM (Cannot allocate memory)"
    )
    assert pool_writes(host) == ["1", "0"] * 3


async def test_no_hugepage_can_be_had() -> None:
    host = kernel([], total=0, free=0, limit=0)
    verdict, _ = await probe_madv_split(host)
    assert verdict.startswith("could not probe: no free 2 MiB hugepage for the probe: ")
    assert "need 1 free 2 MiB pages, only 0" in verdict
    assert not probe_calls(host)


async def test_no_python3_on_the_host() -> None:
    def missing(argv: tuple[str, ...]) -> CommandResult:
        raise HostError("python3: command not found on fake", argv=argv)

    verdict, _ = await probe_madv_split(kernel(missing))
    assert verdict == "could not probe: python3: command not found on fake"


async def test_probe_crash_shows_the_last_line() -> None:
    def crash(argv: tuple[str, ...]) -> CommandResult:
        return CommandResult(argv, 1, "", "Traceback ...\nOSError: libc.so.6: cannot open\n")

    verdict, _ = await probe_madv_split(kernel(crash))
    assert verdict == (
        "could not probe: python3 probe failed (exit 1): OSError: libc.so.6: cannot open"
    )


async def test_mapping_that_is_not_hugetlb_is_no_verdict() -> None:
    report = probe_report()
    report["vma"] = {"header": "...", "kernel_page_kb": 4, "vmflags": ["rd", "wr", "sh"]}
    verdict, _ = await probe_madv_split(kernel([report]))
    assert verdict.startswith("could not probe: ")
    assert "is not a 2 MiB hugetlb mapping" in verdict


# ---------------------------------------------------------------------------
# detect_hgm and decide_hgm


async def test_detect_on_a_stock_host_with_qemu_72() -> None:
    host = kernel([probe_report()])
    host.files[Path("/proc/config.gz")] = gzip.compress(b"CONFIG_HUGETLB_PAGE=y\n")
    support = await detect_hgm(host, QEMU_72)
    assert support == HgmSupport(
        host="fake",
        kernel_release=RELEASE,
        kernel_config=False,
        kernel_config_source="/proc/config.gz",
        madv_split=NOT_SUPPORTED,
        probe_detail=support.probe_detail,
        qemu_binary="/usr/bin/qemu-system-x86_64",
        qemu_version="7.2.22",
        qemu_doublemap=False,
    )
    assert not support.supported
    assert support.reason == (
        f"kernel {RELEASE} lacks MADV_SPLIT (madvise(26) returned EINVAL; "
        "CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING not set in /proc/config.gz) "
        "and QEMU 7.2.22 has no hugetlb-doublemap capability"
    )
    record = support.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert record["supported"] is False
    assert record["reason"] == support.reason


async def test_detect_on_a_hgm_host_with_the_rfc_qemu() -> None:
    report = probe_report(madvise_errno=None, madvise_error=None)
    host = kernel([report], release="6.2.0-rc2-hgm-v1")
    host.set_text("/boot/config-6.2.0-rc2-hgm-v1", text("config-6.2.0-rc2-hgm-v1"))
    support = await detect_hgm(host, QEMU_RFC)
    assert support.kernel_config is True
    assert support.supported
    assert support.reason == (
        "kernel 6.2.0-rc2-hgm-v1 has MADV_SPLIT (madvise(26) succeeded) and QEMU 7.2.50 "
        "offers hugetlb-doublemap"
    )


async def test_detect_without_uname_config_or_qemu() -> None:
    support = await detect_hgm(kernel([probe_report()], release=None), None)
    assert support.kernel_release is None
    assert support.kernel_config is None
    assert support.qemu_doublemap is None
    assert support.qemu_version is None
    assert support.reason == (
        "kernel lacks MADV_SPLIT (madvise(26) returned EINVAL; kernel config not readable "
        "(/boot/config-* (uname -r failed); /proc/config.gz missing)) and no QEMU was "
        "probed for the hugetlb-doublemap capability"
    )


def support_of(madv_split: str, doublemap: bool | None, version: str = "7.2.22") -> HgmSupport:
    return HgmSupport(
        host="dst",
        kernel_release=RELEASE,
        kernel_config=False,
        kernel_config_source="/proc/config.gz",
        madv_split=madv_split,
        probe_detail="...",
        qemu_binary="/usr/bin/qemu-system-x86_64",
        qemu_version=version,
        qemu_doublemap=doublemap,
    )


def test_require_on_a_host_without_hgm_fails_preflight_with_one_line() -> None:
    with pytest.raises(PreflightError) as caught:
        decide_hgm("require", support_of(NOT_SUPPORTED, doublemap=False))
    message = str(caught.value)
    assert message == (
        f"hgm = require: dst: kernel {RELEASE} lacks MADV_SPLIT (madvise(26) returned EINVAL; "
        "CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING not set in /proc/config.gz) and QEMU 7.2.22 "
        "has no hugetlb-doublemap capability; run on a kernel with the HGM series and a QEMU "
        'with hugetlb-doublemap, or set hgm = "auto"'
    )
    assert "\n" not in message
    assert caught.value.exit_code == 3


def test_auto_disables_and_records_why() -> None:
    decision = decide_hgm("auto", support_of(NOT_SUPPORTED, doublemap=False))
    assert not decision.enabled
    assert decision.reason.startswith("hgm = auto: disabled on dst: kernel ")
    assert decision.to_dict() == {"mode": "auto", "enabled": False, "reason": decision.reason}


@pytest.mark.parametrize("mode", ["auto", "require"])
def test_supported_host_enables(mode: str) -> None:
    decision = decide_hgm(mode, support_of(SUPPORTED, doublemap=True))  # type: ignore[arg-type]
    assert decision.enabled
    assert decision.reason.startswith(f"hgm = {mode}: kernel {RELEASE} has MADV_SPLIT")


def test_off_never_enables() -> None:
    decision = decide_hgm("off", support_of(SUPPORTED, doublemap=True))
    assert (decision.enabled, decision.reason) == (False, "hgm = off: not used")


@pytest.mark.parametrize(
    ("madv_split", "doublemap", "reason"),
    [
        (SUPPORTED, False, "QEMU 7.2.22 has no hugetlb-doublemap capability"),
        (NOT_SUPPORTED, True,
         f"kernel {RELEASE} lacks MADV_SPLIT (madvise(26) returned EINVAL; "
         "CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING not set in /proc/config.gz)"),
        ("could not probe: no free 2 MiB hugepage", True,
         f"MADV_SPLIT support of kernel {RELEASE} is unknown (probe failed: no free 2 MiB "
         "hugepage; CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING not set in /proc/config.gz)"),
    ],
)
def test_reason_names_exactly_what_is_missing(
    madv_split: str, doublemap: bool, reason: str
) -> None:
    support = support_of(madv_split, doublemap)
    assert not support.supported
    assert support.reason == reason


# ---------------------------------------------------------------------------
# smaps parsing


def test_recorded_stock_smaps_of_qemu_72() -> None:
    vmas = parse_smaps(text("smaps-qemu-7.2-stock-2m.txt.gz"))
    assert len(vmas) == 294
    assert vmas[0].pathname == "/usr/bin/qemu-system-x86_64"
    assert not vmas[0].deleted
    assert vmas[-1].pathname == "[vsyscall]"
    assert vmas[-1].start == 0xFFFFFFFFFF600000
    guest = find_guest_ram(vmas, GuestRamFilter(size_bytes=64 << 20))
    assert guest is not None
    assert guest.range_text == "7f3033e00000-7f3037e00000"
    assert guest.pathname == (
        "/run/migrator/hugetlbfs-2048k-hgmfixture/migrator-hgmfixture/qemu_back_mem.ram0.qyhVKK"
    )
    assert guest.deleted
    assert guest.shared
    assert guest.hugetlb
    assert (guest.size_kb, guest.kernel_page_kb, guest.rss_kb, guest.hugetlb_kb) == (
        65536, 2048, 0, 65536
    )
    assert guest.vmflags == {"rd", "wr", "sh", "mr", "mw", "me", "ms", "dc", "de", "ht", "hg"}
    # No HGM on this kernel: the three counters are absent, not zero.
    assert (guest.pud_kb, guest.pmd_kb, guest.pte_kb, guest.hm) == (None, None, None, False)
    g = granularity(guest)
    assert not g.measured
    assert g.split_kb is None
    assert g.level == "pmd"  # a 2 MiB page can only be mapped whole without HGM
    assert g.describe() == (
        "65536 of 65536 kB mapped (2048 kB pages); no HGM counters: all at the page's own "
        "level (PMD)"
    )
    # The guard page QEMU leaves after guest RAM: no pathname, trailing space in the header.
    guard = vmas[vmas.index(guest) + 1]
    assert (guard.start, guard.pathname, guard.perms, guard.inode) == (guest.end, "", "---p", 0)


def test_guest_ram_filters() -> None:
    vmas = parse_smaps(text("smaps-qemu-7.2-stock-2m.txt.gz"))
    mem_path = "/run/migrator/hugetlbfs-2048k-hgmfixture/migrator-hgmfixture"
    assert find_guest_ram(vmas, GuestRamFilter(path_prefix=mem_path + "/")) is not None
    assert find_guest_ram(vmas, GuestRamFilter(path_prefix=mem_path[:-3])) is None
    assert find_guest_ram(vmas, GuestRamFilter(size_bytes=1 << 30)) is None
    assert find_guest_ram(vmas, GuestRamFilter(start=0x7F3033E00000)) is not None
    assert find_guest_ram(vmas, GuestRamFilter(start=0x7F3033E00000 + 4096)) is None
    # Only shared hugetlb VMAs qualify, whatever their size.
    heap = next(v for v in vmas if v.pathname == "[heap]")
    assert not GuestRamFilter(size_bytes=heap.length).matches(heap)


def test_hgm_smaps_during_postcopy_1g_picks_the_guest_mapping_not_the_mirror() -> None:
    vmas = parse_smaps(text("smaps-hgm-1g-postcopy.txt"))
    candidates = [v for v in vmas if GuestRamFilter(size_bytes=1 << 30).matches(v)]
    assert len(candidates) == 2
    mirror, guest = candidates  # address order: the mirror is lower
    assert mirror.inode == guest.inode
    assert mirror.pathname == guest.pathname
    chosen = find_guest_ram(vmas, GuestRamFilter(size_bytes=1 << 30))
    assert chosen == guest
    assert guest.hm
    assert guest.uffd_registered
    assert not mirror.hm
    g = granularity(guest)
    assert (g.pud_kb, g.pmd_kb, g.pte_kb, g.split_kb) == (0, 0, 81920, 81920)
    assert (g.level, g.measured, g.hugetlb_kb) == ("pte", True, 81920)
    assert g.describe() == (
        "81920 of 1048576 kB mapped (1048576 kB pages): PUD 0 kB, PMD 0 kB, PTE 81920 kB, hm"
    )
    assert granularity(mirror).level == "pud"


def test_hgm_smaps_after_completion_is_collapsed_to_pud() -> None:
    vmas = parse_smaps(text("smaps-hgm-1g-completed.txt"))
    guest = find_guest_ram(vmas, GuestRamFilter(size_bytes=1 << 30))
    assert guest is not None
    assert guest.start == 0x7F2C40000000
    assert guest.hm
    assert not guest.uffd_registered
    g = granularity(guest)
    assert (g.pud_kb, g.pte_kb, g.split_kb, g.level) == (GIB_KB, 0, 0, "pud")


def test_hgm_smaps_2m_pages_mixed_pmd_and_pte() -> None:
    vmas = parse_smaps(text("smaps-hgm-2m-postcopy.txt"))
    guest = find_guest_ram(vmas, GuestRamFilter(size_bytes=1 << 30))
    assert guest is not None
    assert guest.kernel_page_kb == 2048
    g = granularity(guest)
    assert (g.pud_kb, g.pmd_kb, g.pte_kb) == (0, 655360, 12288)
    assert g.level == "mixed"
    assert g.split_kb == 12288  # PMD is a 2 MiB page's own level, not a split


def relabel(smaps: str, width: Callable[[int], int]) -> str:
    """Re-pad every ``Label: value`` line (the ``i``-th to ``width(i)`` columns)."""
    out = []
    for i, line in enumerate(smaps.splitlines()):
        m = re.fullmatch(r"([A-Za-z_]+):\s+(.*)", line)
        if m and m[1] != "VmFlags":
            line = f"{m[1] + ':':<{width(i)}} {m[2]}"
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("name", ["smaps-hgm-1g-postcopy.txt", "smaps-qemu-7.2-stock-2m.txt.gz"])
def test_parsing_never_depends_on_columns(name: str) -> None:
    original = parse_smaps(text(name))
    for width in (lambda i: 0, lambda i: 30, lambda i: 10 + i % 13):
        assert parse_smaps(relabel(text(name), width)) == original


@pytest.mark.parametrize(
    "name",
    [
        "smaps-qemu-7.2-stock-2m.txt.gz",
        "smaps-hgm-1g-postcopy.txt",
        "smaps-hgm-1g-completed.txt",
        "smaps-hgm-2m-postcopy.txt",
    ],
)
def test_hugetlb_only_fast_path_agrees_with_the_full_parse(name: str) -> None:
    full = [v for v in parse_smaps(text(name)) if v.hugetlb]
    assert full
    assert parse_smaps(text(name), hugetlb_only=True) == full


def test_header_and_line_edge_cases() -> None:
    smaps = "\n".join([
        "7f0000000000-7f0000200000 rw-s 00000000 00:2b 77                         "
        "/mnt/huge pages/guest ram (deleted)",
        "Size:               2048 kB",
        "KernelPageSize:     2048 kB",
        "Private_Hugetlb:    2048 kB",
        "HugetlbPmdMapped:   2048 kB",
        "HugetlbPteMapped:      0 kB",
        "THPeligible:           0",
        "ProtectionKey:         0",
        "some garbage that is not a field",
        "VmFlags: rd wr sh mr mw me ms de ht hm",
        "7f0000200000-7f0000201000 ---p 00000000 00:00 0 ",
        "Size:                  4 kB",
    ])
    first, second = parse_smaps(smaps)
    assert first.pathname == "/mnt/huge pages/guest ram"
    assert first.deleted
    assert first.fields["THPeligible"] == 0
    assert first.fields["ProtectionKey"] == 0
    # A kernel with the PUD level folded prints no HugetlbPudMapped line.
    g = granularity(first)
    assert (g.pud_kb, g.pmd_kb, g.pte_kb, g.measured, g.level) == (None, 2048, 0, True, "pmd")
    assert second.pathname == ""
    assert second.vmflags == frozenset()
    assert parse_smaps("") == []


# ---------------------------------------------------------------------------
# The sampler (against a scripted host; tests/integration samples a real process)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_sampler_follows_split_then_collapse_until_the_process_is_gone(
    tmp_path: Path,
) -> None:
    smaps = Path("/proc/31040/smaps")
    host = ScriptedSmaps(smaps, [
        text("smaps-qemu-7.2-stock-2m.txt.gz").replace("ram0", "other"),  # no 1 GiB VMA yet
        text("smaps-hgm-1g-postcopy.txt"),
        text("smaps-hgm-1g-completed.txt"),
    ])
    out = JsonlWriter(tmp_path / "smaps.jsonl")
    async with asyncio.timeout(5):
        await sample_smaps(host, 31040, out, 200.0, GuestRamFilter(size_bytes=1 << 30))
    out.close()
    first, during, after = records(tmp_path / "smaps.jsonl")
    assert first["vma"] is None
    assert first["pte_kb"] is None
    assert {k: during[k] for k in ("pud_kb", "pmd_kb", "pte_kb", "hm", "vma")} == {
        "pud_kb": 0, "pmd_kb": 0, "pte_kb": 81920, "hm": True, "vma": "7f2c40000000-7f2c80000000"
    }
    assert (after["pud_kb"], after["pte_kb"], after["hm"]) == (GIB_KB, 0, True)
    assert first["host_ns"] < during["host_ns"] < after["host_ns"]


async def test_sampler_stays_on_the_vma_it_found(tmp_path: Path) -> None:
    # Later, a same-sized mapping at a lower address looks even more like guest RAM.
    confusing = text("smaps-hgm-1g-postcopy.txt").replace(
        "VmFlags: rd wr sh mr mw me ms de ht \n", "VmFlags: rd wr sh mr mw me ms um de ht ui hm \n"
    )
    assert find_guest_ram(parse_smaps(confusing), GuestRamFilter()).start == 0x7F2B80000000  # type: ignore[union-attr]
    host = ScriptedSmaps(Path("/proc/7/smaps"), [text("smaps-hgm-1g-completed.txt"), confusing])
    out = JsonlWriter(tmp_path / "s.jsonl")
    await sample_smaps(host, 7, out, 500.0, GuestRamFilter())
    out.close()
    assert [r["vma"] for r in records(tmp_path / "s.jsonl")] == ["7f2c40000000-7f2c80000000"] * 2


async def test_sampler_records_a_read_error_and_stops(tmp_path: Path) -> None:
    host = ScriptedSmaps(Path("/proc/9/smaps"), [PermissionError("Permission denied")])
    out = JsonlWriter(tmp_path / "s.jsonl")
    await sample_smaps(host, 9, out, 100.0, GuestRamFilter())
    out.close()
    (only,) = records(tmp_path / "s.jsonl")
    assert only["error"] == "reading /proc/9/smaps: fake: /proc/9/smaps exists but cannot be read"


async def test_sampler_stops_at_a_zombie(tmp_path: Path) -> None:
    host = ScriptedSmaps(Path("/proc/9/smaps"), ["", text("smaps-hgm-1g-completed.txt")])
    out = JsonlWriter(tmp_path / "s.jsonl")
    await sample_smaps(host, 9, out, 100.0, GuestRamFilter())
    out.close()
    assert (tmp_path / "s.jsonl").read_text() == ""
    assert len(host.reads) == 1


# ---------------------------------------------------------------------------
# Collapse after completion

COMPLETED_NS = 1795630601250000000


def test_collapse_summary_of_a_1g_hgm_run() -> None:
    samples = load_samples(DATA / "smaps-samples-hgm-1g.jsonl")
    assert len(samples) == 16  # the error record is skipped
    s = collapse_summary(samples, completed_ns=COMPLETED_NS)
    assert s.status == "collapsed"
    assert s.samples == 15  # the first sample found no guest RAM
    assert s.peak_split_kb == GIB_KB
    assert s.peak_split_ns == samples[11].host_ns  # first time it reached the whole GiB
    assert s.split_kb_at_completion == GIB_KB
    assert s.last_split_ns == samples[13].host_ns
    assert s.collapsed_ns == samples[14].host_ns
    assert s.after_completion_ns == samples[14].host_ns - COMPLETED_NS == 150_002_866
    assert s.uncertainty_ns == samples[14].host_ns - samples[13].host_ns
    assert s.final is not None
    assert (s.final.level, s.final.hm) == ("pud", True)
    record = s.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert record["final"]["level"] == "pud"
    assert record["final"]["split_kb"] == 0


def test_collapse_summary_without_completion_time() -> None:
    s = collapse_summary(load_samples(DATA / "smaps-samples-hgm-1g.jsonl"))
    assert (s.status, s.after_completion_ns, s.split_kb_at_completion) == ("collapsed", None, None)
    assert s.collapsed_ns is not None


def sample(t: int, pte: int | None, pud: int | None = 0, page_kb: int = GIB_KB) -> SmapsSample:
    return SmapsSample(
        t, pud_kb=pud, pmd_kb=None if pte is None else 0, pte_kb=pte, hm=pte is not None,
        vma="7f2c40000000-7f2c80000000", page_kb=page_kb, hugetlb_kb=(pud or 0) + (pte or 0),
        size_kb=GIB_KB,
    )


def test_collapse_summary_statuses() -> None:
    assert collapse_summary([]).status == "no-samples"
    assert collapse_summary([SmapsSample(1)]).status == "no-samples"
    no_hgm = collapse_summary([sample(1, None, None), sample(2, None, None)])
    assert no_hgm.status == "no-hgm-stats"
    assert no_hgm.final is not None
    assert no_hgm.final.level == "unmapped"
    never = collapse_summary([sample(1, 0, 0), sample(2, 0, GIB_KB)])
    assert (never.status, never.peak_split_kb, never.peak_split_ns) == ("never-split", 0, None)
    stuck = collapse_summary([sample(1, 0), sample(2, 4096), sample(3, 8192)], completed_ns=2)
    assert (stuck.status, stuck.last_split_ns, stuck.collapsed_ns) == ("not-collapsed", 3, None)
    assert stuck.split_kb_at_completion == 4096
    # Split twice: the summary is about the last collapse.
    twice = collapse_summary([sample(1, 4), sample(2, 0), sample(3, 8), sample(5, 0)])
    assert (twice.status, twice.last_split_ns, twice.collapsed_ns, twice.uncertainty_ns) == (
        "collapsed", 3, 5, 2
    )
    # Unsorted input is sorted by time.
    assert collapse_summary([sample(5, 0), sample(3, 8)]).collapsed_ns == 5


def test_pmd_inside_1g_pages_counts_as_split() -> None:
    g = SmapsSample(1, pud_kb=0, pmd_kb=2048, pte_kb=4, hm=True, vma="a-b", page_kb=GIB_KB,
                    hugetlb_kb=2052, size_kb=GIB_KB).granularity
    assert g is not None
    assert g.split_kb == 2052
    assert g.level == "mixed"


def test_load_samples_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"host_ns": 1, "pte_kb": 0}\nnot json\n')
    with pytest.raises(Exception, match=r"s\.jsonl:2: not a smaps sample"):
        load_samples(bad)


def test_sample_record_round_trip() -> None:
    vma = find_guest_ram(parse_smaps(text("smaps-hgm-1g-postcopy.txt")), GuestRamFilter())
    s = SmapsSample.of(123, vma)
    assert SmapsSample.from_record(json.loads(json.dumps(s.to_record()))) == s
    assert set(s.to_record()) >= {"host_ns", "pud_kb", "pmd_kb", "pte_kb", "hm"}


# ---------------------------------------------------------------------------
# Fault granularity from the trace of a HGM (doublemap) QEMU

PLACE = re.compile(r"postcopy_place_page id=(\S+) offset=0x([0-9a-f]+) host=0x([0-9a-f]+)$")


def test_trace_fixture_places_4k_pieces_of_2m_pages() -> None:
    """The fixture itself: every ram0 placement is a 4 KiB piece, most not 2 MiB-aligned."""
    offsets = [
        int(m[2], 16)
        for line in text("dst-trace-hgm-2m.log").splitlines()
        if (m := PLACE.search(line)) and m[1] == "ram0"
    ]
    assert len(offsets) == 15
    assert all(o % 4096 == 0 for o in offsets)
    assert sum(o % (2 << 20) != 0 for o in offsets) == 12


def test_trace_of_a_hgm_qemu_requests_and_rebuild() -> None:
    analysis = analyze_trace(
        DATA / "dst-trace-hgm-2m.log", load_ramblocks(DATA / "info-ramblock-hgm-2m.txt")
    )
    ram = analysis.block("ram0")
    assert ram.page_size == 2 << 20
    assert ram.host_base == 0x7FC540000000
    assert ram.faults == 5
    assert analysis.ignored_events.get("ramblock_rebuild_huge_mappings") == 1


def test_trace_of_a_hgm_qemu_shows_4k_placement_granularity() -> None:
    analysis = analyze_trace(
        DATA / "dst-trace-hgm-2m.log", load_ramblocks(DATA / "info-ramblock-hgm-2m.txt")
    )
    assert analysis.malformed_lines == 0
    ram = analysis.block("ram0")
    assert ram.placement_granularity == 4096
    assert ram.subpage_resolution
    assert (ram.resolved, ram.unresolved) == (5, 0)
    assert analysis.block("pc.bios").placement_granularity == 4096
