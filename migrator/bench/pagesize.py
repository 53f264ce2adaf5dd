"""The page-size table: what post-copy costs per host page size, from a finished suite.

Rows are page sizes (4 KiB, 2 MiB, 1 GiB, and 1 GiB+HGM for HGM runs, those
with ``vm.hgm = "require"``), split further by the suite's other axes (e.g.
``preempt=true``).
Columns come from each run's ``report.json`` (:class:`Report`): fault count,
fetch latency p50/p99/max on the guest RAM block, the freeze (source STOP ->
destination RESUME) next to QEMU's ``downtime``, guest stalls by the guest's
clock (p99, max) and from outside (max heartbeat gap), QEMU's blocktime, the
post-copy duration, and the p50 over the wire floor.  The wire floor is the
page size over the link bandwidth, measured per run as the source's
``ram.transferred`` over its ``total-time`` (an average, stated in a note).
With several repetitions every cell is the median over the finished ones.

Rows without a finished run say why: "not supported on these hosts: ..." for
an HGM run the hosts cannot do, the error of a failed run, or "not run".
The same table is printed (rich), and written as Markdown and CSV beside
``suite.json``.  Reports are read, never written: a run directory without a
``report.json`` (or with an outdated one) is analysed in memory; a caller that
has loaded them already (the suite page) passes them in.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from migrator.bench.runner import RunRecord, RunStatus, SuiteState
from migrator.bench.suite import PlannedRun, Suite
from migrator.errors import MigratorError
from migrator.metrics.run_page import guest_ram_block, load_run_report
from migrator.metrics.summary import TRACE_SOURCE
from migrator.model import BlockFetch, Report
from migrator.rundir import atomic_write
from migrator.units import format_size

__all__ = [
    "COLUMNS",
    "CSV_FILE",
    "MARKDOWN_FILE",
    "Column",
    "PageSizeRow",
    "PageSizeTable",
    "build_page_size_table",
    "load_done_reports",
    "page_label",
    "render_page_size_table",
    "row_cells",
    "run_metrics",
    "table_csv",
    "table_footnotes",
    "table_headers",
    "table_markdown",
    "write_page_size_table",
]

MARKDOWN_FILE = "page-size.md"
CSV_FILE = "page-size.csv"
BANDWIDTH = "link_bandwidth_bytes_per_s"
FLOOR = "wire_floor_ms"
RATIO = "p50_over_wire_floor"


@dataclass(frozen=True)
class Column:
    """One measured column: CSV name, headers (Markdown; terminal), how to read a report."""

    key: str
    header: str
    short: str
    read: Callable[[Report, BlockFetch | None], float | None]


def _block_metric(
    field: Literal["latency_ms", "backlog_placements"], name: str,
) -> Callable[[Report, BlockFetch | None], float | None]:
    """Reads metric ``name`` of the row's RAM block's ``field`` (None when absent)."""
    def read(_report: Report, block: BlockFetch | None) -> float | None:
        metric = getattr(block, field).get(name) if block else None
        return None if metric is None else _number(metric.value)
    return read


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _worst_guest(attribute: str) -> Callable[[Report, BlockFetch | None], float | None]:
    def read(report: Report, _block: BlockFetch | None) -> float | None:
        values = [_number(getattr(vcpu, attribute).value) for vcpu in report.guest_stalls]
        known = [v for v in values if v is not None]
        return max(known) if known else None
    return read


def _metric(section: str, key: str) -> Callable[[Report, BlockFetch | None], float | None]:
    def read(report: Report, _block: BlockFetch | None) -> float | None:
        metric = getattr(report, section).get(key)
        return None if metric is None else _number(metric.value)
    return read


COLUMNS: tuple[Column, ...] = (
    Column("faults", "faults", "faults",
           lambda _r, block: float(block.faults) if block is not None else None),
    Column("fetch_p50_ms", "fetch p50 ms", "fetch\np50", _block_metric("latency_ms", "p50")),
    Column("fetch_p99_ms", "fetch p99 ms", "fetch\np99", _block_metric("latency_ms", "p99")),
    Column("fetch_max_ms", "fetch max ms", "fetch\nmax", _block_metric("latency_ms", "max")),
    Column("backlog_p50", "backlog p50 (placements)", "back-\nlog p50",
           _block_metric("backlog_placements", "p50")),
    Column("freeze_ms", "freeze ms (STOP->RESUME)", "freeze",
           lambda r, _b: _number(r.freeze.freeze.value) if r.freeze else None),
    Column("qemu_downtime_ms", "QEMU downtime ms", "QEMU\ndowntime",
           lambda r, _b: _number(r.freeze.qemu_downtime.value) if r.freeze else None),
    Column("guest_stall_p99_ms", "guest stall p99 ms", "guest\np99", _worst_guest("p99_ms")),
    Column("guest_stall_max_ms", "guest stall max ms", "guest\nmax", _worst_guest("max_ms")),
    Column("outside_stall_max_ms", "outside stall max ms", "outside\nmax",
           lambda r, _b: _number(r.outside_stalls.max_gap.value) if r.outside_stalls else None),
    Column("blocktime_ms", "blocktime ms", "block-\ntime",
           _metric("blocktime", "postcopy-blocktime (all vCPUs)")),
    Column("postcopy_ms", "post-copy ms", "post-\ncopy",
           _metric("timings", "post-copy (postcopy-active -> dst completed)")),
)

NOTES = (
    "fault count and fetch latency: faults on the guest RAM block (the row's page size), "
    f"{TRACE_SOURCE}, latency from the request to the placement of the page holding it.",
    "backlog p50: median count of pages placed between a fault request and its own page "
    "(same trace), i.e. queued ahead of it in the migration stream; hundreds mean the fetch "
    "latency is mostly queueing, not page size.",
    "freeze: source STOP -> destination RESUME (QMP event timestamps, host clock), next to "
    "QEMU's own `downtime` (source query-migrate), which ends before the destination has "
    "loaded device state.",
    "guest stall p99/max: gaps between the guest probe's accesses by its own clock (worst "
    "vCPU), as report.json has them: p99 over every gap (log2 histogram, bucket upper bound, "
    "so about 1 us while stalls are rare), max the longest gap. The guest clock does not run "
    "while the VM is stopped. outside stall max: the longest gap between guest heartbeats as "
    "they arrived at the controller (host clock), which sees the freeze too.",
    "blocktime: the destination's `postcopy-blocktime` (QEMU, all vCPUs). post-copy: source "
    "`postcopy-active` -> destination `completed` (QMP events).",
    "p50 / wire floor: the fetch p50 over the time the page itself needs on the link (page "
    "size / link bandwidth). The link bandwidth is measured from each run itself: the "
    "source's `ram.transferred` / `total-time` (final query-migrate). That is an average over "
    "the whole migration, below the link's peak rate, so a ratio below 1 means a page came "
    "faster than the average rate would carry it.",
)


@dataclass(frozen=True)
class PageSizeRow:
    """One row: a page size (and HGM), split by the suite's other axes."""

    page_size: int
    hgm: bool
    other_labels: tuple[tuple[str, str], ...]
    planned: int
    runs: int
    status: str
    note: str
    values: dict[str, float | None]
    guest: str
    qemu: str = ""

    @property
    def label(self) -> str:
        """``4 KiB``, ``1 GiB+HGM``, ``2 MiB preempt=true``, ``2 MiB qemu=sid QEMU 11.1.3``..."""
        others = " ".join(f"{axis}={label}" for axis, label in self.other_labels)
        qemu = f"QEMU {self.qemu}" if self.qemu else ""
        return " ".join(part for part in (page_label(self.page_size, self.hgm), others, qemu)
                        if part)

    @property
    def runs_text(self) -> str:
        """How many runs finished: ``1``, or ``finished/planned`` with repetitions."""
        return f"{self.runs}" if self.planned <= 1 else f"{self.runs}/{self.planned}"


