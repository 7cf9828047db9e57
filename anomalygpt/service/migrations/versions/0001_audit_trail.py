"""The audit trail as the first service release created it: profiles and inspections.

A database that release made (tables, no alembic_version) is stamped with this revision, not re-created.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "profiles",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("key_name", sa.String(200), nullable=True),
        sa.Column("file", sa.String(200), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("n_references", sa.Integer(), nullable=False),
        sa.Column("image_height", sa.Integer(), nullable=False),
        sa.Column("image_width", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("preset", sa.String(200), nullable=False),
        sa.Column("references_json", sa.Text(), nullable=False),
        sa.Column("warnings_json", sa.Text(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
    )
    op.create_index("ix_profiles_name", "profiles", ["name"])
    op.create_index("ix_profiles_created", "profiles", ["created"])
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("key_name", sa.String(200), nullable=True),
        sa.Column("profile_id", sa.String(32), nullable=False),
        sa.Column("profile_version", sa.Integer(), nullable=False),
        sa.Column("profile_checksum", sa.String(64), nullable=False),
        sa.Column("image_name", sa.String(300), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_bytes", sa.Integer(), nullable=False),
        sa.Column("image_height", sa.Integer(), nullable=False),
        sa.Column("image_width", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("sensitivity", sa.Float(), nullable=False),
        sa.Column("regions_json", sa.Text(), nullable=False),
        sa.Column("result_json", sa.Text(), nullable=False),
        sa.Column("overlay_sha256", sa.String(64), nullable=False),
        sa.Column("map_sha256", sa.String(64), nullable=False),
        sa.Column("preset", sa.String(200), nullable=False),
        sa.Column("versions_json", sa.Text(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
    )
    for column in ("created", "profile_id", "image_sha256", "verdict"):
        op.create_index(f"ix_inspections_{column}", "inspections", [column])


def downgrade() -> None:
    op.drop_table("inspections")
    op.drop_table("profiles")
