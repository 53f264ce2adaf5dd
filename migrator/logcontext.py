"""Which run a log record comes from, when several runs share one controller process.

``migrator bench --parallel N`` runs N scenarios as tasks of one event loop, and
their records go to one log.  The run's label lives in a context variable: set
once in the task that runs it (:func:`run_label`), it is inherited by every task
and thread that run starts (samplers, ``asyncio.to_thread``), and
:class:`RunLabelFilter` puts it on each record as ``run_prefix`` for the
formatter (``"[LABEL] "``, or nothing outside a run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["RunLabelFilter", "run_label"]

_RUN_LABEL: ContextVar[str] = ContextVar("migrator_run_label", default="")


@contextmanager
def run_label(label: str) -> Iterator[None]:
    """Records logged in this context (and the tasks it starts) name ``label``."""
    token = _RUN_LABEL.set(label)
    try:
        yield
    finally:
        _RUN_LABEL.reset(token)


class RunLabelFilter(logging.Filter):
    """Adds ``run_prefix`` (``"[LABEL] "`` or ``""``) to every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        label = _RUN_LABEL.get()
        record.run_prefix = f"[{label}] " if label else ""
        return True
