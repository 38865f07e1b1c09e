"""Run the README's "Processes on a host" commands: install into a new virtual
environment, migrate a PostgreSQL database, start the queue.

Paths and the database URL of the README are replaced with a temporary folder
and a fresh database on the test PostgreSQL server. The queue, which the README
runs in the foreground, is started in the background on a free loopback port and
stopped with SIGTERM once it is ready.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from telemetry.database import make_engine, missing_tables

ROOT = Path(__file__).resolve().parents[2]
README_DATABASE_URL = "postgresql://telemetry@db.example/telemetry"

pytestmark = pytest.mark.slow


def host_install_commands() -> list[str]:
    """Return the commands of the README block that installs into /opt/telemetry, continuations joined."""
    readme = (ROOT / "README.md").read_text()
    block = next(
        body for body in re.findall(r"```sh\n(.*?)```", readme, re.S) if "python3 -m venv /opt/telemetry" in body
    )
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        text = line.strip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        if pending + text:
            commands.append(pending + text)
        pending = ""
    return commands


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_readme_host_install(tmp_path: Path, postgres_url: str) -> None:
    commands = host_install_commands()
    assert [command.split()[0] for command in commands] == [
        "python3",
        "/opt/telemetry/bin/pip",
        "DATABASE_URL=postgresql://telemetry@db.example/telemetry",
        "QUEUE_DATA_DIR=/var/lib/telemetry-queue",
    ]
    replaced = [
        command.replace("/opt/telemetry", str(tmp_path / "venv"))
        .replace("/var/lib/telemetry-queue", str(tmp_path / "queue"))
        .replace(README_DATABASE_URL, postgres_url)
        for command in commands
    ]
    *setup, start_queue = replaced

    for command in setup:
        result = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"

    engine = make_engine(postgres_url)
    try:
        with engine.connect() as connection:
            assert missing_tables(connection) == []
    finally:
        engine.dispose()

    port = free_port()
    environment = {**os.environ, "QUEUE_HOST": "127.0.0.1", "QUEUE_PORT": str(port)}
    words = shlex.split(start_queue)
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        environment[name] = value
    queue = subprocess.Popen(
        words,
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        ready = False
        while not ready and time.monotonic() < deadline:
            assert queue.poll() is None, "the installed telemetry-queue exited at start"
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready, "the installed telemetry-queue did not become ready within 60 s"
    finally:
        queue.send_signal(signal.SIGTERM)
        output, _ = queue.communicate(timeout=30)
    assert queue.returncode == 0, output.decode(errors="replace")
    assert (tmp_path / "queue").is_dir()
