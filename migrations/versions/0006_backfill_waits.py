"""backfill waits: what a job and a chunk wait for (a backend that is down, a retry) and since when

Revision ID: 0006
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("backfill_jobs", "backfill_chunks"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("waiting_for", sa.String(length=255), nullable=True))
            batch_op.add_column(sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ("backfill_chunks", "backfill_jobs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("waiting_since")
            batch_op.drop_column("waiting_for")
