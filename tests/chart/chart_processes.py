"""Run the containers of rendered chart manifests as local processes.

A container becomes a process with the same command, arguments and environment,
after these substitutions, which stand in for what Kubernetes and the image do:

- the command's program is looked up in the virtual environment's bin folder,
  where the project's console scripts live (the image puts the same scripts on
  PATH), and run with this interpreter, under coverage when the test run measures it;
- ``secretKeyRef`` values are read from the rendered Secrets or from test-provided
  ones, and ``$(VAR)`` references are expanded as the kubelet expands them;
- ``*_HOST`` binds to 127.0.0.1 instead of 0.0.0.0 and every container port gets a
  free loopback port, which also replaces the matching ``*_PORT`` value;
- Service DNS names (``<name>.<namespace>.svc:<port>``) are mapped to those loopback ports;
- each volume mount becomes a folder under the test's temporary folder (ConfigMap
  volumes are filled with the ConfigMap's files), and paths under a mount point
  in the environment and arguments are rewritten to that folder;
- ``workingDir: /app``, the installed project in the image, is the repository root.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chart_manifests import Manifest

REPOSITORY = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent
IMAGE_WORKDIR = "/app"

_SERVICE_ADDRESS = re.compile(r"(?P<host>[a-z0-9][a-z0-9.-]*\.svc):(?P<port>[0-9]+)")
_VARIABLE_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def secrets_of(manifests: list[Manifest]) -> dict[str, dict[str, str]]:
    """Decode the data of every rendered Secret, by Secret name."""
    return {
        m["metadata"]["name"]: {key: base64.b64decode(value).decode() for key, value in m.get("data", {}).items()}
        for m in manifests
        if m["kind"] == "Secret"
    }


def config_maps_of(manifests: list[Manifest]) -> dict[str, dict[str, str]]:
    return {m["metadata"]["name"]: m.get("data", {}) for m in manifests if m["kind"] == "ConfigMap"}


@dataclass
class Cluster:
    """The stand-in for a namespace: Secrets, ConfigMaps and Service addresses."""

    secrets: dict[str, dict[str, str]]
    config_maps: dict[str, dict[str, str]]
    root: Path
    #: ``host:port`` of a Service or pod DNS name to the loopback ``host:port`` serving it.
    addresses: dict[str, str] = field(default_factory=dict)

    def map_addresses(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            address = match.group(0)
            if address not in self.addresses:
                raise AssertionError(f"{address!r} names no process started by the test. Known: {sorted(self.addresses)}")
            return self.addresses[address]

        return _SERVICE_ADDRESS.sub(replace, text)


@dataclass
class LocalContainer:
    """One container of a pod, prepared to run on this machine."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    #: Container port name or number to the loopback port that replaces it.
    ports: dict[str, int]
    readiness_path: str | None
    liveness_path: str | None
    readiness_port: int | None
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def run(self, timeout: float) -> subprocess.CompletedProcess[bytes]:
        """Run to completion, as an init container or a Job's container."""
        with self.log_path.open("ab") as log:
            return subprocess.run(
                self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def url(self, path: str) -> str:
        assert self.readiness_port is not None
        return f"http://127.0.0.1:{self.readiness_port}{path}"

    def wait_ready(self, timeout: float) -> None:
        """Poll the readiness probe's path until it returns 200, at most ``timeout`` seconds."""
        assert self.readiness_path is not None, f"{self.name} has no HTTP readiness probe"
        deadline = time.monotonic() + timeout
        status = "no response"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status = str(httpx.get(self.url(self.readiness_path), timeout=2.0).status_code)
            except httpx.TransportError as exc:
                status = type(exc).__name__
            if status == "200":
                return
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready at {self.readiness_path} after {timeout} s ({status}):\n{self.log_tail()}")

    def stop(self, timeout: float) -> int | None:
        """Send SIGTERM and wait. Return the exit status, or None if the process had to be killed."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no output)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def localize(container: dict[str, Any], pod: dict[str, Any], instance: str, cluster: Cluster) -> LocalContainer:
    """Turn a rendered container of ``pod`` into a :class:`LocalContainer` named ``instance``."""
    work = cluster.root / instance
    work.mkdir(parents=True, exist_ok=True)
    mounts = _mount_folders(container, pod, work / "volumes", cluster)

    def rewrite(text: str) -> str:
        for mount_path, folder in sorted(mounts.items(), key=lambda item: -len(item[0])):
            if text == mount_path or text.startswith(mount_path + "/"):
                return str(folder) + text[len(mount_path):]
        return cluster.map_addresses(text)

    ports: dict[str, int] = {}
    for port in container.get("ports", []):
        local = free_port()
        ports[port["name"]] = local
        ports[str(port["containerPort"])] = local

    env = _resolve_env(container, cluster)
    for name in list(env):
        if name.endswith("_HOST") and env[name] == "0.0.0.0":
            env[name] = "127.0.0.1"
        elif name.endswith("_PORT") and env[name] in ports:
            env[name] = str(ports[env[name]])
        else:
            env[name] = rewrite(env[name])
    if "/tmp" in mounts:
        env["TMPDIR"] = str(mounts["/tmp"])
    # Only what a container also has: the chart must provide every setting.
    base_env = {key: os.environ[key] for key in ("PATH", "LANG", "HOME") if key in os.environ}

    command = list(container.get("command", []))
    assert command, f"{instance}: the chart must set the command, so the entry point is explicit"
    arguments = [rewrite(_expand(arg, env)) for arg in command[1:] + container.get("args", [])]
    if command[0] == "python":
        argv = [sys.executable, *arguments]
    else:
        script = BIN_DIR / command[0]
        assert script.exists(), f"{instance}: {command[0]!r} is not installed in {BIN_DIR}"
        argv = [sys.executable, str(script), *arguments]
    if _coverage_active():
        # Each process writes its own data file, which the test run combines.
        argv[1:1] = ["-m", "coverage", "run", "--parallel-mode"]

    working_dir = container.get("workingDir")
    assert working_dir in (None, IMAGE_WORKDIR), f"{instance}: unexpected workingDir {working_dir!r}"

    readiness = container.get("readinessProbe", {}).get("httpGet")
    liveness = container.get("livenessProbe", {}).get("httpGet")
    readiness_port = ports[str(readiness["port"])] if readiness else None
    return LocalContainer(
        name=instance,
        argv=argv,
        env={**base_env, **env},
        cwd=REPOSITORY,
        ports=ports,
        readiness_path=readiness["path"] if readiness else None,
        liveness_path=liveness["path"] if liveness else None,
        readiness_port=readiness_port,
        log_path=cluster.root / f"{instance}.log",
    )


def _coverage_active() -> bool:
    try:
        import coverage
    except ImportError:
        return False
    return coverage.Coverage.current() is not None


def _expand(text: str, env: dict[str, str]) -> str:
    return _VARIABLE_REFERENCE.sub(lambda match: env.get(match.group(1), match.group(0)), text)


def _resolve_env(container: dict[str, Any], cluster: Cluster) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = _expand(str(entry["value"]), env)
            continue
        reference = entry["valueFrom"]["secretKeyRef"]
        secret = cluster.secrets.get(reference["name"])
        assert secret is not None, f"Secret {reference['name']!r} is neither rendered nor provided"
        assert reference["key"] in secret, f"Secret {reference['name']!r} has no key {reference['key']!r}"
        env[entry["name"]] = secret[reference["key"]]
    return env


def _mount_folders(container: dict[str, Any], pod: dict[str, Any], root: Path, cluster: Cluster) -> dict[str, Path]:
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        folder = root / mount["name"]
        folder.mkdir(parents=True, exist_ok=True)
        volume = volumes.get(mount["name"], {})
        if "configMap" in volume:
            for file_name, content in cluster.config_maps[volume["configMap"]["name"]].items():
                (folder / file_name).write_text(content)
        mounts[mount["mountPath"]] = folder
    return mounts
