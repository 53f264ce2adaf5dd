"""Whether a host can do HugeTLB high-granularity mapping (HGM) post-copy, and what to do about it.

HGM is an unmerged kernel series (James Houghton, linux-mm, Jan 2023) plus an
unmerged QEMU RFC (Peter Xu, "migration: Support hugetlb doublemaps").  With
both, a destination QEMU resolves post-copy faults on hugetlbfs-backed RAM in
4 KiB pieces instead of whole 2 MiB / 1 GiB pages.  Three facts decide it:

* the kernel's build option ``CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING``, read
  from ``/boot/config-$(uname -r)`` or ``/proc/config.gz``: informative only,
  because a config file can be missing, stale or describe another kernel;
* a real ``MADV_SPLIT`` probe: on the host, map one shared 2 MiB hugetlb page
  and call ``madvise(addr, 2 MiB, 26)``.  What it proves is narrower than it
  looks: 26 is the number the unmerged series gives ``MADV_SPLIT``, not an ABI,
  so ``EINVAL`` proves only that this kernel does not accept advice 26 on a
  hugetlb mapping (``madvise_behavior_valid()`` in ``mm/madvise.c``), and 0
  proves it accepts it, which a kernel with the series does (and one that gave
  26 another meaning might).  It is the decision's strongest signal, checked
  against the smaps ``hm`` flag that a split mapping shows after a real run;
* whether the host's QEMU offers the ``hugetlb-doublemap`` migration capability.

The probe is a short Python program (ctypes, standard library only) run on the
host through :meth:`Host.run` as ``python3 -I -c SCRIPT PAGE_BYTES`` (argv, no
shell), so the same code works on a remote host; it needs one free hugepage,
which :func:`reserve_hugepages` provides for the duration of the probe only.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

from migrator.cache import read_cache, store_in_cache
from migrator.config.models import Scenario
from migrator.errors import HostError, HugepageShortfall, MissingResource, PreflightError
from migrator.guest.console import Side
from migrator.hosts.base import Host
from migrator.hosts.hugepages import reserve_hugepages
from migrator.hosts.identity import host_key
from migrator.qemu.probe import QemuFacts
from migrator.units import format_size

__all__ = [
    "DOUBLEMAP_CAPABILITY",
    "HGM_KCONFIG",
    "MADV_SPLIT",
    "NOT_SUPPORTED",
    "SUPPORTED",
    "HgmDecision",
    "HgmMode",
    "HgmSupport",
    "decide_hgm",
    "decide_hgm_between",
    "detect_hgm",
    "detect_hgm_for_sides",
    "hgm_not_applicable",
    "kernel_config_enables_hgm",
    "probe_madv_split",
    "read_kernel_config",
]

log = logging.getLogger(__name__)

MADV_SPLIT: Final = 26
HGM_KCONFIG: Final = "CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING"
DOUBLEMAP_CAPABILITY: Final = "hugetlb-doublemap"
SUPPORTED: Final = "supported"
NOT_SUPPORTED: Final = "not supported: EINVAL"
_COULD_NOT: Final = "could not probe: "

HgmMode = Literal["auto", "require", "off"]

PROBE_PAGE_KIB: Final = 2048
PROBE_TIMEOUT_S: Final = 30.0
# Other users of the same pool (concurrent runs) can take the page between our
# reservation and the probe's mmap; a few attempts absorb that race.
_PROBE_ATTEMPTS: Final = 3

# Runs on the host as `python3 -I -c PROBE_SCRIPT PAGE_BYTES`; prints one JSON
# object.  Written for any python3 >= 3.6 (a remote host's, not ours), standard
# library only.  MAP_SHARED because HGM is only offered for shared hugetlb VMAs
# (the series' hugetlb_hgm_eligible()); anonymous MAP_HUGETLB needs no hugetlbfs
# mount, so nothing is left mounted even if the probe is killed; the page is
# touched so the advice lands on a really mapped huge page.  The VMA's smaps
# entry is reported as evidence of what was probed (and shows "hm" after a
# successful MADV_SPLIT).
PROBE_SCRIPT: Final = r"""
import ctypes, errno, json, os, sys
size = int(sys.argv[1])
advice = int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_RW = 0x1 | 0x2
FLAGS = 0x01 | 0x20 | 0x40000 | ((size.bit_length() - 1) << 26)
def err(e):
    return errno.errorcode.get(e, str(e)) + " (" + os.strerror(e) + ")"
