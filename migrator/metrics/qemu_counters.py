"""QEMU's own counters: the final (or last sampled) query-migrate of each side.

Units follow qapi/migration.json: times in ms (``total-time``, ``downtime``,
``setup-time``, ``postcopy-blocktime``, ``postcopy-vcpu-blocktime``), bytes for
``ram.*-bytes`` and ``ram.transferred``; QEMU >= 10.1 adds ``postcopy-latency``,
``postcopy-vcpu-latency`` and ``postcopy-non-vcpu-latency`` in ns and
``postcopy-latency-dist``, counts per power-of-two bucket of microseconds.

The final replies are checked against the samples of the same run: a
cumulative counter (:data:`CUMULATIVE`) that the final reply puts below an
earlier sample is contradicted.  QEMU has been seen to answer ``total-time`` 0
after completion when a sample 100 ms earlier said 812 ms.  Its value is kept,
the sample stands beside it (:attr:`Metric.contradicted_by`) and
:attr:`QemuCounters.warnings` says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrator.metrics.events import read_jsonl
from migrator.model import Metric

__all__ = ["CUMULATIVE", "Contradiction", "QemuCounters", "SampledReplies",
           "load_counters", "read_samples"]

FINAL = "QEMU query-migrate after completion"
LAST_SAMPLE = "QEMU query-migrate, last sample"
SAMPLED = "QEMU query-migrate, highest earlier sample"
FINAL_FILE = "final-query-migrate.json"
SAMPLES_FILE = "samples.jsonl"

#: Counters that never go down during one run, with their units (qapi/migration.json;
#: ``ram.total`` is the RAM size, constant).
CUMULATIVE = {
    "total-time": "ms",
    "setup-time": "ms",
    "postcopy-blocktime": "ms",
    "ram.total": "bytes",
    "ram.transferred": "bytes",
    "ram.precopy-bytes": "bytes",
    "ram.postcopy-bytes": "bytes",
    "ram.downtime-bytes": "bytes",
    "ram.multifd-bytes": "bytes",
    "ram.normal-bytes": "bytes",
    "ram.normal": "pages",
    "ram.duplicate": "pages",
    "ram.skipped": "pages",
    "ram.postcopy-requests": "requests",
    "ram.dirty-sync-count": "passes",
}


def _number(reply: dict[str, Any], path: str) -> int | float | None:
    """A (nested, dot-separated) numeric field of a reply; None when absent or not a number."""
    node: Any = reply
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, int | float) and not isinstance(node, bool) else None


@dataclass(frozen=True)
class Contradiction:
    """A cumulative counter of the final reply below an earlier sample of itself."""

    side: str
    path: str
    unit: str
    final: int | float
    sampled: int | float
    #: Reply time of that sample, host wall clock ns.
    sampled_ns: int
    #: Time from that sample to the side's last sample, ms (0: it is the last).
    before_last_ms: float

    @property
    def source(self) -> str:
        """Where the sample value came from."""
        return f"{SAMPLED} ({SAMPLES_FILE}, {self.side})"

    def warning(self) -> str:
        """One line naming the counter, both values and both sources."""
        when = ("the last sample" if self.before_last_ms == 0 else
                f"a sample {self.before_last_ms:,.0f} ms before the last")
        return (f"QEMU {self.side} {self.path} contradicted: {FINAL} ({FINAL_FILE}, "
                f"{self.side}) says {self.final:,} {self.unit}, but {when} ({SAMPLES_FILE}, "
                f"{self.side}) said {self.sampled:,} {self.unit}; a cumulative counter cannot "
                "go down, so QEMU's final value is shown marked as contradicted")


@dataclass(frozen=True)
class QemuCounters:
    """query-migrate of both sides, where each came from, and what contradicts it."""

    source: dict[str, Any]
    destination: dict[str, Any]
    origin: str
    contradictions: dict[tuple[str, str], Contradiction] = field(default_factory=dict)

    @property
    def final_source_ram(self) -> dict[str, Any]:
        """The ``ram`` section of the source's final ``query-migrate`` ({} without one)."""
        ram = self.source.get("ram") if self.origin == FINAL else None
        return ram if isinstance(ram, dict) else {}

    def metric(self, side: str, path: str, unit: str, scale: float = 1.0) -> Metric:
        """A (nested, dot-separated) field as a metric; value None when QEMU did not say.

        A contradicted counter carries the sample that contradicts it, in the same unit.
        """
        value = _number(self.source if side == "src" else self.destination, path)
        if value is not None and scale != 1.0:
            value *= scale
        against = self.contradictions.get((side, path))
        contradicted_by = None if against is None else Metric(
            value=against.sampled * scale if scale != 1.0 else against.sampled,
            unit=unit, source=against.source)
        return Metric(value=value, unit=unit, source=f"{self.origin} ({side})",
                      contradicted_by=contradicted_by)

    @property
    def warnings(self) -> list[str]:
        """One line per contradicted counter."""
        return [c.warning() for c in self.contradictions.values()]


