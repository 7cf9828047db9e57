"""API keys: when each was last used (to the minute) and when it was revoked (a revoked key answers 401).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("last_used", sa.DateTime(), nullable=True))
    op.add_column("api_keys", sa.Column("revoked", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as table:  # SQLite drops columns by copying the table
        table.drop_column("revoked")
        table.drop_column("last_used")
