"""The latest nightly summaries as a Prometheus textfile (node_exporter's textfile collector).

One gauge family per stored metric, named ``migrator_<metric>`` after the
Prometheus naming conventions (https://prometheus.io/docs/practices/naming/):
base units (``_ms`` metrics are exported in ``_seconds``, bytes stay
``_bytes``), snake case, and none of the suffixes other types reserve
(``_total``, ``_count``, ``_sum``, ``_bucket``).  Per-RAMBlock fetch metrics
(``fetch.<ramblock>.p50_ms``) become one family with a ``ramblock`` label
(``migrator_fetch_p50_seconds{ramblock="ram0"}``), so the set of names does not
grow with the guest's devices.

Every sample carries ``scenario``, ``backing``, ``qemu_version`` and ``host``
(the destination host, where post-copy faults are served); its value is the
mean over the latest night's runs of that label set, the ``candidate_mean``
the dashboard's verdicts use.  Three families describe the summaries
themselves: ``migrator_runs`` (runs averaged), ``migrator_last_run_timestamp_seconds``
and ``migrator_regressions`` (metrics whose verdict against the baseline is a
regression: the one to alert on).

The text is prometheus_client's (a registry of one collector, rendered by
``generate_latest``, the text ``write_to_textfile`` writes), so its escaping
and number formats are the client library's.  Samples carry no timestamps:
the textfile collector refuses them.  How old the file is, node_exporter
exports itself (``node_textfile_mtime_seconds``).  The file is replaced
atomically by :func:`migrator.rundir.atomic_write` (a hidden ``*.tmp`` file in
the same directory, renamed over it), so the collector, which may read it at
any moment, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from migrator.rundir import atomic_write

__all__ = [
    "LABELS",
    "LatestSummary",
    "prometheus_name",
    "render_textfile",
    "textfile_registry",
    "write_textfile",
]

#: Labels of every sample (the exposition text orders a sample's labels by name).
LABELS = ("scenario", "backing", "qemu_version", "host")
PREFIX = "migrator_"
_FETCH = re.compile(r"fetch\.(?P<block>.+)\.(?P<stat>[^.]+)")
_INVALID = re.compile(r"[^a-zA-Z0-9_]+")
# Suffixes the exposition format gives to counters, summaries and histograms: a gauge
# named like that reads as part of another family.
_RESERVED = ("_total", "_count", "_sum", "_bucket", "_created", "_info")
# Stored names whose plain translation ends in a reserved suffix.
_RENAMED = {"transfer.dirty_sync_count": "transfer.dirty_syncs"}


@dataclass(frozen=True)
class LatestSummary:
    """The latest night of one label set: metric means and what they were computed from."""

    labels: Mapping[str, str]
    means: Mapping[str, float]
    units: Mapping[str, str]
    runs: int
    last_run: datetime
    regressions: int
    help: Mapping[str, str] = field(default_factory=dict)


def prometheus_name(metric: str, unit: str) -> tuple[str, dict[str, str], float]:
    """``(family name, extra labels, scale)`` of a stored metric (see module docstring)."""
    metric = _RENAMED.get(metric, metric)
    extra: dict[str, str] = {}
    match = _FETCH.fullmatch(metric)
    if match:
        extra["ramblock"] = match["block"]
        metric = f"fetch.{match['stat']}"
    scale = 1.0
    if metric.endswith("_ms") or unit == "ms":
        metric, scale = metric.removesuffix("_ms") + "_seconds", 1e-3
    elif unit == "bytes" and not metric.endswith("_bytes"):
        metric += "_bytes"
    name = PREFIX + _INVALID.sub("_", metric).strip("_").lower()
    if name.endswith(_RESERVED):
        name += "_value"
    return name, extra, scale


@dataclass
class _Family:
    """One gauge family being gathered: its help, label names and a value per label set."""

    help: str
    labels: tuple[str, ...]
    values: dict[tuple[str, ...], float] = field(default_factory=dict)


def _families(summaries: Iterable[LatestSummary]) -> dict[str, _Family]:
    """The gauge families of ``summaries``, by name (see the module docstring)."""
    families: dict[str, _Family] = {}

    def add(name: str, help_text: str, labels: dict[str, str], value: float) -> None:
        family = families.setdefault(name, _Family(help_text, tuple(labels)))
        if tuple(labels) == family.labels:
            # The first value of a label set is kept: the collector rejects a whole
            # file that repeats one.
            family.values.setdefault(tuple(labels.values()), value)

    for summary in summaries:
        base = {k: summary.labels.get(k) or "unknown" for k in LABELS}
        add(PREFIX + "runs", "Runs of the latest night summarised by the other migrator_ "
            "gauges of the same labels.", base, float(summary.runs))
        add(PREFIX + "last_run_timestamp_seconds",
            "Start of the newest run of the latest night (Unix time).", base,
            summary.last_run.timestamp())
        add(PREFIX + "regressions", "Metrics of the latest night whose verdict against the "
            "baseline nights is a regression (permutation test and threshold).", base,
            float(summary.regressions))
        for metric, mean in sorted(summary.means.items()):
            unit = summary.units.get(metric, "")
            name, extra, scale = prometheus_name(metric, unit)
            what = summary.help.get(metric) or metric
            help_text = (f"{what}: mean over the latest night's runs"
                         + (f" (stored in {unit})" if unit else ""))
            add(name, help_text, {**base, **extra}, mean * scale)
    return families


class _Gauges:
    """A prometheus_client collector of ready-made metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        """The families, as given."""
        return self.families


def textfile_registry(summaries: Iterable[LatestSummary]) -> CollectorRegistry:
    """A registry of ``summaries``' gauges: families sorted by name, samples by labels.

    Two summaries with the same labels are a caller's error (the collector
    would reject the whole file), so the later one is left out rather than
    exported twice.
    """
    gauges: list[Metric] = []
    for name, family in sorted(_families(summaries).items()):
        gauge = GaugeMetricFamily(name, family.help, labels=family.labels)
        for labels, value in sorted(family.values.items()):
            # 15 significant digits: the ms -> s scaling would otherwise export binary
            # noise (0.0068977000000000005).
            gauge.add_metric(labels, float(f"{value:.15g}"))
        gauges.append(gauge)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gauges(gauges))
    return registry


def render_textfile(summaries: Iterable[LatestSummary]) -> str:
    """The exposition text of ``summaries`` (see :func:`textfile_registry`)."""
    return generate_latest(textfile_registry(summaries)).decode()


def write_textfile(path: Path, text: str) -> None:
    """Write a textfile for the collector at ``path``, atomically (see the module docstring)."""
    atomic_write(path, text)