@dataclass(frozen=True)
class PageSizeTable:
    """The whole table, ready to render."""

    suite: str
    rows: tuple[PageSizeRow, ...]
    other_axes: tuple[str, ...]
    environment: str
    generated: str
    notes: tuple[str, ...] = field(default=NOTES)

    @property
    def repetitions(self) -> int:
        """The most repetitions any row planned."""
        return max((row.planned for row in self.rows), default=0)


def page_label(page_size: int, hgm: bool = False) -> str:
    """``4 KiB``, ``2 MiB``, ``1 GiB``, with ``+HGM`` for HGM runs."""
    return format_size(page_size) + ("+HGM" if hgm else "")


def load_done_reports(runs: Mapping[str, RunRecord], suite_dir: Path) -> dict[str, Report]:
    """The reports of the runs marked done whose report can be read or derived (see
    :func:`~migrator.metrics.run_page.load_run_report`: its ``report.json`` when current,
    else derived now, not written), keyed by run id, in the order of ``runs``."""
    reports = {}
    for run_id, record in runs.items():
        path = record.path(suite_dir)
        if record.status is not RunStatus.DONE or path is None:
            continue
        try:
            reports[run_id] = load_run_report(path)[0]
        except MigratorError:
            continue
    return reports


def run_metrics(report: Report, page_size: int) -> dict[str, float | None]:
    """Every column of one run, plus its link bandwidth, wire floor and ratio."""
    block = guest_ram_block(report, page_size)
    values = {column.key: column.read(report, block) for column in COLUMNS}
    transferred = _number(report.transfer["ram.transferred"].value) \
        if "ram.transferred" in report.transfer else None
    total_ms = _number(report.timings["total-time"].value) \
        if "total-time" in report.timings else None
    bandwidth = transferred / (total_ms / 1e3) if transferred and total_ms else None
    floor = page_size / bandwidth * 1e3 if bandwidth else None
    p50 = values["fetch_p50_ms"]
    values[BANDWIDTH] = bandwidth
    values[FLOOR] = floor
    values[RATIO] = p50 / floor if p50 is not None and floor else None
    return values


