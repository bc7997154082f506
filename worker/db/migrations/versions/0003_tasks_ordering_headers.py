"""Task ids on deliveries, FIFO ordering (endpoints.ordering, deliveries.ordering_key and
fifo_seq), and the headers each attempt sent.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from worker.core.models import ORDERING_KEY_MAX, TASK_ID_MAX

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:
        batch.add_column(sa.Column("ordering", sa.String(8), nullable=False,
                                   server_default="none"))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("task_id", sa.String(TASK_ID_MAX)))
        batch.add_column(sa.Column("ordering_key", sa.String(ORDERING_KEY_MAX)))
        batch.add_column(sa.Column("fifo_seq", sa.BigInteger))
    op.create_index("ix_deliveries_task", "deliveries", ["task_id"])
    op.create_index("ix_deliveries_fifo", "deliveries",
                    ["endpoint_id", "ordering_key", "status", "fifo_seq"])
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("request_headers", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("request_headers")
    op.drop_index("ix_deliveries_fifo", "deliveries")
    op.drop_index("ix_deliveries_task", "deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("fifo_seq")
        batch.drop_column("ordering_key")
        batch.drop_column("task_id")
    with op.batch_alter_table("endpoints") as batch:
        batch.drop_column("ordering")
