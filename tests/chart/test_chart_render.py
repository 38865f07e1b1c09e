"""Lint the chart strictly, render it with several value sets and validate every
manifest against the Kubernetes 1.29 and 1.33 schemas in strict mode."""

from __future__ import annotations

import base64
import zlib
from collections.abc import Callable
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from chart_manifests import CHART_DIR, NAMESPACE, RELEASE, VALUE_SETS, Manifest, env_of, find, parse_manifests, pod_spec

KUBERNETES_VERSIONS = ["1.29.0", "1.33.0"]

#: Kinds from operators' CRDs, which kubernetes-validate has no schema for.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}

Render = Callable[..., list[Manifest]]


@pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_lint_strict(value_set: str, kube_version: str) -> None:
    report = helm.lint(CHART_DIR, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == []
    assert problems == []


@pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_manifests_validate_strictly(render: Render, value_set: str, kube_version: str) -> None:
    manifests = render(VALUE_SETS[value_set])
    assert manifests
    for manifest in manifests:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_KINDS:
            assert manifest["spec"], f"{name} has an empty spec"
            continue
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} is invalid for Kubernetes {kube_version}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_pods_hardened(render: Render, value_set: str) -> None:
    for workload in render(VALUE_SETS[value_set]):
        if workload["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert "resources" in container, (name, container["name"])
        for container in spec["containers"]:
            if workload["kind"] != "Job":
                assert "readinessProbe" in container, (name, container["name"])
                assert "livenessProbe" in container, (name, container["name"])


def test_queue_statefulset_defaults(render: Render) -> None:
    manifests = render()
    queue = find(manifests, "StatefulSet", "-queue")
    service = find(manifests, "Service", "-queue")
    budget = find(manifests, "PodDisruptionBudget", "-queue")
    container = pod_spec(queue)["containers"][0]

    assert service["spec"]["clusterIP"] == "None"
    assert queue["spec"]["serviceName"] == service["metadata"]["name"]
    assert queue["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["ports"][0]["containerPort"] == 8500
    assert env_of(container)["QUEUE_HOST"]["value"] == "0.0.0.0"
    assert env_of(container)["QUEUE_DATA_DIR"]["value"] == "/var/lib/telemetry-queue"
    assert {"mountPath": "/var/lib/telemetry-queue", "name": "data"} in container["volumeMounts"]
    assert budget["spec"]["maxUnavailable"] == 1


def test_queue_urls_name_every_replica(render: Render) -> None:
    manifests = render(VALUE_SETS["replicas-10"])
    streamer = pod_spec(find(manifests, "Deployment", "-streamer"))["containers"][0]
    collector = pod_spec(find(manifests, "Deployment", "-collector"))["containers"][0]
    urls = env_of(streamer)["STREAMER_QUEUE_URLS"]["value"].split(",")

    assert find(manifests, "StatefulSet", "-queue")["spec"]["replicas"] == 10
    assert len(urls) == 10
    assert urls[9] == "http://demo-gpu-telemetry-queue-9.demo-gpu-telemetry-queue.telemetry.svc:8500"
    assert env_of(collector)["COLLECTOR_QUEUE_URLS"]["value"] == ",".join(urls)


def test_generated_tokens_match_queue_tokens(render: Render) -> None:
    manifests = render()
    secret = find(manifests, "Secret", "-tokens")
    data = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    scopes_by_token = {}
    for entry in data["queue-tokens"].split(";"):
        scopes, _, token = entry.partition(":")
        scopes_by_token[token] = scopes.split(",")

    assert len(data["api-token"]) == 40
    assert scopes_by_token[data["streamer-token"]] == ["publish", "consume", "admin"]
    assert scopes_by_token[data["collector-token"]] == ["consume", "admin"]
    assert scopes_by_token[data["admin-token"]] == ["admin"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_existing_token_secret_is_used(render: Render) -> None:
    manifests = render(VALUE_SETS["everything-optional"])
    api = pod_spec(find(manifests, "Deployment", "-api"))["containers"][0]
    queue = pod_spec(find(manifests, "StatefulSet", "-queue"))["containers"][0]

    assert not [m for m in manifests if m["kind"] == "Secret" and m["metadata"]["name"].endswith("-tokens")]
    assert env_of(queue)["QUEUE_TOKENS"]["valueFrom"]["secretKeyRef"]["name"] == "telemetry-tokens"
    assert "API_TOKEN" not in env_of(api)


def test_bundled_database_migrates_with_install(render: Render) -> None:
    manifests = render()
    job = find(manifests, "Job", "-migrations-install")
    container = pod_spec(job)["containers"][0]
    collector = pod_spec(find(manifests, "Deployment", "-collector"))
    database_url = env_of(collector["containers"][0])["DATABASE_URL"]["value"]

    assert find(manifests, "StatefulSet", "-postgresql")
    assert "annotations" not in job["metadata"]
    assert [c["name"] for c in pod_spec(job)["initContainers"]] == ["wait-for-database"]
    assert container["command"] + container["args"] == ["alembic", "-c", "migrations/alembic.ini", "upgrade", "head"]
    assert container["workingDir"] == "/app"
    assert [c["name"] for c in collector["initContainers"]] == ["wait-for-schema"]
    assert database_url == (
        "postgresql://telemetry:$(POSTGRES_PASSWORD)@demo-gpu-telemetry-postgresql.telemetry.svc:5432/telemetry"
    )


def test_bundled_database_migrates_before_upgrade(chart: Any) -> None:
    manifests = parse_manifests(chart.render({}, name=RELEASE, namespace=NAMESPACE, is_upgrade=True))
    job = find(manifests, "Job", "-migrations")

    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade"
    assert [c["name"] for c in pod_spec(job)["initContainers"]] == ["wait-for-database"]


def test_external_database_migrates_before_install(render: Render) -> None:
    manifests = render(VALUE_SETS["external-database"])
    job = find(manifests, "Job", "-migrations")
    api = pod_spec(find(manifests, "Deployment", "-api"))["containers"][0]

    assert not [m for m in manifests if m["metadata"]["name"].endswith("-postgresql")]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "initContainers" not in pod_spec(job)
    assert env_of(api)["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "telemetry-database", "key": "url"}


def test_keda_replaces_collector_hpa(render: Render) -> None:
    manifests = render(VALUE_SETS["keda"])
    scaled = find(manifests, "ScaledObject", "-collector")
    auth = find(manifests, "TriggerAuthentication", "-collector")
    trigger = scaled["spec"]["triggers"][0]

    assert not [m for m in manifests if m["kind"] == "HorizontalPodAutoscaler" and "collector" in m["metadata"]["name"]]
    assert scaled["spec"]["minReplicaCount"] == 1
    assert scaled["spec"]["maxReplicaCount"] == 10
    assert trigger["type"] == "metrics-api"
    assert trigger["metadata"]["url"] == (
        "http://demo-gpu-telemetry-queue-0.demo-gpu-telemetry-queue.telemetry.svc:8500/v1/queues/telemetry"
    )
    assert trigger["metadata"]["valueLocation"] == "stats.ready"
    assert trigger["metadata"]["targetValue"] == "5000"
    assert trigger["metadata"]["authMode"] == "bearer"
    assert auth["spec"]["secretTargetRef"][0]["parameter"] == "token"


@pytest.mark.parametrize(
    ("replicas", "queue"),
    [(3, "telemetry"), (10, "telemetry"), (7, "telemetry.b"), (5, "a"), (4, "Q-9_x.y")],
)
def test_keda_trigger_reads_queue_owner(render: Render, replicas: int, queue: str) -> None:
    values = {"queue": {"replicas": replicas}, "collector": {"queue": queue, "autoscaling": {"keda": {"enabled": True}}}}
    manifests = render(values)
    triggers = find(manifests, "ScaledObject", "-collector")["spec"]["triggers"]
    owner = zlib.crc32(queue.encode()) % replicas

    assert len(triggers) == 1
    assert triggers[0]["metadata"]["url"] == (
        f"http://demo-gpu-telemetry-queue-{owner}.demo-gpu-telemetry-queue.telemetry.svc:8500/v1/queues/{queue}"
    )


def test_keda_trigger_follows_queue_urls(render: Render) -> None:
    urls = ["https://queue-a:8500", "https://queue-b:8500", "https://queue-c:8500"]
    values = {"collector": {"queueUrls": urls, "autoscaling": {"keda": {"enabled": True}}}}
    trigger = find(render(values), "ScaledObject", "-collector")["spec"]["triggers"][0]

    assert trigger["metadata"]["url"] == f"{urls[zlib.crc32(b'telemetry') % 3]}/v1/queues/telemetry"


def test_default_hpas_scale_on_cpu(render: Render) -> None:
    manifests = render()
    hpas = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "HorizontalPodAutoscaler"}

    assert sorted(hpas) == ["demo-gpu-telemetry-collector", "demo-gpu-telemetry-streamer"]
    for hpa in hpas.values():
        assert hpa["spec"]["minReplicas"] == 1
        assert hpa["spec"]["maxReplicas"] == 10
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in find(manifests, "Deployment", "-collector")["spec"]


def test_ingress_routes_to_api_service(render: Render) -> None:
    manifests = render(VALUE_SETS["ingress"])
    ingress = find(manifests, "Ingress", "-api")
    service = find(manifests, "Service", "-api")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]

    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["secretName"] == "telemetry-tls"
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}


def test_image_registry_and_tag(render: Render) -> None:
    default = pod_spec(find(render(), "StatefulSet", "-queue"))["containers"][0]
    custom = pod_spec(find(render(VALUE_SETS["everything-optional"]), "Deployment", "-api"))["containers"][0]

    assert default["image"] == "gpu-telemetry-queue:0.1.0"
    assert custom["image"] == "registry.example.com/telemetry/gpu-telemetry-api:1.2.3"


def test_notes_show_how_to_reach_api(chart: Any) -> None:
    notes = chart.render({}, name="demo", namespace=NAMESPACE, is_install=True)["gpu-telemetry/templates/NOTES.txt"]

    assert "kubectl port-forward --namespace telemetry service/demo-gpu-telemetry-api 8000:80" in notes
    assert "curl http://127.0.0.1:8000/api/v1/gpus" in notes
    assert "api-token" in notes
