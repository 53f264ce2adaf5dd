"""Keep the whole report.json; record HGM and the migrator git commit.

Adds ``reports`` (the report document per run, JSONB on PostgreSQL), and to
``runs``: ``hgm`` (false for every existing run: none could use it),
``migrator_commit`` and ``report_sha256`` (unknown for existing runs; a
re-import fills them in).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the ``reports`` table and three ``runs`` columns."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column(
            "hgm", sa.Boolean, nullable=False, server_default=sa.false(),
            comment="hugetlb high-granularity mapping (false until migrator supports it)"))
        batch.add_column(sa.Column("migrator_commit", sa.String(64)))
        batch.add_column(sa.Column("report_sha256", sa.String(64),
                                   comment="of the stored report document"))
    op.create_table(
        "reports",
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("document", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                  nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], ondelete="CASCADE",
                                name=op.f("fk_reports_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_reports")),
    )


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    op.drop_table("reports")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("report_sha256")
        batch.drop_column("migrator_commit")
        batch.drop_column("hgm")
