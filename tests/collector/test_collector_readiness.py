"""The collector's /readyz over real HTTP: not ready until the database has the telemetry tables."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

from collector.http import HealthServer
from collector.push import PushReceiver, WebhookServer
from collector.worker import Collector
from telemetry.database import TELEMETRY_TABLES, make_engine
from telemetry.queue_client import QueueClient


@asynccontextmanager
async def served(mode: str, engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """Serve the health endpoints of ``mode`` on a free loopback port; yield a client for them."""
    # The queue client is never used: only the health endpoints run, not the pull loop.
    queue = QueueClient("http://127.0.0.1:9", timeout_s=1.0)
    server: HealthServer | WebhookServer
    if mode == "pull":
        server = HealthServer(Collector(queue, engine), host="127.0.0.1", port=0)
    else:
        server = WebhookServer(PushReceiver(engine), host="127.0.0.1", port=0)
    serving = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.02)
            yield client
    finally:
        server.stop()
        await asyncio.wait_for(serving, 10)
        await queue.aclose()


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_readyz_needs_migrated_tables(
    mode: str, database_url: str, alembic_config: Callable[[str], Config]
) -> None:
    engine = make_engine(database_url)

    async def scenario() -> None:
        async with served(mode, engine) as client:
            empty = await client.get("/readyz")
            assert empty.status_code == 503, empty.text
            assert empty.json()["database_reachable"] is True
            assert empty.json()["missing_tables"] == list(TELEMETRY_TABLES)
            assert "migrations" in empty.json()["detail"]

            await asyncio.to_thread(command.upgrade, alembic_config(database_url), "head")

            migrated = await client.get("/readyz")
            assert migrated.status_code == 200, migrated.text
            assert migrated.json()["status"] == "ready"
            assert migrated.json()["missing_tables"] == []

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_readyz_unreachable_database(mode: str, tmp_path: Path) -> None:
    # A folder that does not exist: SQLite cannot open the file, so the database is unreachable.
    engine = make_engine(f"sqlite:///{tmp_path}/missing/telemetry.db", create_parent_dir=False)

    async def scenario() -> None:
        async with served(mode, engine) as client:
            response = await client.get("/readyz")
            assert response.status_code == 503, response.text
            assert response.json()["database_reachable"] is False

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()
