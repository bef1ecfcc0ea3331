"""client.eval_shape against the real server (in-process and over uvicorn, with the
fixtures of test_live.py): the shapes it gives are those the operation answers."""

from __future__ import annotations

from pathlib import Path

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


def _cli(url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(["eval-shape", "--base-url", url, *argv])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def _flops(out: str) -> int:
    return int(next(line for line in out.splitlines() if line.startswith("flops:")).split()[1])


def test_cli_eval_shape_of_a_vjp(
    live_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    expr = ["-e", "sin(x) * y", "-s", "x=3,4", "-s", "y=4", "--dtype", "float64"]
    code, out, err = _cli(
        live_url, capsys, "--operation", "vjp", *expr, "--cotangent-shape", "5,3,4",
        "--cotangent-batch", "--wrt", "x",
    )  # fmt: skip
    assert code == 0, err
    assert "output: [3, 4] float64" in out and "vjp x: [5, 3, 4] float64" in out
    assert "vjp y" not in out
    with JVPClient(base_url=live_url, max_retries=0) as c:
        shaped = c.eval_shape(
            "vjp",
            expression="sin(x) * y",
            primals={"x": ShapeInfo((3, 4)), "y": ShapeInfo((4,))},
            cotangents=ShapeInfo((5, 3, 4)),
            wrt="x",
            dtype="float64",
            options={"cotangent_batch": True},
        )
        # The same estimate as the SDK's, and the shapes that /vjp then answers.
        assert _flops(out) == shaped.flops > 0
        got = c.vjp(
            expression="sin(x) * y",
            primals={"x": np.ones((3, 4)), "y": np.ones(4)},
            cotangents=np.ones((5, 3, 4)),
            cotangent_batch=True,
            wrt="x",
        )
        assert got.vjp["x"].shape == (5, 3, 4)
    # A cotangent given by value (a .npy file) instead of by shape: every input by default.
    np.save(tmp_path / "u.npy", np.ones((3, 4)))
    code, out, err = _cli(
        live_url, capsys, "--operation", "vjp", *expr, "-u", str(tmp_path / "u.npy")
    )
    assert code == 0, err
    assert "vjp x: [3, 4] float64" in out and "vjp y: [4] float64" in out


def test_cli_eval_shape_of_a_vjp_of_a_scalar(
    live_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # An empty shape is a scalar: the cotangent of sum(x), and its VJP is shaped like x.
    code, out, err = _cli(
        live_url, capsys, "--operation", "vjp", "-e", "sum(x * x)", "-s", "x=3",
        "--cotangent-shape", "",
    )  # fmt: skip
    assert code == 0, err
    assert "output: [] float32" in out and "vjp x: [3] float32" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--operation", "vjp"], "--operation vjp takes --cotangent or --cotangent-shape"),
        (["--cotangent-shape", "3"], "and only it does"),
        (["--operation", "vjp", "-u", "[1, 2, 3]", "--cotangent-shape", "3"], "not both"),
        (["--operation", "vjp", "--cotangent-shape", "3,a"], "--cotangent-shape: expected D0,D1"),
    ],
)
def test_cli_eval_shape_vjp_usage_errors(
    live_url: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = _cli(live_url, capsys, "-e", "sin(x)", "-s", "x=3", *argv)
    assert code == 2 and message in err


def test_cli_eval_shape_linearize_transpose_and_hvp_output_index(
    live_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--operation", "linearize", "-e", "tanh(A @ x)", "-s", "A=64,64", "-s", "x=64"]
    code, plain, err = _cli(live_url, capsys, *base)
    assert code == 0, err
    code, transposed, err = _cli(live_url, capsys, *base, "--transpose")
    assert code == 0, err

    def peak(out: str) -> int:
        return int(out.split("peak_bytes:")[1].split()[0])

    # What the reverse pass needs is counted in the session's memory estimate.
    assert peak(transposed) > peak(plain)
    hvp = ["--operation", "hvp", "-e", "sum(x**3)", "-s", "x=3", "-t", "x=[1, 0, 0]"]
    code, out, err = _cli(live_url, capsys, *hvp, "--output-index", "0")
    assert code == 0, err
    assert "hvp x: [3] float32" in out
    # --output-index reaches the service: an expression has one output, so 1 is refused.
    code, out, err = _cli(live_url, capsys, *hvp, "--output-index", "1")
    assert code == 1 and "output_index" in err, err
