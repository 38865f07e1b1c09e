"""Run the chart's rendered workloads as local processes and check that they work
together: the migration completes, every readiness probe passes, and telemetry
streamed through the queue reaches the API.

This proves that the chart and the components agree on commands, ports, probe
paths and environment variables. See chart_processes.py for how a container
becomes a local process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from chart_manifests import NAMESPACE, Manifest, find, pod_spec
from chart_processes import REPOSITORY, Cluster, LocalContainer, config_maps_of, localize, secrets_of

Render = Callable[..., list[Manifest]]

QUEUE_REPLICAS = 3
READY_TIMEOUT_S = 60.0
DATA_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 40.0

#: Modules behind the components' console scripts. The test skips while one is missing.
COMPONENT_MODULES = {
    "queue": "queue_server.__main__",
    "streamer": "streamer.__main__",
    "collector": "collector.__main__",
    "api": "api.__main__",
}


def missing_components() -> list[str]:
    missing = [name for name, module in COMPONENT_MODULES.items() if importlib.util.find_spec(module) is None]
    if not list((REPOSITORY / "migrations" / "versions").glob("*.py")):
        missing.append("migrations (no revision in migrations/versions)")
    return missing


def chart_values(database: str, database_url: str) -> dict[str, Any]:
    """Chart values for a run against ``database_url`` with small, fast settings."""
    values: dict[str, Any] = {
        "queue": {"replicas": QUEUE_REPLICAS, "fsync": "never"},
        "streamer": {"intervalS": 0.5, "batchSize": 200},
        "collector": {"waitS": 1, "batchSize": 500, "autoscaling": {"keda": {"enabled": True}}},
        "migrations": {"schemaWaitTimeoutS": 60},
    }
    if database == "postgresql":
        # The chart assembles the bundled PostgreSQL's DATABASE_URL, so the values
        # point it at the test server's user, port and database.
        url = urlsplit(database_url)
        values["postgresql"] = {"username": url.username, "port": url.port, "database": url.path.lstrip("/")}
    else:
        values["postgresql"] = {"enabled": False}
        values["database"] = {"external": {"existingSecret": "external-database", "key": "DATABASE_URL"}}
    return values


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The database mode of the chart and the URL of an empty test database."""
    missing = missing_components()
    if missing:
        pytest.skip(f"components not available yet: {', '.join(missing)}")
    fixture = "postgres_url" if request.param == "postgresql" else "sqlite_url"
    return request.param, request.getfixturevalue(fixture)


@pytest.fixture
def started() -> Iterator[list[LocalContainer]]:
    """Processes started by the test, stopped in reverse order by PID at the end."""
    processes: list[LocalContainer] = []
    yield processes
    for container in reversed(processes):
        container.stop(timeout=STOP_TIMEOUT_S)


def run_to_completion(container: LocalContainer, timeout: float = 120.0) -> None:
    result = container.run(timeout=timeout)
    assert result.returncode == 0, f"{container.name} exited with {result.returncode}:\n{container.log_tail()}"


