"""The report on a terminal: a few lines of text around its tables, drawn with rich.

The tables are the report's own (:mod:`migrator.report.run_tables`), the same
the HTML page draws; this module lays them out *compact*, to fit 80
columns (:func:`draw_table`), and prints the header, the HGM block, the
integrity line, the warnings and the legend of the sources the tables cite.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable
from rich.text import Text

from migrator.model import HgmSection, Metric, Report
from migrator.outcome import severity
from migrator.report.run_tables import (
    blocktime_table,
    clock_step_table,
    comparison_table,
    fault_table,
    fetch_table,
    freeze_table,
    latency_dist_table,
    metric_table,
    outside_table,
    pause_table,
    placement_table,
    thread_cpu_table,
    vcpu_stall_table,
    worst_gap_table,
)
from migrator.report.sources import Sources
from migrator.tables import Cell, Table, Tone
from migrator.units import format_size

__all__ = ["draw_table", "render_report"]

#: The colour of each outcome severity (migrator.outcome.severity).
SEVERITY_STYLES = {"ok": "green", "warn": "yellow", "bad": "red"}
#: The style of each tone of a cell or note (migrator.tables.Tone).
TONE_STYLES: dict[Tone, str] = {"": "", "dim": "dim", "ok": "green", "warn": "yellow",
                                "bad": "red"}


@dataclass
class _Drawn:
    """One column as the terminal draws it: header, alignment, style and cell texts."""

    header: str
    numeric: bool
    tone: Tone
    texts: list[str]
    tones: list[Tone]
    cites: int | None = None

    def natural(self) -> int:
        """Its width with nothing wrapped."""
        return max(len(text) for text in (self.header, *self.texts))

    def narrowest(self) -> int:
        """The least width that cuts no word of it (a number is a word)."""
        words = [word for text in (self.header, *self.texts) for word in text.split()]
        return max((len(word) for word in words), default=1)


def draw_table(table: Table, console: Console, compact: bool = True) -> None:
    """Print ``table`` (title flush left, no outer edge), then its notes indented.

    ``compact`` leaves out detail columns and rows (their compact notes say
    what they held) and rounds the numbers of rounded columns.  Sources are
    cited as ``[n]`` (:func:`_columns`).  No column is narrower than its
    longest word, so a narrow terminal wraps headers and text, never a number.
    """
    title, columns = _columns(table, compact)
    rows = len(columns[0].texts) if columns else 0
    if not rows:
        # Every row left out: the title and the notes that say what they held.
        console.print(Text(title), highlight=False)
    else:
        rich = RichTable(title=escape(title), title_justify="left", show_edge=False)
        widths = _widths(columns, console.width, rich)
        for column, width in zip(columns, widths, strict=True):
            rich.add_column(escape(column.header), style=TONE_STYLES[column.tone],
                            justify="right" if column.numeric else "left",
                            min_width=column.narrowest(), width=width)
        for row in range(rows):
            rich.add_row(*(Text(c.texts[row], style=TONE_STYLES[c.tones[row]])
                           for c in columns))
        console.print(rich)
    for note in table.notes:
        if compact or not note.compact:
            console.print(Text.assemble("  ", (note.text, TONE_STYLES[note.tone])),
                          highlight=False)


def _columns(table: Table, compact: bool) -> tuple[str, list[_Drawn]]:
    """The title and the columns to draw, with their sources cited.

    A column of bare citations of one source is left out and cited in the title;
    a column whose values all cite one source cites it in its header (in the
    title when every such column cites the same one); any other cell cites its
    own after its text.
    """
    title = table.title
    rows = [row for row in table.rows if not (compact and getattr(row, "detail", False))]
    columns: list[_Drawn] = []
    cited_once: set[int] = set()
    for index in range(len(table.columns)):
        column = table.column(index)
        if compact and column.detail:
            continue
        cells = [row[index] for row in rows]
        texts = [cell.shown(compact and column.rounded) for cell in cells]
        cited = {cell.source for cell in cells if cell.source is not None}
        if not any(texts) and len(cited) <= 1:
            cited_once |= cited
            continue
        drawn = _Drawn(str(column), column.numeric or (bool(cells) and all(
            cell.numeric for cell in cells)), column.tone, texts, [cell.tone for cell in cells])
        if len(cited) == 1 and all(c.source is not None or c.text in ("", "-") for c in cells):
            drawn.cites = min(cited)
        else:
            drawn.texts = [_cited(text, cell) for text, cell in zip(texts, cells, strict=True)]
        columns.append(drawn)
    in_headers = {drawn.cites for drawn in columns if drawn.cites is not None}
    if len(in_headers | cited_once) == 1:
        cited_once |= in_headers
    else:
        for drawn in columns:
            if drawn.cites is not None:
                drawn.header += f" [{drawn.cites}]"
    title += "".join(f" [{n}]" for n in sorted(cited_once) if f"[{n}]" not in title)
    return title, columns


def _widths(columns: list[_Drawn], width: int, rich: RichTable) -> list[int | None]:
    """Each column's width: rich's own choice when the table fits ``width`` unwrapped,
    else its narrowest, widened with what is left: first so that cells need not
    wrap, then headers.  A table whose narrowest columns do not fit keeps one space
    after each cell only."""
    if sum(c.natural() for c in columns) + 3 * len(columns) - 1 <= width:
        return [None] * len(columns)
    overhead = 3 * len(columns) - 1
    if sum(c.narrowest() for c in columns) + overhead > width:
        rich.padding = (0, 1, 0, 0)
        overhead = 2 * len(columns) - 1
    widths = [c.narrowest() for c in columns]
    for wanted in ([max(map(len, c.texts), default=0) for c in columns],
                   [c.natural() for c in columns]):
        slack = width - overhead - sum(widths)
        lacking = [max(0, want - have) for want, have in zip(wanted, widths, strict=True)]
        total = sum(lacking)
        if slack <= 0 or not total:
            continue
        widths = [have + (lack if total <= slack else slack * lack // total)
                  for have, lack in zip(widths, lacking, strict=True)]
    return list(widths)


def _cited(text: str, cell: Cell) -> str:
    """``text [n]``: a value and its source."""
    return " ".join(part for part in (text, "" if cell.source is None else f"[{cell.source}]")
                    if part)


def _fmt(metric: Metric) -> str:
    """A metric's value to the thousandth with its unit, or '-' when unknown."""
    value = metric.value
    if value is None:
        return "-"
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.3f}"
    return f"{text} {metric.unit}".rstrip()


