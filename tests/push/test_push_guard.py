"""The SSRF guard, through the resolver seam: rejected addresses never receive a request.

Host names resolve through ``StaticResolver`` tables, and the sender's
transport records any request instead of sending it, so no test here opens a
connection to the addresses it checks.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from queue_server.auth import Tokens
from queue_server.http.app import create_app
from queue_server.push.guard import (
    EndpointGuard,
    EndpointRejected,
    ResolutionFailed,
    StaticResolver,
    parse_networks,
)
from queue_server.push.service import PushService
from queue_server.service import QueueService, ServiceOptions
from queue_server.settings import SettingsError, load_settings

TABLE = {
    "metadata-alias.test": ["169.254.169.254"],
    "link-local.test": ["169.254.10.20"],
    "link-local6.test": ["fe80::1"],
    "aws-metadata6.test": ["fd00:ec2::254"],
    "loopback.test": ["127.0.0.1"],
    "private.test": ["10.1.2.3"],
    "private6.test": ["fd12:3456::1"],
    "cgnat.test": ["100.64.0.5"],
    "public.test": ["8.8.8.8"],
    "mixed.test": ["8.8.8.8", "10.1.2.3"],
    "mapped.test": ["::ffff:169.254.169.254"],
    "cluster.test": ["10.96.0.15"],
}


def guard(*allowed: str) -> tuple[EndpointGuard, StaticResolver]:
    resolver = StaticResolver(TABLE)
    return EndpointGuard(allowed_networks=parse_networks(allowed), resolver=resolver), resolver


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("http://metadata-alias.test/", "cloud metadata"),
        ("http://[fd00:ec2::254]/", "cloud metadata"),
        ("http://aws-metadata6.test/", "cloud metadata"),
        ("http://100.100.100.200/", "cloud metadata"),
        ("http://link-local.test/", "link-local"),
        ("http://link-local6.test/", "link-local"),
        ("http://mapped.test/", "cloud metadata"),
        ("http://0.0.0.0:8080/", "unspecified"),
    ],
    ids=["aws-ip", "aws-by-name", "aws-ipv6", "aws-ipv6-by-name", "alibaba", "link-local", "link-local-ipv6", "ipv4-mapped", "unspecified"],
)
def test_always_rejected_even_when_allowlisted(url: str, fragment: str) -> None:
    checker, _ = guard("0.0.0.0/0", "::/0")
    with pytest.raises(EndpointRejected, match=fragment):
        asyncio.run(checker.pin(url))


@pytest.mark.parametrize(
    "host",
    ["metadata.google.internal", "METADATA.GOOGLE.INTERNAL.", "metadata", "instance-data.ec2.internal"],
)
def test_metadata_host_names_rejected_before_lookup(host: str) -> None:
    checker, resolver = guard("0.0.0.0/0")
    with pytest.raises(EndpointRejected, match="cloud metadata"):
        asyncio.run(checker.pin(f"http://{host}/computeMetadata/v1/"))
    assert resolver.lookups == []


@pytest.mark.parametrize(
    "url",
    [
        "http://loopback.test/",
        "http://127.0.0.1:9000/",
        "http://[::1]/",
        "http://private.test/",
        "http://private6.test/",
        "http://cgnat.test/",
        "http://mixed.test/",
    ],
    ids=["loopback-name", "loopback-ip", "loopback-ipv6", "private", "private-ipv6", "cgnat", "mixed-public-private"],
)
def test_non_global_rejected_without_allowlist(url: str) -> None:
    checker, _ = guard()
    with pytest.raises(EndpointRejected, match="QUEUE_PUSH_ALLOWED_NETWORKS"):
        asyncio.run(checker.pin(url))


def test_rejection_names_the_address() -> None:
    checker, _ = guard()
    with pytest.raises(EndpointRejected, match=r"'10\.1\.2\.3' \(resolved from 'private\.test'\)"):
        asyncio.run(checker.pin("http://private.test/hook"))


def test_allowlisted_private_network_is_pinned() -> None:
    checker, _ = guard("10.96.0.0/12")
    pinned = asyncio.run(checker.pin("http://cluster.test:9102/webhook?x=1"))
    assert pinned.address == ipaddress.ip_address("10.96.0.15")
    assert pinned.connect_url == "http://10.96.0.15:9102/webhook?x=1"
    assert pinned.host_header == "cluster.test:9102"
    with pytest.raises(EndpointRejected):
        asyncio.run(checker.pin("http://private.test/"))


def test_allowlisted_host_name_is_pinned() -> None:
    resolver = StaticResolver(TABLE)
    checker = EndpointGuard(allowed_hosts=["Cluster.Test."], resolver=resolver)

    pinned = asyncio.run(checker.pin("http://cluster.test:9102/webhook"))

    assert pinned.address == ipaddress.ip_address("10.96.0.15")
    with pytest.raises(EndpointRejected, match="QUEUE_PUSH_ALLOWED_HOSTS"):
        asyncio.run(checker.pin("http://private.test/"))
    with pytest.raises(EndpointRejected, match="QUEUE_PUSH_ALLOWED_HOSTS"):
        asyncio.run(checker.pin("http://10.96.0.15:9102/webhook"))


def test_allowlisted_host_name_keeps_metadata_rejected() -> None:
    resolver = StaticResolver(TABLE)
    checker = EndpointGuard(allowed_hosts=["metadata-alias.test", "link-local.test"], resolver=resolver)

    with pytest.raises(EndpointRejected, match="cloud metadata"):
        asyncio.run(checker.pin("http://metadata-alias.test/"))
    with pytest.raises(EndpointRejected, match="link-local"):
        asyncio.run(checker.pin("http://link-local.test/"))


def test_public_address_allowed() -> None:
    checker, _ = guard()
    pinned = asyncio.run(checker.pin("https://public.test/hook"))
    assert str(pinned.address) == "8.8.8.8"
    assert pinned.port == 443
    assert pinned.host_header == "public.test"


def test_unknown_name_fails_resolution() -> None:
    checker, _ = guard()
    with pytest.raises(ResolutionFailed, match="nowhere.test"):
        asyncio.run(checker.pin("http://nowhere.test/"))


def test_parse_networks_names_bad_entry() -> None:
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        parse_networks(["10.0.0.0/8", "10.0.0.0/33"])


# Through the API: a rejected endpoint is a 400 at subscription time.


class RecordingTransport(httpx.AsyncBaseTransport):
    """Fails every request and remembers it, so a test can assert that none was made."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        raise httpx.ConnectError("the test transport sends nothing", request=request)


