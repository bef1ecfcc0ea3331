"""Request ids, logs (text and JSON lines), /metrics, and the warning for an open bind."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from app.api.app import create_app
from app.cli import exposure_warning
from app.logs import JSONFormatter, RequestIdFilter, configure_logging
from app.settings import Settings
from tests.conftest import ROOT, free_port
from tests.test_faults import serve

JVP = {"expression": "x * 3", "primals": {"x": [1.0, 2.0]}, "tangents": {"x": [1.0, 0.0]}}
HEX32 = re.compile(r"[0-9a-f]{32}")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


# --- request ids ---------------------------------------------------------------------------------


def test_request_id_is_echoed_when_sane(client: TestClient) -> None:
    r = client.post("/jvp", json=JVP, headers={"X-Request-ID": "client-id.42:abc"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "client-id.42:abc"


@pytest.mark.parametrize(
    "given", [None, "", "has space", "x" * 129, "tab\there", "caf\u00e9"], ids=repr
)
def test_request_id_is_new_uuid_when_missing_or_not_sane(
    client: TestClient, given: str | None
) -> None:
    headers = {} if given is None else {"X-Request-ID": given.encode()}
    r = client.get("/models", headers=headers)
    assert r.status_code == 200
    assert HEX32.fullmatch(r.headers["x-request-id"])
    assert r.headers["x-request-id"] != given


def test_request_id_is_on_errors_and_unknown_routes(client: TestClient) -> None:
    assert HEX32.fullmatch(client.post("/jvp", json={"primals": {}}).headers["x-request-id"])
    assert HEX32.fullmatch(client.get("/no/such/route").headers["x-request-id"])
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("app")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise KeyError("a bug in the service")


class OutOfMemory(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


BODY = {"primals": {"x": [[1.0, 2.0]]}, "tangents": {"x": [[1.0, 0.0]]}}


def test_server_errors_log_their_request_id(captured: Captured) -> None:
    # raise_server_exceptions=False: see the 500 the client gets, not the test's re-raise.
    with TestClient(create_app(Settings()), raise_server_exceptions=False) as c:
        serve(c, "broken", Broken())
        serve(c, "oom", OutOfMemory())
        r = c.post("/jvp", json={"model": "broken", **BODY}, headers={"X-Request-ID": "req-500"})
        assert r.status_code == 500
        assert r.headers["x-request-id"] == "req-500"
        assert r.json()["error"]["type"] == "internal_error"
        assert "req-500" in r.json()["error"]["message"]
        r = c.post("/jvp", json={"model": "oom", **BODY}, headers={"X-Request-ID": "req-507"})
        assert r.status_code == 507
        assert r.headers["x-request-id"] == "req-507"
    by_id = {rec.request_id: rec for rec in captured.records}  # type: ignore[attr-defined]
    assert by_id["req-500"].levelno == logging.ERROR
    assert "req-500" in by_id["req-500"].getMessage()
    assert by_id["req-500"].exc_info is not None  # the traceback is logged
    assert by_id["req-507"].levelno == logging.WARNING
    assert "507 out_of_memory (request req-507)" in by_id["req-507"].getMessage()


def test_json_formatter_writes_one_object_per_line_with_request_id() -> None:
    from app.logs import request_id

    token = request_id.set("rid-1")
    try:
        record = logging.LogRecord("app.x", logging.WARNING, __file__, 1, "n=%d", (3,), None)
        RequestIdFilter().filter(record)
        line = JSONFormatter().format(record)
    finally:
        request_id.reset(token)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["request_id"] == "rid-1"
    assert entry["message"] == "n=3"
    assert entry["level"] == "WARNING" and entry["logger"] == "app.x"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    named = {n: logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access")}
    saved_named = {n: (list(lg.handlers), lg.propagate, lg.level) for n, lg in named.items()}
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for n, (handlers, propagate, level) in saved_named.items():
            named[n].handlers[:] = handlers
            named[n].propagate = propagate
            named[n].setLevel(level)


def test_configure_logging_json_puts_request_id_on_every_line(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "info")
    with TestClient(create_app(Settings()), raise_server_exceptions=False) as c:
        serve(c, "broken", Broken())
        c.post("/jvp", json={"model": "broken", **BODY}, headers={"X-Request-ID": "req-json"})
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert entries and all("request_id" in e for e in entries)
    failed = [e for e in entries if e["level"] == "ERROR"]
    assert failed and failed[0]["request_id"] == "req-json"
    assert "KeyError" in failed[0]["exc_info"]


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_template_and_status(client: TestClient) -> None:
    before = client.get("/metrics").text
    assert client.get("/models/linear").status_code == 200
    assert client.get("/models/no-such-model").status_code == 404
    assert client.post("/jvp", json=JVP).status_code == 200
    after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    total = "jvp_http_requests_total"
    assert delta(total, route="/models/{name}", method="GET", status="200") == 1
    assert delta(total, route="/models/{name}", method="GET", status="404") == 1
    assert delta(total, route="/jvp", method="POST", status="200") == 1
    assert delta("jvp_http_request_duration_seconds_count", route="/jvp") == 1
    # The JVP's time on the device worker, split into its queue wait and its computation.
    assert delta("jvp_queue_seconds_count", device="cpu") == 1
    assert delta("jvp_compute_seconds_count", device="cpu") == 1
    assert delta("jvp_compute_seconds_sum", device="cpu") > 0
    # No raw path becomes a label.
    assert "no-such-model" not in after


def test_metrics_expose_queue_depth_memory_batches_and_job_tasks(client: TestClient) -> None:
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    for name in (
        "jvp_queue_depth",
        "jvp_device_memory_bytes",
        "jvp_batch_size",
        "jvp_job_tasks",
        "jvp_job_tasks_active",
        "jvp_http_requests_in_flight",
        "process_resident_memory_bytes",
    ):
        assert name in names, name
    assert sample(r.text, "jvp_queue_depth", device="cpu") == 0
    rss = sample(r.text, "process_resident_memory_bytes")
    assert sample(r.text, "jvp_device_memory_bytes", device="cpu") == pytest.approx(rss, rel=0.2)
    for device in range(torch.cuda.device_count()):
        assert sample(r.text, "jvp_device_memory_bytes", device=f"cuda:{device}") >= 0


def test_metrics_hooks_feed_batch_and_job_task_metrics() -> None:
    from app.metrics import Metrics

    m = Metrics()
    m.observe_batch(torch.device("cpu"), 8)
    m.job_task_ended("completed", 3)
    m.job_task_ended("failed")
    m.set_job_tasks("queued", 5)
    text = m.render()[0].decode()
    assert sample(text, "jvp_batch_size_count", device="cpu") == 1
    assert sample(text, "jvp_batch_size_sum", device="cpu") == 8
    assert sample(text, "jvp_job_tasks_total", status="completed") == 3
    assert sample(text, "jvp_job_tasks_total", status="failed") == 1
    assert sample(text, "jvp_job_tasks_active", state="queued") == 5
    # A second app's registry starts from zero.
    assert sample(Metrics().render()[0].decode(), "jvp_job_tasks_total", status="completed") == 0


# --- exposure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_exposure_warning_is_silent_on_loopback(host: str) -> None:
    assert exposure_warning(host, Settings()) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "jvp.internal"])
def test_exposure_warning_names_host_when_open_without_keys(host: str) -> None:
    warning = exposure_warning(host, Settings())
    assert warning is not None and host in warning and "JVP_API_KEYS" in warning
    assert exposure_warning(host, Settings(api_keys=["k"])) is None


def test_serve_defaults_to_loopback() -> None:
    assert Settings().host == "127.0.0.1"


def test_serve_beyond_loopback_without_keys_logs_warning_as_json() -> None:
    # 203.0.113.1 (TEST-NET-3, RFC 5737) is no address of this machine: the warning is
    # logged at start, then the bind fails and the server exits, so nothing listens on an
    # interface others could reach (0.0.0.0 would).
    host = "203.0.113.1"
    env = {
        **os.environ,
        "JVP_DATABASE_URL": f"sqlite:///{tempfile.mkdtemp(prefix='jvp-exposure-')}/jobs.db",
        "JVP_HOST": host,
        "JVP_LOG_FORMAT": "json",
    }
    run = [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())]
    done = subprocess.run(
        [*run, "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode != 0  # could not bind: nothing was served
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    warnings = [e for e in entries if "with no API keys" in e["message"]]
    assert len(warnings) == 1, output
    assert warnings[0]["level"] == "WARNING"
    assert host in warnings[0]["message"]
