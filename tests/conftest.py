"""Fixtures shared by every component's tests.

PostgreSQL tests use the server named by ``TEST_POSTGRES_URL`` (``.ci/run`` starts
one on 127.0.0.1). Without it they are skipped on a developer machine and fail
under CI, so a CI run never passes with PostgreSQL silently untested.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The real DCGM exporter dump, read in place next to the project.
REAL_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dcgm_metrics_20250718_134233.csv"


@pytest.fixture(scope="session")
def real_csv() -> Path:
    """Path of the real DCGM CSV; fails when it is missing under CI."""
    if not REAL_CSV.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"real DCGM CSV not found at {REAL_CSV}")
        pytest.skip(f"real DCGM CSV not found at {REAL_CSV}")
    return REAL_CSV


def _postgres_admin_url() -> str:
    url = os.environ.get("TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("TEST_POSTGRES_URL is not set: .ci/run must start PostgreSQL")
        pytest.skip("TEST_POSTGRES_URL is not set")
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped after the test."""
    import psycopg

    admin_url = _postgres_admin_url()
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a new SQLite file in the test's temporary folder."""
    return f"sqlite:///{tmp_path / 'telemetry.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """An empty database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")