@dataclass(frozen=True)
class SampledReplies:
    """Each side's ``query-migrate`` replies in ``samples.jsonl``.

    ``timed``: (reply time ns, reply) of the replies that say when they were
    taken, in file order; ``untimed``: how many replies of each side do not
    (the run page counts every reply when none carries ram statistics).
    """

    timed: dict[str, list[tuple[int, dict[str, Any]]]]
    untimed: dict[str, int]

    def replies(self, side: str) -> int:
        """How many replies ``side`` recorded, timed or not."""
        return len(self.timed[side]) + self.untimed[side]


def read_samples(run_path: Path) -> SampledReplies:
    """Both sides' replies in a run directory's ``samples.jsonl`` (see :class:`SampledReplies`).

    A reply's time is when QEMU answered (``reply_ns``), else when it was asked
    (``host_ns``, older runs).
    """
    timed: dict[str, list[tuple[int, dict[str, Any]]]] = {"src": [], "dst": []}
    untimed = {"src": 0, "dst": 0}
    for record in read_jsonl(run_path / SAMPLES_FILE):
        reply, side = record.get("reply"), record.get("side")
        if not isinstance(reply, dict) or side not in timed:
            continue
        when = record.get("reply_ns") or record.get("host_ns")
        if isinstance(when, int):
            timed[side].append((when, reply))
        else:
            untimed[side] += 1
    return SampledReplies(timed, untimed)


def _contradictions(final: dict[str, dict[str, Any]],
                    samples: dict[str, list[tuple[int, dict[str, Any]]]]
                    ) -> dict[tuple[str, str], Contradiction]:
    found = {}
    for side, replies in samples.items():
        if not replies:
            continue
        last_ns = max(when for when, _ in replies)
        for path, unit in CUMULATIVE.items():
            value = _number(final.get(side, {}), path)
            sampled = [(number, when) for when, reply in replies
                       if (number := _number(reply, path)) is not None]
            if value is None or not sampled:
                continue
            # The highest sample, the latest of equals: the strongest contradiction.
            highest, when = max(sampled)
            if value < highest:
                found[side, path] = Contradiction(side, path, unit, value, highest, when,
                                                  (last_ns - when) / 1e6)
    return found


def load_counters(run_path: Path, samples: SampledReplies | None = None) -> QemuCounters:
    """Prefer the replies taken after completion, checked against the samples.

    Falls back to the last samples when there is no final reply.  ``samples``:
    the run's samples when the caller has read them already (read here when None).
    """
    sampled = (samples if samples is not None else read_samples(run_path)).timed
    final = run_path / FINAL_FILE
    if final.exists():
        data = json.loads(final.read_text())
        replies = {side: data.get(side, {}) for side in ("src", "dst")}
        return QemuCounters(replies["src"], replies["dst"], FINAL,
                            _contradictions(replies, sampled))
    last = {side: records[-1][1] if records else {} for side, records in sampled.items()}
    return QemuCounters(last["src"], last["dst"], LAST_SAMPLE)
