"""The table model every renderer draws: titled columns, rows of cells, notes.

The report's tables are defined once (:mod:`migrator.report.run_tables`) and
drawn by the terminal (rich), the HTML run report and the nightly dashboard,
which only lay them out.  What differs
between a wide page and an 80-column terminal is said here, by the model:

* a ``detail`` column or :class:`Row` is shown in full, left out by a
  *compact* rendering (the terminal's), and a ``compact`` :class:`Note` says in
  a sentence what such a rendering left out;
* a cell's ``text`` is final, except in a ``rounded`` column, whose cells
  carry their ``value`` so that a compact rendering shows it to about three
  significant digits (:func:`short_number`);
* a cell cites its source by number (one :class:`~migrator.report.sources.Sources`
  per page or report); where the mark goes (after the value, in the header or
  the title) is the renderer's choice.

A ``tone`` says how much attention a cell or note wants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Cell", "Column", "Note", "Row", "Table", "Tone", "short_number"]

#: How a cell or note stands out: "" plain, "dim" less, "ok" / "warn" / "bad" an outcome.
Tone = Literal["", "dim", "ok", "warn", "bad"]


def short_number(value: float) -> str:
    """``value`` to about three significant digits (integers whole): latencies span
    10 us to seconds, and a column of them must fit a narrow terminal."""
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


class Column(str):
    """A column's header as shown, with the unit and source of its values.

    A ``str`` (its header), so a table's columns are found and printed by their
    headers, and a plain header is a column of text with no unit; ``numeric``
    right-aligns the column where a renderer aligns whole columns (the
    terminal), ``tone`` styles all of its cells there; ``detail``: a compact
    rendering leaves the column out; ``rounded``: a compact rendering shows its
    cells' values to about three significant digits.
    """

    unit: str
    source: str
    numeric: bool
    tone: Tone
    detail: bool
    rounded: bool

    def __new__(cls, header: str, unit: str = "", source: str = "", numeric: bool = False,
                tone: Tone = "", detail: bool = False, rounded: bool = False) -> Column:
        column = super().__new__(cls, header)
        column.unit, column.source, column.numeric, column.tone = unit, source, numeric, tone
        column.detail, column.rounded = detail, rounded
        return column


@dataclass(frozen=True)
class Cell:
    """A table cell: its text, optionally a cited source (footnote number and its text).

    ``value``: the number the text shows, for a renderer that rounds it
    (:attr:`Column.rounded`).
    """

    text: str
    source: int | None = None
    title: str = ""
    numeric: bool = False
    tone: Tone = ""
    value: float | None = None

    def shown(self, rounded: bool) -> str:
        """The text, or the value to three significant digits when ``rounded``."""
        return short_number(self.value) if rounded and self.value is not None else self.text


class Row(list[Cell]):
    """A row of cells; a ``detail`` row is left out by a compact rendering."""

    detail: bool

    def __init__(self, cells: list[Cell], detail: bool = False) -> None:
        super().__init__(cells)
        self.detail = detail


@dataclass(frozen=True)
class Note:
    """A sentence under a table; a ``compact`` one only where a compact rendering
    left detail out (it says in words what those columns or rows held)."""

    text: str
    tone: Tone = ""
    compact: bool = False


@dataclass
class Table:
    """A titled table: columns, rows of cells and the notes under it.

    ``columns``: headers, or :class:`Column` s where the unit, source or
    rendering matters (:meth:`column`); ``anchor``: the id an HTML page links it by.
    """

    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    anchor: str = ""

    def column(self, index: int) -> Column:
        """The column at ``index`` (a plain header: text, no unit)."""
        header = self.columns[index]
        return header if isinstance(header, Column) else Column(header)

    @staticmethod
    def of(title: str, headers: list[str], rows: list[list[Cell]] | None = None,
           note: str = "", anchor: str = "") -> Table:
        """A table of plain columns named ``headers``, with at most one ``note``."""
        return Table(title, headers, rows or [], [Note(note)] if note else [], anchor)
