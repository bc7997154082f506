"""Sealed endpoint credentials, per-endpoint limits, endpoint health, attempt numbers that
run on across replays (`deliveries.retry_base`).

Existing plaintext secrets are sealed under the configured key (see worker.keys) and the
plaintext column is dropped.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import context, op

from worker.core.credentials import fresh, open_credentials, seal_credentials
from worker.core.sealing import KeyRing
from worker.db.schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("endpoints") as batch:
        batch.add_column(sa.Column("credentials", sa.Text))
        batch.add_column(sa.Column("verify_tls", sa.Boolean, nullable=False,
                                   server_default=sa.true()))
        batch.add_column(sa.Column("max_in_flight", sa.Integer))
        batch.add_column(sa.Column("rate_limit", sa.Float))
        batch.add_column(sa.Column("rate_burst", sa.Integer))
        batch.add_column(sa.Column("failure_streak", sa.Integer, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("failing_since", UTCDateTime))
        batch.add_column(sa.Column("circuit_open_until", UTCDateTime))
    _seal_existing()
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("retry_base", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("endpoints") as batch:
        batch.alter_column("credentials", nullable=False)
        batch.drop_column("secrets")


_TABLE = sa.table("endpoints", sa.column("id", sa.String), sa.column("secrets", sa.JSON),
                  sa.column("credentials", sa.Text))


def _keys() -> KeyRing:
    """The key ring, read only when there are rows to seal or open."""
    from worker.keys import load_keyring
    from worker.settings import get_settings

    given = context.config.attributes.get("keyring")
    if isinstance(given, KeyRing):
        return given
    return load_keyring(get_settings(),
                        database_url=context.config.get_main_option("sqlalchemy.url"))


def _seal_existing() -> None:
    conn = op.get_bind()
    rows = list(conn.execute(sa.select(_TABLE.c.id, _TABLE.c.secrets)))
    if not rows:
        return  # nothing to seal: no key needed yet
    keys = _keys()
    for row in rows:
        token = seal_credentials(keys, row.id, fresh(list(row.secrets or ())))
        conn.execute(sa.update(_TABLE).where(_TABLE.c.id == row.id).values(credentials=token))


def downgrade() -> None:
    """Back to plaintext secrets (static headers are lost: 0001 has no place for them)."""
    with op.batch_alter_table("endpoints") as batch:
        batch.add_column(sa.Column("secrets", sa.JSON))
    conn = op.get_bind()
    rows = list(conn.execute(sa.select(_TABLE.c.id, _TABLE.c.credentials)))
    keys = _keys() if rows else None
    for row in rows:
        assert keys is not None
        secrets = list(open_credentials(keys, row.id, row.credentials).secrets)
        conn.execute(sa.update(_TABLE).where(_TABLE.c.id == row.id).values(secrets=secrets))
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("retry_base")
    with op.batch_alter_table("endpoints") as batch:
        batch.alter_column("secrets", nullable=False)
        for name in ("credentials", "verify_tls", "max_in_flight", "rate_limit", "rate_burst",
                     "failure_streak", "failing_since", "circuit_open_until"):
            batch.drop_column(name)
