"""The Alembic migrations against real SQLite and PostgreSQL databases."""

from __future__ import annotations

from collections.abc import Callable

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Index, MetaData, inspect

from telemetry.database import make_engine
from telemetry.tables import GPUS_FILLFACTOR, metadata

MakeConfig = Callable[[str], Config]
TABLES = {"gpus", "gpu_metrics", "telemetry_samples"}


def _schema_diff(url: str, target: MetaData) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, target))
    finally:
        engine.dispose()


def _table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_migrated_schema_matches_models(database_url: str, alembic_config: MakeConfig) -> None:
    command.upgrade(alembic_config(database_url), "head")

    assert _schema_diff(database_url, metadata) == []


def test_schema_comparison_detects_missing_index(database_url: str, alembic_config: MakeConfig) -> None:
    # The schema comparison is useful only because it can fail, so a model with
    # one index more than the migrated database must show up as a difference.
    command.upgrade(alembic_config(database_url), "head")
    extended = MetaData()
    for table in metadata.tables.values():
        table.to_metadata(extended)
    Index("ix_extra_metric_name", extended.tables["telemetry_samples"].c.metric_name)

    diff = _schema_diff(database_url, extended)

    assert [entry[0] for entry in diff] == ["add_index"]  # type: ignore[index]


def test_gpus_fill_factor_matches_model(postgres_url: str, alembic_config: MakeConfig) -> None:
    # The schema comparison does not compare table storage options, so this
    # compares the migrated table's fill factor with the model's on its own.
    config = alembic_config(postgres_url)

    command.upgrade(config, "head")
    migrated = _table_options(postgres_url, "gpus")
    command.downgrade(config, "0001")
    reset = _table_options(postgres_url, "gpus")

    assert metadata.tables["gpus"].dialect_options["postgresql"]["with"] == {"fillfactor": GPUS_FILLFACTOR}
    assert migrated.get("postgresql_with") == {"fillfactor": str(GPUS_FILLFACTOR)}
    assert "postgresql_with" not in reset


def _table_options(url: str, table: str) -> dict[str, object]:
    engine = make_engine(url)
    try:
        return dict(inspect(engine).get_table_options(table))
    finally:
        engine.dispose()


def test_upgrade_then_downgrade_to_empty(database_url: str, alembic_config: MakeConfig) -> None:
    config = alembic_config(database_url)

    command.upgrade(config, "head")
    assert _table_names(database_url) == TABLES

    command.downgrade(config, "base")
    assert _table_names(database_url) == set()

    command.upgrade(config, "head")
    assert _table_names(database_url) == TABLES


def test_sqlite_engine_uses_wal(sqlite_url: str, alembic_config: MakeConfig) -> None:
    command.upgrade(alembic_config(sqlite_url), "head")
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
            timeout = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
    finally:
        engine.dispose()

    assert mode == "wal"
    assert timeout > 0
