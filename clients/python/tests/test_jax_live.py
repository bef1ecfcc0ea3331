"""jvp_client.jax.remote against the real server (in-process): a local JAX function composed
with the remote one, under jax.grad, jax.vjp, jax.jvp, jax.jit and jax.vmap over
tangents and cotangents (one batched request each), against the same program written in
JAX (float64); requests counted on the wire by an httpx event hook."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
import test_live

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from jvp_client import JVPClient  # noqa: E402
from jvp_client.jax import remote  # noqa: E402

asgi = test_live.asgi


def _local_remote_part(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sin(x) * y


def _program(f):  # type: ignore[no-untyped-def]
    def h(x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.sum(jnp.tanh(f(x * 2.0, y)) ** 2)

    return h


X = jnp.asarray(np.random.default_rng(0).standard_normal(5))
Y = jnp.asarray(np.random.default_rng(1).standard_normal(5))


def test_remote_under_grad_vjp_and_jit(asgi: JVPClient) -> None:
    f = remote(asgi, expression="sin(x) * y")
    h, ref = _program(f), _program(_local_remote_part)
    np.testing.assert_allclose(h(X, Y), ref(X, Y), rtol=1e-12)
    for got, want in zip(
        jax.grad(h, argnums=(0, 1))(X, Y), jax.grad(ref, argnums=(0, 1))(X, Y), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    out, pullback = jax.vjp(lambda x: f(x, Y), X)
    u = jnp.arange(5.0)
    np.testing.assert_allclose(pullback(u)[0], jnp.cos(X) * Y * u, rtol=1e-12)
    before = dict(f.calls)
    jitted = jax.jit(jax.grad(h))
    np.testing.assert_allclose(jitted(X, Y), jax.grad(ref)(X, Y), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jitted(X + 1, Y), jax.grad(ref)(X + 1, Y), rtol=1e-10)
    assert f.calls["vjp"] == before["vjp"] + 2  # one /vjp per gradient, also under jit


def test_remote_under_jvp_and_vmap_over_tangents(asgi: JVPClient) -> None:
    f = remote(asgi, expression="sin(x) * y")
    h, ref = _program(f), _program(_local_remote_part)
    v = jnp.asarray(np.random.default_rng(2).standard_normal(5))
    got = jax.jvp(lambda x: h(x, Y), (X,), (v,))
    want = jax.jvp(lambda x: ref(x, Y), (X,), (v,))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)


@pytest.fixture
def counted() -> Any:
    """A client on the app in-process whose requests are recorded: (client, [(path, body)])."""
    with test_live.asgi_http(test_live.SERVER_ENV) as http:
        seen: list[tuple[str, dict[str, Any]]] = []

        def record(request: httpx.Request) -> None:
            body = json.loads(request.content) if request.content else {}
            seen.append((request.url.path, body))

        http.event_hooks = {"request": [record]}
        yield JVPClient(http_client=http, max_retries=0), seen


def _tangent_requests(seen: list[tuple[str, dict[str, Any]]], path: str) -> list[dict[str, Any]]:
    key = "tangents" if path == "/jvp" else "cotangents"
    return [body for p, body in seen if p == path and body.get(key)]


def test_vmap_over_tangents_is_one_tangent_batch_request(counted: Any) -> None:
    client, seen = counted
    f = remote(client, expression="sin(x) * y")
    V = jnp.asarray(np.random.default_rng(3).standard_normal((4, 5)))

    def directions(g):  # type: ignore[no-untyped-def]
        return lambda t: jax.jvp(lambda x: _program(g)(x, Y), (X,), (t,))[1]

    want = jax.vmap(directions(_local_remote_part))(V)
    f(X, Y)  # shapes known (one /eval_shape), so what follows counts only the work
    seen.clear()
    np.testing.assert_allclose(jax.vmap(directions(f))(V), want, rtol=1e-10, atol=1e-12)
    (batched,) = _tangent_requests(seen, "/jvp")  # one request carries all 4 tangents ...
    assert batched["options"]["tangent_batch"] is True
    assert len(seen) == 2  # ... and one the primal output (no tangents)
    seen.clear()
    jitted = jax.jit(jax.vmap(directions(f)))
    np.testing.assert_allclose(jitted(V), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jitted(V * 2), want * 2, rtol=1e-10, atol=1e-12)
    # Under jit too: per call one request for all the tangents, one for the output (which
    # tanh's derivative needs).
    assert len(seen) == 4 and len(_tangent_requests(seen, "/jvp")) == 2
    assert all(b["options"]["tangent_batch"] is True for b in _tangent_requests(seen, "/jvp"))
    # jax.jacfwd is a vmap over the identity's rows: the whole Jacobian in one request.
    seen.clear()
    jac = jax.jit(jax.jacfwd(lambda x: f(x, Y)))(X)
    np.testing.assert_allclose(jac, jnp.diag(jnp.cos(X) * Y), rtol=1e-12, atol=1e-15)
    assert len(seen) == 1 and seen[0][1]["options"]["tangent_batch"] is True


def test_vmap_over_cotangents_is_one_cotangent_batch_request(counted: Any) -> None:
    client, seen = counted
    f = remote(client, expression="sin(x) * y")
    U = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5)))
    _, pullback = jax.vjp(lambda x, y: f(x, y), X, Y)
    _, ref_pullback = jax.vjp(_local_remote_part, X, Y)
    seen.clear()
    got = jax.vmap(pullback)(U)
    for g, w in zip(got, jax.vmap(ref_pullback)(U), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15)
    (batched,) = _tangent_requests(seen, "/vjp")
    assert batched["options"]["cotangent_batch"] is True and len(seen) == 1
    seen.clear()
    jac = jax.jit(jax.jacrev(lambda x: _program(f)(x, Y) * x))(X)
    want = jax.jacrev(lambda x: _program(_local_remote_part)(x, Y) * x)(X)
    np.testing.assert_allclose(jac, want, rtol=1e-10, atol=1e-12)
    assert [p for p, _ in seen] == ["/jvp", "/vjp"]  # the output, then all 5 rows at once
    assert seen[1][1]["options"]["cotangent_batch"] is True


def test_vmap_over_primals_is_one_request_per_point(counted: Any) -> None:
    client, seen = counted
    f = remote(client, expression="sin(x) * y")
    Xs = jnp.stack([X, X + 1.0, X - 0.5])
    v = jnp.asarray(np.random.default_rng(5).standard_normal(5))
    got = jax.vmap(lambda x: jax.jvp(lambda x: f(x, Y), (x,), (v,))[1])(Xs)
    want = jax.vmap(lambda x: jnp.cos(x) * Y * v)(Xs)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert len(_tangent_requests(seen, "/jvp")) == 3
