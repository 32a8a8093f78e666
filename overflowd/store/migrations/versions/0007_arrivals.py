"""Arrivals: every way each report reached this node, the fewest hops it made, and peer rows
in the outbox.

``report_arrivals`` has one row per (report, channel) with a count and the first and last
arrival; ``reports.hops`` the smallest peer-to-peer hop count seen (0 for reports that did not
come through a peer); ``webhook_outbox.kind`` tells webhook deliveries from peer pushes, which
share the outbox's machinery but not its workers.

Revision ID: 0007_arrivals
Revises: 0007_peers
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_arrivals"
down_revision: str | Sequence[str] | None = "0007_peers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "report_arrivals",
        sa.Column("report_id", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("first_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("report_id", "channel", name="pk_report_arrivals"),
    )
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("hops", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("webhook_outbox") as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="webhook"))
    # Arrivals of reports already stored: the one way each is known to have come.
    op.execute(
        "INSERT INTO report_arrivals (report_id, channel, count, first_ms, last_ms) "
        "SELECT id, CASE WHEN via = 'gossip' THEN 'peer' ELSE via END, 1, received_ms, "
        "received_ms FROM reports"
    )


def downgrade() -> None:
    with op.batch_alter_table("webhook_outbox") as batch:
        batch.drop_column("kind")
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("hops")
    op.drop_table("report_arrivals")
