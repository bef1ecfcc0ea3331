"""What the client offers a new user (issue 19, "The client"), met against the real server.

A uvicorn server with its own job store; the CLI runs as a subprocess, as a user runs it.
References: ``torch.func.jvp`` computed here, and the server's own JSON for the job fields.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_live

from jvp_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncJVPClient,
    JVPClient,
    JVPResult,
)

torch = test_live.torch


def _server(tmp: pytest.TempPathFactory, env: dict[str, str]) -> Iterator[str]:
    """A uvicorn server with its own job store."""
    db = tmp.mktemp("jobs") / "jobs.db"
    with test_live.uvicorn_server({**env, "JVP_DATABASE_URL": f"sqlite:///{db}"}) as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _server(tmp_path_factory, test_live.SERVER_ENV)


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _server(tmp_path_factory, test_live.RESTRICTED_ENV)


@pytest.fixture
def client(server: str) -> Iterator[JVPClient]:
    with JVPClient(base_url=server, max_retries=0) as c:
        yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers (a hung service)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    listener.close()


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``jvp ARGS`` in a subprocess, with no JVP_* variables but ``env``."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("JVP_")}
    child.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "jvp_client", *argv],
        capture_output=True,
        text=True,
        env=child,
        timeout=120,
        check=False,
    )


def _reference(x: np.ndarray, v: np.ndarray) -> tuple[Any, Any]:
    out, jvp = torch.func.jvp(
        lambda a: torch.sin(a) * a, (torch.as_tensor(x),), (torch.as_tensor(v),)
    )
    return out.numpy(), jvp.numpy()


# -- errors that say what to check, retries on the logger ----------------------------------


def test_raise_connection_error_names_url_timeout_retries(caplog) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    caplog.set_level(logging.INFO, logger="jvp_client")
    with JVPClient(base_url=url, timeout=1.5, max_retries=2) as client:
        client._sleep = lambda s: None  # type: ignore[method-assign]
        with pytest.raises(APIConnectionError) as info:
            client.jvp(expression="x", primals={"x": [1.0]})
    err = info.value
    assert not isinstance(err, APITimeoutError)
    text = str(err)
    assert f"{url}/jvp" in text and "3 attempts (2 retries)" in text and "1.5 s" in text
    assert "Check that the service is running" in text and "JVP_BASE_URL" in text
    assert (err.url, err.retries) == (f"{url}/jvp", 2)
    retries = [r for r in caplog.records if r.name == "jvp_client"]
    assert len(retries) == 2
    assert all(f"{url}/jvp" in r.getMessage() and "ConnectError" in r.getMessage() for r in retries)
    assert "retry 1 of 2" in retries[0].getMessage() and "retry 2 of 2" in retries[1].getMessage()


def test_raise_timeout_error_names_timeout_and_suggests(silent_server: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger="jvp_client")
    with JVPClient(base_url=silent_server, timeout=0.3, max_retries=1) as client:
        client._sleep = lambda s: None  # type: ignore[method-assign]
        with pytest.raises(APITimeoutError) as info:
            client.models()
    text = str(info.value)
    assert f"{silent_server}/models" in text and "0.3 s per attempt" in text
    assert "2 attempts (1 retry)" in text and "with_options(timeout=" in text
    assert len([r for r in caplog.records if r.name == "jvp_client"]) == 1


def test_with_options_timeout_copies_and_shares_pool(client: JVPClient, silent_server: str) -> None:
    x, v = np.linspace(-1, 1, 5), np.ones(5)
    patient = client.with_options(timeout=30.0)
    assert patient.timeout == 30.0 and client.timeout != 30.0
    assert patient._client is client._client  # the same connection pool
    out, jvp = patient.jvp(expression="sin(x) * x", primals={"x": x}, tangents={"x": v})
    ref_out, ref_jvp = _reference(x, v)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    np.testing.assert_allclose(jvp, ref_jvp, rtol=1e-12)
    patient.close()  # a copy leaves the shared pool open
    assert client.models()
    hung = client.with_options(base_url=silent_server, timeout=0.2)
    with pytest.raises(APITimeoutError, match="0.2 s per attempt"):
        hung.health()


# -- results ---------------------------------------------------------------------------------


def test_jvp_unpacks_like_jax_and_carries_request_id(client: JVPClient) -> None:
    x = np.linspace(-2, 2, 7)
    v = np.cos(x)
    ref_out, ref_jvp = _reference(x, v)
    for big in (False, True):  # JSON, then safetensors
        c = client.with_options(binary_min_elements=0 if big else None)
        result = c.jvp(expression="sin(x) * x", primals={"x": x}, tangents={"x": v})
        out, jvp = result
        np.testing.assert_allclose(out, ref_out, rtol=1e-12)
        np.testing.assert_allclose(jvp, ref_jvp, rtol=1e-12)
        assert isinstance(result, JVPResult) and result.request_id


def test_request_id_on_every_result(client: JVPClient) -> None:
    p = {"x": np.array([0.5, -1.0])}
    results: list[Any] = [
        client.jacobian(expression="x**2", primals=p),
        client.hvp(expression="sum(x**3)", primals=p, tangents=p),
        client.eval_shape("jvp", expression="x**2", primals=p),
        client.model("linear"),
        *client.models(),
    ]
    with client.linearize(expression="x**2", primals=p) as lin:
        results.append(lin.info)
    job = client.submit_job([{"primals": p}], expression="x * 2")
    results += [job.info, job.wait(poll_interval_s=0.05, timeout_s=60), *client.list_jobs()]
    ids = [r.request_id for r in results]
    assert all(isinstance(i, str) and i for i in ids), ids
    assert len({r.request_id for r in results[:4]}) == 4  # one per response


def test_linearization_is_callable(client: JVPClient) -> None:
    x, v = np.linspace(0.1, 1.0, 4), np.linspace(1.0, 2.0, 4)
    _, ref_jvp = _reference(x, v)
    with client.linearize(expression="sin(x) * x", primals={"x": x}) as lin:
        np.testing.assert_allclose(lin(v), ref_jvp, rtol=1e-12)
        np.testing.assert_allclose(lin({"x": v}), ref_jvp, rtol=1e-12)
    y = np.ones(4)
    with client.linearize(expression="x * y", primals={"x": x, "y": y}) as lin2:
        with pytest.raises(TypeError, match=r"wrt=\['x', 'y'\]"):
            lin2(v)
        np.testing.assert_allclose(lin2({"y": v}), x * v, rtol=1e-12)


@pytest.mark.asyncio
async def test_async_linearization_is_callable_and_iter_jobs(server: str) -> None:
    x, v = np.linspace(0.1, 1.0, 4), np.ones(4)
    _, ref_jvp = _reference(x, v)
    async with AsyncJVPClient(base_url=server, max_retries=0) as client:
        async with await client.linearize(expression="sin(x) * x", primals={"x": x}) as lin:
            np.testing.assert_allclose(await lin(v), ref_jvp, rtol=1e-12)
        job = await client.submit_job(
            [{"primals": {"x": x}, "tangents": {"x": v}}] * 3, expression="sin(x) * x"
        )
        await job.wait(poll_interval_s=0.05, timeout_s=60)
        stacked = await job.results_array()
        np.testing.assert_allclose(stacked.jvp, np.stack([ref_jvp] * 3), rtol=1e-12)
        seen = [j.id async for j in client.iter_jobs(status="completed", page_size=1)]
        assert job.id in seen and len(seen) == len(set(seen))


# -- jobs ------------------------------------------------------------------------------------


def _tasks(n: int, fail: int | None = None) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = [
        {"primals": {"x": np.linspace(0, 1, 3) + i}, "tangents": {"x": np.ones(3)}}
        for i in range(n)
    ]
    if fail is not None:  # a tangent of the wrong shape fails that task only
        tasks[fail] = {"primals": {"x": np.ones(3)}, "tangents": {"x": np.ones(2)}}
    return tasks


def test_job_info_carries_server_fields(client: JVPClient) -> None:
    job = client.submit_job(_tasks(4), expression="sin(x) * x")
    info = job.wait(poll_interval_s=0.05, timeout_s=60)
    raw = info.raw
    assert info.status == "completed" and (info.eta_s, raw["eta_s"]) == (0, 0)
    assert info.started_at == raw["started_at"] and info.started_at is not None
    assert info.finished_at == raw["finished_at"] and info.finished_at is not None
    assert info.cancelled == raw["cancelled"] == 0
    big = client.submit_job(_tasks(300), expression="sin(x) * x")
    ended = big.cancel()
    assert (ended.cancelled, ended.finished_at) == (
        ended.raw["cancelled"],
        ended.raw["finished_at"],
    )
    if ended.status == "cancelled":  # not finished before the cancel came
        assert ended.cancelled > 0 and ended.finished_at is not None


def test_list_jobs_by_status_and_iterate_pages(client: JVPClient) -> None:
    ids = [client.submit_job(_tasks(1), expression="x").id for _ in range(3)]
    for job_id in ids:
        client.get_job(job_id).wait(poll_interval_s=0.05, timeout_s=60)
    completed = client.list_jobs(status="completed", limit=1000)
    assert completed and all(j.status == "completed" for j in completed)
    assert set(ids) <= {j.id for j in completed}
    assert client.list_jobs(status="queued", limit=1000) == [] or all(
        j.status == "queued" for j in client.list_jobs(status="queued", limit=1000)
    )
    paged = [j.id for j in client.iter_jobs(status="completed", page_size=2)]
    assert paged == [j.id for j in completed]  # every page, in order, none twice
    first = list(itertools.islice(client.iter_jobs(page_size=1), 2))
    assert [j.id for j in first] == [j.id for j in client.list_jobs(limit=2)]


def test_results_array_stacks_tasks(client: JVPClient) -> None:
    tasks = _tasks(5, fail=3)
    job = client.submit_job(tasks, expression="sin(x) * x")
    job.wait(poll_interval_s=0.05, timeout_s=60)
    with pytest.raises(ValueError, match=r"task 3: invalid_request"):
        job.results_array()
    stacked = job.results_array(on_error="skip", page_size=2)
    assert stacked.index.tolist() == [0, 1, 2, 4] and list(stacked.errors) == [3]
    refs = [_reference(tasks[i]["primals"]["x"], tasks[i]["tangents"]["x"]) for i in (0, 1, 2, 4)]
    assert stacked.output.shape == (4, 3)
    np.testing.assert_allclose(stacked.output, np.stack([r[0] for r in refs]), rtol=1e-12)
    np.testing.assert_allclose(stacked.jvp, np.stack([r[1] for r in refs]), rtol=1e-12)


def test_progress_bar_total_from_first_frame_and_tqdm_auto(client: JVPClient, monkeypatch) -> None:
    import tqdm.auto

    made: list[dict[str, Any]] = []

    class Recording(tqdm.auto.tqdm):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    job = client.submit_job(_tasks(6), expression="x")
    job.wait(progress=True, poll_interval_s=0.05, timeout_s=60)
    assert len(made) == 1 and made[0]["total"] == 6


# -- the command line, as a subprocess ------------------------------------------------------


def test_jobs_cli_list_results_stack_and_progress(
    client: JVPClient, server: str, tmp_path: Path
) -> None:
    tasks = _tasks(40)
    job = client.submit_job(tasks, expression="sin(x) * x")
    done = _cli("jobs", "wait", job.id, "--base-url", server, "--poll-interval", "0.05")
    assert done.returncode == 0, done.stderr
    first_frame = next(f for f in done.stderr.split("\r") if f.strip())
    assert "/40" in first_frame, done.stderr  # the total is known from the first frame
    listed = _cli("jobs", "list", "--status", "completed", "--base-url", server)
    assert listed.returncode == 0, listed.stderr
    assert f"job {job.id}: completed, 40/40 done, 0 failed" in listed.stdout
    out = tmp_path / "stacked.npz"
    stacked = _cli("jobs", "results", job.id, "--stack", "--out", str(out), "--base-url", server)
    assert stacked.returncode == 0, stacked.stderr
    refs = [_reference(t["primals"]["x"], t["tangents"]["x"]) for t in tasks]
    with np.load(out) as data:
        assert sorted(data.files) == ["index", "jvp", "output"]
        assert data["index"].tolist() == list(range(40))
        np.testing.assert_allclose(data["output"], np.stack([r[0] for r in refs]), rtol=1e-12)
        np.testing.assert_allclose(data["jvp"], np.stack([r[1] for r in refs]), rtol=1e-12)


def test_cli_missing_key_says_env_or_flag(restricted: str) -> None:
    done = _cli("call", "-e", "x", "-p", "x=[1.0]", "--base-url", restricted)
    assert done.returncode == 1
    assert "401 unauthorized" in done.stderr
    assert "set JVP_API_KEY or pass --api-key" in done.stderr
    assert "Authorization" not in done.stderr
    wrong = _cli("call", "-e", "x", "-p", "x=[1.0]", "--base-url", restricted, "--api-key", "no")
    assert wrong.returncode == 1 and "check JVP_API_KEY or --api-key" in wrong.stderr
    ok = _cli(
        "call",
        "-e",
        "x*2",
        "-p",
        "x=[1.0]",
        "--base-url",
        restricted,
        env={"JVP_API_KEY": test_live.INFERENCE_KEY},
    )
    assert ok.returncode == 0 and "jvp" in ok.stdout, ok.stderr
