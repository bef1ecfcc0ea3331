"""Start and stop the benchmarked servers as subprocesses on free 127.0.0.1 ports.

Each `Server` runs one command, waits until its readiness URL answers 200, and
reads its peak resident memory (``VmHWM`` in ``/proc/<pid>/status``, summed over
its child processes) before it is stopped. Output goes to a log file, never a
pipe, so a chatty server cannot block on a full pipe.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TESSERACT_VENV = BENCH / ".venv-tesseract"
TESSERACT_API = BENCH / "peers" / "tesseract" / "tesseract_api.py"
# What the benchmark installs into its own venv (PyPI); the runtime extra brings
# FastAPI and uvicorn, which `tesseract-runtime serve` needs.
TESSERACT_REQUIREMENT = "tesseract-core[runtime]==1.15.0"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of `pid` plus its descendants, in MiB; None if unreadable."""
    total_kib = 0
    seen = False
    for p in [pid, *_children(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
                seen = True
    return total_kib / 1024 if seen else None


@dataclass
class Server:
    """One server subprocess: `start()`, `url`, `peak_rss_mib()`, `stop()`."""

    name: str
    argv: list[str]
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    startup_timeout_s: float = 120.0
    cleanup: list[Path] = field(default_factory=list)  # files removed once it stopped
    cwd: Path = ROOT  # bench/revisions.py serves another revision from its worktree
    process: subprocess.Popen[bytes] | None = None
    peak_mib: float | None = None
    _log: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Server:
        argv = [a.replace("{port}", str(self.port)).replace("{host}", HOST) for a in self.argv]
        self._log = tempfile.NamedTemporaryFile(prefix=f"bench-{self.name}-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.output()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1.0) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        output = self.output()
        self.stop()
        raise RuntimeError(f"{self.name} not ready in {self.startup_timeout_s:.0f} s:\n{output}")

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def peak_rss_mib(self) -> float | None:
        if self.process is None or self.process.poll() is not None:
            return self.peak_mib
        self.peak_mib = peak_rss_mib(self.process.pid)
        return self.peak_mib

    def stop(self) -> None:
        if self.process is None:
            return
        self.peak_rss_mib()
        if self.process.poll() is None:
            # The server leads its own session: signal it (and any workers it forked).
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        for path in self.cleanup:
            path.unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def jvp_service(name: str = "jvp-service", env: dict[str, str] | None = None) -> Server:
    """`jvp-service serve` (default settings unless `env` says otherwise) on a free port."""
    # The job store goes to a temporary file, so a bench run leaves nothing in the tree.
    db = Path(tempfile.gettempdir()) / f"bench-jvp-jobs-{os.getpid()}-{name}.db"
    return Server(
        name=name,
        argv=[sys.executable, "-m", "app.cli", "serve", "--port", "{port}"]
        + ["--log-level", "warning"],
        ready_path="/readyz",
        env={"JVP_DATABASE_URL": f"sqlite:///{db}", **(env or {})},
        cleanup=[db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")],
    )


def uvicorn_app(name: str, app: str) -> Server:
    """A peer ASGI app under uvicorn with the settings `jvp-service serve` uses."""
    return Server(
        name=name,
        argv=[
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--log-level",
            "warning",
        ],
        ready_path="/healthz",
    )


def ensure_tesseract_venv(log: Path) -> str | None:
    """Create bench/.venv-tesseract with tesseract-core's runtime; None, or why it failed."""
    runtime = TESSERACT_VENV / "bin" / "tesseract-runtime"
    if runtime.exists():
        return None
    try:
        if not (TESSERACT_VENV / "bin" / "python").exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(TESSERACT_VENV)],
                check=True,
                capture_output=True,
                timeout=300,
            )
        with log.open("wb") as out:
            done = subprocess.run(
                [
                    str(TESSERACT_VENV / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    TESSERACT_REQUIREMENT,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=900,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"venv setup failed: {exc}"
    if done.returncode != 0 or not runtime.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return f"pip install {TESSERACT_REQUIREMENT} failed: " + " | ".join(tail)
    return None


def tesseract_runtime(workdir: Path) -> Server:
    """`tesseract-runtime serve` of bench/peers/tesseract/tesseract_api.py, without docker."""
    return Server(
        name="tesseract",
        argv=[
            str(TESSERACT_VENV / "bin" / "tesseract-runtime"),
            "serve",
            "--host",
            "{host}",
            "--port",
            "{port}",
        ],
        ready_path="/health",
        env={
            "TESSERACT_API_PATH": str(TESSERACT_API),
            "TESSERACT_NAME": "bench-sum-of-squares",
            # Each request writes a run folder (logs) under the output path: not in the tree.
            "TESSERACT_OUTPUT_PATH": str(workdir),
            "TESSERACT_INPUT_PATH": str(workdir),
        },
    )


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
