"""The real server process: start, graceful stop, restart with state, protocols."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from telemetry.queue_client import OutgoingMessage, QueueClient


def test_fixture_server_ready_and_stops_cleanly(queue_server) -> None:
    assert httpx.get(f"{queue_server.url}/healthz").json() == {"status": "ok"}
    assert queue_server.pid > 0
    assert queue_server.stop() == 0
    assert "write-ahead log flushed and closed" in queue_server.log_text()


@pytest.mark.parametrize("http2", [True, False], ids=["h2c-prior-knowledge", "http1.1"])
def test_client_round_trip_both_protocols(queue_server, http2: bool) -> None:
    async def scenario() -> None:
        async with QueueClient(queue_server.url, http2=http2) as client:
            await client.create_queue("jobs")
            published = await client.publish("jobs", [OutgoingMessage(body={"n": i}) for i in range(10)])
            leased = await client.lease("jobs", max_messages=10, wait_s=1)
            acked = await client.ack("jobs", [m.receipt for m in leased])
            assert [m.body for m in leased] == [{"n": i} for i in range(10)]
            assert [m.id for m in leased] == [p.id for p in published]
            assert all(r.status == "acked" for r in acked)
            version = "HTTP/2" if http2 else "HTTP/1.1"
            response = await client._nodes[0].client.get("/healthz")
            assert response.http_version == version

    asyncio.run(scenario())


@pytest.mark.parametrize("http2", [True, False], ids=["h2c-prior-knowledge", "http1.1"])
def test_abandoned_long_poll_takes_no_messages(queue_server, http2: bool) -> None:
    async def scenario() -> None:
        async with QueueClient(queue_server.url, http2=http2) as client:
            await client.create_queue("jobs")
            # A consumer that stops cancels its waiting long-poll, which closes the request.
            waiting = asyncio.create_task(client.lease("jobs", max_messages=10, wait_s=10))
            await asyncio.sleep(0.5)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await asyncio.sleep(0.3)

            await client.publish("jobs", [OutgoingMessage(body={"n": 1})])
            leased = await client.lease("jobs", max_messages=10, wait_s=1)

            assert [m.body for m in leased] == [{"n": 1}]

    asyncio.run(scenario())


def test_restart_keeps_unacked_messages(queue_server) -> None:
    async def publish_and_lease() -> list[str]:
        async with QueueClient(queue_server.url) as client:
            await client.create_queue("jobs")
            await client.publish("jobs", [OutgoingMessage(body=i) for i in range(5)])
            leased = await client.lease("jobs", max_messages=2, wait_s=0)
            await client.ack("jobs", [leased[0].receipt])
            return [m.receipt for m in leased]

    receipts = asyncio.run(publish_and_lease())
    queue_server.kill()
    queue_server.start()

    async def after_restart() -> None:
        async with QueueClient(queue_server.url) as client:
            leased = await client.lease("jobs", max_messages=10, wait_s=0)
            assert sorted(m.body for m in leased) == [1, 2, 3, 4]
            redelivered = [m for m in leased if m.body == 1]
            assert redelivered[0].deliveries == 2
            stale = await client.ack("jobs", [receipts[1]])
            assert stale[0].status == "stale"
            gone = await client.ack("jobs", [receipts[0]])
            assert gone[0].status == "not_found"

    asyncio.run(after_restart())


def test_tls_serves_http2_by_alpn(start_queue_server, tmp_path) -> None:
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server = start_queue_server(QUEUE_TLS_CERT=str(cert), QUEUE_TLS_KEY=str(key))
    context = ssl.create_default_context(cafile=str(cert))
    assert server.url.startswith("https://")

    async def scenario() -> None:
        transport = httpx.AsyncHTTPTransport(verify=context, http2=True)
        async with QueueClient(server.url, transport=transport) as client:
            await client.create_queue("secure")
            await client.publish("secure", [OutgoingMessage(body="over tls")])
            [message] = await client.lease("secure", wait_s=1)
            assert message.body == "over tls"
            response = await client._nodes[0].client.get("/healthz")
            assert response.http_version == "HTTP/2"

    asyncio.run(scenario())


def test_open_mode_warns_at_start(queue_server) -> None:
    assert "no QUEUE_TOKENS or QUEUE_TOKENS_FILE configured" in queue_server.log_text()


def test_tokens_file_enforces_scopes(start_queue_server, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# operators\nadmin,publish:adm\nconsume:con\n")
    server = start_queue_server(QUEUE_TOKENS_FILE=str(tokens))
    admin = {"authorization": "Bearer adm"}
    assert httpx.put(f"{server.url}/v1/queues/jobs", json={}, headers=admin).status_code == 201
    assert httpx.get(f"{server.url}/v1/queues").status_code == 401
    denied = httpx.post(f"{server.url}/v1/queues/jobs/messages", json={"messages": [{"body": 1}]}, headers={"authorization": "Bearer con"})
    assert denied.status_code == 403
    assert "no QUEUE_TOKENS" not in server.log_text()


def test_sigterm_answers_long_poll_and_exits_zero(queue_server) -> None:
    httpx.put(f"{queue_server.url}/v1/queues/jobs", json={})

    async def scenario() -> list:
        async with QueueClient(queue_server.url) as client:
            waiting = asyncio.create_task(client.lease("jobs", wait_s=15))
            await asyncio.sleep(0.5)
            os.kill(queue_server.pid, signal.SIGTERM)
            return await asyncio.wait_for(waiting, 10)

    assert asyncio.run(scenario()) == []
    assert queue_server.stop() == 0


def test_second_server_on_same_data_dir_exits(queue_server) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "queue_server", "--port", "0", "--data-dir", str(queue_server.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "locked by another queue server" in result.stderr


def test_busy_port_exits_with_error(queue_server, tmp_path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "queue_server", "--port", str(queue_server.port), "--data-dir", str(tmp_path / "other")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot serve on 127.0.0.1" in result.stderr


def test_corrupt_middle_record_stops_server(queue_server) -> None:
    from queue_server.wal.frame import HEADER_SIZE
    from queue_server.wal.log import list_segments

    httpx.put(f"{queue_server.url}/v1/queues/jobs", json={})
    httpx.post(f"{queue_server.url}/v1/queues/jobs/messages", json={"messages": [{"body": "x" * 100}]})
    assert queue_server.stop() == 0
    _, first = list_segments(queue_server.data_dir)[0]
    data = bytearray(first.read_bytes())
    data[HEADER_SIZE + 2] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="exited with 1"):
        queue_server.start()
    assert f"write-ahead log '{first}' is corrupt at byte offset 0" in queue_server.log_text()


def test_torn_tail_truncated_at_start(queue_server) -> None:
    from queue_server.wal.log import list_segments

    httpx.put(f"{queue_server.url}/v1/queues/jobs", json={})
    httpx.post(f"{queue_server.url}/v1/queues/jobs/messages", json={"messages": [{"body": 1}]})
    queue_server.kill()
    _, last = list_segments(queue_server.data_dir)[-1]
    with last.open("ab") as segment:
        segment.write(b"\x10\x00\x00\x00partial")
    queue_server.start()
    assert "truncating torn tail" in queue_server.log_text()
    stats = httpx.get(f"{queue_server.url}/v1/queues/jobs").json()["stats"]
    assert stats["ready"] == 1


def test_help_and_bad_setting_exit_codes() -> None:
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "queue_server", "--help"], capture_output=True, text=True, timeout=60)
    bad = subprocess.run(
        [sys.executable, "-m", "queue_server"], capture_output=True, text=True, timeout=60, env={**os.environ, "QUEUE_PORT": "eighty"}
    )
    assert shown.returncode == 0
    assert "QUEUE_FSYNC" in shown.stdout
    assert bad.returncode == 2
    assert "QUEUE_PORT='eighty' is invalid" in bad.stderr


def test_sigterm_with_idle_http2_connection_exits(queue_server) -> None:
    async def scenario() -> int:
        async with httpx.AsyncClient(http1=False, http2=True, base_url=queue_server.url) as client:
            response = await client.put("/v1/queues/jobs", json={})
            assert response.http_version == "HTTP/2"
            # The connection stays open and idle while the server stops.
            return await asyncio.to_thread(queue_server.stop, 15)

    assert asyncio.run(scenario()) == 0
    assert "closed them" in queue_server.log_text()
