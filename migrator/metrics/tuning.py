"""The run's migration tuning (the knobs beyond post-copy itself), as asked and as QEMU took it.

Inputs are raw artifacts only: the plan in ``run.json`` (what each side was
asked to set) and the ``settings-in-effect`` mark in ``timeline.jsonl`` (what
each QEMU reported right after: ``query-migrate-capabilities`` and
``query-migrate-parameters``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from migrator.config.migration import BASE_CAPABILITIES, BASE_PARAMETERS, tuning_label
from migrator.metrics.events import MigrationEvents
from migrator.rundir import RunMeta

__all__ = ["tuning_of", "tuning_warnings"]

_SIDES = (("source", "source_capabilities", "source_parameters"),
          ("destination", "destination_capabilities", "destination_parameters"))


def tuning_of(meta: RunMeta) -> str:
    """The source's tuning as :func:`tuning_label` writes it ("" when none)."""
    return tuning_label(meta.plan.source_capabilities, meta.plan.source_parameters)


def tuning_warnings(meta: RunMeta, ev: MigrationEvents) -> list[str]:
    """One warning per tuning setting a QEMU reports otherwise than its plan asked."""
    taken = next((record for record in ev.timeline
                  if record.get("what") == "settings-in-effect"), None)
    if taken is None:
        return []  # a run recorded before the mark, or stopped before the settings
    plan = meta.plan.model_dump()
    warnings = []
    for side, capabilities_key, parameters_key in _SIDES:
        reported: Mapping[str, Any] = taken.get(side) or {}
        on = set(reported.get("capabilities") or ())
        values: Mapping[str, Any] = reported.get("parameters") or {}
        for name, wanted in plan[capabilities_key].items():
            if name not in BASE_CAPABILITIES and (name in on) != wanted:
                warnings.append(f"tuning: the {side} QEMU reports capability {name} "
                                f"{'on' if name in on else 'off'}, the plan asked "
                                f"{'on' if wanted else 'off'} (settings-in-effect, "
                                "timeline.jsonl)")
        for name, wanted in plan[parameters_key].items():
            if name not in BASE_PARAMETERS and name in values and values[name] != wanted:
                warnings.append(f"tuning: the {side} QEMU reports {name} = {values[name]!r}, "
                                f"the plan asked {wanted!r} (settings-in-effect, "
                                "timeline.jsonl)")
    return warnings
