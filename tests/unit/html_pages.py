"""Reading the HTML pages migrator writes, for the tests of the run, suite and overlay pages."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import numpy as np

__all__ = ["EXTERNAL", "figures", "values"]

_NEW_PLOT = re.compile(r'Plotly\.newPlot\("([a-z0-9-]+)", (.*?)\);</script>')
#: Anything that would make a page fetch from elsewhere when opened.
EXTERNAL = re.compile(
    r"<(?:script|link|img|iframe|source|embed|object)\b[^>]*\b(?:src|href|data)\s*=\s*"
    r"[\"']?\s*(?:https?:)?//|url\(\s*[\"']?(?:https?:)?//|@import",
    re.IGNORECASE,
)


def figures(html: str) -> dict[str, dict[str, Any]]:
    """The figure objects handed to Plotly.newPlot, by div id."""
    return {m.group(1): json.loads(m.group(2)) for m in _NEW_PLOT.finditer(html)}


def values(array: Any) -> list[float]:
    """A plotly data array as floats (plotly writes numpy arrays as base64 typed arrays)."""
    if isinstance(array, dict):
        decoded = np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
        return [float(v) for v in decoded]
    return [float(v) for v in array]
