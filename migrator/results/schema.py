"""What a stored run is: the tables, and how a run directory maps onto them.

Three tables (SQLAlchemy Core; alembic migrations in ``migrations/`` build the
same thing, and a test checks that they agree)::

    runs     one row per finished run: its dimensions (what was run, where, with what)
    metrics  long table (run_id, name, value, unit, source), one row per number
    reports  the whole report.json of the run, for anything the metrics leave out

A run's dimensions and metrics are pure functions of its run directory and its
:class:`~migrator.model.Report` (:func:`run_dimensions`,
:func:`report_metrics`), so they are tested without a database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from migrator.config.models import Backing
from migrator.model import Metric, Report
from migrator.rundir import RunMeta

__all__ = [
    "DIMENSIONS",
    "METADATA",
    "MetricValue",
    "metrics",
    "report_metrics",
    "reports",
    "run_dimensions",
    "runs",
    "scenario_hash",
]

# Deterministic constraint names: alembic can only alter or drop what it can name,
# and SQLite's batch mode rebuilds tables by these names.
METADATA = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

runs = sa.Table(
    "runs", METADATA,
    sa.Column("run_id", sa.String(200), primary_key=True, comment="run directory name"),
    sa.Column("scenario", sa.String(200), nullable=False, index=True),
    sa.Column("scenario_hash", sa.String(64), nullable=False, index=True,
              comment="sha256 of the resolved scenario.toml"),
    sa.Column("backing", sa.String(32)),
    sa.Column("page_size", sa.BigInteger, comment="host page size of guest RAM, bytes"),
    sa.Column("memory_mib", sa.Integer),
    sa.Column("vcpus", sa.Integer),
    sa.Column("postcopy", sa.Boolean),
    sa.Column("preempt", sa.Boolean),
    sa.Column("hgm", sa.Boolean, nullable=False, server_default=sa.false(),
              comment="hugetlb high-granularity mapping (false until migrator supports it)"),
    sa.Column("switchover", sa.String(32), comment="switchover policy"),
    sa.Column("tuning", sa.String(1000), nullable=False, server_default="",
              comment="migration capabilities and parameters beyond post-copy itself "
                      "(config.migration.tuning_label); empty: none"),
    sa.Column("placement", sa.String(1000), nullable=False, server_default="",
              comment="CPU and NUMA placement of both sides' QEMUs "
                      "(config.placement.placement_label); empty: none"),
    sa.Column("qemu_version", sa.String(64), index=True, comment="destination QEMU"),
    sa.Column("source_qemu_version", sa.String(64)),
    sa.Column("accel", sa.String(16)),
    sa.Column("host_kernel", sa.String(128)),
    sa.Column("guest_kernel", sa.String(128)),
    sa.Column("source_host", sa.String(255)),
    sa.Column("destination_host", sa.String(255)),
    sa.Column("migrator_version", sa.String(64)),
    sa.Column("migrator_commit", sa.String(64)),
    sa.Column("run_date", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("origin", sa.Text, comment="where the run directory was imported from"),
    sa.Column("report_sha256", sa.String(64), comment="of the stored report document"),
)

metrics = sa.Table(
    "metrics", METADATA,
    sa.Column("run_id", sa.String(200),
              sa.ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("value", sa.Double, nullable=False),
    sa.Column("unit", sa.String(32), nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Index("ix_metrics_name", "name"),
)

reports = sa.Table(
    "reports", METADATA,
    sa.Column("run_id", sa.String(200),
              sa.ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("schema_version", sa.Integer, nullable=False),
    # JSONB on PostgreSQL so a team can query inside reports; plain JSON text elsewhere.
    sa.Column("document", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
              nullable=False),
)

#: Columns of ``runs`` a selector may filter on (everything but bookkeeping).
DIMENSIONS: tuple[str, ...] = tuple(
    c.name for c in runs.columns
    if c.name not in {"error", "imported_at", "origin", "report_sha256"}
)


@dataclass(frozen=True)
class MetricValue:
    """One row of the ``metrics`` table, before it has a run id."""

    name: str
    value: float
    unit: str
    source: str


def scenario_hash(scenario_toml: bytes) -> str:
    """sha256 (hex) of a run's resolved scenario.toml: same hash, same experiment."""
    return hashlib.sha256(scenario_toml).hexdigest()


