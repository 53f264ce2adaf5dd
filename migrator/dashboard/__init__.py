"""The nightly dashboard: a static site and a Prometheus textfile built from the results store.

``build`` picks each scenario's latest night and its baseline, gets verdicts
from :mod:`migrator.results.compare` and writes the pages; ``prometheus``
writes the latest summaries for node_exporter's textfile collector.  Like
``report/``, nothing here touches a live process.
"""

from __future__ import annotations

from migrator.dashboard.build import (
    DashboardOptions,
    DashboardResult,
    ScenarioView,
    build_dashboard,
    night_of,
)
from migrator.dashboard.prometheus import LatestSummary, render_textfile, write_textfile

__all__ = [
    "DashboardOptions",
    "DashboardResult",
    "LatestSummary",
    "ScenarioView",
    "build_dashboard",
    "night_of",
    "render_textfile",
    "write_textfile",
]