def _median(samples: Sequence[float | None]) -> float | None:
    known = [s for s in samples if s is not None]
    return statistics.median(known) if known else None


def _row(
    page_size: int, hgm: bool, others: tuple[tuple[str, str], ...],
    entries: Sequence[tuple[PlannedRun, RunRecord, Report | None]], name_qemu: bool,
) -> PageSizeRow:
    """One row; ``name_qemu``: say which QEMU its runs used (the table mixes QEMU builds)."""
    done = [report for _, _, report in entries if report is not None]
    # A run marked done whose report cannot be read counts as failed here.
    failed = [record for _, record, report in entries if report is None
              and record.status in (RunStatus.FAILED, RunStatus.DONE)]
    unsupported = [record for _, record, _ in entries if record.status is RunStatus.UNSUPPORTED]
    per_run = [run_metrics(report, page_size) for report in done]
    keys = [column.key for column in COLUMNS] + [BANDWIDTH, FLOOR, RATIO]
    values = {key: _median([metrics[key] for metrics in per_run]) for key in keys}
    first = entries[0][0].scenario
    guest = (f"{first.vm.memory_mib} MiB guest, {first.workload.working_set_mib} MiB working "
             f"set, {first.vm.backing.value}")
    if done:
        status = "done" if len(done) == len(entries) else "partial"
        note = ""
        if failed:
            note = (f"{len(failed)} of {len(entries)} repetitions failed: "
                    f"{failed[0].error or 'no report'}")
    elif unsupported:
        status, note = "unsupported", unsupported[0].reason or "not supported on these hosts"
    elif failed:
        status, note = "failed", f"failed: {failed[0].error or 'no report'}"
    else:
        status = "not run"
        why = {record.status.value for _, record, _ in entries}
        note = f"not run ({', '.join(sorted(why))})"
    qemu = _distinct(done, "qemu_version") if name_qemu and done else ""
    return PageSizeRow(page_size=page_size, hgm=hgm, other_labels=others,
                       planned=len(entries), runs=len(done), status=status, note=note,
                       values=values, guest=guest, qemu=qemu)


def _distinct(reports: Sequence[Report], key: str) -> str:
    """The distinct values of one environment entry over ``reports``, comma-separated."""
    return ", ".join(sorted({str(r.environment.get(key)) for r in reports}))


