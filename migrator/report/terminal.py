"""The report on a terminal: a few lines of text around its tables, drawn with rich.

The tables are :mod:`migrator.report.terminal_tables`' (built from the report);
this module only draws them, plus the header, the HGM block, the integrity
line, the warnings and the legend of the sources the tables cite.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable
from rich.text import Text

from migrator.model import HgmSection, Report
from migrator.outcome import severity
from migrator.report.sources import Sources
from migrator.report.terminal_tables import fmt, leading_tables, size_of, trailing_tables
from migrator.tables import Table, Tone
from migrator.units import format_size

__all__ = ["draw_table", "render_report"]

#: The colour of each outcome severity (migrator.outcome.severity).
SEVERITY_STYLES = {"ok": "green", "warn": "yellow", "bad": "red"}
#: The style of each tone of a cell or note (migrator.tables.Tone).
TONE_STYLES: dict[Tone, str] = {"": "", "dim": "dim", "ok": "green", "warn": "yellow",
                                "bad": "red"}


def draw_table(table: Table, console: Console) -> None:
    """Print ``table`` (title flush left, no outer edge), then its notes indented."""
    drawn = RichTable(title=escape(table.title), title_justify="left", show_edge=False)
    for index in range(len(table.columns)):
        column = table.column(index)
        width = None
        if table.fit:
            width = max(len(column), *(len(row[index].text) for row in table.rows))
        drawn.add_column(escape(column), justify="right" if column.numeric else "left",
                         style=TONE_STYLES[column.tone], min_width=width)
    for row in table.rows:
        drawn.add_row(*(Text(cell.text, style=TONE_STYLES[cell.tone]) for cell in row))
    console.print(drawn)
    for note in table.notes:
        console.print(Text.assemble("  ", (note.text, TONE_STYLES[note.tone])), highlight=False)


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
    for table in leading_tables(report, sources):
        draw_table(table, console)
    if report.hgm is not None:
        _render_hgm(report.hgm, console, sources)
    for table in trailing_tables(report, sources):
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
            f"{size_of(block.placement_granularity)} over {block.pages_placed:,} "
            f"placement{'' if block.pages_placed == 1 else 's'} "
            f"{sources.cite(block.placement_granularity)} {verdict}".rstrip(),
            highlight=False)
    mapping = hgm.mapping
    if mapping is not None:
        spans = " -> ".join(f"{span.level.upper()} ({span.phase})" for span in mapping.timeline)
        last = mapping.timeline[-1].mapped if mapping.timeline else None
        mapped = f", {fmt(last)} mapped at the end" if last and last.value is not None else ""
        console.print(f"  guest RAM mapping, {mapping.found:,} of {mapping.samples:,} samples "
                      f"{sources.cite(mapping.collapse.peak_split)}: {spans or '-'}{mapped}",
                      highlight=False)
        collapse = mapping.collapse
        if not mapping.hgm_counters:
            detail = "the kernel prints no HGM counters: huge pages are mapped whole"
        elif collapse.status == "collapsed":
            detail = (f"collapsed {fmt(collapse.collapsed_after_completion)} after completion "
                      f"(+/- {fmt(collapse.uncertainty)}) "
                      f"{sources.cite(collapse.collapsed_after_completion)}; peak split "
                      f"{fmt(collapse.peak_split)}")
        elif collapse.status == "not-collapsed":
            detail = (f"[yellow]still split at the last sample[/yellow]; peak split "
                      f"{fmt(collapse.peak_split)}")
        else:
            detail = collapse.status
        console.print(f"  split/collapse: {detail}", highlight=False)
    for note in hgm.notes:
        console.print(f"  [dim]{escape(note)}[/dim]", highlight=False)
