"""jvp_client.jax.remote against the real server (in-process): a local JAX function composed
with the remote one, under jax.grad, jax.vjp, jax.jvp, jax.jit and jax.vmap over
tangents (refused for now), against the same program written in JAX (float64)."""

from __future__ import annotations

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
    # Not done: jax.vmap over tangents. The tangent map is a linear_call (so that jax.grad
    # can transpose it), and JAX 0.10 has no batching rule for linear_call: refused by JAX,
    # never a wrong number. (Batched tangents: client.jvp(..., tangent_batch=True).)
    V = jnp.asarray(np.random.default_rng(3).standard_normal((4, 5)))
    with pytest.raises(NotImplementedError, match="Batching rule for 'linear_call'"):
        jax.vmap(lambda t: jax.jvp(lambda x: f(x, Y), (X,), (t,))[1])(V)
