"""What the overlay page of several runs shows, derived from their run directories (no plotting).

:func:`load_overlay_data` takes each run's artifacts and report (as
:func:`~migrator.metrics.run_artifacts.load_run_artifacts` and
:func:`~migrator.metrics.summary.derive_report` made them) and returns an
:class:`~migrator.pagedata.OverlayData` for
:func:`migrator.report.overlay.render_overlay_html` to draw:

* each run's page data (:func:`~migrator.metrics.run_page.load_run_page_data`),
  its series placed on a shared time axis whose t = 0 is each run's switchover
  (the source's STOP; the ``migrate`` command for a run that never switched);
* its legend label: scenario name, run id and the values of the dimensions that
  differ between the runs (QEMU version, accelerator, HGM, tuning, kernels,
  migrator version from ``report.environment``; every field of ``scenario.toml``
  but its name and description);
* a few thread kinds per side for the CPU plot: the source's migration thread,
  the destination's post-copy fault thread, and each side's vCPU threads summed;
* the headline numbers side by side, each a :class:`~migrator.model.Metric` of
  its report (with its own unit and source), or None where a run has none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from migrator.errors import ArtifactError
from migrator.metrics.run_artifacts import RunArtifacts
from migrator.metrics.run_page import guest_ram_block
from migrator.metrics.summary import TRACE_SOURCE
from migrator.model import Metric, Report
from migrator.pagedata import HeadlineRow, OverlayData, OverlayRun, RunPageData, ThreadLoad
from migrator.units import flat_fields, format_value

__all__ = ["HEADLINE", "LABEL_DIMENSIONS", "dimensions", "headline_rows", "label_order",
           "load_overlay_data", "overlay_threads"]

#: ``report.environment`` fields that can tell runs apart, and their names on the page
#: (the others repeat a field of scenario.toml, or say how a fact was found).
ENVIRONMENT = {"qemu_version": "QEMU", "accel": "accel", "hgm": "HGM", "tuning": "tuning",
               "host_kernel": "host kernel", "guest_kernel": "guest kernel",
               "migrator_version": "migrator"}
#: scenario.toml fields that name a run rather than set it up.
NAMING = ("name", "description")
#: How many differing dimensions a legend label names (the table lists them all).
LABEL_DIMENSIONS = 4
#: The dimensions a label names first, when they differ: those a comparison is usually about.
FIRST_NAMED = ("vm.backing", "QEMU", "tuning", "accel", "HGM", "migration.preempt",
               "migration.postcopy", "vm.memory_mib", "vm.vcpus", "workload.working_set_mib")


def dimensions(runs: Sequence[tuple[RunArtifacts, Report]]) -> dict[str, list[str]]:
    """Every dimension whose value differs between ``runs``, with each run's value ("-"
    where a run lacks it): the environment's first, then scenario.toml's in file order."""
    per_run = []
    for artifacts, report in runs:
        values = {name: format_value(report.environment.get(key)) or "(none)"
                  for key, name in ENVIRONMENT.items()}
        values.update((key, text) for key, text in flat_fields(artifacts.scenario)
                      if key not in NAMING)
        per_run.append(values)
    names = list(dict.fromkeys(name for values in per_run for name in values))
    table = {name: [values.get(name, "-") for values in per_run] for name in names}
    return {name: texts for name, texts in table.items() if len(set(texts)) > 1}


def label_order(differ: dict[str, list[str]]) -> list[str]:
    """The differing dimensions in the order a label names them: :data:`FIRST_NAMED`
    first, then those every run has a value of (a field missing from some
    scenario.toml is mostly one added to the schema since), in table order."""
    order = list(differ)
    return sorted(order, key=lambda name: (
        FIRST_NAMED.index(name) if name in FIRST_NAMED else len(FIRST_NAMED),
        "-" in differ[name], order.index(name)))


def _label(report: Report, differs: dict[str, str], order: list[str]) -> str:
    named = [f"{name}={differs[name]}" for name in order[:LABEL_DIMENSIONS]]
    if len(order) > LABEL_DIMENSIONS:
        named.append(f"+{len(order) - LABEL_DIMENSIONS} more")
    return " · ".join([report.scenario, report.run_id, *named])


def _zero(page: RunPageData, artifacts: RunArtifacts) -> tuple[int, str]:
    """t = 0 of one run on the overlay's axes, and what it is."""
    if page.switchover_ns is not None:
        return page.switchover_ns, "switchover (src STOP)"
    if (migrate := artifacts.events.marks.get("migrate")) is not None:
        return migrate, "migrate (the run never switched over)"
    raise ArtifactError(f"{artifacts.path}: nothing to overlay: the run never started migrating "
                        f"(outcome {page.report.outcome}, no migrate mark in timeline.jsonl)")


