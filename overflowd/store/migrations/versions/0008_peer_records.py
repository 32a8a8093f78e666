"""Peer records: the signed node record each peer last served (docs/peers.md "Learned peers").

Revision ID: 0008_peer_records
Revises: 0007_query
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_peer_records"
down_revision: str | Sequence[str] | None = "0007_query"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "peer_records",
        sa.Column("key", sa.LargeBinary(32), nullable=False),
        sa.Column("record", sa.LargeBinary(4096), nullable=False),
        sa.Column("record_ms", sa.BigInteger(), nullable=False),
        sa.Column("fetched_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_peer_records"),
    )


def downgrade() -> None:
    op.drop_table("peer_records")
