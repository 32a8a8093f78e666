"""Trust label of received reports, and the observer events an operator must see.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
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
    # NULL for reports stored before this revision and for our own ('local') reports.
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("trust", sa.String(16), nullable=True))
    op.create_table(
        "observer_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("key", sa.LargeBinary(32), nullable=False),
        sa.Column("old_contacts", sa.Text(), nullable=False),
        sa.Column("new_contacts", sa.Text(), nullable=False),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("sender", sa.String(64), nullable=True),
        sa.Column("detail", sa.String(400), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_observer_events"),
    )
    op.create_index("ix_observer_events_at_ms", "observer_events", ["at_ms"])


def downgrade() -> None:
    op.drop_index("ix_observer_events_at_ms", table_name="observer_events")
    op.drop_table("observer_events")
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("trust")
