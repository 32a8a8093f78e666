"""Storage budgets: the sender network of received reports, and oldest-first pruning by kind.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for reports stored before: they count against no sender network's budget.
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("sender_net", sa.String(43), nullable=True))
    op.create_index("ix_reports_via_received_ms", "reports", ["via", "received_ms"])


def downgrade() -> None:
    op.drop_index("ix_reports_via_received_ms", table_name="reports")
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("sender_net")
