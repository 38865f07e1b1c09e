"""collector.mode=push: collectors serve the webhook behind their Service and register it."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest

from chart_manifests import CHART_DIR, NAMESPACE, Manifest, env_of, find, pod_spec
from queue_server.push.guard import EndpointGuard, EndpointRejected, StaticResolver
from queue_server.settings import load_settings
from telemetry.webhooks import secret_key

Render = Callable[..., list[Manifest]]

PUSH = {
    "collector": {"mode": "push", "push": {"subscription": "db-writers", "maxConcurrency": 8, "timeoutS": 15}},
    "networkPolicy": {"enabled": True},
}


def test_push_mode_wires_webhook_service_and_secret(render: Render) -> None:
    manifests = render(PUSH)
    deployment = find(manifests, "Deployment", "-collector")
    service = find(manifests, "Service", "-collector")
    [container] = pod_spec(deployment)["containers"]
    env = env_of(container)

    assert env["COLLECTOR_MODE"]["value"] == "push"
    port = service["spec"]["ports"][0]["port"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    expected_url = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}/webhook"
    assert env["COLLECTOR_REGISTER_URL"]["value"] == expected_url
    assert env["COLLECTOR_SUBSCRIPTION"]["value"] == "db-writers"
    assert env["COLLECTOR_PUSH_MAX_CONCURRENCY"]["value"] == "8"
    assert env["COLLECTOR_PUSH_TIMEOUT_S"]["value"] == "15"

    secret_ref = env["COLLECTOR_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]
    secret = find(manifests, "Secret", secret_ref["name"])
    webhook_secret = base64.b64decode(secret["data"][secret_ref["key"]]).decode()
    assert len(secret_key(webhook_secret)) == 32

    queue = find(manifests, "StatefulSet", "-queue")
    queue_env = env_of(pod_spec(queue)["containers"][0])
    assert queue_env["QUEUE_PUSH_ALLOWED_NETWORKS"]["value"] == ""
    assert queue_env["QUEUE_PUSH_ALLOWED_HOSTS"]["value"] == f"{service['metadata']['name']}.{NAMESPACE}.svc"

    policy = find(manifests, "NetworkPolicy", "-collector-webhook")
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "queue"


def test_pull_mode_has_no_push_settings(render: Render) -> None:
    manifests = render({})
    env = env_of(pod_spec(find(manifests, "Deployment", "-collector"))["containers"][0])
    assert env["COLLECTOR_MODE"]["value"] == "pull"
    assert env["COLLECTOR_REGISTER_URL"]["value"] == ""
    assert "COLLECTOR_WEBHOOK_SECRET" not in env
    assert not [m for m in manifests if m["metadata"]["name"].endswith("-collector-webhook")]


def test_push_mode_queue_accepts_registered_url(render: Render) -> None:
    manifests = render({**PUSH, "queue": {"pushAllowedHosts": ["hooks.example.internal"]}})
    collector_env = env_of(pod_spec(find(manifests, "Deployment", "-collector"))["containers"][0])
    queue_env = env_of(pod_spec(find(manifests, "StatefulSet", "-queue"))["containers"][0])
    register_url = collector_env["COLLECTOR_REGISTER_URL"]["value"]
    service_host = urlsplit(register_url).hostname
    settings = load_settings(
        [], {name: entry["value"] for name, entry in queue_env.items() if name.startswith("QUEUE_PUSH_")}
    )
    # The Service name resolves to a ClusterIP, a private address, as in a cluster.
    resolver = StaticResolver({service_host: ["10.96.12.34"], "other.test": ["10.96.12.35"]})
    guard = EndpointGuard(
        allowed_networks=settings.push_allowed_networks, allowed_hosts=settings.push_allowed_hosts, resolver=resolver
    )

    pinned = asyncio.run(guard.pin(register_url))

    assert str(pinned.address) == "10.96.12.34"
    assert "hooks.example.internal" in settings.push_allowed_hosts
    with pytest.raises(EndpointRejected):
        asyncio.run(guard.pin("http://other.test/webhook"))


def test_push_manifests_lint_and_validate(render: Render) -> None:
    report = helm.lint(CHART_DIR, PUSH, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    for manifest in render(PUSH):
        if manifest["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            continue
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)
