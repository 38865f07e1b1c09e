"""The README's first command: `make run` starts the stack, `make scale` resizes it, Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
from system_stack import ROOT, VENV_BIN, free_port, wait_until

#: GPUs in the sample CSV that `make run` streams by default.
SAMPLE_GPUS = 32


def restore_sigint() -> None:
    # A process started in the background may inherit an ignored SIGINT; a terminal's does not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make(*args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    output = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            ["make", "--no-print-directory", *args, f"VENV={VENV_BIN.parent}"],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=restore_sigint,
        )
    finally:
        if log is not None:
            output.close()


def gpu_count(api_url: str) -> int:
    try:
        response = httpx.get(f"{api_url}/api/v1/gpus", timeout=5)
    except httpx.TransportError:
        return -1
    return int(response.json()["count"]) if response.status_code == 200 else -1


def acked_total(queue_port: int) -> int:
    response = httpx.get(f"http://127.0.0.1:{queue_port}/v1/queues/telemetry", timeout=5)
    return int(response.json()["stats"]["acked_total"])


def numprocesses(circus_port: int, watcher: str) -> int:
    result = subprocess.run(
        [str(VENV_BIN / "circusctl"), "--timeout", "30", "--endpoint", f"tcp://127.0.0.1:{circus_port}",
         "numprocesses", watcher],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return int(result.stdout.strip())


def readme_banner() -> list[str]:
    """Return the lines that the README shows `make run` printing."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```console\n$ make run\n", 1)[1].split("```", 1)[0]
    return block.strip("\n").splitlines()


def printed_banner(log_text: str, ports: dict[int, int]) -> list[str]:
    """Return the banner lines of a `make run` log, with the test's ports put back to the defaults."""
    lines = log_text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("Starting the queue"))
    banner = "\n".join(lines[start : start + len(readme_banner())])
    for port, default in ports.items():
        banner = banner.replace(f"127.0.0.1:{port}", f"127.0.0.1:{default}")
        banner = banner.replace(f"CIRCUS_PORT={port}", f"CIRCUS_PORT={default}")
    return banner.splitlines()


def test_make_run_scale_and_stop(tmp_path: Path) -> None:
    api_port, queue_port, circus_port = free_port(), free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    log = tmp_path / "make-run.log"
    process = make(
        "run",
        f"DATA_DIR={tmp_path / 'data'}",
        f"API_PORT={api_port}",
        f"QUEUE_PORT={queue_port}",
        f"CIRCUS_PORT={circus_port}",
        "STREAMER_ROWS_PER_SHARD=50",
        log=log,
    )
    stack: list[psutil.Process] = []
    try:
        wait_until(lambda: gpu_count(api_url) == SAMPLE_GPUS, timeout_s=120, what="the API to list the sample GPUs")
        stack = psutil.Process(process.pid).children(recursive=True)
        banner = log.read_text()
        assert f"make scale STREAMERS=4 COLLECTORS=1 CIRCUS_PORT={circus_port}" in banner
        assert f"http://127.0.0.1:{api_port}/docs" in banner
        assert printed_banner(banner, {api_port: 8000, queue_port: 8500, circus_port: 8555}) == readme_banner()

        # A variable on make's command line reaches the streamers: 320 sample rows make 7 shards.
        assert "7 shards of up to 50 rows" in banner

        scale_log = tmp_path / "make-scale.log"
        scale = make("scale", "STREAMERS=1", "COLLECTORS=1", f"CIRCUS_PORT={circus_port}", log=scale_log)
        assert scale.wait(timeout=300) == 0
        assert scale_log.read_text().strip() == "make scale: done: STREAMERS=1 COLLECTORS=1"
        assert numprocesses(circus_port, "streamer") == 1
        assert numprocesses(circus_port, "collector") == 1

        # A count that is not given stays as it is.
        scale = make("scale", "COLLECTORS=2", f"CIRCUS_PORT={circus_port}")
        assert scale.wait(timeout=300) == 0
        assert numprocesses(circus_port, "streamer") == 1
        assert numprocesses(circus_port, "collector") == 2
        acked_before = acked_total(queue_port)
        wait_until(lambda: acked_total(queue_port) > acked_before, timeout_s=30, what="rows acknowledged after scaling")
    finally:
        # Ctrl-C in a terminal sends SIGINT to the whole foreground process group.
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(child.is_running() and child.status() != "zombie" for child in stack):
        time.sleep(0.2)
    left = [child.pid for child in stack if child.is_running() and child.status() != "zombie"]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert stack, "make run started no processes"
    assert left == []


def test_make_scale_without_counts_fails() -> None:
    process = subprocess.run(
        ["make", "--no-print-directory", "scale", f"CIRCUS_PORT={free_port()}", f"VENV={VENV_BIN.parent}"],
        env={name: value for name, value in os.environ.items() if name not in ("STREAMERS", "COLLECTORS")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert process.returncode != 0
    assert "pass STREAMERS=n, COLLECTORS=m or both" in process.stderr


def test_make_scale_without_stack_fails_fast() -> None:
    started = time.monotonic()
    process = subprocess.run(
        ["make", "--no-print-directory", "scale", "STREAMERS=1", f"CIRCUS_PORT={free_port()}", f"VENV={VENV_BIN.parent}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert process.returncode != 0
    assert "no stack answers" in process.stderr
    assert time.monotonic() - started < 60
