"""Value sets for the chart tests, and helpers that parse and search rendered manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "gpu-telemetry"
RELEASE = "demo"
NAMESPACE = "telemetry"

Manifest = dict[str, Any]

#: Value sets every render, lint and schema test runs with.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-database": {
        "postgresql": {"enabled": False},
        "database": {"external": {"existingSecret": "telemetry-database", "key": "url"}},
    },
    "keda": {"collector": {"autoscaling": {"keda": {"enabled": True, "targetReadyPerReplica": 5000}}}},
    "replicas-10": {
        "queue": {"replicas": 10},
        "streamer": {"replicas": 10, "autoscaling": {"enabled": False}},
        "collector": {"replicas": 10, "autoscaling": {"minReplicas": 10, "maxReplicas": 10}},
        "api": {"replicas": 10, "autoscaling": {"enabled": True, "minReplicas": 10, "maxReplicas": 10}},
    },
    "ingress": {
        "api": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "60"},
                "hosts": [{"host": "telemetry.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                "tls": [{"hosts": ["telemetry.example.com"], "secretName": "telemetry-tls"}],
            }
        }
    },
    "everything-optional": {
        "auth": {"existingSecret": "telemetry-tokens", "apiTokenEnabled": False},
        "queue": {"replicas": 3, "tls": {"secretName": "queue-tls"}},
        "collector": {"autoscaling": {"keda": {"enabled": True}}},
        "api": {"autoscaling": {"enabled": True}, "service": {"type": "LoadBalancer", "port": 8080}},
        "networkPolicy": {"enabled": True, "apiIngressFrom": [{"podSelector": {"matchLabels": {"app": "gateway"}}}]},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "image": {"registry": "registry.example.com/telemetry/", "tag": "1.2.3"},
    },
}


def parse_manifests(rendered: dict[str, str]) -> list[Manifest]:
    """Parse helm's template-name-to-text mapping into manifests, NOTES.txt left out."""
    manifests: list[Manifest] = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def find(manifests: list[Manifest], kind: str, name_suffix: str) -> Manifest:
    """Return the one manifest of ``kind`` whose name ends with ``name_suffix``."""
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)]
    if len(matches) != 1:
        names = [f"{m['kind']}/{m['metadata']['name']}" for m in manifests]
        raise AssertionError(f"expected one {kind} named *{name_suffix}, found {len(matches)} in {names}")
    return matches[0]


def pod_spec(workload: Manifest) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Map a container's env variable names to their entries."""
    return {entry["name"]: entry for entry in container.get("env", [])}
