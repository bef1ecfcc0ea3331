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


def test_cli_eval_shape_of_a_solve_is_the_whole_solve_at_its_caps(
    live_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cube = ["-e", "u**3 - a", "-s", "u=5", "-s", "a=5", "--unknown", "u"]
    with JVPClient(base_url=live_url, max_retries=0) as c:
        # One J·v of f, in /solve's dtype: the unit of a solve's estimate (NOTE [the cost
        # of a solve]: at most max_iterations x (max_krylov + GMRES restarts + 20 line
        # search steps + 1) products, and one more).
        one = c.eval_shape(
            expression="u**3 - a",
            primals={"u": ShapeInfo((5,)), "a": ShapeInfo((5,))},
            tangents={"u": ShapeInfo((5,))},
            dtype="float64",
        ).flops
        assert one > 0
        solved = c.solve(
            expression="u**3 - a", primals={"u": np.ones(5), "a": np.full(5, 8.0)}, unknowns="u"
        )
    code, out, err = _cli(live_url, capsys, "--operation", "solve", *cube, "--max-iterations", "2")
    assert code == 0, err
    # The shapes that /solve then answers: float64 (its default), the solution like u.
    assert solved.solution["u"].shape == (5,) and solved.solution["u"].dtype == np.float64
    assert "output: [5] float64" in out and "solution u: [5] float64" in out
    assert _flops(out) == one * (2 * (200 + 4 + 21) + 1)
    assert "peak_bytes:" in out
    code, out, err = _cli(
        live_url, capsys, "--operation", "solve", *cube, "--max-iterations", "3",
        "--max-krylov", "10", "--krylov", "bicgstab",
    )  # fmt: skip
    assert code == 0, err
    assert _flops(out) == one * (3 * (10 + 0 + 21) + 1)  # BiCGSTAB: no restarts
    # linear: one linear solve, rhs by its shape or by value (the same estimate).
    linear = ["--operation", "solve", *cube, "--method", "linear"]
    code, by_shape, err = _cli(live_url, capsys, *linear, "--rhs-shape", "5")
    assert code == 0, err
    assert "solution u: [5] float64" in by_shape
    assert _flops(by_shape) == one * (200 + 4 + 1)
    code, by_value, err = _cli(live_url, capsys, *linear, "--rhs", "[1, 2, 3, 4, 5]")
    assert code == 0, err
    assert _flops(by_value) == _flops(by_shape)
    # The service checks the body as /solve would: linear needs rhs (exit status 1).
    code, _, err = _cli(live_url, capsys, *linear)
    assert code == 1 and "needs 'rhs'" in err, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--unknown", "x"], "--unknown is for --operation solve"),
        (["--max-iterations", "3"], "--max-iterations is for --operation solve"),
        (["--operation", "solve"], "--operation solve takes --unknown NAME"),
        (
            ["--operation", "solve", "-x", "x", "--rhs", "[1, 2, 3]", "--rhs-shape", "3"],
            "give --rhs or --rhs-shape, not both",
        ),
        (["--operation", "solve", "-x", "x", "--rhs-shape", "3,a"], "--rhs-shape: expected"),
    ],
)
def test_cli_eval_shape_solve_usage_errors(
    live_url: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = _cli(live_url, capsys, "-e", "sin(x)", "-s", "x=3", *argv)
    assert code == 2 and message in err, err
