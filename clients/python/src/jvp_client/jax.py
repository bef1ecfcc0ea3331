"""The remote function inside JAX programs (``pip install "jvp-client[jax]"``).

`remote` returns a function of JAX arrays usable under ``jax.jvp``, ``jax.vjp`` /
``jax.grad`` and ``jax.jit``. The values come from ``jax.pure_callback`` (the service is
called from the host; result shapes from ``POST /eval_shape``, asked once per input
shapes while tracing). Derivatives:

- forward mode: a ``jax.custom_jvp`` rule whose tangent is ``POST /jvp``; inputs whose
  tangent is a symbolic zero are not sent (they contribute nothing, exactly);
- reverse mode: that tangent map is a primitive of its own (``jvp_client_remote_jvp``)
  whose transpose rule is ``POST /vjp`` (``jvp_client_remote_vjp``), so ``jax.grad``
  transposes the JVP rule into one /vjp;
- ``jax.vmap`` over tangents: the batching rule of the tangent map sends the K tangents as
  ONE ``tangent_batch`` request, and that of its transpose the K cotangents as one
  ``cotangent_batch`` request (``jax.vmap`` of a pullback, ``jax.jacrev``). ``jax.vmap``
  over primals makes one request per element (the service linearizes at one point).

NOTE [why primitives]: ``jax.custom_derivatives.linear_call`` (JAX's ready-made "linear
function with a custom transpose") has no batching rule in JAX 0.10, and a
``custom_vmap`` is not transposable; a ``jax.extend.core.Primitive`` takes all three
rules (batching, transpose, lowering through ``jax.pure_callback``) and is the route JAX's
own custom-derivative design note names for calling into other systems.

Higher derivatives (a JVP of the VJP) are refused by JAX: a callback has no derivative.

    >>> import jax, jax.numpy as jnp
    >>> f = remote(client, expression="sin(x) * y")  # doctest: +SKIP
    >>> jax.grad(lambda x: jnp.sum(f(x, y=jnp.ones(3))))(jnp.zeros(3))  # doctest: +SKIP
    Array([1., 1., 1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.core import ShapedArray
    from jax.custom_derivatives import SymbolicZero
    from jax.extend.core import Primitive
    from jax.interpreters import ad, batching, mlir
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError('jvp_client.jax needs JAX: pip install "jvp-client[jax]"') from exc

from ._types import ShapeInfo
from ._variables import RemoteTarget

if TYPE_CHECKING:
    from ._client import JVPClient

__all__ = ["RemoteJaxFunction", "remote"]


def _np(value: Any) -> np.ndarray:
    return np.asarray(value)


class RemoteJaxFunction(RemoteTarget):
    """The function `remote` returns; ``.names`` lists its inputs in positional order;
    ``.calls`` counts the requests it made, by route."""

    def __init__(
        self, client: JVPClient, *, expression: str | None = None, model: str | None = None
    ) -> None:
        super().__init__(client, expression=expression, model=model)
        self.calls: dict[str, int] = {"jvp": 0, "vjp": 0, "eval_shape": 0}
        self._shapes: dict[Any, tuple[list[jax.ShapeDtypeStruct], bool]] = {}
        self._fn = self._build()

    # -- shapes -----------------------------------------------------------------------

    def _out_specs(self, xs: Sequence[Any]) -> tuple[list[jax.ShapeDtypeStruct], bool]:
        """Output shapes and dtypes for inputs shaped like ``xs`` (POST /eval_shape)."""
        key = tuple((tuple(x.shape), str(x.dtype)) for x in xs)
        found = self._shapes.get(key)
        if found is None:
            self.calls["eval_shape"] += 1
            dtype = str(xs[0].dtype) if xs else "float32"
            result = self.client.eval_shape(
                "jvp",
                expression=self.expression,
                model=self.model,
                primals={
                    n: ShapeInfo(tuple(x.shape), str(x.dtype))
                    for n, x in zip(self.names, xs, strict=True)
                },
                dtype=dtype,
            )
            outputs = result.output if isinstance(result.output, list) else [result.output]
            specs = [
                jax.ShapeDtypeStruct(tuple(o.shape), np.dtype(o.dtype))  # type: ignore[no-untyped-call, unused-ignore]
                for o in outputs
            ]
            found = self._shapes[key] = (specs, isinstance(result.output, list))
        return found

    # -- host calls -------------------------------------------------------------------

    def _host_eval(self, *arrays: Any) -> tuple[np.ndarray, ...]:
        self.calls["jvp"] += 1
        r = self.client.jvp(
            expression=self.expression,
            model=self.model,
            primals={n: _np(a) for n, a in zip(self.names, arrays, strict=True)},
        )
        outs = r.output if isinstance(r.output, list) else [r.output]
        return tuple(_np(o) for o in outs)

    def _host_jvp(
        self,
        shapes: list[tuple[int, ...]],
        which: tuple[int, ...],
        dtypes: list[np.dtype[Any]],
        *arrays: Any,
    ) -> tuple[np.ndarray, ...]:
        """J·t for the inputs in ``which``; a tangent with one more (leading) axis than its
        primal is a batch (jax.vmap over tangents): sent as one tangent_batch request."""
        self.calls["jvp"] += 1
        n = len(self.names)
        primals = {
            name: _np(a).reshape(shape)
            for name, a, shape in zip(self.names, arrays[:n], shapes, strict=True)
        }
        given = [_np(t) for t in arrays[n:]]
        batch = max(
            (t.shape[0] for t, i in zip(given, which, strict=True) if t.ndim > len(shapes[i])),
            default=None,
        )
        tangents: dict[str, np.ndarray] = {}
        for t, i in zip(given, which, strict=True):
            shape = shapes[i]
            if batch is not None:
                t = t if t.ndim > len(shape) else t[None]
                t = np.broadcast_to(t, (batch, *shape))
            tangents[self.names[i]] = np.ascontiguousarray(t)
        r = self.client.jvp(
            expression=self.expression,
            model=self.model,
            primals=primals,
            tangents=tangents,
            tangent_batch=batch is not None,
        )
        jvps = r.jvp if isinstance(r.jvp, list) else [r.jvp]
        return tuple(_np(j).astype(d) for j, d in zip(jvps, dtypes, strict=True))

    def _host_vjp(
        self,
        shapes: list[tuple[int, ...]],
        which: tuple[int, ...],
        batch: int | None,
        *arrays: Any,
    ) -> tuple[np.ndarray, ...]:
        """Jᵀ·u for the inputs in ``which``; with ``batch`` (jax.vmap over cotangents) every
        cotangent has a leading K (the batching rule broadcast it): one cotangent_batch
        request."""
        self.calls["vjp"] += 1
        n = len(self.names)
        primals = {name: _np(a) for name, a in zip(self.names, arrays[:n], strict=True)}
        cts = [np.ascontiguousarray(_np(c)) for c in arrays[n:]]
        wrt = [self.names[i] for i in which]
        r = self.client.vjp(
            expression=self.expression,
            model=self.model,
            primals=primals,
            cotangents=tuple(cts) if len(cts) > 1 else cts[0],
            wrt=wrt,
            cotangent_batch=batch is not None,
        )
        return tuple(
            _np(r.vjp[name]).astype(arrays[i].dtype) for name, i in zip(wrt, which, strict=True)
        )

    # -- the JAX function -------------------------------------------------------------

    def _linear(self, which: tuple[int, ...], primals: tuple[Any, ...], tangents: Any) -> Any:
        """J·t for the inputs in ``which`` (primals as residuals): the tangent-map primitive,
        transposed by JAX into POST /vjp and batched into one tangent_batch request."""
        specs, _ = self._out_specs(primals)
        call = _Call(
            self,
            which,
            tuple(tuple(p.shape) for p in primals),
            tuple((tuple(s.shape), np.dtype(s.dtype)) for s in specs),
        )
        return _jvp_p.bind(*primals, *tangents, call=call)

    def _build(self) -> Any:
        # (untyped without JAX installed: mypy then sees jax as Any)
        @jax.custom_jvp  # type: ignore[untyped-decorator, unused-ignore]
        def f(*xs: Any) -> Any:
            specs, _ = self._out_specs(xs)
            return jax.pure_callback(self._host_eval, tuple(specs), *xs, vmap_method="sequential")

        def f_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> Any:
            out = f(*primals)
            which = tuple(i for i, t in enumerate(tangents) if not isinstance(t, SymbolicZero))
            if not which:
                return out, tuple(jnp.zeros(o.shape, o.dtype) for o in out)
            t_out = self._linear(which, tuple(primals), tuple(tangents[i] for i in which))
            return out, tuple(t_out)

        f.defjvp(f_jvp, symbolic_zeros=True)
        return f

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        given = self.bind(args, kwargs)
        xs = [jnp.asarray(given[n]) for n in self.names]
        outs = self._fn(*xs)
        _, several = self._out_specs(xs)
        return list(outs) if several else outs[0]


# ---------------------------------------------------------------------------------------
# The tangent map and its transpose as primitives (NOTE [why primitives]).


@dataclass(frozen=True)
class _Call:
    """A primitive's static parameters (hashable: jax.jit caches on them). ``out`` holds the
    unbatched (shape, dtype) of each result; ``batch`` the leading K once vmapped."""

    fn: RemoteJaxFunction
    which: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    out: tuple[tuple[tuple[int, ...], np.dtype[Any]], ...]
    batch: int | None = None

    def results(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        lead = () if self.batch is None else (self.batch,)
        return tuple(jax.ShapeDtypeStruct((*lead, *s), d) for s, d in self.out)  # type: ignore[no-untyped-call, unused-ignore]


_jvp_p = Primitive("jvp_client_remote_jvp")  # (*primals, *tangents of `which`) -> J·t
_vjp_p = Primitive("jvp_client_remote_vjp")  # (*primals, *cotangents) -> Jᵀ·u per `which`


def _jvp_callback(*args: Any, call: _Call) -> Any:
    dtypes = [d for _, d in call.out]
    host = call.fn._host_jvp
    return jax.pure_callback(
        lambda *a: host(list(call.shapes), call.which, dtypes, *a),
        call.results(),
        *args,
        vmap_method="sequential",
    )


def _vjp_callback(*args: Any, call: _Call) -> Any:
    host = call.fn._host_vjp
    return jax.pure_callback(
        lambda *a: host(list(call.shapes), call.which, call.batch, *a),
        call.results(),
        *args,
        vmap_method="sequential",
    )


def _batch_rule(prim: Primitive) -> Any:
    """Only the tangents (cotangents) mapped, primals not: one batched request, the mapped
    axis moved to the front. Mapped primals (the service linearizes at one point) or a
    second vmap: one bind per element, stacked."""

    def rule(args: Sequence[Any], dims: Sequence[int | None], *, call: _Call) -> Any:
        n = len(call.shapes)
        size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
        if call.batch is None and all(d is None for d in dims[:n]):
            lead = [
                jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
                for a, d in zip(args[n:], dims[n:], strict=True)
            ]
            outs = prim.bind(*args[:n], *lead, call=replace(call, batch=size))
            return outs, [0] * len(outs)
        per_k = [
            prim.bind(
                *[
                    a if d is None else jnp.take(a, k, axis=d)
                    for a, d in zip(args, dims, strict=True)
                ],
                call=call,
            )
            for k in range(size)
        ]
        return [jnp.stack(outs) for outs in zip(*per_k, strict=True)], [0] * len(per_k[0])

    return rule


def _jvp_transpose(cts: Sequence[Any], *args: Any, call: _Call) -> list[Any]:
    """Jᵀ·u for the tangents' inputs; the primals are residuals (no cotangent)."""
    n = len(call.shapes)
    primals = args[:n]
    cts = [ad.instantiate_zeros(c) if type(c) is ad.Zero else c for c in cts]
    out = tuple((call.shapes[i], np.dtype(primals[i].dtype)) for i in call.which)
    grads = _vjp_p.bind(*primals, *cts, call=replace(call, out=out))
    return [None] * n + list(grads)


for _prim, _callback in ((_jvp_p, _jvp_callback), (_vjp_p, _vjp_callback)):
    _prim.multiple_results = True
    _prim.def_impl(_callback)
    _prim.def_abstract_eval(
        lambda *_, call: [ShapedArray(r.shape, r.dtype) for r in call.results()]
    )
    mlir.register_lowering(_prim, mlir.lower_fun(_callback, multiple_results=True))
    batching.primitive_batchers[_prim] = _batch_rule(_prim)
ad.primitive_transposes[_jvp_p] = _jvp_transpose


def remote(
    client: JVPClient, *, expression: str | None = None, model: str | None = None
) -> RemoteJaxFunction:
    """The service's function as a differentiable, jit-able JAX function (see the module)."""
    return RemoteJaxFunction(client, expression=expression, model=model)
