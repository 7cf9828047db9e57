"""API keys (stored as sha256 only), chat answers, and one version number per profile name.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "chat_answers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("key_name", sa.String(200), nullable=True),
        sa.Column("inspection_id", sa.String(32), nullable=False),
        sa.Column("profile_id", sa.String(32), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("answerer", sa.String(32), nullable=False),
        sa.Column("checks_json", sa.Text(), nullable=False),
        sa.Column("preset", sa.String(200), nullable=False),
        sa.Column("versions_json", sa.Text(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
    )
    op.create_index("ix_chat_answers_created", "chat_answers", ["created"])
    op.create_index("ix_chat_answers_inspection_id", "chat_answers", ["inspection_id"])
    # Two replicas creating the same profile name at once must not both take the same version.
    op.create_index("uq_profiles_name_version", "profiles", ["name", "version"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_profiles_name_version", "profiles")
    op.drop_table("chat_answers")
    op.drop_table("api_keys")
