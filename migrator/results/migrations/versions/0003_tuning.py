"""Record each run's migration tuning (auto-converge, xbzrle, multifd, other knobs).

Adds ``runs.tuning``: the capabilities and parameters a run set beyond post-copy
itself, as one text (``config.migration.tuning_label``); "" for every existing
run, none of which could set any.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``runs.tuning``."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column(
            "tuning", sa.String(1000), nullable=False, server_default="",
            comment="migration capabilities and parameters beyond post-copy itself "
                    "(config.migration.tuning_label); empty: none"))


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("tuning")
