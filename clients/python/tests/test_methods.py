"""Methods written once for both clients show their own signature and docstring; stacking
and with_options refuse what they cannot do, saying why."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from jvp_client import (
    AsyncJob,
    AsyncJVPClient,
    AsyncLinearization,
    Job,
    JobTaskError,
    JobTaskResult,
    JVPClient,
    Linearization,
    stack_results,
)

PAIRS = [
    (
        JVPClient,
        AsyncJVPClient,
        ("jvp", "jacobian", "hvp", "linearize", "vjp", "submit_job", "health"),
    ),
    (Job, AsyncJob, ("status", "wait", "results_array", "cancel")),
    (Linearization, AsyncLinearization, ("jvp", "vjp", "__call__", "close")),
]


@pytest.mark.parametrize(("sync", "async_", "names"), PAIRS)
def test_sync_and_async_methods_show_the_same_signature(
    sync: type, async_: type, names: tuple[str, ...]
) -> None:
    for name in names:
        s, a = getattr(sync, name), getattr(async_, name)
        assert inspect.signature(s) == inspect.signature(a), name
        assert inspect.iscoroutinefunction(a) and not inspect.iscoroutinefunction(s)
        assert "Plan" not in str(inspect.signature(s)) and s.__doc__ == a.__doc__


def test_help_shows_jvp_parameters_and_result() -> None:
    sig = inspect.signature(JVPClient.jvp)
    assert list(sig.parameters)[:4] == ["self", "expression", "model", "primals"]
    assert sig.return_annotation == "JVPResult"
    assert (JVPClient.jvp.__doc__ or "").startswith("``POST /jvp``")


def test_help_shows_vjp_parameters_and_result() -> None:
    sig = inspect.signature(JVPClient.vjp)
    assert list(sig.parameters)[:5] == ["self", "expression", "model", "primals", "cotangents"]
    assert sig.return_annotation == "VJPResult"
    assert (JVPClient.vjp.__doc__ or "").startswith("``POST /vjp``")
    assert inspect.signature(Linearization.vjp).return_annotation == "dict[str, Array]"


def _ok(index: int, value: object) -> JobTaskResult:
    array = np.asarray(value, dtype=float)
    return JobTaskResult(index=index, output=array, jvp=2 * array)


def test_stack_results_in_task_order() -> None:
    stacked = stack_results([_ok(1, [3.0, 4.0]), _ok(0, [1.0, 2.0])])
    np.testing.assert_array_equal(stacked.output, [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(stacked.jvp, [[2.0, 4.0], [6.0, 8.0]])
    assert stacked.index.tolist() == [0, 1] and stacked.errors == {}


def test_stack_results_refuses_shapes_that_differ() -> None:
    with pytest.raises(ValueError, match=r"task 0 has shape \[2\], task 1 has shape \[3\]"):
        stack_results([_ok(0, [1.0, 2.0]), _ok(1, [1.0, 2.0, 3.0])])


def test_stack_results_refuses_failures_unless_skipped() -> None:
    failed = JobTaskResult(index=1, error=JobTaskError(type="invalid_request", message="bad"))
    with pytest.raises(ValueError, match="task 1: invalid_request: bad"):
        stack_results([_ok(0, [1.0]), failed])
    with pytest.raises(ValueError, match="no task succeeded"):
        stack_results([failed], on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        stack_results([_ok(0, [1.0])], on_error="nan")  # type: ignore[arg-type]


def test_stack_results_of_torch_and_several_outputs() -> None:
    torch = pytest.importorskip("torch")
    rows = [
        JobTaskResult(index=i, output=[torch.ones(2) * i, torch.zeros(1)], jvp=[torch.ones(2)] * 2)
        for i in range(3)
    ]
    stacked = stack_results(rows)
    assert isinstance(stacked.output, list) and isinstance(stacked.output[0], torch.Tensor)
    assert stacked.output[0].shape == (3, 2) and stacked.output[1].shape == (3, 1)


def test_with_options_validates_and_leaves_the_original() -> None:
    with JVPClient(base_url="http://127.0.0.1:9", timeout=5.0) as client:
        with pytest.raises(ValueError, match="max_retries"):
            client.with_options(max_retries=-1)
        other = client.with_options(timeout=None, max_retries=0, base_url="http://h:1/api")
        assert (other.timeout, other.max_retries, str(other.base_url)) == (
            None,
            0,
            "http://h:1/api/",
        )
        assert (client.timeout, client.max_retries) == (5.0, 2)
        other.close()
        assert not client._client.is_closed
