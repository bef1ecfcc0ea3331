"""AsyncJVPClient: the same behaviour as JVPClient, awaited."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from jvp_fakes import FakeJobs, Recorder, error_response, fake_service

from jvp_client import (
    APIConnectionError,
    AsyncJob,
    AsyncJVPClient,
    NotFoundError,
    OverloadedError,
    UnprocessableEntityError,
)

X = {"x": np.array([1.0, 2.0])}


@pytest.mark.asyncio
async def test_jvp_async_returns_arrays(make_async_client) -> None:
    client = make_async_client(fake_service)
    result = await client.jvp(
        expression="x**2 + y**2",
        primals={"x": np.array([1.0, 2.0]), "y": np.array([3.0, 4.0])},
        tangents={"x": np.ones(2)},
    )
    np.testing.assert_array_equal(result.output, [10.0, 20.0])
    np.testing.assert_array_equal(result.jvp, [2.0, 4.0])
    assert result.dtype == "float64" and result.device == "cpu"


@pytest.mark.asyncio
async def test_jvp_async_returns_torch_for_torch_inputs(make_async_client) -> None:
    client = make_async_client(fake_service)
    x = torch.linspace(0, 1, 80, dtype=torch.float64)
    result = await client.jvp(expression="x * 2", primals={"x": x}, tangents={"x": x})
    assert isinstance(result.jvp, torch.Tensor) and result.jvp.dtype == torch.float64
    torch.testing.assert_close(result.jvp, 2 * x)


@pytest.mark.asyncio
async def test_retry_async_succeeds_after_failures(make_async_client, delays) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if len(recorder.requests) <= 2:
            return error_response(503, "overloaded", "full", headers={"Retry-After": "2"})
        return fake_service(request)

    recorder = Recorder(handler)
    client = make_async_client(recorder, max_retries=2)
    await client.jvp(expression="x * 2", primals=X)
    assert len(recorder.requests) == 3 and delays == [2.0, 2.0]


@pytest.mark.asyncio
async def test_retry_async_gives_up_after_max_retries(make_async_client, delays) -> None:
    recorder = Recorder(lambda r: error_response(503, "overloaded", "full"))
    with pytest.raises(OverloadedError):
        await make_async_client(recorder, max_retries=1).jvp(expression="x * 2", primals=X)
    assert len(recorder.requests) == 2 and len(delays) == 1


@pytest.mark.asyncio
async def test_retry_async_connection_error_gives_up(make_async_client) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    recorder = Recorder(refuse)
    with pytest.raises(APIConnectionError):
        await make_async_client(recorder, max_retries=2).models()
    assert len(recorder.requests) == 3


@pytest.mark.asyncio
async def test_raise_async_status_error_fields(make_async_client) -> None:
    recorder = Recorder(
        lambda r: error_response(
            422,
            "invalid_request",
            "Expected tangent 'x' of shape [2], got [3]",
            "tangents.x",
            headers={"X-Request-ID": "abc"},
        )
    )
    with pytest.raises(UnprocessableEntityError) as info:
        await make_async_client(recorder).jvp(expression="x * 2", primals=X)
    assert (info.value.param, info.value.request_id) == ("tangents.x", "abc")


@pytest.mark.asyncio
async def test_get_async_models_and_health(make_async_client) -> None:
    client = make_async_client(fake_service)
    assert [m.name for m in await client.models()] == ["linear"]
    assert (await client.model("linear")).outputs == 1
    assert (await client.health()).ready
    with pytest.raises(NotFoundError):
        await client.model("missing")


@pytest.mark.asyncio
async def test_submit_job_async_reuses_idempotency_key(make_async_client, delays) -> None:
    fake = FakeJobs()
    attempts: list[httpx.Request] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        if len(attempts) == 1:
            fake(request)
            return error_response(502, "bad_gateway", "lost")
        return fake(request)

    client = make_async_client(flaky, max_retries=2)
    job = await client.submit_job([{"primals": X}], expression="x * 2")
    assert isinstance(job, AsyncJob) and len(fake.jobs) == 1
    assert len({r.headers["idempotency-key"] for r in attempts}) == 1


@pytest.mark.asyncio
async def test_wait_job_async_then_results_and_cancel(make_async_client, delays) -> None:
    fake = FakeJobs(per_poll=2)
    client = make_async_client(fake)
    tasks = [
        {"primals": {"x": np.full(2, float(i))}, "tangents": {"x": np.ones(2)}} for i in range(5)
    ]
    job = await client.submit_job(tasks, expression="x * 2")
    info = await job.wait(poll_interval_s=0.25)
    assert info.status == "completed" and info.done == 5
    assert len(delays) == 2 and all(0.15 < d <= 0.25 for d in delays), delays
    results = [r async for r in job.results(page_size=2)]
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(results[4].output, [8.0, 8.0])
    other = await client.submit_job(tasks, expression="x * 2")
    cancelled = await other.cancel()
    assert cancelled.status == "cancelled"
    body = json.loads(fake.requests[0].content)
    assert body["expression"] == "x * 2" and len(body["tasks"]) == 5


@pytest.mark.asyncio
async def test_close_async_client_owned_pool() -> None:
    async with AsyncJVPClient(base_url="http://jvp.test") as client:
        pass
    assert client._client.is_closed
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake_service))
    async with AsyncJVPClient(http_client=http):
        pass
    assert not http.is_closed
    await http.aclose()
