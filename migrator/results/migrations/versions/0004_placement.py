"""Record each run's CPU and NUMA placement ([placement.source], [placement.destination]).

Adds ``runs.placement``: both sides' placement as one text
(``config.placement.placement_label``); "" for every existing run, none of which
could ask for one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``runs.placement``."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column(
            "placement", sa.String(1000), nullable=False, server_default="",
            comment="CPU and NUMA placement of both sides' QEMUs "
                    "(config.placement.placement_label); empty: none"))


def downgrade() -> None:
    """Drop what :func:`upgrade` added."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("placement")