out = {"release": os.uname().release, "page_bytes": size, "advice": advice}
addr = libc.mmap(None, size, PROT_RW, FLAGS, -1, 0)
if addr is None or addr == ctypes.c_void_p(-1).value:
    out["mmap_error"] = err(ctypes.get_errno())
else:
    out["addr"] = hex(addr)
    try:
        ctypes.memset(addr, 0x5A, 1)
        rc = libc.madvise(addr, size, advice)
        out["madvise_errno"] = errno.errorcode.get(ctypes.get_errno(), "?") if rc else None
        out["madvise_error"] = err(ctypes.get_errno()) if rc else None
        head = "%x-" % addr
        vma = None
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                if line.startswith(head):
                    vma = {"header": line.strip()}
                elif vma is not None:
                    label, _, value = line.partition(":")
                    if label == "KernelPageSize":
                        vma["kernel_page_kb"] = int(value.split()[0])
                    elif label == "VmFlags":
                        vma["vmflags"] = value.split()
                        break
        out["vma"] = vma
    finally:
        libc.munmap(addr, size)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class HgmSupport:
    """What one host offers for HGM post-copy (see the module docstring).

    ``kernel_config`` is None when no config could be read; ``kernel_config_source``
    says where it was read (or, when None, where it was looked for).
    ``madv_split`` is :data:`SUPPORTED`, :data:`NOT_SUPPORTED` or
    ``"could not probe: <reason>"``; ``probe_detail`` tells exactly what the
    probe did and saw.  ``qemu_doublemap`` is None when no QEMU was probed.
    """

    host: str
    kernel_release: str | None
    kernel_config: bool | None
    kernel_config_source: str
    madv_split: str
    probe_detail: str
    qemu_binary: str | None
    qemu_version: str | None
    qemu_doublemap: bool | None

    @property
    def kernel_supported(self) -> bool:
        """The MADV_SPLIT probe succeeded on this host's running kernel."""
        return self.madv_split == SUPPORTED

    @property
    def supported(self) -> bool:
        """Kernel probe OK and QEMU offers ``hugetlb-doublemap``."""
        return self.kernel_supported and self.qemu_doublemap is True

    @property
    def reason(self) -> str:
        """One line: what is missing, or why HGM can be used."""
        kernel = f"kernel {self.kernel_release}" if self.kernel_release else "kernel"
        qemu = f"QEMU {self.qemu_version}" if self.qemu_version else "QEMU"
        if self.supported:
            return (
                f"{kernel} has MADV_SPLIT (madvise({MADV_SPLIT}) succeeded) and {qemu} "
                f"offers {DOUBLEMAP_CAPABILITY}"
            )
        missing = []
        if self.madv_split == NOT_SUPPORTED:
            missing.append(
                f"{kernel} lacks MADV_SPLIT (madvise({MADV_SPLIT}) returned EINVAL"
                + self._config_note()
                + ")"
            )
        elif not self.kernel_supported:
            cause = self.madv_split.removeprefix(_COULD_NOT)
            missing.append(
                f"MADV_SPLIT support of {kernel} is unknown (probe failed: {cause}"
                + self._config_note()
                + ")"
            )
        if self.qemu_doublemap is None:
            missing.append(f"no QEMU was probed for the {DOUBLEMAP_CAPABILITY} capability")
        elif not self.qemu_doublemap:
            missing.append(f"{qemu} has no {DOUBLEMAP_CAPABILITY} capability")
        return " and ".join(missing)

    def _config_note(self) -> str:
        if self.kernel_config is None:
            return f"; kernel config not readable ({self.kernel_config_source})"
        state = "=y" if self.kernel_config else "not set"
        return f"; {HGM_KCONFIG} {state} in {self.kernel_config_source}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, with the derived ``supported`` and ``reason``."""
        return {**asdict(self), "supported": self.supported, "reason": self.reason}