def _size(metric: Metric) -> str:
    """A size metric's value in binary units, or '-' when it is not a whole byte count."""
    return format_size(metric.value) if isinstance(metric.value, int) else "-"


def _tables(report: Report, sources: Sources, before_hgm: bool) -> list[Table]:
    """The tables the terminal shows, before the HGM block or after it (sources are
    numbered in the order the tables are built)."""
    if before_hgm:
        tables = [pause_table(report, sources) if report.recoveries else None,
                  fault_table(report, sources) if report.faults else None,
                  fetch_table(report, sources)]
    else:
        tables = [freeze_table(report, sources), vcpu_stall_table(report, sources),
                  clock_step_table(report, sources, None), outside_table(report, sources),
                  worst_gap_table(report, None), blocktime_table(report, sources),
                  thread_cpu_table(report, sources), placement_table(report, sources),
                  metric_table("Timings", report.timings, sources),
                  metric_table("Transfer", report.transfer, sources),
                  latency_dist_table(report), comparison_table(report, sources)]
    return [table for table in tables if table is not None and table.rows]


def render_report(report: Report, console: Console) -> None:
    """Print the whole report."""
    sources = Sources()
    env = report.environment
    outcome_style = SEVERITY_STYLES[severity(report.outcome)]
    console.print(
        f"[bold]{escape(report.scenario)}[/bold]  run {escape(report.run_id)}  outcome "
        f"[{outcome_style}]{escape(report.outcome)}[/{outcome_style}]",
        highlight=False,
    )
    if report.statement:
        console.print(f"[bold {outcome_style}]{escape(report.statement)}[/]", highlight=False)
    # The statement of a failed run already holds the error.
    if report.error and (not report.statement or report.error not in report.statement):
        console.print(f"[red]{escape(report.error)}[/red]", highlight=False)
    console.print(
        f"QEMU {env.get('qemu_version', '?')}  accel {env.get('accel', '?')}  backing "
        f"{env.get('backing', '?')}  {env.get('memory_mib', '?')} MiB  "
        f"{env.get('vcpus', '?')} vCPU  post-copy {env.get('postcopy')}  preempt "
        f"{env.get('preempt')}",
        highlight=False,
    )
    for key in ("tuning", "placement"):
        if env.get(key):
            console.print(f"{key} {escape(str(env[key]))}", highlight=False)
    for table in _tables(report, sources, before_hgm=True):
        draw_table(table, console)
    if report.hgm is not None:
        _render_hgm(report.hgm, console, sources)
    for table in _tables(report, sources, before_hgm=False):
        draw_table(table, console)
    integrity = report.integrity
    if integrity:
        bad = integrity.get("bad_pages")
        style = "green" if bad == 0 else "red"
        console.print(f"Guest integrity: [{style}]{bad} bad pages[/{style}] of "
                      f"{integrity.get('pages')} checked", highlight=False)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    console.print(f"[dim]Sources:\n{sources.legend()}[/dim]", highlight=False)


