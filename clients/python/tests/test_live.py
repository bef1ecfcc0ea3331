"""The client against the real server: in-process (ASGI) and over a uvicorn subprocess.

Numbers are checked against ``torch.func.jvp`` references computed here. The
built-in models are rebuilt locally the way ``app/models/builtin.py`` documents
them (PyTorch's default initialisation under a fixed seed in a forked RNG), so
the references use the same weights as the service.

Skipped as a whole, with the reason, while ``app.main`` (the server) or torch cannot
be imported: the client alone (``pip install -e clients/python``) has neither.
``test_derivatives_live.py`` and ``test_eval_shape_live.py`` import this module, so
they skip with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from jvp_fakes import REPO_ROOT

from jvp_client import (
    AsyncJVPClient,
    AuthenticationError,
    BadRequestError,
    DeadlineExceededError,
    JVPClient,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnprocessableEntityError,
)
from jvp_client.cli import main as cli_main

# The server and torch, installed beside the client by `make test`; without them these
# tests skip (with the reason) instead of failing to import.
app_main = pytest.importorskip(
    "app.main", reason="the live tests need the server: `make install-dev` installs it"
)
torch = pytest.importorskip("torch", reason="the live tests need torch for their references")
nn = torch.nn

README = Path(__file__).resolve().parents[1] / "README.md"
SERVER_ENV = {"JVP_DEVICE": "cpu", "JVP_NUM_THREADS": "2"}
INFERENCE_KEY, ADMIN_KEY = "sk-inference-test", "sk-admin-test"
RESTRICTED_ENV = {
    **SERVER_ENV,
    "JVP_API_KEYS": INFERENCE_KEY,
    "JVP_ADMIN_KEYS": ADMIN_KEY,
    "JVP_MAX_TENSOR_ELEMENTS": "1000",
}
_CLEARED = (
    "JVP_API_KEYS",
    "JVP_ADMIN_KEYS",
    "JVP_MODEL_DIR",
    "JVP_DATABASE_URL",
    "JVP_API_KEY",
    "JVP_BASE_URL",
    "JVP_MAX_TENSOR_ELEMENTS",
    "JVP_REQUEST_TIMEOUT_S",
)


# -- references ---------------------------------------------------------------------------


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    return module.eval()


def linear_module() -> nn.Module:
    return _seeded(0, lambda: nn.Linear(5, 5))


def mlp_module() -> nn.Module:
    return _seeded(1, lambda: nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64)))


def reference_jvp(
    f: Callable[..., torch.Tensor], primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    as_t = [torch.as_tensor(p) for p in primals]
    tan_t = [torch.as_tensor(t) for t in tangents]
    result = torch.func.jvp(f, tuple(as_t), tuple(tan_t))
    return result[0], result[1]


def module_jvp(
    module: nn.Module,
    x: torch.Tensor,
    x_dot: torch.Tensor,
    param_dots: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    params = {k: v.detach() for k, v in module.named_parameters()}
    dots = {k: torch.zeros_like(v) for k, v in params.items()}
    dots.update(param_dots or {})

    def f(p: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, p, (inp,))

    result = torch.func.jvp(f, (params, x), (dots, x_dot))
    return result[0], result[1]


# -- servers ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (*_CLEARED, *values)}
    for k in _CLEARED:
        os.environ.pop(k, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def uvicorn_server(env: dict[str, str]) -> Iterator[str]:
    """``python -m uvicorn app.main:create_app --factory`` on a free port; yields its URL.

    Its output goes to a temporary file (a pipe nobody reads could fill and block it)
    and is shown if it fails to start.
    """
    port = _free_port()
    child_env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    child_env.update(env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [child_env.get("PYTHONPATH")])]
    )
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        env=child_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                output = log.read().decode(errors="replace")
                pytest.fail(f"uvicorn exited with {proc.returncode}:\n{output[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("uvicorn did not become ready within 90 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    """Run the app's lifespan (it starts the engine): asgi-lifespan, else starlette's."""
    try:
        from asgi_lifespan import LifespanManager
    except ImportError:
        async with app.router.lifespan_context(app):
            yield
    else:
        async with LifespanManager(app):
            yield


class ThreadedASGITransport(httpx.BaseTransport):
    """A sync transport over ``httpx.ASGITransport``: the app and its lifespan run on an
    event loop in a thread (what ``fastapi.testclient.TestClient`` does, without depending
    on which httpx package starlette's TestClient is built on)."""

    def __init__(self, app: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._asgi = httpx.ASGITransport(app=app)
        self._stack = contextlib.AsyncExitStack()
        self._call(self._stack.enter_async_context(_lifespan(app)))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        content = request.read()

        async def send() -> tuple[int, httpx.Headers, bytes]:
            inner = httpx.Request(
                request.method, request.url, headers=request.headers, content=content
            )
            response = await self._asgi.handle_async_request(inner)
            return response.status_code, response.headers, await response.aread()

        status, headers, body = self._call(send())
        return httpx.Response(status, headers=headers, content=body, request=request)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._stack.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()


@contextlib.contextmanager
def asgi_http(env: dict[str, str]) -> Iterator[httpx.Client]:
    """An httpx.Client on ``create_app()`` in-process, built with the ``JVP_*`` env ``env``."""
    with _env(env):
        app = app_main.create_app()
    with httpx.Client(transport=ThreadedASGITransport(app), base_url="http://asgi") as http:
        yield http


@contextlib.contextmanager
def asgi_client(env: dict[str, str], **kwargs: Any) -> Iterator[JVPClient]:
    """A JVPClient on the app in-process."""
    with asgi_http(env) as http:
        yield JVPClient(http_client=http, max_retries=0, **kwargs)


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    with uvicorn_server(SERVER_ENV) as url:
        yield url


@pytest.fixture(scope="module")
def restricted_url() -> Iterator[str]:
    with uvicorn_server(RESTRICTED_ENV) as url:
        yield url


@pytest.fixture(scope="module")
def asgi() -> Iterator[JVPClient]:
    with asgi_client(SERVER_ENV) as client:
        yield client


@pytest.fixture(params=["asgi", "uvicorn"])
def client(request: pytest.FixtureRequest) -> Iterator[JVPClient]:
    """The same tests in-process and over a real socket."""
    if request.param == "asgi":
        yield request.getfixturevalue("asgi")
        return
    with JVPClient(base_url=request.getfixturevalue("live_url"), max_retries=0) as c:
        yield c


@pytest_asyncio.fixture(params=["asgi", "uvicorn"])
async def async_client(request: pytest.FixtureRequest) -> AsyncIterator[AsyncJVPClient]:
    if request.param == "uvicorn":
        async with AsyncJVPClient(base_url=request.getfixturevalue("live_url"), max_retries=0) as c:
            yield c
        return
    with _env(SERVER_ENV):
        app = app_main.create_app()
    async with _lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport) as http:
            yield AsyncJVPClient(http_client=http, max_retries=0)


# -- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize("n", [3, 200], ids=["json", "b64"])
def test_jvp_expression_matches_torch_func_jvp_numpy(
    client: JVPClient, engine: str, n: int
) -> None:
    rng = np.random.default_rng(0)
    x, y, tx, ty = (rng.standard_normal(n) for _ in range(4))
    result = client.jvp(
        expression="x**2 * sin(y) + exp(x / 4)",
        primals={"x": x, "y": y},
        tangents={"x": tx, "y": ty},
        engine=engine,
    )
    out, jvp = reference_jvp(lambda a, b: a**2 * torch.sin(b) + torch.exp(a / 4), (x, y), (tx, ty))
    assert isinstance(result.output, np.ndarray) and result.output.dtype == np.float64
    assert result.dtype == "float64" and result.engine == engine
    np.testing.assert_allclose(result.output, out.numpy(), rtol=1e-12)
    np.testing.assert_allclose(result.jvp, jvp.numpy(), rtol=1e-12, atol=1e-14)
    assert result.timing_ms["total"] > 0 and result.device == "cpu"


@pytest.mark.parametrize("shape", [(), (4,), (8, 16)], ids=str)
def test_jvp_expression_matches_torch_func_jvp_torch(
    client: JVPClient, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    x, t = torch.randn(shape), torch.randn(shape)
    result = client.jvp(expression="tanh(x) * x", primals={"x": x}, tangents={"x": t})
    out, jvp = reference_jvp(lambda a: torch.tanh(a) * a, (x,), (t,))
    assert isinstance(result.jvp, torch.Tensor) and result.jvp.dtype == torch.float32
    assert result.jvp.shape == shape
    torch.testing.assert_close(result.output, out)
    torch.testing.assert_close(result.jvp, jvp)


def test_jvp_expression_zero_tangent_for_missing_input(client: JVPClient) -> None:
    result = client.jvp(
        expression="x * y", primals={"x": [1.0, 2.0], "y": [3.0, 4.0]}, tangents={"x": [1.0, 1.0]}
    )
    np.testing.assert_allclose(result.jvp, [3.0, 4.0])
    no_tangents = client.jvp(expression="x * y", primals={"x": [1.0], "y": [3.0]})
    np.testing.assert_array_equal(no_tangents.jvp, [0.0])


def test_jvp_expression_keeps_nan_and_infinity(client: JVPClient) -> None:
    x = np.array([math.nan, math.inf, -math.inf, 1.0], dtype=np.float32)
    result = client.jvp(
        expression="x * 2", primals={"x": x}, tangents={"x": np.ones(4, np.float32)}
    )
    np.testing.assert_array_equal(result.output, x * 2)
    big = np.full(100, 1000.0, dtype=np.float32)  # b64 both ways
    overflow = client.jvp(expression="exp(x)", primals={"x": big}, tangents={"x": big})
    assert np.isposinf(overflow.output).all() and np.isposinf(overflow.jvp).all()


def test_jvp_bfloat16_torch_in_torch_out(client: JVPClient) -> None:
    x = torch.linspace(-2, 2, 100).to(torch.bfloat16)
    result = client.jvp(expression="x * x", primals={"x": x}, tangents={"x": torch.ones_like(x)})
    assert isinstance(result.output, torch.Tensor)
    assert result.output.dtype == torch.bfloat16 and result.dtype == "bfloat16"
    torch.testing.assert_close(result.output, x * x)
    torch.testing.assert_close(result.jvp, 2 * x)


def test_jvp_bfloat16_numpy_comes_back_float32(client: JVPClient) -> None:
    x = np.array([0.5, 1.5, 3.0])
    result = client.jvp(
        expression="x * 3", primals={"x": x}, tangents={"x": np.ones(3)}, dtype="bfloat16"
    )
    assert isinstance(result.output, np.ndarray)
    assert result.dtype == "bfloat16" and result.output.dtype == np.float32
    np.testing.assert_array_equal(result.output, [1.5, 4.5, 9.0])


def test_jvp_model_linear_matches_reference_numpy(client: JVPClient) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    t = rng.standard_normal((3, 5)).astype(np.float32)
    dw = rng.standard_normal((5, 5)).astype(np.float32)
    result = client.jvp(
        model="linear", primals={"x": x}, tangents={"x": t}, parameter_tangents={"weight": dw}
    )
    out, jvp = module_jvp(
        linear_module(), torch.from_numpy(x), torch.from_numpy(t), {"weight": torch.from_numpy(dw)}
    )
    np.testing.assert_allclose(result.output, out.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.jvp, jvp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_jvp_model_linear_parameter_tangents_only(client: JVPClient) -> None:
    x = torch.randn(2, 5)
    db = torch.arange(5.0)
    result = client.jvp(model="linear", primals={"x": x}, parameter_tangents={"bias": db})
    torch.testing.assert_close(result.jvp, db.expand(2, 5))


def test_jvp_model_mlp_matches_reference_torch(client: JVPClient) -> None:
    torch.manual_seed(2)
    x, t = torch.randn(4, 64), torch.randn(4, 64)
    result = client.jvp(model="mlp", primals={"x": x}, tangents={"x": t}, engine="functional")
    out, jvp = module_jvp(mlp_module(), x, t)
    assert isinstance(result.jvp, torch.Tensor)
    torch.testing.assert_close(result.output, out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.jvp, jvp.detach(), rtol=1e-5, atol=1e-5)


def test_get_models_lists_builtins(client: JVPClient) -> None:
    names = {m.name for m in client.models()}
    assert {"linear", "mlp"} <= names
    info = client.model("linear")
    assert info.source == "builtin" and info.outputs == 1
    assert [s.name for s in info.inputs] == ["x"] and info.inputs[0].shape[-1] == 5
    assert {p.name: p.shape for p in info.parameters} == {"weight": [5, 5], "bias": [5]}


def test_get_health_ready(client: JVPClient) -> None:
    status = client.health()
    assert status.live and status.ready


# -- errors -------------------------------------------------------------------------------


def _check_error(err: Any, status: int, type_: str) -> None:
    assert err.status_code == status and err.type == type_
    assert err.message and err.body["error"]["message"] == err.message
    assert err.request_id == err.response.headers.get("x-request-id")


def test_raise_bad_request_for_bad_expression(client: JVPClient) -> None:
    with pytest.raises(BadRequestError) as info:
        client.jvp(expression="x **", primals={"x": 1.0})
    _check_error(info.value, 400, "invalid_expression")
    assert info.value.param == "expression"
    with pytest.raises(BadRequestError, match="__import__|not allowed|Unknown|unknown"):
        client.jvp(expression="__import__('os')", primals={"x": 1.0})


def test_raise_not_found_for_unknown_model(client: JVPClient) -> None:
    with pytest.raises(NotFoundError) as info:
        client.jvp(model="no-such-model", primals={"x": [1.0]})
    _check_error(info.value, 404, "not_found")
    assert "no-such-model" in info.value.message
    with pytest.raises(NotFoundError):
        client.model("no-such-model")


def test_raise_unprocessable_for_bad_shapes(client: JVPClient) -> None:
    with pytest.raises(UnprocessableEntityError) as info:
        client.jvp(expression="x * 2", primals={"x": np.ones(3)}, tangents={"x": np.ones(2)})
    _check_error(info.value, 422, "invalid_request")
    assert "[3]" in info.value.message and "[2]" in info.value.message
    assert info.value.param is not None and "x" in info.value.param


def test_raise_unprocessable_for_missing_input(client: JVPClient) -> None:
    with pytest.raises(UnprocessableEntityError) as info:
        client.jvp(expression="x * y", primals={"x": [1.0]})
    assert "y" in info.value.message


def test_raise_unprocessable_for_model_input_shape(client: JVPClient) -> None:
    with pytest.raises(UnprocessableEntityError):
        client.jvp(model="linear", primals={"x": np.ones((2, 4), np.float32)})


def test_raise_deadline_exceeded_in_process() -> None:
    env = {**SERVER_ENV, "JVP_REQUEST_TIMEOUT_S": "0.000001"}
    with asgi_client(env) as client:
        with pytest.raises(DeadlineExceededError) as info:
            client.jvp(
                model="mlp",
                primals={"x": np.ones((512, 64), np.float32)},
                tangents={"x": np.ones((512, 64), np.float32)},
            )
    _check_error(info.value, 504, "timeout")


@pytest.fixture(params=["asgi", "uvicorn"])
def restricted(request: pytest.FixtureRequest) -> Iterator[Callable[..., JVPClient]]:
    """make(api_key) -> a client of a service with API keys and a 1000-element tensor limit."""
    if request.param == "asgi":
        with asgi_http(RESTRICTED_ENV) as http:
            yield lambda api_key=None: JVPClient(
                http_client=http, api_key=api_key or "", max_retries=0
            )
        return
    url = request.getfixturevalue("restricted_url")
    made: list[JVPClient] = []

    def make(api_key: str | None = None) -> JVPClient:
        made.append(JVPClient(base_url=url, api_key=api_key or "", max_retries=0))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_raise_authentication_error_without_key(restricted) -> None:
    with pytest.raises(AuthenticationError) as info:
        restricted().jvp(expression="x", primals={"x": 1.0})
    _check_error(info.value, 401, "unauthorized")
    with pytest.raises(AuthenticationError):
        restricted("wrong-key").models()
    assert restricted().health().ready  # /healthz and /readyz need no key


def test_jvp_with_inference_and_admin_keys(restricted) -> None:
    for key in (INFERENCE_KEY, ADMIN_KEY):
        result = restricted(key).jvp(expression="x + 1", primals={"x": [1.0]})
        np.testing.assert_array_equal(result.output, [2.0])


def test_raise_permission_denied_for_inference_key_on_admin_route(restricted) -> None:
    try:
        restricted(INFERENCE_KEY).load_model("linear")
    except PermissionDeniedError as err:
        _check_error(err, 403, "forbidden")
    else:
        pytest.fail("an inference key was accepted on an admin route")


def test_raise_payload_too_large_for_big_tensor(restricted) -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        restricted(INFERENCE_KEY).jvp(expression="x", primals={"x": np.ones(2000)})
    _check_error(info.value, 413, "too_large")
    assert "1000" in info.value.message


# -- async ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_jvp_async_matches_torch_func_jvp(async_client: AsyncJVPClient) -> None:
    x = np.linspace(-1, 1, 150)
    result = await async_client.jvp(
        expression="cos(x) * x", primals={"x": x}, tangents={"x": np.ones_like(x)}
    )
    _, jvp = reference_jvp(lambda a: torch.cos(a) * a, (x,), (np.ones_like(x),))
    np.testing.assert_allclose(result.jvp, jvp.numpy(), rtol=1e-12)
    torch_result = await async_client.jvp(
        model="linear", primals={"x": torch.ones(1, 5)}, tangents={"x": torch.ones(1, 5)}
    )
    _, ref = module_jvp(linear_module(), torch.ones(1, 5), torch.ones(1, 5))
    torch.testing.assert_close(torch_result.jvp, ref.detach())


@pytest.mark.asyncio
async def test_raise_async_errors(async_client: AsyncJVPClient) -> None:
    with pytest.raises(BadRequestError):
        await async_client.jvp(expression="x +", primals={"x": 1.0})
    with pytest.raises(NotFoundError):
        await async_client.model("nope")
    assert (await async_client.health()).ready


# -- safetensors bodies (NOTE [binary bodies] in _base.py) ---------------------------------

SAFETENSORS = "application/x-safetensors"


@contextlib.contextmanager
def _media_types(client: JVPClient) -> Iterator[list[tuple[str, str]]]:
    """(request, response) Content-Types of what ``client`` sends while inside."""
    http: httpx.Client = client._client
    seen: list[tuple[str, str]] = []

    def record(response: httpx.Response) -> None:
        seen.append(
            (
                response.request.headers.get("content-type", ""),
                response.headers.get("content-type", ""),
            )
        )

    hooks = http.event_hooks
    http.event_hooks = {**hooks, "response": [*hooks["response"], record]}
    try:
        yield seen
    finally:
        http.event_hooks = hooks


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_jvp_binary_matches_torch_func_jvp(client: JVPClient, dtype: type) -> None:
    rng = np.random.default_rng(3)
    x, y, tx, ty = (rng.standard_normal((256, 300)).astype(dtype) for _ in range(4))
    with _media_types(client) as seen:
        result = client.jvp(
            expression="x**2 * sin(y) + exp(x / 4)",
            primals={"x": x, "y": y},
            tangents={"x": tx, "y": ty},
        )
    assert seen == [(SAFETENSORS, SAFETENSORS)]
    out, jvp = reference_jvp(lambda a, b: a**2 * torch.sin(b) + torch.exp(a / 4), (x, y), (tx, ty))
    assert isinstance(result.jvp, np.ndarray) and result.jvp.dtype == dtype
    assert result.jvp.shape == (256, 300) and result.dtype == np.dtype(dtype).name
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-13}
    np.testing.assert_allclose(result.output, out.numpy(), **tol)
    np.testing.assert_allclose(result.jvp, jvp.numpy(), **tol)
    assert result.device == "cpu" and result.method and result.timing_ms["total"] > 0


def test_jvp_binary_tangent_batch_and_check(client: JVPClient) -> None:
    x = np.linspace(-2.0, 2.0, 30_000)
    directions = np.stack([np.ones_like(x), x, np.cos(x)])  # K = 3: 120,000 elements in all
    with _media_types(client) as seen:
        batched = client.jvp(
            expression="tanh(x) * x",
            primals={"x": x},
            tangents={"x": directions},
            tangent_batch=True,
        )
        checked = client.jvp(
            expression="tanh(x) * x",
            primals={"x": np.tile(x, 3)},
            tangents={"x": np.tile(directions[2], 3)},
            check=True,
        )
    assert seen == [(SAFETENSORS, SAFETENSORS)] * 2
    assert batched.jvp.shape == (3, 30_000)
    for k in range(3):
        _, ref = reference_jvp(lambda a: torch.tanh(a) * a, (x,), (directions[k],))
        np.testing.assert_allclose(batched.jvp[k], ref.numpy(), rtol=1e-12, atol=1e-14)
    assert checked.check is not None and checked.check.passed
    assert checked.check.max_abs_error < 1e-6


def test_jvp_binary_model_mlp_parameter_tangents(client: JVPClient) -> None:
    torch.manual_seed(4)
    x, t = torch.randn(1024, 64), torch.randn(1024, 64)  # 131,072 elements
    dw = torch.randn(256, 64)
    with _media_types(client) as seen:
        result = client.jvp(
            model="mlp", primals={"x": x}, tangents={"x": t}, parameter_tangents={"0.weight": dw}
        )
    assert seen == [(SAFETENSORS, SAFETENSORS)]
    out, jvp = module_jvp(mlp_module(), x, t, {"0.weight": dw})
    assert isinstance(result.jvp, torch.Tensor) and result.jvp.shape == (1024, 64)
    torch.testing.assert_close(result.output, out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.jvp, jvp.detach(), rtol=1e-4, atol=1e-4)


def test_raise_errors_for_binary_requests(client: JVPClient) -> None:
    big = np.ones(70_000, np.float32)
    with _media_types(client) as seen:
        with pytest.raises(NotFoundError) as not_found:
            client.jvp(model="no-such-model", primals={"x": big})
        with pytest.raises(BadRequestError) as bad:
            client.jvp(expression="x **", primals={"x": big})
        with pytest.raises(UnprocessableEntityError) as shapes:
            client.jvp(expression="x * 2", primals={"x": big}, tangents={"x": big[:-1]})
    assert [request for request, _ in seen] == [SAFETENSORS] * 3
    _check_error(not_found.value, 404, "not_found")
    assert "no-such-model" in not_found.value.message
    _check_error(bad.value, 400, "invalid_expression")
    assert bad.value.param == "expression"
    _check_error(shapes.value, 422, "invalid_request")
    assert "70000" in shapes.value.message and "69999" in shapes.value.message


def test_raise_payload_too_large_for_binary_request(restricted) -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        restricted(INFERENCE_KEY).jvp(expression="x", primals={"x": np.ones(70_000)})
    _check_error(info.value, 413, "too_large")
    assert "1000" in info.value.message and "70000" in info.value.message


@pytest.mark.asyncio
async def test_jvp_async_binary_matches_torch_func_jvp(async_client: AsyncJVPClient) -> None:
    x = torch.linspace(-1, 1, 100_000, dtype=torch.float64)
    t = torch.cos(x)
    result = await async_client.jvp(expression="cos(x) * x", primals={"x": x}, tangents={"x": t})
    out, jvp = reference_jvp(lambda a: torch.cos(a) * a, (x,), (t,))
    assert isinstance(result.jvp, torch.Tensor) and result.jvp.dtype == torch.float64
    torch.testing.assert_close(result.output, out, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.jvp, jvp, rtol=1e-12, atol=1e-14)
    with pytest.raises(NotFoundError, match="no-such-model"):
        await async_client.jvp(model="no-such-model", primals={"x": x})


# -- jobs, CLI, README ----------------------------------------------------------------------


def test_submit_job_live(client: JVPClient) -> None:
    tasks: list[dict[str, Any]] = [
        {"primals": {"x": np.full(3, float(i))}, "tangents": {"x": np.ones(3)}} for i in range(4)
    ]
    # a tangent whose shape does not match its primal fails that task only
    tasks.append({"primals": {"x": np.ones(3)}, "tangents": {"x": np.ones(2)}})
    job = client.submit_job(tasks, expression="x**2")
    info = job.wait(poll_interval_s=0.05, timeout_s=60)
    assert info.status == "completed" and info.total == 5 and info.done == 5
    assert info.failed == 1
    results = list(job.results(page_size=2))
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    for r in results[:4]:
        assert isinstance(r.output, np.ndarray) and isinstance(r.jvp, np.ndarray)
        np.testing.assert_allclose(r.output, np.full(3, r.index**2))
        np.testing.assert_allclose(r.jvp, np.full(3, 2.0 * r.index))
    error = results[4].error
    assert error is not None and error.type == "invalid_request"
    assert "[3]" in error.message and "[2]" in error.message


def test_wait_returns_at_the_jobs_end_not_at_the_next_poll_live(client: JVPClient) -> None:
    """The service holds each poll until the job finishes (GET /jobs/{id}?wait_s=): with
    polls 30 s apart, `wait` still returns as the job ends."""
    tasks = [
        {"primals": {"x": np.full(3, float(i))}, "tangents": {"x": np.ones(3)}} for i in range(3)
    ]
    job = client.submit_job(tasks, expression="x**3")
    t0 = time.monotonic()
    info = job.wait(poll_interval_s=30, timeout_s=120)
    assert time.monotonic() - t0 < 20
    assert info.status == "completed" and info.done == 3 and info.failed == 0
    for r in job.results():
        np.testing.assert_allclose(r.jvp, np.full(3, 3.0 * r.index**2))
    # an expression that does not compile fails the whole submission, naming the task
    with pytest.raises(BadRequestError) as info:
        client.submit_job([{"expression": "x **", "primals": {"x": [1.0]}}])
    assert info.value.param == "tasks[0].expression"


def test_call_cli_live(live_url: str, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "x.npy", np.array([1.0, 2.0], dtype=np.float32))
    np.save(tmp_path / "v.npy", np.array([1.0, 0.5], dtype=np.float32))
    out = tmp_path / "result.npz"
    code = cli_main(
        [
            "call",
            "--base-url",
            live_url,
            "--expression",
            "x**2 + y**2",
            "--primal",
            f"x={tmp_path / 'x.npy'}",
            "--primal",
            "y=[3.0, 4.0]",
            "--tangent",
            f"x={tmp_path / 'v.npy'}",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    with np.load(out) as data:
        np.testing.assert_allclose(data["output"], [10.0, 20.0])
        np.testing.assert_allclose(data["jvp"], [2.0, 2.0])
    assert cli_main(["models", "--base-url", live_url]) == 0
    assert "linear" in capsys.readouterr().out
    assert cli_main(["health", "--base-url", live_url]) == 0
    assert cli_main(["call", "--base-url", live_url, "-m", "nope", "-p", "x=1"]) == 1
    assert "404 not_found" in capsys.readouterr().err


def _readme_python_block() -> str:
    text = README.read_text()
    section = text.split("## Python client", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README.md's 'Python client' section has no python block"
    return match.group(1)


def test_run_readme_example(live_url: str, monkeypatch, capsys) -> None:
    monkeypatch.setenv("JVP_BASE_URL", live_url)
    monkeypatch.delenv("JVP_API_KEY", raising=False)
    code = compile(_readme_python_block(), str(README), "exec")
    exec(code, {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "404 not_found" in printed and "forward" in printed
    assert "check passed: max abs error" in printed
