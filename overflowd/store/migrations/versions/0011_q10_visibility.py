"""Autovacuum comes by every thousand inserted reports (PostgreSQL; issue #11, `top` in 100 ms).

Every aggregation over a time window reads ``ix_reports_last_ms_covering`` alone, but an
index-only scan still fetches the table row of every entry on a page the visibility map does
not mark all-visible, and only VACUUM marks it. By default autovacuum vacuums an insert-only
table after ``1000 + 0.2 * rows`` inserts: at a million stored reports, after 200,000 more,
so the newest hours of a live node are never all-visible and ``top --by src --since 1h`` reads
the hour's ~41,500 rows (~1 kB each) from the table as well as from the index: 21 ms of the
statement's ~66 ms of server time, against 6 ms from the index alone (measured: the bench's
million reports, docs/storage.md). With a threshold of 1,000 inserts and no scale factor,
autovacuum (every ``autovacuum_naptime``, 1 min by default) keeps all but the last thousand
reports or minute or two all-visible. Such a vacuum is cheap: it skips the pages already
all-visible, and PostgreSQL 14+ skips index vacuuming while fewer than 2% of the pages hold
dead rows (retention's deletes at the old end) and index cleanup when nothing was deleted.

The two storage parameters are PostgreSQL 13's (the first with insert-driven autovacuum).
SQLite has no visibility map: nothing to do there.

Revision ID: 0011_q10_visibility
Revises: 0010_top_keys
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011_q10_visibility"
down_revision: str | Sequence[str] | None = "0010_top_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: inserts after which autovacuum vacuums the reports table (PostgreSQL's default threshold,
#: without the default scale factor of 0.2 of the table's rows on top)
INSERT_THRESHOLD = 1000


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "ALTER TABLE reports SET (autovacuum_vacuum_insert_threshold = "
        f"{INSERT_THRESHOLD}, autovacuum_vacuum_insert_scale_factor = 0)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "ALTER TABLE reports RESET (autovacuum_vacuum_insert_threshold, "
        "autovacuum_vacuum_insert_scale_factor)"
    )
