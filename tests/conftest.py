"""Fixtures shared by every component's tests.

PostgreSQL tests use the server named by ``TEST_POSTGRES_URL`` (``.ci/run`` starts
one on 127.0.0.1). Without it they are skipped on a developer machine and fail
under CI, so a CI run never passes with PostgreSQL silently untested.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

#: The real DCGM exporter dump, read in place next to the project.
REAL_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dcgm_metrics_20250718_134233.csv"


@pytest.fixture(scope="session")
def real_csv() -> Path:
    """Path of the real DCGM CSV; fails when it is missing under CI."""
    if not REAL_CSV.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"real DCGM CSV not found at {REAL_CSV}")
        pytest.skip(f"real DCGM CSV not found at {REAL_CSV}")
    return REAL_CSV


def _postgres_admin_url() -> str:
    url = os.environ.get("TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("TEST_POSTGRES_URL is not set: .ci/run must start PostgreSQL")
        pytest.skip("TEST_POSTGRES_URL is not set")
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped after the test."""
    import psycopg

    admin_url = _postgres_admin_url()
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a new SQLite file in the test's temporary folder."""
    return f"sqlite:///{tmp_path / 'telemetry.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """An empty database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


# A real queue server process (python -m queue_server) for tests of any component.

QUEUE_READY_TIMEOUT_S = 30.0


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class QueueServerProcess:
    """A ``python -m queue_server`` process on 127.0.0.1 with its own port and data directory.

    ``start`` (re)starts it on the same port and data directory and waits for
    ``/readyz``; ``kill`` sends SIGKILL; ``stop`` sends SIGTERM and returns the
    exit code. Server output goes to ``log_path``. Under coverage the process
    runs through ``coverage run --parallel-mode``, so a SIGTERM stop records
    its coverage (a SIGKILL loses it).
    """

    def __init__(self, data_dir: Path, log_path: Path, env: dict[str, str]) -> None:
        self.port = _free_port()
        #: With QUEUE_TLS_CERT the URL is https and readiness checks trust that certificate.
        self.tls_cert = env.get("QUEUE_TLS_CERT")
        scheme = "https" if self.tls_cert else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = env
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the queue server is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, *, wait: bool = True) -> "QueueServerProcess":
        import sys

        if self.running:
            raise RuntimeError(f"the queue server (pid {self.pid}) is already running")
        command = [sys.executable]
        if _coverage_active():
            command += ["-m", "coverage", "run", "--parallel-mode"]
        command += ["-m", "queue_server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--data-dir", str(self.data_dir)]
        # Temporary file systems can be small, so the 507 free-space guard starts at 1 MiB here.
        env = {**os.environ, "QUEUE_MIN_FREE_BYTES": "1048576", **self.env}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1]
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = QUEUE_READY_TIMEOUT_S) -> None:
        import ssl
        import time

        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"the queue server exited with {self.exit_code()}:\n{self.log_text()[-4000:]}")
            try:
                verify = ssl.create_default_context(cafile=self.tls_cert) if self.tls_cert else True
                if httpx.get(f"{self.url}/readyz", timeout=1.0, verify=verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the queue server was not ready within {timeout_s} s:\n{self.log_text()[-4000:]}")

    def exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def kill(self) -> None:
        """Send SIGKILL and wait for the process to end."""
        if self.running:
            assert self._process is not None
            self._process.kill()
            self._process.wait(timeout=30)

    def stop(self, timeout_s: float = 30.0) -> int:
        """Send SIGTERM, wait for the exit and return the exit code (SIGKILL after ``timeout_s``)."""
        import signal

        if self._process is None:
            raise RuntimeError("the queue server was never started")
        if self.running:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=30)
                raise
        return int(self._process.returncode)


def _coverage_active() -> bool:
    try:
        import coverage
    except ImportError:
        return False
    return coverage.Coverage.current() is not None


@pytest.fixture
def start_queue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., QueueServerProcess]]:
    """Factory: ``start_queue_server(**env)`` starts a real queue server and returns it once ready.

    Keyword arguments are extra environment variables such as ``QUEUE_TOKENS`` or
    ``QUEUE_FSYNC``. Every server started here is stopped at teardown.
    """
    started: list[QueueServerProcess] = []

    def start(**env: str) -> QueueServerProcess:
        base = tmp_path_factory.mktemp("queue-server")
        server = QueueServerProcess(base / "data", base / "server.log", {k: str(v) for k, v in env.items()})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        if server.running:
            try:
                server.stop(timeout_s=10)
            except Exception:
                server.kill()


@pytest.fixture
def queue_server(start_queue_server: Callable[..., QueueServerProcess]) -> QueueServerProcess:
    """A started queue server with default settings; ``.url``, ``.pid``, ``.data_dir``, ``.kill()``, ``.stop()``, ``.start()``."""
    return start_queue_server()


class TemporaryPostgres:
    """A throw-away PostgreSQL cluster of the test's own, to stop and start at will."""

    def __init__(self, bin_dir: Path, base_dir: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.data_dir = base_dir / "data"
        self.log_file = base_dir / "postgres.log"
        self.socket_dir = base_dir
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            # The PostgreSQL server does not start as root.
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-k {self.socket_dir} -c fsync=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-o", options, "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")


@pytest.fixture
def temporary_postgres() -> Iterator[TemporaryPostgres]:
    """A running PostgreSQL cluster on a free loopback port, removed after the test."""
    bin_dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bin_dirs:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries (initdb) not found under /usr/lib/postgresql")
        pytest.skip("PostgreSQL server binaries (initdb) not found under /usr/lib/postgresql")
    base_dir = Path(tempfile.mkdtemp(prefix="test-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(base_dir, user="postgres")
    cluster = TemporaryPostgres(bin_dirs[-1].parent, base_dir, _free_loopback_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        except subprocess.CalledProcessError:
            pass  # Already stopped by the test.
        shutil.rmtree(base_dir, ignore_errors=True)


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
