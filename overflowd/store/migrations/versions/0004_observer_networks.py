"""Continuity that survives a restart: networks per observer key, and when contacts last changed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
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
    # NULL until the daemon has written it (and again when a report brings other contacts).
    with op.batch_alter_table("observers") as batch:
        batch.add_column(sa.Column("contacts_since_ms", sa.BigInteger(), nullable=True))
    op.create_table(
        "observer_networks",
        sa.Column("key", sa.LargeBinary(32), nullable=False),
        sa.Column("network", sa.String(43), nullable=False),
        sa.Column("first_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
        sa.Column("reports", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", "network", name="pk_observer_networks"),
    )


def downgrade() -> None:
    op.drop_table("observer_networks")
    with op.batch_alter_table("observers") as batch:
        batch.drop_column("contacts_since_ms")
