"""Shared fixtures: the app in-process (TestClient) and as a real uvicorn process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _scratch_database() -> str:
    """A fresh SQLite job store in a temporary folder, so tests never write into the repo."""
    folder = tempfile.mkdtemp(prefix="jvp-test-db-")
    return f"sqlite:///{folder}/jobs.db"


@pytest.fixture(scope="session")
def client() -> Iterator[TestClient]:
    """The app with default settings, lifespan started (workers running)."""
    with TestClient(create_app(Settings(database_url=_scratch_database()))) as c:
        yield c


def make_client(**settings: object) -> TestClient:
    """A client for an app with non-default settings (use as a context manager)."""
    settings.setdefault("database_url", _scratch_database())
    return TestClient(create_app(Settings(**settings)))  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LiveServer:
    """`jvp-service serve` in a subprocess on a free port; stopped at exit."""

    def __init__(self, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        """``prefix``: a command the server runs under, such as ``["taskset", "-c", "0"]``."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "JVP_DATABASE_URL": _scratch_database(), **(env or {})}
        # A file, not a pipe: a full pipe would block the server.
        self.log = tempfile.NamedTemporaryFile(prefix="jvp-server-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                *(prefix or []),
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become ready in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    server = LiveServer()
    try:
        yield server
    finally:
        server.stop()
