"""Fixtures of the API tests: databases loaded through the collector's storage path."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
from api_test_data import store_in_batches
from apiflask import APIFlask
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine

from api.app import create_app
from api.database import ENGINE_EXTENSION
from telemetry.database import make_engine
from telemetry.record import TelemetryRecord
from telemetry.tables import metadata


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on an empty SQLite or PostgreSQL database with the telemetry tables."""
    engine = make_engine(database_url)
    metadata.create_all(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    """An engine on an empty SQLite file with the telemetry tables."""
    engine = make_engine(sqlite_url)
    metadata.create_all(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def store(engine: Engine) -> Callable[[Sequence[TelemetryRecord]], None]:
    """Return a function that stores records in the test's database."""
    return lambda records: store_in_batches(engine, records)


@pytest.fixture
def app(engine: Engine) -> APIFlask:
    """The API without a token, on the test's database."""
    return create_app(engine=engine)


@pytest.fixture
def client(app: APIFlask) -> FlaskClient:
    """A test client of ``app``."""
    return app.test_client()


@pytest.fixture
def sqlite_store(sqlite_engine: Engine) -> Callable[[Sequence[TelemetryRecord]], None]:
    """Return a function that stores records in the SQLite test database."""
    return lambda records: store_in_batches(sqlite_engine, records)


@pytest.fixture
def sqlite_client(sqlite_engine: Engine) -> FlaskClient:
    """A test client of the API without a token, on an SQLite file; for tests of input handling."""
    return create_app(engine=sqlite_engine).test_client()


@pytest.fixture
def make_url_client() -> Iterator[Callable[[str], FlaskClient]]:
    """Return a function that builds a test client from a database URL; engines are disposed after the test."""
    engines: list[Engine] = []

    def make(url: str) -> FlaskClient:
        app = create_app(url)
        engines.append(app.extensions[ENGINE_EXTENSION])
        return app.test_client()

    yield make
    for engine in engines:
        engine.dispose()