def _summed(loads: list[ThreadLoad], side: str, name: str) -> ThreadLoad | None:
    """The vCPU threads of one side as one kind: their CPU use added up."""
    mine = [one for one in loads if one.side == side and one.thread.startswith("vCPU ")]
    if not mine:
        return None
    first = mine[0]
    return ThreadLoad(side, name, sum(one.threads for one in mine), first.t_s,
                      np.sum([one.percent for one in mine], axis=0), first.source,
                      first.tick_percent)


def overlay_threads(loads: list[ThreadLoad]) -> list[ThreadLoad]:
    """The thread kinds the overlay's CPU plot shows: per side its vCPUs summed, and the
    source's migration thread or the destination's post-copy fault thread."""
    out = []
    for side, own in (("src", "migration"), ("dst", "post-copy fault")):
        out += [one for one in loads if one.side == side and one.thread == own]
        vcpus = _summed(loads, side, "vCPUs")
        if vcpus is not None:
            out.append(vcpus)
    return out


def _block_metric(key: str) -> Callable[[Report], Metric | None]:
    def read(report: Report) -> Metric | None:
        block = guest_ram_block(report, None)
        return None if block is None else block.latency_ms.get(key)
    return read


def _faults(report: Report) -> Metric | None:
    block = guest_ram_block(report, None)
    if block is None:
        return None
    return Metric(value=block.faults, unit="faults", source=TRACE_SOURCE)


def _worst_vcpu(attribute: str) -> Callable[[Report], Metric | None]:
    """The metric of the vCPU for which it is largest."""
    def read(report: Report) -> Metric | None:
        metrics = [getattr(vcpu, attribute) for vcpu in report.guest_stalls]
        known = [m for m in metrics if isinstance(m.value, int | float)]
        return max(known, key=lambda m: m.value, default=None)
    return read


#: The headline rows: what each reads from a report.
HEADLINE: tuple[tuple[str, Callable[[Report], Metric | None]], ...] = (
    ("total time", lambda r: r.timings.get("total-time")),
    ("post-copy (postcopy-active → dst completed)",
     lambda r: r.timings.get("post-copy (postcopy-active -> dst completed)")),
    ("freeze (src STOP → dst RESUME)", lambda r: r.freeze.freeze if r.freeze else None),
    ("QEMU downtime", lambda r: r.freeze.qemu_downtime if r.freeze else None),
    ("faults on the guest RAM block", _faults),
    ("fetch p50 (guest RAM block)", _block_metric("p50")),
    ("fetch p99 (guest RAM block)", _block_metric("p99")),
    ("fetch max (guest RAM block)", _block_metric("max")),
    ("guest stall p99 (worst vCPU)", _worst_vcpu("p99_ms")),
    ("guest stall max (worst vCPU)", _worst_vcpu("max_ms")),
    ("heartbeat gap p99 (outside view)",
     lambda r: r.outside_stalls.p99_gap if r.outside_stalls else None),
    ("heartbeat gap max (outside view)",
     lambda r: r.outside_stalls.max_gap if r.outside_stalls else None),
    ("blocktime (QEMU, all vCPUs)", lambda r: r.blocktime.get("postcopy-blocktime (all vCPUs)")),
    ("ram transferred", lambda r: r.transfer.get("ram.transferred")),
)


def headline_rows(reports: Sequence[Report]) -> list[HeadlineRow]:
    """:data:`HEADLINE` read from each report; a row no run has is left out."""
    rows = []
    for name, read in HEADLINE:
        metrics = [read(report) for report in reports]
        if any(m is not None and m.value is not None for m in metrics):
            unit = next(m.unit for m in metrics if m is not None and m.value is not None)
            rows.append(HeadlineRow(name, unit, metrics))
    return rows


def load_overlay_data(runs: Sequence[tuple[RunArtifacts, Report]],
                      pages: Sequence[RunPageData]) -> OverlayData:
    """What the overlay page of ``runs`` shows (see module docstring); writes nothing.

    ``pages``: each run's page data (:func:`load_run_page_data`), in the same order.
    ArtifactError, naming the run directory, when a run never started migrating: it has
    nothing to overlay.
    """
    differ = dimensions(runs)
    order = label_order(differ)
    out = []
    for index, ((artifacts, report), page) in enumerate(zip(runs, pages, strict=True)):
        zero_ns, zero_what = _zero(page, artifacts)
        differs = {name: values[index] for name, values in differ.items()}
        out.append(OverlayRun(_label(report, differs, order), differs, str(artifacts.path), page,
                              zero_ns, zero_what, overlay_threads(page.threads)))
    return OverlayData(out, list(differ), headline_rows([report for _, report in runs]))
