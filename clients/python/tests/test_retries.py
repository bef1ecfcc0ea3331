"""Retries: which failures are retried, how often, and how long the client waits."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from jvp_fakes import Recorder, error_response, fake_service

from jvp_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ForwardADUnsupportedError,
    InternalServerError,
    OutOfMemoryError,
    OverloadedError,
)
from jvp_client._base import INITIAL_RETRY_DELAY_S, MAX_RETRY_AFTER_S, MAX_RETRY_DELAY_S

X = {"x": np.array([1.0, 2.0])}


def fail_then_succeed(n: int, fail: Callable[[httpx.Request], httpx.Response]) -> Recorder:
    """A handler that answers ``fail`` to the first ``n`` requests, then serves normally."""

    def handler(request: httpx.Request) -> httpx.Response:
        if len(recorder.requests) <= n:
            return fail(request)
        return fake_service(request)

    recorder = Recorder(handler)
    return recorder


def overloaded(request: httpx.Request) -> httpx.Response:
    return error_response(503, "overloaded", "The queue is full (1024 waiting)")


@pytest.mark.parametrize("failures", [1, 2, 3])
def test_retry_jvp_succeeds_after_failures(make_client, delays, failures: int) -> None:
    recorder = fail_then_succeed(failures, overloaded)
    client = make_client(recorder, max_retries=3)
    result = client.jvp(expression="x * 2", primals=X)
    np.testing.assert_array_equal(result.output, [2.0, 4.0])
    assert len(recorder.requests) == failures + 1
    assert len(delays) == failures


def test_retry_jvp_gives_up_after_max_retries(make_client, delays) -> None:
    recorder = Recorder(overloaded)
    client = make_client(recorder, max_retries=2)
    with pytest.raises(OverloadedError, match="queue is full"):
        client.jvp(expression="x * 2", primals=X)
    assert len(recorder.requests) == 3
    assert len(delays) == 2


def test_retry_jvp_never_with_max_retries_zero(make_client, delays) -> None:
    recorder = Recorder(overloaded)
    client = make_client(recorder, max_retries=0)
    with pytest.raises(OverloadedError):
        client.jvp(expression="x * 2", primals=X)
    assert len(recorder.requests) == 1 and delays == []


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retry_status_retried(make_client, delays, status: int) -> None:
    recorder = fail_then_succeed(1, lambda r: error_response(status, "x", "try again"))
    client = make_client(recorder, max_retries=1)
    client.jvp(expression="x * 2", primals=X)
    assert len(recorder.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 501, 507])
def test_retry_status_not_retried(make_client, delays, status: int) -> None:
    recorder = Recorder(lambda r: error_response(status, "x", "no use retrying"))
    client = make_client(recorder, max_retries=3)
    with pytest.raises(APIStatusError) as info:
        client.jvp(expression="x * 2", primals=X)
    assert info.value.status_code == status
    assert len(recorder.requests) == 1 and delays == []


def test_retry_not_on_501_or_507(make_client) -> None:
    for status, cls in ((501, ForwardADUnsupportedError), (507, OutOfMemoryError)):

        def final(request: httpx.Request, status: int = status) -> httpx.Response:
            return error_response(status, "x", "final")

        recorder = Recorder(final)
        with pytest.raises(cls):
            make_client(recorder, max_retries=5).jvp(expression="x * 2", primals=X)
        assert len(recorder.requests) == 1


def test_retry_connection_error_then_succeed(make_client, delays) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    recorder = fail_then_succeed(2, refuse)
    client = make_client(recorder, max_retries=2)
    client.jvp(expression="x * 2", primals=X)
    assert len(recorder.requests) == 3 and len(delays) == 2


def test_retry_connection_error_gives_up(make_client, delays) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    recorder = Recorder(refuse)
    with pytest.raises(APIConnectionError, match="connection refused") as info:
        make_client(recorder, max_retries=2).jvp(expression="x * 2", primals=X)
    assert not isinstance(info.value, APITimeoutError)
    assert len(recorder.requests) == 3


def test_retry_timeout_gives_up_with_timeout_error(make_client, delays) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    recorder = Recorder(slow)
    with pytest.raises(APITimeoutError):
        make_client(recorder, max_retries=1).jvp(expression="x * 2", primals=X)
    assert len(recorder.requests) == 2 and len(delays) == 1


def test_retry_honours_retry_after_seconds(make_client, delays) -> None:
    recorder = fail_then_succeed(
        2, lambda r: error_response(503, "overloaded", "full", headers={"Retry-After": "3"})
    )
    make_client(recorder, max_retries=2).jvp(expression="x * 2", primals=X)
    assert delays == [3.0, 3.0]


def test_retry_honours_retry_after_http_date(make_client, delays) -> None:
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    recorder = fail_then_succeed(
        1, lambda r: error_response(429, "rate_limited", "slow down", headers={"Retry-After": when})
    )
    make_client(recorder, max_retries=1).jvp(expression="x * 2", primals=X)
    assert len(delays) == 1 and 17.0 <= delays[0] <= 20.0


def test_retry_honours_retry_after_ms(make_client, delays) -> None:
    recorder = fail_then_succeed(
        1, lambda r: error_response(503, "overloaded", "full", headers={"Retry-After-Ms": "250"})
    )
    make_client(recorder, max_retries=1).jvp(expression="x * 2", primals=X)
    assert delays == [0.25]


def test_retry_caps_retry_after(make_client, delays) -> None:
    recorder = fail_then_succeed(
        1, lambda r: error_response(503, "overloaded", "full", headers={"Retry-After": "3600"})
    )
    make_client(recorder, max_retries=1).jvp(expression="x * 2", primals=X)
    assert delays == [MAX_RETRY_AFTER_S]


def test_retry_backoff_grows_exponentially_with_jitter_and_cap(make_client, delays) -> None:
    recorder = Recorder(lambda r: error_response(500, "internal", "boom"))
    with pytest.raises(InternalServerError):
        make_client(recorder, max_retries=7).jvp(expression="x * 2", primals=X)
    assert len(delays) == 7
    for n, delay in enumerate(delays):
        nominal = min(INITIAL_RETRY_DELAY_S * 2**n, MAX_RETRY_DELAY_S)
        assert 0.75 * nominal <= delay <= nominal, (n, delay)
    assert max(delays) <= MAX_RETRY_DELAY_S


def test_retry_ignores_unreadable_retry_after(make_client, delays) -> None:
    recorder = fail_then_succeed(
        1, lambda r: error_response(503, "overloaded", "full", headers={"Retry-After": "soon"})
    )
    make_client(recorder, max_retries=1).jvp(expression="x * 2", primals=X)
    assert 0.75 * INITIAL_RETRY_DELAY_S <= delays[0] <= INITIAL_RETRY_DELAY_S


def test_retry_resends_same_body(make_client) -> None:
    recorder = fail_then_succeed(1, overloaded)
    make_client(recorder, max_retries=1).jvp(expression="x * 2", primals=X)
    first, second = recorder.requests
    assert first.content == second.content and first.url == second.url
