"""Chat questions per API key and clock minute, counted in the database so replicas share one limit.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "question_counts",
        sa.Column("key_name", sa.String(200), primary_key=True),
        sa.Column("minute", sa.Integer(), primary_key=True),
        sa.Column("count", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("question_counts")