def _page_size(backing: object) -> int | None:
    try:
        return Backing(str(backing)).page_size
    except ValueError:
        return None


def _host(spec: dict[str, Any], controller: str | None) -> str | None:
    # A local host is the controller itself; an ssh host is its address.
    if spec.get("kind", "local") == "local":
        return controller
    return str(spec.get("address") or spec.get("kind"))


def run_dimensions(
    report: Report, meta: RunMeta, scenario: dict[str, Any], scenario_toml: bytes,
) -> dict[str, Any]:
    """The ``runs`` row of one run (without bookkeeping columns).

    ``meta`` is the run's run.json, ``scenario`` its parsed scenario.toml and
    ``scenario_toml`` that file's bytes.
    """
    env = report.environment
    controller = meta.controller.hostname
    hosts = scenario.get("hosts", {})
    switchover = env.get("switchover")
    started_ns = meta.started_ns
    run_date = (datetime.fromtimestamp(started_ns / 1e9, UTC) if started_ns is not None
                else _date_from_run_id(report.run_id))
    return {
        "run_id": report.run_id,
        "scenario": report.scenario,
        "scenario_hash": scenario_hash(scenario_toml),
        "backing": env.get("backing"),
        "page_size": _page_size(env.get("backing")),
        "memory_mib": env.get("memory_mib"),
        "vcpus": env.get("vcpus"),
        "postcopy": env.get("postcopy"),
        "preempt": env.get("preempt"),
        "hgm": bool(env.get("hgm", False)),
        "switchover": switchover.get("policy") if isinstance(switchover, dict) else None,
        "tuning": env.get("tuning") or "",
        "placement": env.get("placement") or "",
        "qemu_version": env.get("qemu_version"),
        "source_qemu_version": meta.qemu.source.version,
        "accel": env.get("accel"),
        "host_kernel": env.get("host_kernel"),
        "guest_kernel": env.get("guest_kernel"),
        "source_host": _host(hosts.get("source", {}), controller),
        "destination_host": _host(hosts.get("destination", {}), controller),
        "migrator_version": env.get("migrator_version"),
        # Recorded by runs that know their git commit; older runs leave it unknown.
        "migrator_commit": meta.migrator_commit,
        "run_date": run_date,
        "outcome": report.outcome,
        "error": report.error,
    }


def _date_from_run_id(run_id: str) -> datetime:
    # RunDir names start with a UTC stamp (20261125T183726Z-...).
    try:
        return datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return datetime.now(UTC)


def _add(out: list[MetricValue], name: str, metric: Metric | None) -> None:
    if metric is not None and isinstance(metric.value, int | float):
        out.append(MetricValue(name, float(metric.value), metric.unit, metric.source))


def _count(out: list[MetricValue], name: str, value: float | None, unit: str,
           source: str) -> None:
    if value is not None:
        out.append(MetricValue(name, float(value), unit, source))


