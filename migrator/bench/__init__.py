"""Benchmark suites: sweep a base scenario over axes, run the matrix, tabulate page sizes.

:mod:`migrator.bench.suite` reads a suite file and expands it into validated
runs with stable ids; :mod:`migrator.bench.runner` runs them one at a time into
a suite directory whose ``suite.json`` records every outcome (resumable,
filterable); :mod:`migrator.bench.pagesize` turns a finished suite into the
page-size table.  ``migrator bench`` (``migrator.cli.bench``) drives all three.
"""

from migrator.bench.pagesize import (
    PageSizeRow,
    PageSizeTable,
    build_page_size_table,
    render_page_size_table,
    write_page_size_table,
)
from migrator.bench.runner import (
    RunRecord,
    RunStatus,
    SuiteObserver,
    SuiteState,
    hgm_blocker,
    load_state,
    run_and_report,
    run_suite,
)
from migrator.bench.suite import (
    Axis,
    AxisValue,
    PlannedRun,
    Selection,
    Suite,
    load_suite,
    parse_only,
    parse_suite,
)

__all__ = [
    "Axis",
    "AxisValue",
    "PageSizeRow",
    "PageSizeTable",
    "PlannedRun",
    "RunRecord",
    "RunStatus",
    "Selection",
    "Suite",
    "SuiteObserver",
    "SuiteState",
    "build_page_size_table",
    "hgm_blocker",
    "load_state",
    "load_suite",
    "parse_only",
    "parse_suite",
    "render_page_size_table",
    "run_and_report",
    "run_suite",
    "write_page_size_table",
]