@dataclass(frozen=True)
class HgmDecision:
    """Whether a run enables ``hugetlb-doublemap``, and why (recorded in the run)."""

    mode: HgmMode
    enabled: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def kernel_config_enables_hgm(config_text: str) -> bool:
    """Whether a kernel ``.config`` text sets ``CONFIG_HUGETLB_HIGH_GRANULARITY_MAPPING=y``.

    The option is a bool; "# ... is not set" and a config that does not know the
    option at all (every mainline kernel) both mean no.
    """
    wanted = f"{HGM_KCONFIG}="
    for line in config_text.splitlines():
        line = line.strip()
        if line.startswith(wanted):
            return line.removeprefix(wanted).strip().strip('"') == "y"
    return False


async def read_kernel_config(host: Host, release: str | None) -> tuple[str | None, str]:
    """The running kernel's config text and where it came from.

    Tries ``/boot/config-RELEASE`` (Debian installs it with the kernel) and then
    ``/proc/config.gz`` (``CONFIG_IKCONFIG_PROC``).  Never reads another
    ``/boot/config-*``: it would describe an installed kernel, not the running
    one.  Returns ``(None, what was tried)`` when neither can be read.
    """
    tried = []
    candidates = []
    if release:
        candidates.append(Path(f"/boot/config-{release}"))
    else:
        tried.append("/boot/config-* (uname -r failed)")
    candidates.append(Path("/proc/config.gz"))
    for path in candidates:
        try:
            data = await host.read_file(path)
        except FileNotFoundError:
            tried.append(f"{path} missing")
            continue
        except (OSError, HostError) as error:
            tried.append(f"{path}: {error}")
            continue
        if path.suffix == ".gz":
            try:
                # ~25 KiB compressed, ~1 ms to inflate: not worth a thread.
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as error:
                tried.append(f"{path}: not gzip ({error})")
                continue
        return data.decode("utf-8", errors="replace"), str(path)
    return None, "; ".join(tried)


async def _kernel_release(host: Host) -> str | None:
    try:
        result = await host.run(["uname", "-r"], timeout=15)
    except (HostError, TimeoutError) as error:
        log.warning("%s: uname -r failed: %s", host.name, error)
        return None
    release = result.stdout.strip()
    return release if result.status == 0 and release else None


def _interpret_probe(report: dict[str, Any], page_kib: int) -> tuple[str, str]:
    """(madv_split, probe_detail) from the probe script's JSON report."""
    size = format_size(page_kib << 10)
    mapping = f"a MAP_SHARED|MAP_HUGETLB {size} page"
    if "mmap_error" in report:
        cause = f"mmap of {mapping} failed: {report['mmap_error']}"
        return _COULD_NOT + cause, cause
    vma = report.get("vma") or {}
    flags = vma.get("vmflags")
    page_kb = vma.get("kernel_page_kb")
    evidence = (
        f"; smaps: KernelPageSize {page_kb} kB, VmFlags {' '.join(flags)}"
        if flags is not None
        else "; smaps entry not found"
    )
    call = f"madvise({report.get('addr')}, {size}, {MADV_SPLIT}) on {mapping}"
    if flags is not None and ("ht" not in flags or page_kb != page_kib):
        # MAP_HUGETLB cannot silently fall back to small pages, but say so if it did.
        cause = f"{call}: the mapping is not a {size} hugetlb mapping{evidence}"
        return _COULD_NOT + cause, cause
    errno_name = report.get("madvise_errno")
    if errno_name is None:
        return SUPPORTED, f"{call} returned 0{evidence}"
    if errno_name == "EINVAL":
        return NOT_SUPPORTED, f"{call} failed: {report.get('madvise_error')}{evidence}"
    cause = f"{call} failed: {report.get('madvise_error')}"
    return _COULD_NOT + cause, cause + evidence


