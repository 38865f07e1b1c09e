"""Create the telemetry tables: gpus, gpu_metrics and telemetry_samples.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gpus",
        sa.Column("uuid", sa.String(length=128), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("gpu_index", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("uuid"),
    )
    op.create_index("ix_gpus_hostname", "gpus", ["hostname"], unique=False)

    op.create_table(
        "gpu_metrics",
        sa.Column("gpu_uuid", sa.String(length=128), nullable=False),
        sa.Column("metric_name", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["gpu_uuid"], ["gpus.uuid"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("gpu_uuid", "metric_name"),
    )

    op.create_table(
        "telemetry_samples",
        # SQLite makes only INTEGER PRIMARY KEY an alias of the rowid.
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("gpu_uuid", sa.String(length=128), nullable=False),
        sa.Column("metric_name", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source_timestamp", sa.DateTime(timezone=True), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("container", sa.String(length=255), nullable=True),
        sa.Column("pod", sa.String(length=255), nullable=True),
        sa.Column("namespace", sa.String(length=255), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(["gpu_uuid"], ["gpus.uuid"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key", name="uq_telemetry_samples_idempotency_key"),
    )
    op.create_index(
        "ix_telemetry_samples_gpu_time",
        "telemetry_samples",
        ["gpu_uuid", "timestamp", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_telemetry_samples_gpu_time", table_name="telemetry_samples")
    op.drop_table("telemetry_samples")
    op.drop_table("gpu_metrics")
    op.drop_index("ix_gpus_hostname", table_name="gpus")
    op.drop_table("gpus")
