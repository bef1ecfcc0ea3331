"""Batch jobs against a MockTransport fake of API.md's jobs API (FakeJobs in conftest.py)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from jvp_fakes import FakeJobs, error_response

from jvp_client import APIResponseValidationError, Job, NotFoundError


def _tasks(n: int, *, bad: frozenset[int] = frozenset()) -> list[dict]:
    return [
        {
            "primals": {"x": np.full(3, float(i)), "y": np.ones(3)},
            "tangents": {"x": np.ones(3), "y": np.zeros(3)},
            **({"expression": "nope"} if i in bad else {}),
        }
        for i in range(n)
    ]


def test_submit_job_sends_defaults_and_tasks(make_client) -> None:
    fake = FakeJobs()
    job = make_client(fake).submit_job(_tasks(2), expression="x**2 + y**2", engine="functional")
    assert isinstance(job, Job) and job.id == "job-1"
    assert job.info.status == "queued" and job.info.total == 2
    body = json.loads(fake.requests[0].content)
    assert body["expression"] == "x**2 + y**2"
    assert body["options"] == {"dtype": "float64", "engine": "functional"}
    assert body["tasks"][1]["primals"]["x"] == {
        "shape": [3],
        "dtype": "float64",
        "data": [1.0, 1.0, 1.0],
    }
    assert fake.requests[0].headers["idempotency-key"] == job.idempotency_key


def test_submit_job_reuses_idempotency_key_across_retries(make_client, delays) -> None:
    fake = FakeJobs()
    attempts: list[httpx.Request] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        if len(attempts) == 1:
            raise httpx.ConnectError("reset", request=request)
        if len(attempts) == 2:
            fake(request)  # the job is made, but the answer is lost
            return error_response(503, "overloaded", "try later", headers={"Retry-After": "1"})
        return fake(request)

    job = make_client(flaky, max_retries=3).submit_job(_tasks(3), expression="x**2 + y**2")
    keys = {r.headers["idempotency-key"] for r in attempts}
    assert len(attempts) == 3 and len(keys) == 1
    assert keys == {job.idempotency_key}
    assert len(fake.jobs) == 1 and job.id == "job-1"  # the retry returned the same job
    assert delays[1] == 1.0


def test_submit_job_uses_new_key_per_submission(make_client) -> None:
    fake = FakeJobs()
    client = make_client(fake)
    first = client.submit_job(_tasks(1), expression="x * 2")
    second = client.submit_job(_tasks(1), expression="x * 2")
    assert first.idempotency_key != second.idempotency_key
    assert first.id != second.id


def test_submit_job_uses_given_idempotency_key(make_client) -> None:
    fake = FakeJobs()
    client = make_client(fake)
    a = client.submit_job(_tasks(1), expression="x * 2", idempotency_key="k-1")
    b = client.submit_job(_tasks(1), expression="x * 2", idempotency_key="k-1")
    assert a.id == b.id and fake.requests[0].headers["idempotency-key"] == "k-1"


@pytest.mark.parametrize(
    ("tasks", "kwargs", "exc", "match"),
    [
        ([], {"expression": "x"}, ValueError, "at least one task"),
        ({"primals": {}}, {"expression": "x"}, TypeError, "list of task mappings"),
        ([{"primals": {"x": 1.0}}], {}, ValueError, r"tasks\[0\]: no expression or model"),
        ([{"tangents": {}}], {"expression": "x"}, TypeError, r"tasks\[0\]: expected 'primals'"),
        ([{"primals": {}}], {"expression": "x", "model": "m"}, TypeError, "at most one"),
    ],
)
def test_submit_job_rejects_bad_tasks_before_sending(
    make_client, tasks, kwargs, exc, match
) -> None:
    fake = FakeJobs()
    with pytest.raises(exc, match=match):
        make_client(fake).submit_job(tasks, **kwargs)
    assert fake.requests == []


def test_wait_job_polls_until_completed(make_client, delays) -> None:
    fake = FakeJobs(per_poll=2)
    job = make_client(fake).submit_job(_tasks(5), expression="x**2 + y**2")
    info = job.wait(poll_interval_s=0.5)
    assert info.status == "completed" and info.done == 5 and info.failed == 0
    assert job.info is info
    # polls at 2, 4, 5 done, each asking the service to wait for the job's end; this one
    # answers at once, so the client sleeps out the rest of each interval
    polls = [r for r in fake.requests if r.method == "GET"]
    assert [r.url.params.get("wait_s") for r in polls] == ["0.5"] * 3
    assert len(delays) == 2 and all(0.4 < d <= 0.5 for d in delays), delays


def test_wait_job_shows_progress_bar(make_client, capsys) -> None:
    fake = FakeJobs(per_poll=1)
    job = make_client(fake).submit_job(_tasks(3, bad=frozenset({1})), expression="x**2 + y**2")
    job.wait(progress=True)
    err = capsys.readouterr().err
    assert f"job {job.id}" in err
    assert "3/3" in err
    assert "failed=1" in err


def test_wait_job_times_out(make_client) -> None:
    fake = FakeJobs(per_poll=1)
    job = make_client(fake).submit_job(_tasks(3), expression="x * 2")
    with pytest.raises(TimeoutError, match=r"did not finish within 0 s \(status running, 1/3"):
        job.wait(timeout_s=0)


def test_results_job_iterates_pages_in_task_order(make_client) -> None:
    fake = FakeJobs(per_poll=10)
    client = make_client(fake)
    job = client.submit_job(_tasks(5, bad=frozenset({3})), expression="x**2 + y**2")
    job.wait()
    results = list(job.results(page_size=2))
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    offsets = [r.url.params["offset"] for r in fake.requests if r.url.path.endswith("/results")]
    assert offsets == ["0", "2", "4"]
    for r in results:
        if r.index == 3:
            assert not r.ok and r.error is not None
            assert r.error.type == "invalid_expression" and "nope" in r.error.message
            assert r.output is None
            continue
        assert r.ok and isinstance(r.output, np.ndarray)
        np.testing.assert_allclose(r.output, np.full(3, r.index**2 + 1.0))
        np.testing.assert_allclose(r.jvp, np.full(3, 2.0 * r.index))


def test_results_job_pages(make_client) -> None:
    fake = FakeJobs(per_poll=10)
    job = make_client(fake).submit_job(_tasks(3), expression="x * 2")
    job.wait()
    pages = list(job.pages(page_size=2))
    assert [len(p.results) for p in pages] == [2, 1]
    assert [p.next_offset for p in pages] == [2, None]


def test_results_job_returns_torch_for_torch_tasks(make_client) -> None:
    fake = FakeJobs(per_poll=10)
    tasks = [{"primals": {"x": torch.arange(100.0)}, "tangents": {"x": torch.ones(100)}}]
    job = make_client(fake).submit_job(tasks, expression="x * 2")
    job.wait()
    (result,) = list(job.results())
    assert isinstance(result.output, torch.Tensor) and result.output.dtype == torch.float32
    torch.testing.assert_close(result.jvp, torch.full((100,), 2.0))
    body = json.loads(fake.requests[0].content)
    assert "b64" in body["tasks"][0]["primals"]["x"] and body["options"]["encoding"] == "b64"


def test_results_job_stops_on_stuck_next_offset(make_client) -> None:
    def stuck(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/results"):
            return httpx.Response(200, json={"results": [], "next_offset": 0})
        return httpx.Response(
            200, json={"id": "j", "status": "completed", "total": 0, "done": 0, "failed": 0}
        )

    job = make_client(stuck).get_job("j")
    assert list(job.results()) == []


def test_results_job_rejects_malformed_page(make_client) -> None:
    def bad(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/results"):
            return httpx.Response(200, json={"pages": []})
        return httpx.Response(
            200, json={"id": "j", "status": "completed", "total": 0, "done": 0, "failed": 0}
        )

    job = make_client(bad).get_job("j")
    with pytest.raises(APIResponseValidationError, match="job results"):
        list(job.results())


def test_cancel_job(make_client) -> None:
    fake = FakeJobs(per_poll=1)
    job = make_client(fake).submit_job(_tasks(4), expression="x * 2")
    job.status()
    info = job.cancel()
    assert info.status == "cancelled" and job.info.status == "cancelled"
    assert fake.requests[-1].method == "DELETE"
    assert job.wait().status == "cancelled"


def test_cancel_job_with_empty_answer_reads_status(make_client) -> None:
    state = {"status": "running"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            state["status"] = "cancelled"
            return httpx.Response(204)
        return httpx.Response(200, json={"id": "j", "total": 1, "done": 0, "failed": 0, **state})

    info = make_client(handler).get_job("j").cancel()
    assert info.status == "cancelled"


def test_get_job_unknown_raises_not_found(make_client) -> None:
    with pytest.raises(NotFoundError, match="Unknown job"):
        make_client(FakeJobs()).get_job("missing")


def test_list_jobs(make_client) -> None:
    listing = {
        "jobs": [
            {"id": "b", "status": "queued", "total": 1, "done": 0, "failed": 0},
            {"id": "a", "status": "completed", "total": 1, "done": 1, "failed": 0},
        ]
    }
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=listing)

    jobs = make_client(handler).list_jobs(limit=5)
    assert [j.id for j in jobs] == ["b", "a"] and jobs[1].finished
    assert seen[0].url.params["limit"] == "5"