async def probe_madv_split(host: Host, page_kib: int = PROBE_PAGE_KIB) -> tuple[str, str]:
    """Run the real MADV_SPLIT probe on ``host``; returns ``(madv_split, probe_detail)``.

    Holds one free hugepage of ``page_kib`` (growing the pool by the shortfall
    only, and shrinking it by exactly that afterwards) while the probe runs.
    Never raises for a probe that could not be run: that is a
    ``"could not probe: ..."`` answer.
    """
    argv = ["python3", "-I", "-c", PROBE_SCRIPT, str(page_kib * 1024), str(MADV_SPLIT)]
    outcome = (_COULD_NOT + "not attempted", "not attempted")
    for attempt in range(1, _PROBE_ATTEMPTS + 1):
        try:
            async with reserve_hugepages(host, page_kib, 1):
                result = await host.run(argv, timeout=PROBE_TIMEOUT_S)
        except (HugepageShortfall, MissingResource) as error:
            cause = f"no free {format_size(page_kib << 10)} hugepage for the probe: {error}"
            return _COULD_NOT + cause, cause
        except HostError as error:
            return _COULD_NOT + str(error), str(error)
        except TimeoutError:
            cause = f"python3 probe did not finish within {PROBE_TIMEOUT_S:g} s"
            return _COULD_NOT + cause, cause
        try:
            report = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            report = None
        if result.status != 0 or not isinstance(report, dict):
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            cause = f"python3 probe failed (exit {result.status}): {tail[0]}"
            return _COULD_NOT + cause, cause
        outcome = _interpret_probe(report, page_kib)
        if not str(report.get("mmap_error", "")).startswith("ENOMEM"):
            break
        log.info("%s: MADV_SPLIT probe attempt %d: hugepage taken meanwhile", host.name, attempt)
    log.info("%s: MADV_SPLIT probe: %s (%s)", host.name, outcome[0], outcome[1])
    return outcome


async def detect_hgm(host: Host, qemu: QemuFacts | None,
                     cache_file: Path | None = None) -> HgmSupport:
    """Everything that decides HGM post-copy on ``host`` with this QEMU (module docstring).

    With ``cache_file``, the kernel's part is kept there under the host's boot id
    (:func:`~migrator.hosts.identity.host_key`): a kernel does not gain or lose
    MADV_SPLIT without a reboot.  Only a definite probe answer is kept, never a
    "could not probe".
    """
    identity = await host_key(host) if cache_file is not None else None
    key = json.dumps(["hgm-kernel", identity])
    kernel = (await asyncio.to_thread(read_cache, cache_file)).get(key) \
        if cache_file is not None and identity is not None else None
    if not isinstance(kernel, dict):
        release = await _kernel_release(host)
        config_text, source = await read_kernel_config(host, release)
        madv_split, detail = await probe_madv_split(host)
        kernel = {"kernel_release": release,
                  "kernel_config": None if config_text is None
                  else kernel_config_enables_hgm(config_text),
                  "kernel_config_source": source, "madv_split": madv_split,
                  "probe_detail": detail}
        if cache_file is not None and identity is not None \
                and madv_split in (SUPPORTED, NOT_SUPPORTED):
            await asyncio.to_thread(store_in_cache, cache_file, key, kernel)
    return HgmSupport(
        host=host.name,
        **kernel,
        qemu_binary=qemu.binary if qemu is not None else None,
        qemu_version=qemu.version if qemu is not None else None,
        qemu_doublemap=None if qemu is None else DOUBLEMAP_CAPABILITY in qemu.capabilities,
    )


