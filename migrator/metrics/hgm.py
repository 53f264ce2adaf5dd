"""The report's ``hgm`` section: what was decided, and what really happened.

Inputs are raw artifacts only: ``run.json`` (the ``hgm`` decision the runner
recorded, or, for runs recorded before it did, whether the plan enabled
``hugetlb-doublemap``), the destination trace as already analysed (the spacing
of placed addresses per RAMBlock), ``dst/smaps.jsonl`` (the guest RAM mapping
sampled by :func:`migrator.hgm.sample_smaps`) and ``dst/events.jsonl`` (when
the destination completed).

The point is to make a mismatch visible: a run that enabled HGM but whose
destination placed whole huge pages, or whose guest RAM stayed split after
completion, gets a warning; a run that placed 4 KiB pieces of huge pages
without HGM gets one too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from migrator.config.models import Backing
from migrator.errors import ArtifactError
from migrator.hgm import DOUBLEMAP_CAPABILITY, CollapseSummary, SmapsSample, collapse_summary
from migrator.hgm import load_samples as load_smaps_samples
from migrator.metrics.events import PhaseTimeline, read_jsonl
from migrator.metrics.trace_results import TraceAnalysis
from migrator.model import (
    HgmBlock,
    HgmCollapse,
    HgmMapping,
    HgmMappingSpan,
    HgmSection,
    Metric,
)
from migrator.rundir import RunMeta, artifact_path
from migrator.units import format_size

__all__ = ["SMAPS_SOURCE", "hgm_section"]

SMAPS_FILE: Final = "dst/smaps.jsonl"
SMAPS_SOURCE: Final = (
    "dst QEMU /proc/PID/smaps, guest RAM VMA (dst/smaps.jsonl, controller wall clock)"
)
PLACEMENT_SOURCE: Final = (
    "dst QEMU trace: postcopy_place_page addresses (largest power of two dividing every "
    "placed offset)"
)
COLLAPSE_SOURCE: Final = (
    "dst/smaps.jsonl against dst MIGRATION completed (QMP event arrival, controller wall clock)"
)
SMALL_PAGE: Final = 4096
NOT_FOUND: Final = "not-found"


def _small_pages(backing: str | None) -> bool:
    """The scenario's backing has 4 KiB pages (False when unknown)."""
    try:
        return backing is not None and not Backing(backing).is_hugetlb
    except ValueError:
        return False


def _decision(meta: RunMeta, backing: str | None) -> tuple[
    str | None, bool, str, str, dict[str, Any]
]:
    """(mode, enabled, reason, decided_by, hosts) from run.json."""
    record = meta.hgm
    if record is not None:
        return (record.get("mode"), bool(record.get("enabled")), str(record.get("reason", "")),
                "run.json hgm", dict(record.get("hosts") or {}))
    # Runs recorded before the runner decided HGM: what QEMU was told is the plan.
    enabled = meta.plan.destination_capabilities.get(DOUBLEMAP_CAPABILITY) is True
    verb = "enabled" if enabled else "did not enable"
    reason = f"no HGM decision in run.json; its plan {verb} {DOUBLEMAP_CAPABILITY}"
    if _small_pages(backing):
        reason += f" (vm.backing = {backing}: 4 KiB pages)"
    return None, enabled, reason, "run.json plan", {}


def _blocks(analysis: TraceAnalysis, enabled: bool, warnings: list[str]) -> list[HgmBlock]:
    """Every huge-page RAMBlock of the trace with its placement granularity.

    4 KiB blocks are left out: every fetch there is a whole 4 KiB page, with or
    without HGM.
    """
    out = []
    for block in analysis.blocks:
        if block.page_size <= SMALL_PAGE:
            continue
        granularity = block.placement_granularity
        if granularity is None or not block.pages_placed:
            fetched, matches = "nothing placed", None
        elif granularity < block.page_size:
            fetched, matches = f"{format_size(granularity)} pieces", enabled
            if not enabled:
                warnings.append(
                    f"{block.name}: the destination placed {format_size(granularity)} pieces of "
                    f"{format_size(block.page_size)} pages although HGM was not enabled")
        else:
            fetched, matches = "whole pages", not enabled
            if enabled:
                warnings.append(
                    f"{block.name}: HGM was enabled ({DOUBLEMAP_CAPABILITY}) but the "
                    f"destination placed whole {format_size(block.page_size)} pages (every one of "
                    f"{block.pages_placed:,} placements {format_size(block.page_size)}-aligned): "
                    "faults were not resolved in 4 KiB pieces")
        out.append(HgmBlock(
            ramblock=block.name, page_size=block.page_size, pages_placed=block.pages_placed,
            placement_granularity=Metric(value=granularity, unit="bytes",
                                         source=PLACEMENT_SOURCE),
            subpage_resolution=block.subpage_resolution, fetched=fetched,
            matches_decision=matches,
        ))
    return out


def _level(sample: SmapsSample) -> str:
    granularity = sample.granularity
    return NOT_FOUND if granularity is None else granularity.level


def _kib(value: int | None) -> Metric:
    return Metric(value=value, unit="KiB", source=SMAPS_SOURCE)


