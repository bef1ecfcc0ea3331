"""client.eval_shape against the real server (in-process and over uvicorn, with the
fixtures of test_live.py): the shapes it gives are those the operation answers."""

from __future__ import annotations

import numpy as np
import pytest
import test_live

from jvp_client import (
    AsyncJVPClient,
    EvalShapeResult,
    JVPClient,
    PayloadTooLargeError,
    ShapeInfo,
    UnprocessableEntityError,
)
from jvp_client.cli import main as cli_main

asgi = test_live.asgi
live_url = test_live.live_url
client = test_live.client
async_client = test_live.async_client


def test_eval_shape_of_a_jvp_matches_the_jvp(client: JVPClient) -> None:
    x, y = np.ones((4, 3), dtype=np.float32), np.ones(3, dtype=np.float32)
    shaped = client.eval_shape(
        expression="tanh(A @ x)",
        primals={"A": ShapeInfo((4, 3)), "x": ShapeInfo((3,))},
        tangents={"x": ShapeInfo((5, 3))},
        tangent_batch=True,
    )
    assert isinstance(shaped, EvalShapeResult)
    real = client.jvp(
        expression="tanh(A @ x)",
        primals={"A": x, "x": y},
        tangents={"x": np.ones((5, 3), dtype=np.float32)},
        tangent_batch=True,
    )
    assert shaped.output == ShapeInfo(tuple(real.output.shape), "float32")
    assert shaped.result == ShapeInfo(tuple(real.jvp.shape), "float32")
    assert shaped.result.shape == (5, 4)
    assert shaped.flops > 0 and shaped.peak_bytes > 0


def test_eval_shape_of_a_jacobian_and_an_hvp(client: JVPClient) -> None:
    jac = client.eval_shape("jacobian", model="mlp", primals={"x": ShapeInfo((2, 64))})
    assert jac.output == ShapeInfo((2, 64))
    assert jac.result == {"x": ShapeInfo((2, 64, 2, 64))}
    hvp = client.eval_shape(
        "hvp",
        expression="sum(x**3)",
        primals={"x": np.ones(7)},
        tangents={"x": ShapeInfo((7,))},
    )
    assert hvp.output == ShapeInfo(())
    assert hvp.result == {"x": ShapeInfo((7,))}


def test_eval_shape_over_a_limit_raises_the_operations_413(client: JVPClient) -> None:
    with pytest.raises(PayloadTooLargeError, match="JVP_MAX_TENSOR_ELEMENTS"):
        client.eval_shape(
            expression="x * y",
            primals={"x": ShapeInfo((16384, 1)), "y": ShapeInfo((1, 16384))},
        )
    # A solve without its unknowns gets the 422 POST /solve gives (issue 18).
    with pytest.raises(UnprocessableEntityError, match="unknowns"):
        client.eval_shape("solve", expression="x", primals={"x": ShapeInfo((2,))})


@pytest.mark.asyncio
async def test_eval_shape_async(async_client: AsyncJVPClient) -> None:
    shaped = await async_client.eval_shape(
        "linearize", model="linear", primals={"x": ShapeInfo((3, 5))}
    )
    assert shaped.output == ShapeInfo((3, 5))
    assert shaped.result == ShapeInfo((3, 5))


def test_cli_eval_shape_prints_shapes_and_cost(
    live_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(
        [
            "eval-shape",
            "--base-url",
            live_url,
            "--operation",
            "jacobian",
            "-e",
            "sin(x) * y",
            "--shape",
            "x=3,4",
            "--shape",
            "y=4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "output: [3, 4] float32" in out
    assert "jacobian x: [3, 4, 3, 4] float32" in out
    assert "jacobian y: [3, 4, 4] float32" in out
    assert "flops:" in out and "peak_bytes:" in out
