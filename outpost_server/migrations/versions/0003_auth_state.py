"""auth_state for the site's Spawner (issue 14): the servers' auth_state column
(outpost_schema.version 3).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

Only adds a nullable column: a server running before the upgrade has no auth_state. Its
values are encrypted by the Outpost (store.SECRET_COLUMNS); the migration writes none.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outpost_servers") as batch:
        batch.add_column(sa.Column("auth_state", sa.JSON, nullable=True))
    op.execute("UPDATE outpost_schema SET version = 3")


def downgrade() -> None:
    with op.batch_alter_table("outpost_servers") as batch:
        batch.drop_column("auth_state")
    op.execute("UPDATE outpost_schema SET version = 2")