def _spans(samples: Sequence[SmapsSample], phases: PhaseTimeline) -> list[HgmMappingSpan]:
    """Consecutive samples at one mapping level, merged (the granularity over time)."""
    runs: list[list[SmapsSample]] = []
    for sample in sorted(samples, key=lambda s: s.host_ns):
        if runs and _level(runs[-1][-1]) == _level(sample):
            runs[-1].append(sample)
        else:
            runs.append([sample])
    spans = []
    for run in runs:
        splits = [g.split_kb for s in run if (g := s.granularity) is not None
                  and g.split_kb is not None]
        spans.append(HgmMappingSpan(
            level=_level(run[0]), start_ns=run[0].host_ns, end_ns=run[-1].host_ns,
            phase=phases.span(run[0].host_ns, run[-1].host_ns), samples=len(run),
            mapped=_kib(run[-1].hugetlb_kb), split_peak=_kib(max(splits, default=None)),
        ))
    return spans


def _collapse(summary: CollapseSummary) -> HgmCollapse:
    def ms(ns: int | None) -> Metric:
        value = None if ns is None else round(ns / 1e6, 3)
        return Metric(value=value, unit="ms", source=COLLAPSE_SOURCE)

    record = summary.to_dict()
    return HgmCollapse(
        status=summary.status, peak_split=_kib(summary.peak_split_kb),
        peak_split_ns=summary.peak_split_ns, completed_ns=summary.completed_ns,
        split_at_completion=_kib(summary.split_kb_at_completion),
        last_split_ns=summary.last_split_ns, collapsed_ns=summary.collapsed_ns,
        collapsed_after_completion=ms(summary.after_completion_ns),
        uncertainty=ms(summary.uncertainty_ns),
        final_level=summary.final.level if summary.final is not None else None,
        final=record["final"],
    )


def _completed_ns(run_path: Path) -> int | None:
    """When the destination's ``MIGRATION completed`` event reached the controller.

    The arrival time (controller clock) rather than QEMU's own stamp: smaps
    samples carry the controller's clock too, which on a remote host differs
    from the host's by the clock offset.
    """
    for record in read_jsonl(run_path / "dst" / "events.jsonl"):
        if record.get("event") == "MIGRATION" and record.get("data", {}).get(
                "status") == "completed":
            stamp = record.get("host_ns", record.get("qemu_ns"))
            return int(stamp) if stamp is not None else None
    return None


def _sampler_errors(path: Path) -> list[str]:
    return [str(record["error"]) for record in read_jsonl(path) if "error" in record]


def _mapping(
    run_path: Path, phases: PhaseTimeline, enabled: bool, warnings: list[str],
) -> HgmMapping | None:
    path = run_path / SMAPS_FILE
    if artifact_path(path) is None:
        return None
    try:
        samples = load_smaps_samples(path)
    except ArtifactError as error:
        warnings.append(f"{SMAPS_FILE}: {error}")
        return None
    warnings += [f"{SMAPS_FILE}: the sampler stopped early: {error}"
                 for error in _sampler_errors(path)]
    summary = collapse_summary(samples, completed_ns=_completed_ns(run_path))
    found = [s for s in samples if s.found]
    if enabled and summary.status == "no-hgm-stats":
        warnings.append("HGM was enabled but the destination kernel printed no HugetlbPudMapped/"
                        "HugetlbPmdMapped/HugetlbPteMapped counters in smaps")
    if not enabled and summary.peak_split_kb:
        warnings.append(f"guest RAM was mapped in pieces ({summary.peak_split_kb:,} KiB below "
                        "huge-page level at peak) although HGM was not enabled")
    if enabled and summary.status == "not-collapsed":
        warnings.append(
            f"guest RAM was still mapped in pieces at the last smaps sample "
            f"({summary.final.split_kb if summary.final else '?'} KiB below huge-page level): "
            "the collapse back to huge mappings was not seen")
    return HgmMapping(
        samples=len(samples), found=len(found),
        vma=found[-1].vma if found else None,
        page_size_kib=found[-1].page_kb if found else None,
        hgm_counters=any(g.measured for s in found if (g := s.granularity) is not None),
        timeline=_spans(samples, phases), collapse=_collapse(summary), source=SMAPS_SOURCE,
    )


def hgm_section(
    run_path: Path, meta: RunMeta, backing: str | None,
    analysis: TraceAnalysis | None, phases: PhaseTimeline,
) -> tuple[HgmSection, list[str]]:
    """The ``hgm`` section of one run directory's report, and its warnings."""
    mode, enabled, reason, decided_by, hosts = _decision(meta, backing)
    warnings: list[str] = []
    notes: list[str] = []
    if analysis is None:
        notes.append("no dst/trace.log: the fault granularity is unknown")
        blocks = []
    else:
        blocks = _blocks(analysis, enabled, warnings)
        if not blocks:
            notes.append("no huge-page RAMBlock in the destination trace: every fetch was a "
                         "whole 4 KiB page")
    mapping = _mapping(run_path, phases, enabled, warnings)
    if mapping is None and artifact_path(run_path / SMAPS_FILE) is None:
        why = ("nothing to sample on a 4 KiB backing"
               if _small_pages(backing)
               else "recorded before migrator sampled smaps, or the run stopped before migrating")
        notes.append(f"no {SMAPS_FILE}: the guest RAM mapping was not sampled ({why})")
    return HgmSection(
        mode=mode, enabled=enabled, reason=reason, decided_by=decided_by, hosts=hosts,
        blocks=blocks, mapping=mapping, notes=notes,
    ), warnings
