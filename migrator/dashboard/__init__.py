"""The nightly dashboard: a static site and a Prometheus textfile built from the results store.

``build`` writes the site: ``views`` picks each scenario's latest night and
its baseline and gets verdicts from :mod:`migrator.results.compare`, ``pages``
and ``figures`` draw the scenario pages and the index, ``run_pages`` the pages
of runs without a report.html of their own; ``prometheus``
writes the latest summaries for node_exporter's textfile collector.  Like
``report/``, nothing here touches a live process.
"""

from __future__ import annotations

from migrator.dashboard.build import DashboardResult, build_dashboard
from migrator.dashboard.prometheus import LatestSummary, render_textfile, write_textfile
from migrator.dashboard.views import DashboardOptions, ScenarioView, night_of

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
