"""Baseline: the schema of the releases before flavors (outpost_schema.version 1).

Revision ID: 0001
Revises:
Create Date: 2026-11-28

A database written by those releases has these tables but no version table of alembic's:
it is recognised (outpost_server.migrations.legacy_revision) and stamped with this
revision by ``jupyterhub-outpost upgrade-db``.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outpost_servers",
        sa.Column("hub", sa.String(255), primary_key=True),
        sa.Column("server_name", sa.String(255), primary_key=True),
        sa.Column("start_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("user_info", sa.JSON, nullable=False),
        sa.Column("spawner_name", sa.String(255), nullable=False),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("user_options", sa.JSON, nullable=False),
        sa.Column("config_overrides", sa.JSON, nullable=False),
        sa.Column("spawner_state", sa.JSON, nullable=True),
        sa.Column("scheme", sa.String(8), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("port", sa.Integer, nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("failure_message", sa.Text, nullable=False),
        sa.Column("error_class", sa.String(255), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "outpost_events",
        sa.Column("hub", sa.String(255), primary_key=True),
        sa.Column("server_name", sa.String(255), primary_key=True),
        sa.Column("sequence", sa.Integer, primary_key=True),
        sa.Column("start_id", sa.String(128), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
    )
    schema = op.create_table("outpost_schema", sa.Column("version", sa.Integer, primary_key=True))
    op.bulk_insert(schema, [{"version": 1}])


def downgrade() -> None:
    op.drop_table("outpost_schema")
    op.drop_table("outpost_events")
    op.drop_table("outpost_servers")
