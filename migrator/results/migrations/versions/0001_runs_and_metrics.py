"""Runs with their dimensions, and their metrics as a long table.

The first schema: enough to compare runs by dimension and metric.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``runs`` and ``metrics``."""
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(200), nullable=False, comment="run directory name"),
        sa.Column("scenario", sa.String(200), nullable=False),
        sa.Column("scenario_hash", sa.String(64), nullable=False,
                  comment="sha256 of the resolved scenario.toml"),
        sa.Column("backing", sa.String(32)),
        sa.Column("page_size", sa.BigInteger, comment="host page size of guest RAM, bytes"),
        sa.Column("memory_mib", sa.Integer),
        sa.Column("vcpus", sa.Integer),
        sa.Column("postcopy", sa.Boolean),
        sa.Column("preempt", sa.Boolean),
        sa.Column("switchover", sa.String(32), comment="switchover policy"),
        sa.Column("qemu_version", sa.String(64), comment="destination QEMU"),
        sa.Column("source_qemu_version", sa.String(64)),
        sa.Column("accel", sa.String(16)),
        sa.Column("host_kernel", sa.String(128)),
        sa.Column("guest_kernel", sa.String(128)),
        sa.Column("source_host", sa.String(255)),
        sa.Column("destination_host", sa.String(255)),
        sa.Column("migrator_version", sa.String(64)),
        sa.Column("run_date", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("origin", sa.Text, comment="where the run directory was imported from"),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_scenario"), "runs", ["scenario"])
    op.create_index(op.f("ix_runs_scenario_hash"), "runs", ["scenario_hash"])
    op.create_index(op.f("ix_runs_qemu_version"), "runs", ["qemu_version"])
    op.create_index(op.f("ix_runs_run_date"), "runs", ["run_date"])
    op.create_table(
        "metrics",
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("value", sa.Double, nullable=False),
        sa.Column("unit", sa.String(32), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], ondelete="CASCADE",
                                name=op.f("fk_metrics_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "name", name=op.f("pk_metrics")),
    )
    op.create_index("ix_metrics_name", "metrics", ["name"])


def downgrade() -> None:
    """Drop everything :func:`upgrade` made."""
    op.drop_index("ix_metrics_name", table_name="metrics")
    op.drop_table("metrics")
    for column in ("run_date", "qemu_version", "scenario_hash", "scenario"):
        op.drop_index(op.f(f"ix_runs_{column}"), table_name="runs")
    op.drop_table("runs")