def _environment(reports: Sequence[Report]) -> str:
    if not reports:
        return "no finished runs"
    return (f"QEMU {_distinct(reports, 'qemu_version')}, accel {_distinct(reports, 'accel')}, "
            f"host kernel {_distinct(reports, 'host_kernel')}, guest kernel "
            f"{_distinct(reports, 'guest_kernel')}")


def build_page_size_table(suite: Suite, state: SuiteState, out_dir: Path,
                          reports: Mapping[str, Report] | None = None) -> PageSizeTable:
    """The table of a suite's runs as ``state`` records them.

    ``reports``: the reports of the runs marked done, keyed by run id, as
    :func:`load_done_reports` loaded them from ``out_dir``; None loads them here.
    """
    page_axes = suite.page_axes
    other_axes = tuple(axis.name for axis in suite.axes if axis.name not in page_axes)
    if reports is None:
        reports = load_done_reports({run.run_id: state.runs[run.run_id] for run in suite.runs
                                     if run.run_id in state.runs}, out_dir)
    groups: dict[tuple[int, bool, tuple[tuple[str, str], ...]],
                 list[tuple[PlannedRun, RunRecord, Report | None]]] = {}
    order: dict[tuple[tuple[str, str], ...], int] = {}
    done: list[Report] = []
    for run in suite.runs:
        record = state.runs.get(run.run_id)
        if record is None:
            continue
        others = tuple((axis, label) for axis, label in run.labels if axis not in page_axes)
        order.setdefault(others, len(order))
        report = reports.get(run.run_id)
        if report is not None:
            done.append(report)
        key = (run.scenario.vm.backing.page_size, run.hgm, others)
        groups.setdefault(key, []).append((run, record, report))
    # Rows name their QEMU when the runs used more than one (a suite comparing builds).
    mixed = len({report.environment.get("qemu_version") for report in done}) > 1
    rows = [_row(page, hgm, others, entries, mixed)
            for (page, hgm, others), entries in sorted(
                groups.items(), key=lambda item: (item[0][0], item[0][1], order[item[0][2]]))]
    return PageSizeTable(
        suite=suite.name, rows=tuple(rows), other_axes=other_axes,
        environment=_environment(done),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _fmt(value: float | None, key: str) -> str:
    """Whole numbers as integers, other times with three significant digits (no exponent)."""
    if value is None:
        return "-"
    if key == "faults":
        return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
    if key == RATIO:
        return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"
    if value == int(value) or abs(value) >= 100:
        return f"{value:,.0f}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def table_headers(table: PageSizeTable) -> list[str]:
    """The column headers, as the Markdown and HTML tables show them."""
    runs = "runs" if table.repetitions <= 1 else "runs (medians)"
    return ["page size", runs, *(c.header for c in COLUMNS), "p50 / wire floor", "note"]


def row_cells(row: PageSizeRow) -> list[str]:
    """The cells of one row as text (numbers formatted), under :func:`table_headers`."""
    return [row.label, row.runs_text, *(_fmt(row.values[c.key], c.key) for c in COLUMNS),
            _fmt(row.values[RATIO], RATIO), row.note]


def _bandwidth_note(table: PageSizeTable) -> str:
    parts = []
    for row in table.rows:
        bandwidth = row.values[BANDWIDTH]
        floor = row.values[FLOOR]
        if bandwidth is None or floor is None:
            continue
        parts.append(f"{row.label}: {bandwidth * 8 / 1e9:.2f} Gbit/s, floor "
                     f"{_fmt(floor, FLOOR)} ms")
    return "measured link bandwidth per row: " + ("; ".join(parts) if parts else "none")


def table_footnotes(table: PageSizeTable) -> list[str]:
    """The notes under the table, to be numbered: the column notes, the measured link
    bandwidth per row, the guests, and how repetitions are summed up."""
    notes = list(table.notes)
    notes.append(_bandwidth_note(table))
    notes.append("guests: " + "; ".join(f"{row.label}: {row.guest}" for row in table.rows))
    if table.repetitions > 1:
        notes.append("with several repetitions every cell is the median over the finished "
                     "repetitions; 'runs' says how many finished of how many planned.")
    return notes


def table_markdown(table: PageSizeTable) -> str:
    """The table as a Markdown document (heading, table, numbered notes)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    headers = table_headers(table)
    out = [f"## Page-size table: suite `{table.suite}`", "",
           f"{table.environment}; generated {table.generated}.", "",
           line(headers),
           "|" + "|".join("---" if i in (0, len(headers) - 1) else "---:"
                          for i in range(len(headers))) + "|"]
    out += [line(row_cells(row)) for row in table.rows]
    out.append("")
    out += [f"{number}. {note}" for number, note in enumerate(table_footnotes(table), 1)]
    return "\n".join(out) + "\n"


def _csv_number(value: float | None) -> str:
    """Full precision; whole numbers without a fraction; empty when unknown."""
    if value is None:
        return ""
    return str(int(value)) if value.is_integer() else repr(value)


def table_csv(table: PageSizeTable) -> str:
    """The table as CSV: one row per table row, raw numbers (ms, bytes, bytes/s)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = [c.key for c in COLUMNS] + [BANDWIDTH, FLOOR, RATIO]
    writer.writerow(["row", "page_size_bytes", "hgm", *table.other_axes, "status", "runs",
                     "planned", *keys, "note"])
    for row in table.rows:
        others = dict(row.other_labels)
        writer.writerow([
            row.label, row.page_size, str(row.hgm).lower(),
            *(others.get(axis, "") for axis in table.other_axes),
            row.status, row.runs, row.planned,
            *(_csv_number(row.values[key]) for key in keys),
            row.note,
        ])
    return buffer.getvalue()


def write_page_size_table(table: PageSizeTable, out_dir: Path) -> tuple[Path, Path]:
    """Write ``page-size.md`` and ``page-size.csv`` into ``out_dir`` (atomically)."""
    markdown, comma = out_dir / MARKDOWN_FILE, out_dir / CSV_FILE
    atomic_write(markdown, table_markdown(table))
    atomic_write(comma, table_csv(table))
    return markdown, comma


def _rich_table(table: PageSizeTable, title: str, columns: Sequence[Column],
                with_ratio: bool) -> Table:
    rich_table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD,
                       collapse_padding=True, pad_edge=False)
    rich_table.add_column("page size", no_wrap=True)
    rich_table.add_column("runs", justify="right", no_wrap=True)
    for column in columns:
        rich_table.add_column(column.short, justify="right", no_wrap=True)
    if with_ratio:
        rich_table.add_column("p50 /\nfloor", justify="right", no_wrap=True)
    for row in table.rows:
        cells = [row.label, row.runs_text, *(_fmt(row.values[c.key], c.key) for c in columns)]
        if with_ratio:
            cells.append(_fmt(row.values[RATIO], RATIO))
        rich_table.add_row(*cells, style=None if row.status in ("done", "partial") else "dim")
    return rich_table


def render_page_size_table(table: PageSizeTable, console: Console) -> None:
    """Print the table on a terminal (times in ms), row notes and footnotes below it.

    A terminal too narrow for all columns gets two tables: fetch latency, then
    freeze and stalls; numbers are never cut.
    """
    title = f"page-size table: suite {table.suite} (times in ms)"
    whole = _rich_table(table, title, COLUMNS, with_ratio=True)
    # Measured without the console's limit: the table's natural width.
    natural = Measurement.get(console, console.options.update_width(1 << 16), whole).maximum
    if natural <= console.width:
        console.print(whole)
    else:
        console.print(_rich_table(table, title + ": fetch", COLUMNS[:4], with_ratio=True))
        console.print(_rich_table(table, title + ": freeze and stalls", COLUMNS[4:],
                                  with_ratio=False))
    console.print(table.environment, style="dim", highlight=False, soft_wrap=True)
    for row in table.rows:
        if row.note:
            console.print(f"[bold]{row.label}[/bold]: {row.note}", highlight=False,
                          soft_wrap=True)
    for number, note in enumerate(table_footnotes(table), 1):
        console.print(f"[dim]{number}. {note}[/dim]", highlight=False, soft_wrap=True)
