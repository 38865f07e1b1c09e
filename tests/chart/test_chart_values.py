"""Bad values are rejected at install time with a message that names them, and
every component setting reaches its environment variable."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from chart_manifests import CHART_DIR, Manifest, env_of, find, pod_spec

Render = Callable[..., list[Manifest]]

REJECTED = [
    pytest.param({"streamer": {"replicas": -1}}, "/streamer/replicas", id="negative-streamer-replicas"),
    pytest.param({"api": {"replicas": -3}}, "/api/replicas", id="negative-api-replicas"),
    pytest.param({"queue": {"replicas": 0}}, "/queue/replicas", id="zero-queue-replicas"),
    pytest.param({"collector": {"autoscaling": {"minReplicas": 0}}}, "/collector/autoscaling/minReplicas", id="zero-min-replicas"),
    pytest.param({"replicaCount": 2}, "additional properties 'replicaCount' not allowed", id="unknown-top-level-key"),
    pytest.param({"queue": {"fsyncMode": "always"}}, "additional properties 'fsyncMode' not allowed", id="unknown-nested-key"),
    pytest.param({"queue": {"fsync": "sometimes"}}, "/queue/fsync", id="bad-fsync"),
    pytest.param({"queue": {"port": 70000}}, "/queue/port", id="port-out-of-range"),
    pytest.param({"streamer": {"batchSize": 5000}}, "/streamer/batchSize", id="batch-over-queue-limit"),
    pytest.param({"collector": {"waitS": 60}}, "/collector/waitS", id="wait-over-queue-limit"),
    pytest.param({"collector": {"mode": "stream"}}, "/collector/mode", id="unknown-collector-mode"),
    pytest.param({"collector": {"maxMergeWaitS": 11}}, "/collector/maxMergeWaitS", id="merge-wait-over-limit"),
    pytest.param({"api": {"logLevel": "LOUD"}}, "/api/logLevel", id="bad-log-level"),
    pytest.param({"streamer": {"replicas": "two"}}, "/streamer/replicas", id="replicas-not-integer"),
]


@pytest.mark.parametrize(("values", "message"), REJECTED)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values, name="demo", namespace="telemetry")

    assert message in str(caught.value)


FAILED_RULES = [
    pytest.param(
        {"streamer": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
        "streamer.autoscaling.maxReplicas (2) is below streamer.autoscaling.minReplicas (5)",
        id="streamer-max-below-min",
    ),
    pytest.param(
        {"collector": {"autoscaling": {"minReplicas": 4, "maxReplicas": 3}}},
        "collector.autoscaling.maxReplicas (3) is below collector.autoscaling.minReplicas (4)",
        id="collector-max-below-min",
    ),
    pytest.param(
        {"api": {"autoscaling": {"enabled": True, "minReplicas": 10, "maxReplicas": 1}}},
        "api.autoscaling.maxReplicas (1) is below api.autoscaling.minReplicas (10)",
        id="api-max-below-min",
    ),
    pytest.param(
        {"postgresql": {"enabled": False}},
        "no database configured: set database.external.existingSecret",
        id="no-database",
    ),
    pytest.param(
        {"database": {"external": {"existingSecret": "db"}}},
        "choose one database",
        id="two-databases",
    ),
    pytest.param(
        {"collector": {"autoscaling": {"enabled": False, "keda": {"enabled": True}}}},
        "collector.autoscaling.keda.enabled=true needs collector.autoscaling.enabled=true",
        id="keda-without-autoscaling",
    ),
]


@pytest.mark.parametrize(("values", "message"), FAILED_RULES)
def test_template_rules_reject_values(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        chart.render(values, name="demo", namespace="telemetry")

    assert message in str(caught.value)


def test_bad_values_fail_lint() -> None:
    report = helm.lint(CHART_DIR, {"streamer": {"replicas": -1}}, strict=True)

    assert report["errors"] or [m for m in report["messages"] if m["severity"] >= 3]


#: Component values set to distinct, valid values, and the variables they must reach.
MAPPINGS = {
    ("StatefulSet", "-queue"): (
        {"queue": {"host": "127.0.0.2", "port": 8600, "logLevel": "DEBUG", "dataDir": "/data/q", "fsync": "interval",
                   "fsyncIntervalS": 0.05, "segmentBytes": 134217728, "minFreeBytes": 1073741824,
                   "pushAllowedNetworks": ["10.0.0.0/8", "fd00::/8"],
                   "pushAllowedHosts": ["collector.telemetry.svc", "hooks"]}},
        {"QUEUE_HOST": "127.0.0.2", "QUEUE_PORT": "8600", "QUEUE_LOG_LEVEL": "DEBUG",
         "QUEUE_DATA_DIR": "/data/q", "QUEUE_FSYNC": "interval", "QUEUE_FSYNC_INTERVAL_S": "0.05",
         "QUEUE_SEGMENT_BYTES": "134217728", "QUEUE_MIN_FREE_BYTES": "1073741824",
         "QUEUE_PUSH_ALLOWED_NETWORKS": "10.0.0.0/8,fd00::/8",
         "QUEUE_PUSH_ALLOWED_HOSTS": "collector.telemetry.svc,hooks"},
    ),
    ("Deployment", "-streamer"): (
        {"streamer": {"host": "127.0.0.3", "port": 9201, "logLevel": "WARNING", "csv": "/data/dump.csv",
                      "intervalS": 2.5, "rate": 300, "batchSize": 250, "passes": 3, "rowsPerShard": 100,
                      "controlQueue": "shards.b", "leaseTimeoutS": 30, "concurrentShards": 3, "cacheRows": 0, "queueHttp2": False,
                      "queueUrls": ["http://queue-a:8500", "http://queue-b:8500"]}},
        {"STREAMER_HOST": "127.0.0.3", "STREAMER_PORT": "9201", "STREAMER_LOG_LEVEL": "WARNING",
         "STREAMER_CSV": "/data/dump.csv", "STREAMER_INTERVAL_S": "2.5", "STREAMER_RATE": "300",
         "STREAMER_BATCH_SIZE": "250", "STREAMER_PASSES": "3", "STREAMER_ROWS_PER_SHARD": "100",
         "STREAMER_CONTROL_QUEUE": "shards.b", "STREAMER_LEASE_TIMEOUT_S": "30", "STREAMER_CONCURRENT_SHARDS": "3",
         "STREAMER_CACHE_ROWS": "0",
         "STREAMER_QUEUE_HTTP2": "false",
         "STREAMER_QUEUE_URLS": "http://queue-a:8500,http://queue-b:8500"},
    ),
    ("Deployment", "-collector"): (
        {"collector": {"host": "127.0.0.4", "port": 9202, "logLevel": "ERROR", "batchSize": 500,
                       "maxTransactionRows": 2000, "maxMergeWaitS": 0.5, "waitS": 5, "visibilityTimeoutS": 120, "stopTimeoutS": 15, "queue": "telemetry.b",
                       "queueHttp2": False, "queueUrls": ["http://queue-c:8500"]}},
        {"COLLECTOR_HOST": "127.0.0.4", "COLLECTOR_PORT": "9202", "COLLECTOR_LOG_LEVEL": "ERROR",
         "COLLECTOR_BATCH_SIZE": "500", "COLLECTOR_MAX_TRANSACTION_ROWS": "2000", "COLLECTOR_MAX_MERGE_WAIT_S": "0.5",
         "COLLECTOR_WAIT_S": "5", "COLLECTOR_VISIBILITY_TIMEOUT_S": "120",
         "COLLECTOR_STOP_TIMEOUT_S": "15", "COLLECTOR_QUEUE": "telemetry.b", "COLLECTOR_QUEUE_HTTP2": "false",
         "COLLECTOR_QUEUE_URLS": "http://queue-c:8500"},
    ),
    ("Deployment", "-api"): (
        {"api": {"host": "127.0.0.5", "port": 8080, "logLevel": "ERROR", "workers": 4, "threads": 2}},
        {"API_HOST": "127.0.0.5", "API_PORT": "8080", "API_LOG_LEVEL": "ERROR", "API_WORKERS": "4", "API_THREADS": "2"},
    ),
}


@pytest.mark.parametrize("workload", list(MAPPINGS), ids=lambda workload: workload[1].lstrip("-"))
def test_values_reach_environment(render: Render, workload: tuple[str, str]) -> None:
    values, expected = MAPPINGS[workload]
    container = pod_spec(find(render(values), *workload))["containers"][0]
    env = env_of(container)

    for name, value in expected.items():
        assert env[name].get("value") == value, name
    assert container["ports"][0]["containerPort"] == int(expected[next(k for k in expected if k.endswith("_PORT"))])


# The components' help names each option's variable in brackets or parentheses,
# "[STREAMER_RATE, default 0.0]" or "(QUEUE_HOST, default 127.0.0.1)".
HELP_VARIABLE = re.compile(r"[\[(]((?:QUEUE|STREAMER|COLLECTOR|API)_[A-Z0-9_]*[A-Z0-9]|DATABASE_URL)\b")

#: Variables the chart leaves out on purpose: the queue reads its tokens from
#: QUEUE_TOKENS, never from a file.
NOT_SET_BY_CHART = {"QUEUE_TOKENS_FILE"}

WORKLOADS_BY_SCRIPT = {
    "telemetry-queue": ("StatefulSet", "-queue"),
    "telemetry-streamer": ("Deployment", "-streamer"),
    "telemetry-collector": ("Deployment", "-collector"),
    "telemetry-api": ("Deployment", "-api"),
}


@pytest.mark.parametrize("script", list(WORKLOADS_BY_SCRIPT))
def test_chart_sets_every_documented_variable(render: Render, script: str) -> None:
    program = Path(sys.executable).parent / script
    if not program.exists():
        pytest.skip(f"{script} is not installed")
    help_text = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    documented = set(HELP_VARIABLE.findall(help_text)) - NOT_SET_BY_CHART
    values = {"queue": {"tls": {"secretName": "queue-tls"}}, "streamer": {"csv": "/data/dump.csv"}}
    container = pod_spec(find(render(values), *WORKLOADS_BY_SCRIPT[script]))["containers"][0]

    assert documented
    assert sorted(documented - set(env_of(container))) == []
