"""Indexes for the web UI: keyset pages of deliveries on (created_at, id), whole or by
endpoint, status or event type; attempts by time for the overview's chart.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The two listing indexes gain `id` (a superset: what used them still can), so a page
    # boundary inside one timestamp is an index condition, not a sort.
    op.drop_index("ix_deliveries_created_at", "deliveries")
    op.create_index("ix_deliveries_created_at", "deliveries", ["created_at", "id"])
    op.drop_index("ix_deliveries_endpoint", "deliveries")
    op.create_index("ix_deliveries_endpoint", "deliveries", ["endpoint_id", "created_at", "id"])
    op.create_index("ix_deliveries_status_created", "deliveries", ["status", "created_at", "id"])
    op.create_index("ix_deliveries_event_type", "deliveries", ["event_type", "created_at", "id"])
    op.create_index("ix_attempts_attempted_at", "attempts", ["attempted_at", "outcome"])


def downgrade() -> None:
    op.drop_index("ix_attempts_attempted_at", "attempts")
    op.drop_index("ix_deliveries_event_type", "deliveries")
    op.drop_index("ix_deliveries_status_created", "deliveries")
    op.drop_index("ix_deliveries_endpoint", "deliveries")
    op.create_index("ix_deliveries_endpoint", "deliveries", ["endpoint_id", "created_at"])
    op.drop_index("ix_deliveries_created_at", "deliveries")
    op.create_index("ix_deliveries_created_at", "deliveries", ["created_at"])
