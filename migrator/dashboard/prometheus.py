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

Samples carry no timestamps: the textfile collector refuses them.  How old the
file is, node_exporter exports itself (``node_textfile_mtime_seconds``).  The
file is replaced atomically (a temporary file in the same directory, renamed
over it), so the collector, which may read it at any moment, sees the old file
or the new one, never half of one.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

__all__ = [
    "LABELS",
    "LatestSummary",
    "prometheus_name",
    "render_textfile",
    "write_public",
    "write_textfile",
]

#: Labels of every sample, in this order.
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


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # 15 significant digits: the ms -> s scaling would otherwise print binary noise
    # (0.0068977000000000005).
    return f"{value:.15g}"


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def render_textfile(summaries: Iterable[LatestSummary]) -> str:
    """The exposition text of ``summaries``: families sorted by name, one HELP/TYPE each.

    Two summaries with the same labels are a caller's error (the collector
    would reject the whole file), so the later one is dropped here rather than
    written twice.
    """
    families: dict[str, tuple[str, dict[tuple[str, ...], tuple[str, float]]]] = {}

    def add(name: str, help_text: str, labels: dict[str, str], value: float) -> None:
        _, samples = families.setdefault(name, (help_text, {}))
        key = tuple(f"{k}={v}" for k, v in labels.items())
        samples.setdefault(key, (_labels(labels), value))

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

    lines = []
    for name in sorted(families):
        help_text, samples = families[name]
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} gauge")
        lines += [f"{name}{labels} {_number(value)}"
                  for _, (labels, value) in sorted(samples.items())]
    return "\n".join(lines) + "\n"


def write_public(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically, readable by every user (mode 0644).

    Readers (the textfile collector, a web server serving the site) run as
    their own users: a ``mkstemp`` file is 0600 and would be unreadable after
    the rename, so the mode is set before it.  The temporary name starts with
    a dot and ends in ``.tmp``, so a collector scanning the directory for
    ``*.prom`` meanwhile ignores it.
    """
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            os.fchmod(out.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_textfile(path: Path, text: str) -> None:
    """Write a textfile for the collector at ``path`` (atomically, see :func:`write_public`)."""
    write_public(path, text)
