"""Unit formatting shared by the metrics and the report renderers (imports nothing of migrator)."""

from __future__ import annotations

__all__ = ["format_size", "format_value"]

_MIB = float(1 << 20)


def format_size(size: int) -> str:
    """A byte count in the largest binary unit dividing it evenly: ``2 MiB``, ``512 B``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def format_value(value: object, unit: str = "") -> str:
    """A table cell's text: ``-`` for None, thousands separators, at most three decimals,
    and bytes of a MiB or more also in MiB."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, int | float):
        return str(value)
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.3f}".rstrip("0").rstrip(".")
    if unit == "bytes" and value >= _MIB:
        text += f" ({value / _MIB:,.1f} MiB)"
    return text
