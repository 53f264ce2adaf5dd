"""Unit formatting shared by the metrics and the report renderers (imports nothing of migrator)."""

from __future__ import annotations

__all__ = ["format_size"]


def format_size(size: int) -> str:
    """A byte count in the largest binary unit dividing it evenly: ``2 MiB``, ``512 B``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"