def _render_hgm(hgm: HgmSection, console: Console, sources: Sources) -> None:
    """The short HGM block: decision, fetch granularity per huge-page block, mapping."""
    state = "[green]enabled[/green]" if hgm.enabled else "disabled"
    mode = f"hgm = {hgm.mode}" if hgm.mode else "no hgm setting"
    console.print(f"[bold]HGM[/bold] {state} ({mode}): {escape(hgm.reason)}", highlight=False)
    for block in hgm.blocks:
        verdict = {True: "as decided", False: "[red]NOT as decided[/red]", None: ""}[
            block.matches_decision]
        console.print(
            f"  {block.ramblock} ({format_size(block.page_size)} pages): {block.fetched}, "
            f"placed at "
            f"{_size(block.placement_granularity)} over {block.pages_placed:,} "
            f"placement{'' if block.pages_placed == 1 else 's'} "
            f"{sources.cite(block.placement_granularity)} {verdict}".rstrip(),
            highlight=False)
    mapping = hgm.mapping
    if mapping is not None:
        spans = " -> ".join(f"{span.level.upper()} ({span.phase})" for span in mapping.timeline)
        last = mapping.timeline[-1].mapped if mapping.timeline else None
        mapped = f", {_fmt(last)} mapped at the end" if last and last.value is not None else ""
        console.print(f"  guest RAM mapping, {mapping.found:,} of {mapping.samples:,} samples "
                      f"{sources.cite(mapping.collapse.peak_split)}: {spans or '-'}{mapped}",
                      highlight=False)
        collapse = mapping.collapse
        if not mapping.hgm_counters:
            detail = "the kernel prints no HGM counters: huge pages are mapped whole"
        elif collapse.status == "collapsed":
            detail = (f"collapsed {_fmt(collapse.collapsed_after_completion)} after completion "
                      f"(+/- {_fmt(collapse.uncertainty)}) "
                      f"{sources.cite(collapse.collapsed_after_completion)}; peak split "
                      f"{_fmt(collapse.peak_split)}")
        elif collapse.status == "not-collapsed":
            detail = (f"[yellow]still split at the last sample[/yellow]; peak split "
                      f"{_fmt(collapse.peak_split)}")
        else:
            detail = collapse.status
        console.print(f"  split/collapse: {detail}", highlight=False)
    for note in hgm.notes:
        console.print(f"  [dim]{escape(note)}[/dim]", highlight=False)