@asynccontextmanager
async def api(data_dir: Path, *allowed: str) -> AsyncIterator[tuple[httpx.AsyncClient, RecordingTransport]]:
    service = QueueService(ServiceOptions(data_dir=data_dir, min_free_bytes=0))
    transport = RecordingTransport()
    checker, _ = guard(*allowed)
    push = PushService(service, guard=checker, transport=transport, wait_s=0.05)
    app = create_app(service, Tokens({}), manage_service=True, push=push)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://queue.test") as client:
            response = await client.put("/v1/queues/jobs", json={})
            assert response.status_code == 201
            yield client, transport


@pytest.mark.parametrize(
    ("endpoint", "address"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://metadata-alias.test/", "169.254.169.254"),
        ("http://link-local6.test/", "fe80::1"),
        ("http://private.test/", "10.1.2.3"),
        ("http://loopback.test:9102/webhook", "127.0.0.1"),
    ],
    ids=["metadata-ip", "metadata-name", "link-local-ipv6", "private", "loopback"],
)
def test_put_rejected_endpoint_is_400(tmp_path: Path, endpoint: str, address: str) -> None:
    async def scenario() -> None:
        async with api(tmp_path) as (client, transport):
            response = await client.put("/v1/queues/jobs/subscriptions/hook", json={"endpoint": endpoint})
            assert response.status_code == 400
            assert response.headers["content-type"] == "application/problem+json"
            assert repr(address) in response.json()["detail"]
            listed = await client.get("/v1/queues/jobs/subscriptions")
            assert listed.json() == {"subscriptions": []}
            assert transport.requests == []

    asyncio.run(scenario())


def test_put_allowlisted_private_endpoint_is_accepted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with api(tmp_path, "10.96.0.0/12") as (client, transport):
            response = await client.put(
                "/v1/queues/jobs/subscriptions/hook", json={"endpoint": "http://cluster.test:9102/webhook"}
            )
            assert response.status_code == 201, response.text
            assert response.json()["endpoint"] == "http://cluster.test:9102/webhook"

    asyncio.run(scenario())


def test_settings_read_allowed_hosts() -> None:
    settings = load_settings([], {"QUEUE_PUSH_ALLOWED_HOSTS": "Collector.Telemetry.svc., hooks.internal"})

    assert settings.push_allowed_hosts == ("collector.telemetry.svc", "hooks.internal")


@pytest.mark.parametrize("entry", ["http://collector.svc", "collector.svc:9102", "collector.svc/webhook"])
def test_settings_reject_host_with_scheme_port_or_path(entry: str) -> None:
    with pytest.raises(SettingsError, match="QUEUE_PUSH_ALLOWED_HOSTS"):
        load_settings([], {"QUEUE_PUSH_ALLOWED_HOSTS": entry})
