"""Peer state: each peer's pull and push cursors, contact, counts, score and ban.

Revision ID: 0007_peers
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_peers"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "peer_state",
        sa.Column("key", sa.LargeBinary(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("pull_cursor", sa.BigInteger(), nullable=False),
        sa.Column("push_cursor", sa.BigInteger(), nullable=False),
        sa.Column("last_contact_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.String(400), nullable=True),
        sa.Column("last_error_ms", sa.BigInteger(), nullable=True),
        sa.Column("reports_in", sa.BigInteger(), nullable=False),
        sa.Column("reports_out", sa.BigInteger(), nullable=False),
        sa.Column("duplicates", sa.BigInteger(), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("banned_until_ms", sa.BigInteger(), nullable=True),
        sa.Column("ban_count", sa.Integer(), nullable=False),
        sa.Column("ban_reason", sa.String(400), nullable=True),
        sa.Column("learned", sa.Boolean(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_peer_state"),
    )


def downgrade() -> None:
    op.drop_table("peer_state")
