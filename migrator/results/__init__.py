"""Results history: a store of finished runs and statistical comparison between sets of them.

``schema`` says what a stored run is, ``store`` keeps runs in SQLite or
PostgreSQL (alembic-migrated on open), ``compare`` gives per-metric verdicts
(import it as ``migrator.results.compare``: it loads scipy, which the store
does not need).  Like ``report/`` and ``metrics/``, nothing here touches a live
process: runs are read from their directories.
"""

from __future__ import annotations

from migrator.results.store import (
    ImportResult,
    ResultsStore,
    RunRecord,
    Selector,
    load_run,
    parse_selector,
)

__all__ = [
    "ImportResult",
    "ResultsStore",
    "RunRecord",
    "Selector",
    "load_run",
    "parse_selector",
]
