"""`brim serve` as a real process on a free loopback port, for the tests that need one."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until GET /health answers 200; fails with the server's log if it exits or is late."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"brim serve did not become healthy:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


@contextlib.contextmanager
def brim_serve(args: list[str], log: Path, *, env: dict | None = None, timeout: float = 180,
               host: str = "127.0.0.1") -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of `brim serve ARGS --host HOST --port <free>`, healthy; stopped
    with SIGINT (then killed) when the block ends."""
    port = free_port(host)
    brim = Path(sys.executable).with_name("brim")
    with open(log, "w") as out:
        process = subprocess.Popen([str(brim), "serve", *args, "--host", host, "--port",
                                    str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://{host}:{port}"
    try:
        wait_healthy(url, process, log, timeout)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
