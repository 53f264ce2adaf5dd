"""Unit formatting shared by the metrics and the report renderers (imports nothing of migrator)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

__all__ = ["flat_fields", "format_size", "format_value", "iso_time"]

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


def iso_time(ns: int) -> str:
    """Epoch ``ns`` as an ISO 8601 UTC time to the millisecond."""
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def flat_fields(document: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted path, text) of every leaf of a JSON or TOML ``document``.

    Tables nest as ``a.b``; a list of plain values is one field (``a, b``, or
    ``(none)`` when empty), a list of tables one field per leaf (``faults[0].kind``);
    an integer ``*_ns`` field that is an epoch time also shows it in ISO 8601.
    """
    if isinstance(document, dict):
        for key, inner in document.items():
            yield from flat_fields(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(document, list):
        if all(not isinstance(v, dict | list) for v in document):
            yield prefix, ", ".join(str(v) for v in document) if document else "(none)"
        else:
            for index, inner in enumerate(document):
                yield from flat_fields(inner, f"{prefix}[{index}]")
    elif isinstance(document, int) and not isinstance(document, bool) \
            and prefix.endswith("_ns") and document > 10**17:
        yield prefix, f"{document} ({iso_time(document)})"
    else:
        yield prefix, format_value(document) if isinstance(document, bool) else \
            "null" if document is None else str(document)
