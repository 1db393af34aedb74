"""Flavors and runtime limits (issue 12): the servers' flavor, flavor_spec, end_time and
stop_message (outpost_schema.version 2).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Only adds columns, each nullable or with a server default, so every existing row stays
valid: a server running before the upgrade has no flavor ("") and no end time.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def columns() -> tuple[sa.Column, ...]:
    return (
        sa.Column("flavor", sa.String(64), nullable=False, server_default=""),
        sa.Column("flavor_spec", sa.JSON, nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_message", sa.Text, nullable=True),
    )


def upgrade() -> None:
    # a database of a development version between flavors and runtime limits may have
    # the first two already (schema version 2 then added missing columns at open)
    existing = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("outpost_servers")}
    with op.batch_alter_table("outpost_servers") as batch:
        for column in columns():
            if column.name not in existing:
                batch.add_column(column)
    # releases before alembic refuse a database whose version is newer than theirs
    op.execute("UPDATE outpost_schema SET version = 2")


def downgrade() -> None:
    with op.batch_alter_table("outpost_servers") as batch:
        for column in ("stop_message", "end_time", "flavor_spec", "flavor"):
            batch.drop_column(column)
    op.execute("UPDATE outpost_schema SET version = 1")
