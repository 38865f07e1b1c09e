"""The whole stack as real processes on 127.0.0.1, run by circus from circus.ini.

``Stack`` starts ``circusd`` with the same configuration ``make run`` uses, on
free ports and a temporary data directory, and drives it the way an operator
does: ``circusctl`` to scale, signals to kill.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 0.2 s until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class Stack:
    """A running stack; every process belongs to the circusd this object started."""

    data_dir: Path
    database_url: str
    csv: Path
    streamers: int = 1
    collectors: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    queue_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    circus_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def queue_url(self) -> str:
        return f"http://127.0.0.1:{self.queue_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VENV_BIN=str(VENV_BIN),
            STREAMERS=str(self.streamers),
            COLLECTORS=str(self.collectors),
            STREAMER_RESPAWN="true",
            CIRCUS_PORT=str(self.circus_port),
            CIRCUS_PUBSUB_PORT=str(free_port()),
            DATABASE_URL=self.database_url,
            QUEUE_PORT=str(self.queue_port),
            QUEUE_DATA_DIR=str(self.data_dir / "queue"),
            STREAMER_CSV=str(self.csv),
            STREAMER_QUEUE_URLS=self.queue_url,
            COLLECTOR_QUEUE_URLS=self.queue_url,
            API_PORT=str(self.api_port),
            STREAMER_PORT="0",
            COLLECTOR_PORT="0",
        )
        env.update(self.extra_env)
        return env

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ROOT / "migrations" / "alembic.ini"), "upgrade", "head"],
            cwd=ROOT,
            env=self.env(),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.migrate()
        with open(self.data_dir / "circus.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "circusd"), str(ROOT / "circus.ini")],
                cwd=self.data_dir,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._api_ready, timeout_s=60, what="the API to answer /readyz")
        wait_until(self.queue_ready, timeout_s=60, what="the queue to answer /readyz")

    def _api_ready(self) -> bool:
        return _answers(f"{self.api_url}/readyz")

    def queue_ready(self) -> bool:
        return _answers(f"{self.queue_url}/readyz")

    def circusctl(self, *args: str) -> str:
        """Run one circusctl command, retried while circus is busy with an earlier one."""
        for _ in range(120):
            result = self._circusctl_once(*args)
            if "already running" not in result.stdout + result.stderr:
                break
            time.sleep(0.5)
        if result.returncode != 0:
            raise RuntimeError(f"circusctl {' '.join(args)} failed: {result.stdout} {result.stderr}")
        return result.stdout.strip()

    def _circusctl_once(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "circusctl"), "--timeout", "90", "--endpoint", f"tcp://127.0.0.1:{self.circus_port}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def scale(self, watcher: str, count: int) -> None:
        """Set the number of ``watcher`` processes, as ``make scale`` does."""
        self.circusctl("set", watcher, "numprocesses", str(count))

    def pids(self, watcher: str) -> list[int]:
        output = self.circusctl("list", watcher)
        return [int(pid) for pid in output.split(",") if pid.strip()]

    def stop(self) -> int | None:
        """Stop circusd with SIGTERM, as Ctrl-C on ``make run`` does; return its exit code.

        Any process circusd started that is still alive afterwards is killed, so no
        test leaves processes behind. circus gives each child a process group of its
        own, so killing circusd's group would not reach them.
        """
        if self.process is None:
            return None
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout=90)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass

    def log(self) -> str:
        return (self.data_dir / "circus.log").read_text(errors="replace")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