async def detect_hgm_for_sides(
    hosts: Mapping[Side, Host], qemus: Mapping[Side, QemuFacts],
    known: Mapping[Side, HgmSupport] | None = None,
) -> dict[Side, HgmSupport]:
    """:func:`detect_hgm` for each side of a migration; ``known`` sides are not probed again.

    ``known`` is what the preflight already detected.  One machine in both
    roles is probed once.
    """
    # One after the other: two "hosts" can share one hugepage pool (network
    # namespaces on one machine), and each probe grows and shrinks it.
    supports: dict[Side, HgmSupport] = dict(known or {})
    if "src" not in supports:
        supports["src"] = await detect_hgm(hosts["src"], qemus["src"])
    if "dst" not in supports:
        supports["dst"] = (supports["src"] if hosts["dst"] is hosts["src"]
                           else await detect_hgm(hosts["dst"], qemus["dst"]))
    return supports


def hgm_not_applicable(scenario: Scenario) -> HgmDecision | None:
    """The decision when HGM cannot matter to ``scenario``, without probing; None when it can.

    HGM can matter only with a hugetlb backing, post-copy on, and ``hgm`` not ``off``.
    """
    vm = scenario.vm
    if not vm.backing.is_hugetlb:
        return HgmDecision(vm.hgm, enabled=False, reason=(
            f"not applicable: vm.backing = {vm.backing.value} has 4 KiB pages (HGM maps "
            "pieces of hugetlb pages)"))
    if not scenario.migration.postcopy:
        return HgmDecision(vm.hgm, enabled=False, reason=(
            "not applicable: migration.postcopy = false (HGM changes how post-copy "
            "resolves faults)"))
    if vm.hgm == "off":
        return HgmDecision(vm.hgm, enabled=False, reason="hgm = off: not used")
    return None


def decide_hgm(mode: HgmMode, support: HgmSupport) -> HgmDecision:
    """Apply the scenario's ``hgm`` option to what a host offers.

    ``off`` never enables; ``auto`` enables exactly when :attr:`HgmSupport.supported`
    and records why not otherwise; ``require`` raises :class:`PreflightError`
    with a one-line reason on a host without it.
    """
    if mode == "off":
        return HgmDecision(mode, enabled=False, reason="hgm = off: not used")
    if support.supported:
        return HgmDecision(mode, enabled=True, reason=f"hgm = {mode}: {support.reason}")
    if mode == "require":
        raise PreflightError(
            f"hgm = require: {support.host}: {support.reason}; run on a kernel with the HGM "
            f'series and a QEMU with {DOUBLEMAP_CAPABILITY}, or set hgm = "auto"'
        )
    return HgmDecision(
        mode, enabled=False, reason=f"hgm = auto: disabled on {support.host}: {support.reason}"
    )


def decide_hgm_between(mode: HgmMode, supports: Sequence[HgmSupport]) -> HgmDecision:
    """:func:`decide_hgm` for a migration between hosts: HGM needs every one of them.

    ``supports`` holds each distinct host once (one machine playing both roles
    is one entry).  ``require`` raises for the first host without HGM; ``auto``
    enables only when every host supports it, and its reason names each host
    that does not (or, when enabled, what each one offers).
    """
    if not supports:
        raise ValueError("decide_hgm_between needs at least one host")
    decisions = [decide_hgm(mode, support) for support in supports]
    if len(decisions) == 1 or mode == "off":
        return decisions[0]
    prefix = f"hgm = {mode}: "
    if all(decision.enabled for decision in decisions):
        return HgmDecision(mode, enabled=True, reason=prefix + "; ".join(
            f"{support.host}: {support.reason}" for support in supports))
    return HgmDecision(mode, enabled=False, reason=prefix + "; ".join(
        decision.reason.removeprefix(prefix) for decision in decisions if not decision.enabled))