@pytest.mark.slow
def test_rendered_workloads_deliver_telemetry(
    render: Render, database: tuple[str, str], tmp_path: Path, started: list[LocalContainer]
) -> None:
    mode, database_url = database
    manifests = render(chart_values(mode, database_url))
    cluster = Cluster(secrets=secrets_of(manifests), config_maps=config_maps_of(manifests), root=tmp_path)
    cluster.secrets["external-database"] = {"DATABASE_URL": database_url}
    if mode == "postgresql":
        # The bundled PostgreSQL's Service stands for the test server.
        url = urlsplit(database_url)
        postgresql = find(manifests, "Service", "-postgresql")["metadata"]["name"]
        cluster.addresses[f"{postgresql}.{NAMESPACE}.svc:{url.port}"] = f"127.0.0.1:{url.port}"

    # Queue replicas, each with its own port and data folder, under their per-pod DNS names.
    queue_set = find(manifests, "StatefulSet", "-queue")
    queue_pod = pod_spec(queue_set)
    service = find(manifests, "Service", "-queue")["metadata"]["name"]
    queues = []
    for index in range(queue_set["spec"]["replicas"]):
        container = localize(queue_pod["containers"][0], queue_pod, f"queue-{index}", cluster)
        container_port = queue_pod["containers"][0]["ports"][0]["containerPort"]
        cluster.addresses[f"{service}-{index}.{service}.{NAMESPACE}.svc:{container_port}"] = (
            f"127.0.0.1:{container.ports['http']}"
        )
        queues.append(container)
    for container in queues:
        container.start()
        started.append(container)
    for container in queues:
        container.wait_ready(READY_TIMEOUT_S)
        assert container.liveness_path is not None
        assert httpx.get(container.url(container.liveness_path), timeout=5.0).status_code == 200

    # The migration Job: its init containers, then alembic upgrade head.
    [job] = [manifest for manifest in manifests if manifest["kind"] == "Job"]
    job_pod = pod_spec(job)
    for init in job_pod.get("initContainers", []):
        run_to_completion(localize(init, job_pod, f"migrations-{init['name']}", cluster))
    run_to_completion(localize(job_pod["containers"][0], job_pod, "migrations", cluster))

    # Collector, API and streamer: init containers (waiting for the schema) first.
    workers = []
    for suffix in ("-collector", "-api", "-streamer"):
        pod = pod_spec(find(manifests, "Deployment", suffix))
        for init in pod.get("initContainers", []):
            run_to_completion(localize(init, pod, f"{suffix[1:]}-{init['name']}", cluster), timeout=90.0)
        workers.append(localize(pod["containers"][0], pod, suffix[1:], cluster))
    for container in workers:
        container.start()
        started.append(container)
    for container in workers:
        container.wait_ready(READY_TIMEOUT_S)
        assert container.liveness_path is not None
        assert httpx.get(container.url(container.liveness_path), timeout=5.0).status_code == 200

    # Telemetry reaches the API, which requires the generated bearer token.
    api = workers[1]
    gpus_url = api.url("/api/v1/gpus")
    assert httpx.get(gpus_url, timeout=5.0).status_code == 401
    headers = {"Authorization": f"Bearer {api.env['API_TOKEN']}"}
    body = poll_gpus(gpus_url, headers, api, workers[0])
    assert body["count"] > 0
    assert body["items"][0]["metric_names"]

    # Streamer and collector agree on the queue replica that contains each queue:
    # the one at crc32(name) % replicas in their identical URL lists.
    collector_queue = workers[0].env["COLLECTOR_QUEUE"]
    control_queue = workers[2].env["STREAMER_CONTROL_QUEUE"]
    token = workers[0].env["COLLECTOR_QUEUE_TOKEN"]
    assert workers[0].env["COLLECTOR_QUEUE_URLS"] == workers[2].env["STREAMER_QUEUE_URLS"]
    owner = queues[zlib.crc32(collector_queue.encode()) % len(queues)]
    stats = poll_queue_stats(owner, collector_queue, token)
    assert stats["published_total"] > 0, owner.name
    assert stats["acked_total"] > 0, owner.name
    for container in queues:
        names = queue_names(container, token)
        assert (collector_queue in names) == (container is owner), (container.name, names)
        control_owner = container is queues[zlib.crc32(control_queue.encode()) % len(queues)]
        assert (control_queue in names) == control_owner, (container.name, names)

    # KEDA's trigger reads a number at its valueLocation, with the token its
    # TriggerAuthentication names.
    trigger = find(manifests, "ScaledObject", "-collector")["spec"]["triggers"][0]
    reference = find(manifests, "TriggerAuthentication", "-collector")["spec"]["secretTargetRef"][0]
    trigger_token = cluster.secrets[reference["name"]][reference["key"]]
    response = httpx.get(
        cluster.map_addresses(trigger["metadata"]["url"]),
        headers={"Authorization": f"Bearer {trigger_token}"},
        timeout=5.0,
    )
    assert response.status_code == 200, response.text
    assert trigger["metadata"]["valueLocation"] == "stats.ready"
    assert isinstance(response.json()["stats"]["ready"], int)

    # Every long-running component exits 0 on SIGTERM.
    for container in reversed(started):
        assert container.stop(timeout=STOP_TIMEOUT_S) == 0, f"{container.name} did not stop cleanly:\n{container.log_tail()}"


def poll_gpus(url: str, headers: dict[str, str], api: LocalContainer, collector: LocalContainer) -> dict[str, Any]:
    """GET the GPU list until it is non-empty, for at most DATA_TIMEOUT_S seconds."""
    deadline = time.monotonic() + DATA_TIMEOUT_S
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(url, headers=headers, timeout=5.0)
        assert response.status_code == 200, response.text
        body = response.json()
        if body.get("items"):
            return body
        time.sleep(0.5)
    raise AssertionError(
        f"no GPU reached the API in {DATA_TIMEOUT_S} s: {body}\n"
        f"collector log:\n{collector.log_tail()}\napi log:\n{api.log_tail()}"
    )


def queue_names(queue: LocalContainer, token: str) -> set[str]:
    response = httpx.get(queue.url("/v1/queues"), headers={"Authorization": f"Bearer {token}"}, timeout=5.0)
    assert response.status_code == 200, f"{queue.name}: {response.status_code} {response.text}"
    return {entry["name"] for entry in response.json()["queues"]}


def poll_queue_stats(queue: LocalContainer, name: str, token: str) -> dict[str, Any]:
    """GET the queue's stats until it has acked a message, for at most DATA_TIMEOUT_S seconds."""
    deadline = time.monotonic() + DATA_TIMEOUT_S
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(queue.url(f"/v1/queues/{name}"), headers={"Authorization": f"Bearer {token}"}, timeout=5.0)
        assert response.status_code == 200, f"{queue.name}: {response.status_code} {response.text}"
        stats = response.json()["stats"]
        if stats["acked_total"] > 0:
            return stats
        time.sleep(0.5)
    return stats


def test_schema_wait_times_out_before_migration(tmp_path: Path, sqlite_url: str) -> None:
    missing = missing_components()
    if missing:
        pytest.skip(f"components not available yet: {', '.join(missing)}")
    script = REPOSITORY / "charts" / "gpu-telemetry" / "files" / "wait_for_schema.py"
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": sqlite_url}

    result = subprocess.run(
        [sys.executable, str(script), "--timeout", "1", "--interval", "0.2"],
        cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=60, check=False,
    )

    assert result.returncode == 1
    assert "timed out after 1 s" in result.stderr
    assert "schema at [], waiting for" in result.stderr
