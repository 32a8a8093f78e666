"""The destination's index covers what who and the victim view read (issue #14).

``ix_reports_dst_last_ms`` (dst, last_ms) becomes ``ix_reports_dst_covering``: the same two
leading columns (every query it served it still serves, in the same order), then the columns
of ``ix_reports_last_ms_covering``, so that ``who --dst NET`` and the dashboard's victim
series over a long window read the destination's index entries only, never a row (a row is
~1 kB, most of it the signed bytes). A whole day of one attacked /24 at a million stored
reports is 30,000 of its entries instead of the day's million entries of the time index
(query.py's ``_address_first`` chooses between the two on SQLite). It costs about 90 bytes
more per report than the index it replaces.

Revision ID: 0009_dash_dst_covering
Revises: 0008_peer_records
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009_dash_dst_covering"
down_revision: str | Sequence[str] | None = "0008_peer_records"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: dst and last_ms first (what the old index was), then what who and the series read
COVERING = (
    "dst",
    "last_ms",
    "observer_key",
    "ip_version",
    "src",
    "first_ms",
    "packets",
    "bytes",
    "probability",
    "sampling_interval",
)


def upgrade() -> None:
    op.create_index("ix_reports_dst_covering", "reports", list(COVERING))
    op.drop_index("ix_reports_dst_last_ms", table_name="reports")


def downgrade() -> None:
    op.create_index("ix_reports_dst_last_ms", "reports", ["dst", "last_ms"])
    op.drop_index("ix_reports_dst_covering", table_name="reports")
