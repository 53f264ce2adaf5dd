"""The table model every renderer draws: titled columns, rows of formatted cells, notes.

The report's tables are built once from a :class:`~migrator.model.Report` (see
:mod:`migrator.report.run_tables` and :mod:`migrator.report.terminal_tables`)
and drawn by the terminal (rich), the HTML run report and the nightly
dashboard, which only lay them out.  Plain data, no formatting rules: a cell's
text is final, its ``tone`` says how much attention it wants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Cell", "Column", "Note", "Table", "Tone"]

#: How a cell or note stands out: "" plain, "dim" less, "ok" / "warn" / "bad" an outcome.
Tone = Literal["", "dim", "ok", "warn", "bad"]


class Column(str):
    """A column's header as shown, with the unit and source of its values.

    A ``str`` (its header), so a table's columns are found and printed by their
    headers, and a plain header is a column of text with no unit; ``numeric``
    right-aligns the column where a renderer aligns whole columns (the
    terminal), ``tone`` styles all of its cells there.
    """

    unit: str
    source: str
    numeric: bool
    tone: Tone

    def __new__(cls, header: str, unit: str = "", source: str = "", numeric: bool = False,
                tone: Tone = "") -> Column:
        column = super().__new__(cls, header)
        column.unit, column.source, column.numeric, column.tone = unit, source, numeric, tone
        return column


@dataclass(frozen=True)
class Cell:
    """A table cell: its text, optionally a cited source (footnote number and its text)."""

    text: str
    source: int | None = None
    title: str = ""
    numeric: bool = False
    tone: Tone = ""


@dataclass(frozen=True)
class Note:
    """A sentence under a table."""

    text: str
    tone: Tone = ""


@dataclass
class Table:
    """A titled table: columns, rows of cells and the notes under it.

    ``columns``: headers, or :class:`Column` s where the unit, source or alignment
    matters (:meth:`column`); ``anchor``: the id an HTML page links it by;
    ``fit``: each column at least as wide as its widest cell, so a narrow
    terminal wraps the title, never a cell.
    """

    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    anchor: str = ""
    fit: bool = False

    def column(self, index: int) -> Column:
        """The column at ``index`` (a plain header: text, no unit)."""
        header = self.columns[index]
        return header if isinstance(header, Column) else Column(header)

    @staticmethod
    def of(title: str, headers: list[str], rows: list[list[Cell]] | None = None,
           note: str = "", anchor: str = "") -> Table:
        """A table of plain columns named ``headers``, with at most one ``note``."""
        return Table(title, headers, rows or [], [Note(note)] if note else [], anchor)
