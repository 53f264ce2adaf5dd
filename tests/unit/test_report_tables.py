"""One definition of each report table, drawn whole by the HTML page and compact by the terminal."""

from __future__ import annotations

import re
import shutil
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from migrator.metrics.run_artifacts import load_run_artifacts
from migrator.metrics.run_page import load_run_page_data
from migrator.metrics.summary import derive_report
from migrator.model import Report
from migrator.report.html import render_run_html
from migrator.report.run_tables import fetch_table, pause_table
from migrator.report.sources import Sources
from migrator.report.terminal import draw_table
from migrator.tables import Cell, Column, Note, Row, Table, short_number
from tests.unit.rendering import terminal_text

DATA = Path(__file__).resolve().parents[1] / "data"
RUNS = DATA / "runs"
RECOVERY = DATA / "recovery" / "link-down-twice"


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Report, str]]:
    """Each recorded run's report and HTML page (built on a copy)."""
    out = {}
    for run in (*sorted(p for p in RUNS.iterdir() if p.is_dir()), RECOVERY):
        copy = tmp_path_factory.mktemp("tables") / run.name
        shutil.copytree(run, copy)
        artifacts = load_run_artifacts(copy)
        report = derive_report(artifacts)
        out[run.name] = (report, render_run_html(load_run_page_data(artifacts, report)))
    return out


def test_an_80_column_terminal_cuts_nothing(reports: dict[str, tuple[Report, str]]) -> None:
    for name, (report, _) in reports.items():
        text = terminal_text(report, width=80)
        assert "…" not in text, name
        assert max(len(line) for line in text.splitlines()) <= 80, name


def test_the_page_shows_every_column_the_terminal_its_compact_ones(
        reports: dict[str, tuple[Report, str]]) -> None:
    report, html = reports["hugetlb-2m"]
    table = fetch_table(report, Sources())
    detail = [str(c) for c in map(table.column, range(len(table.columns))) if c.detail]
    assert detail == ["resolved", "unresolved", "mean", "backlog max (placements)",
                      "placed (requested / background / zero)"]
    assert "".join(f"<th>{c}</th>" for c in table.columns) in html
    terminal = terminal_text(report)
    header = next(line for line in terminal.splitlines() if "RAMBlock ┃" in line)
    assert not any(column in header for column in detail)
    # The RAMBlocks without faults: rows on the page, a compact note on the terminal.
    quiet = [block.ramblock for block in report.fetch if not block.faults]
    assert quiet
    assert all(f"<td>{name}</td>" in html for name in quiet)
    assert not any(f" {name} " in terminal for name in quiet)
    assert f"{len(quiet)} other RAMBlocks took no faults" in terminal
    assert "other RAMBlocks took no faults" not in html


def test_the_terminal_rounds_what_the_page_shows_whole(
        reports: dict[str, tuple[Report, str]]) -> None:
    report, html = reports["hugetlb-2m"]
    [ram0] = [block for block in report.fetch if block.faults]
    assert ram0.latency_ms["p50"].value == 6.8977
    assert '<td class="num">6.898</td>' in html
    row = next(line for line in terminal_text(report).splitlines() if "ram0" in line)
    assert re.search(r"│ +6\.9 │", row)


def test_one_source_numbering_cited_in_the_title_headers_or_cells(
        reports: dict[str, tuple[Report, str]]) -> None:
    report, html = reports["link-down-twice"]
    sources = Sources()
    table = pause_table(report, sources)
    began = table.rows[0][table.columns.index("began")]
    assert began.source == sources.number(report.recoveries[0].began.source)
    assert f'href="#src-{began.source}">[{began.source}]</a>' in html
    text = terminal_text(report)
    # The pause table is the terminal's first: its numbering is the same.
    assert re.search(rf"began \[{began.source}\]", " ".join(text.split()))
    assert "Faults injected, s since migrate [" in text


def test_compact_rendering_of_the_model() -> None:
    table = Table("T", [Column("a"), Column("b", detail=True), Column("n", rounded=True),
                        Column("src")],
                  [Row([Cell("x"), Cell("detail-col"), Cell("1.2345", value=1.2345), Cell("", 1)]),
                   Row([Cell("detail-row"), Cell("w"), Cell("1,234.5", value=1234.5),
                        Cell("", 1)],
                       detail=True)],
                  [Note("shown by both"), Note("only compact", compact=True)])
    console = Console(record=True, width=80, file=StringIO())
    draw_table(table, console)
    text = console.export_text()
    assert text.splitlines()[0].rstrip() == "T [1]"
    assert "1.23" in text
    assert "1.2345" not in text
    assert "detail-col" not in text
    assert "detail-row" not in text
    assert "shown by both" in text
    assert "only compact" in text
    console = Console(record=True, width=80, file=StringIO())
    draw_table(table, console, compact=False)
    text = console.export_text()
    assert "1.2345" in text
    assert "1,234.5" in text
    assert "detail-col" in text
    assert "only compact" not in text
    assert [short_number(v) for v in (0.001, 6.8977, 143.712, 1008.807, 15)] == [
        "0.001", "6.9", "144", "1,009", "15"]
