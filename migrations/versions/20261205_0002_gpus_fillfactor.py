"""Leave half of each gpus page free on PostgreSQL, for HOT updates of last_seen.

The collector updates every GPU's row in nearly every transaction. A fill factor
of 50 lets PostgreSQL keep the new version on the page of the old one. The
option applies to pages written from now on; an existing table's full pages
empty out as their rows move. SQLite has no such option.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE gpus SET (fillfactor = 50)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE gpus RESET (fillfactor)")
