"""Subscriptions: the prefixes peers subscribed to (docs/peers.md "Subscriptions").

Revision ID: 0007_subscriptions
Revises: 0007_arrivals
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_subscriptions"
down_revision: str | Sequence[str] | None = "0007_arrivals"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "peer_subscriptions",
        sa.Column("subscriber", sa.LargeBinary(32), nullable=False),
        sa.Column("prefix", sa.String(43), nullable=False),
        sa.Column("endpoint", sa.String(2048), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subscriber", "prefix", name="pk_peer_subscriptions"),
    )


def downgrade() -> None:
    op.drop_table("peer_subscriptions")