def report_metrics(report: Report) -> list[MetricValue]:
    """The ``metrics`` rows of one report; unknown (null) values are left out.

    Names are dotted paths, lower case, with the unit as suffix where it is a
    time (``_ms``) or size (``_bytes``): ``fetch.<ramblock>.p50_ms``, ``freeze_ms``,
    ``qemu_downtime_ms``, ``outside.max_gap_ms``, ``guest.max_stall_ms``,
    ``blocktime_ms``, ``postcopy_requests``, ``time.postcopy_ms``, ...
    (docs/results.md lists them all).
    """
    out: list[MetricValue] = []
    for block in report.fetch:
        # Blocks that never faulted (ROMs placed in the background) have no latency.
        if not block.faults:
            continue
        for stat, metric in block.latency_ms.items():
            _add(out, f"fetch.{block.ramblock}.{stat.replace('.', '')}_ms", metric)
        for stat, metric in block.backlog_placements.items():
            _add(out, f"fetch.{block.ramblock}.backlog_{stat}", metric)
        source = block.latency_ms["p50"].source if "p50" in block.latency_ms else "trace"
        _count(out, f"fetch.{block.ramblock}.faults", block.faults, "faults", source)
    if report.freeze is not None:
        _add(out, "freeze_ms", report.freeze.freeze)
        _add(out, "qemu_downtime_ms", report.freeze.qemu_downtime)
    outside = report.outside_stalls
    if outside is not None:
        _add(out, "outside.max_gap_ms", outside.max_gap)
        _add(out, "outside.p99_gap_ms", outside.p99_gap)
        _count(out, "outside.gaps_over_threshold", outside.gaps_over_threshold, "gaps",
               outside.max_gap.source)
        _count(out, "outside.lost_heartbeats", outside.lost, "heartbeats",
               outside.max_gap.source)
    _guest_metrics(out, report)
    _add(out, "blocktime_ms", report.blocktime.get("postcopy-blocktime (all vCPUs)"))
    traced = [m for k, m in report.blocktime.items() if k.startswith("trace blocktime")]
    if traced:
        _count(out, "trace_blocktime_ms", sum(float(m.value or 0) for m in traced), "ms",
               traced[0].source + ", summed over vCPUs")
    _add(out, "postcopy_requests", report.transfer.get("ram.postcopy-requests"))
    for key, name in (("ram.transferred", "transfer.ram_bytes"),
                      ("ram.precopy-bytes", "transfer.precopy_bytes"),
                      ("ram.postcopy-bytes", "transfer.postcopy_bytes"),
                      ("ram.dirty-sync-count", "transfer.dirty_sync_count")):
        _add(out, name, report.transfer.get(key))
    for key, name in (("total-time", "time.total_ms"), ("setup-time", "time.setup_ms"),
                      ("pre-copy (migrate -> postcopy-active)", "time.precopy_ms"),
                      ("post-copy (postcopy-active -> dst completed)", "time.postcopy_ms"),
                      ("guest boot to ready", "time.boot_ms")):
        _add(out, name, report.timings.get(key))
    for key, name in (("postcopy-latency", "qemu.postcopy_latency_ms"),
                      ("postcopy-non-vcpu-latency", "qemu.postcopy_non_vcpu_latency_ms")):
        _add(out, name, report.qemu_latency.get(key))
    for key in ("bad_pages", "read_mismatches"):
        value = report.integrity.get(key)
        if isinstance(value, int):
            _count(out, f"integrity.{key}", value, "pages" if key == "bad_pages" else "reads",
                   "guest probe verify pass")
    return out


def _guest_metrics(out: list[MetricValue], report: Report) -> None:
    """Stalls the guest saw, folded over vCPUs (worst vCPU; totals summed)."""
    vcpus = report.guest_stalls
    if not vcpus:
        return
    source = vcpus[0].max_ms.source
    worst = [float(v.max_ms.value) for v in vcpus if v.max_ms.value is not None]
    if worst:
        _count(out, "guest.max_stall_ms", max(worst), "ms", source + ", worst vCPU")
    p99 = [float(v.p99_ms.value) for v in vcpus if v.p99_ms.value is not None]
    if p99:
        _count(out, "guest.p99_stall_ms", max(p99), "ms", vcpus[0].p99_ms.source + ", worst vCPU")
    totals = [float(v.total_stalled_ms.value) for v in vcpus
              if v.total_stalled_ms.value is not None]
    if totals:
        _count(out, "guest.total_stalled_ms", sum(totals), "ms", source + ", all vCPUs")
    _count(out, "guest.stalls", sum(v.stalls for v in vcpus), "stalls", source + ", all vCPUs")
