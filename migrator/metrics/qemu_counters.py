"""QEMU's own counters: the final (or last sampled) query-migrate of each side.

Units follow qapi/migration.json: times in ms (``total-time``, ``downtime``,
``setup-time``, ``postcopy-blocktime``, ``postcopy-vcpu-blocktime``), bytes for
``ram.*-bytes`` and ``ram.transferred``; QEMU >= 10.1 adds ``postcopy-latency``,
``postcopy-vcpu-latency`` and ``postcopy-non-vcpu-latency`` in ns and
``postcopy-latency-dist``, counts per power-of-two bucket of microseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator.metrics.events import read_jsonl
from migrator.report.schema import Metric

__all__ = ["QemuCounters", "load_counters"]

FINAL = "QEMU query-migrate after completion"
LAST_SAMPLE = "QEMU query-migrate, last sample"


@dataclass(frozen=True)
class QemuCounters:
    """query-migrate of both sides and where each came from."""

    source: dict[str, Any]
    destination: dict[str, Any]
    origin: str

    def metric(self, side: str, path: str, unit: str, scale: float = 1.0) -> Metric:
        """A (nested, dot-separated) field as a metric; value None when QEMU did not say."""
        node: Any = self.source if side == "src" else self.destination
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        value = node * scale if isinstance(node, int | float) and scale != 1.0 else node
        if not isinstance(value, int | float):
            value = None
        return Metric(value=value, unit=unit, source=f"{self.origin} ({side})")


def load_counters(run_path: Path) -> QemuCounters:
    """Prefer the replies taken after completion; fall back to the last samples."""
    final = run_path / "final-query-migrate.json"
    if final.exists():
        data = json.loads(final.read_text())
        return QemuCounters(data.get("src", {}), data.get("dst", {}), FINAL)
    last: dict[str, dict[str, Any]] = {"src": {}, "dst": {}}
    for record in read_jsonl(run_path / "samples.jsonl"):
        if "reply" in record and record.get("side") in last:
            last[record["side"]] = record["reply"]
    return QemuCounters(last["src"], last["dst"], LAST_SAMPLE)
