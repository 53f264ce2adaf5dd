"""A run directory's raw artifacts, read once for the report and the run page.

:func:`load_run_artifacts` reads ``run.json``, ``scenario.toml``, both sides'
``events.jsonl`` with ``timeline.jsonl``, the guest consoles, ``samples.jsonl``,
``final-query-migrate.json`` and both sides' ``threads.jsonl``: what both
:func:`~migrator.metrics.summary.derive_report` and
:func:`~migrator.metrics.run_page.load_run_page_data` use.  The destination
trace and the HGM smaps samples, which only the report needs and which can be
large, are left to the report, so a run page drawn from a current
``report.json`` never reads them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator.errors import ArtifactError
from migrator.metrics.events import MigrationEvents, load_events
from migrator.metrics.guest import GuestObservations, load_guest
from migrator.metrics.qemu_counters import QemuCounters, SampledReplies, load_counters, read_samples
from migrator.metrics.threads import ThreadSamples, load_thread_samples
from migrator.rundir import RunMeta

__all__ = ["RunArtifacts", "load_run_artifacts"]


@dataclass(frozen=True)
class RunArtifacts:
    """What one run directory recorded, parsed.

    ``meta_document`` is ``run.json`` as written (its keys in file order, as the
    run page lists them); ``meta`` the same validated.  ``scenario_text`` is
    ``scenario.toml`` as written, ``scenario`` the same parsed.
    """

    path: Path
    meta: RunMeta
    meta_document: dict[str, Any]
    scenario_text: str
    scenario: dict[str, Any]
    events: MigrationEvents
    guest: GuestObservations
    samples: SampledReplies
    counters: QemuCounters
    threads: dict[str, ThreadSamples]


def _read_scenario(run_path: Path) -> tuple[str, dict[str, Any]]:
    """``scenario.toml`` as written, and parsed."""
    path = run_path / "scenario.toml"
    try:
        text = path.read_text(encoding="utf-8")
        return text, tomllib.loads(text)
    except (FileNotFoundError, tomllib.TOMLDecodeError) as error:
        raise ArtifactError(f"{path}: {error}") from None


def load_run_artifacts(run_path: Path) -> RunArtifacts:
    """Read the artifacts of one run directory (see module docstring).

    ArtifactError when ``run.json`` or ``scenario.toml`` is missing or malformed;
    the other artifacts may be absent (a run that stopped early).
    """
    meta, document = RunMeta.read_with_document(run_path)
    scenario_text, scenario = _read_scenario(run_path)
    events = load_events(run_path)
    samples = read_samples(run_path)
    counters = load_counters(run_path, samples)
    return RunArtifacts(
        path=run_path, meta=meta, meta_document=document, scenario_text=scenario_text,
        scenario=scenario, events=events, guest=load_guest(run_path), samples=samples,
        counters=counters, threads=load_thread_samples(run_path))
