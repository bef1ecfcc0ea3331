"""The service's Jacobian as a SciPy ``LinearOperator`` (``pip install "jvp-client[scipy]"``).

`linear_operator` linearizes the function once (``POST /linearize`` with
``options.transpose``) and answers ``J @ v`` with ``POST /linearize/{id}/jvp`` and
``J.T @ u`` with ``POST /linearize/{id}/vjp``; ``J @ V`` and ``J.T @ U`` (several columns)
are one call each with ``tangent_batch`` / ``cotangent_batch``. So it plugs into every
Krylov solver and eigensolver of ``scipy.sparse.linalg`` (gmres, lgmres, cg, lsmr, lsqr,
eigsh, svds) unchanged, with exact products (SciPy's own ``newton_krylov`` takes
finite-difference products instead)::

    from scipy.sparse.linalg import gmres
    with client.linear_operator(model="mlp", primals={"x": x}, wrt="x") as J:
        delta, info = gmres(J, b)

The operator's shape is (elements of every output, elements of the ``wrt`` arguments),
flattened row-major and concatenated in order; its dtype is the session's. A session that
expired is made again at the same point, once per call. ``with`` deletes the session.

`least_squares_jac` makes ``fun`` and ``jac`` for ``scipy.optimize.least_squares(...,
tr_solver="lsmr")``, the Jacobian a `JacobianOperator` at each point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

try:
    from scipy.sparse.linalg import LinearOperator
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError('jvp_client.scipy needs SciPy: pip install "jvp-client[scipy]"') from exc

from ._exceptions import NotFoundError
from ._plans import ClosesOnExit

if TYPE_CHECKING:
    from ._client import JVPClient
    from ._linearize import Linearization

__all__ = ["JacobianOperator", "LeastSquaresProblem", "least_squares_jac", "linear_operator"]


class _Function(TypedDict):
    """The function and where it runs, as `JVPClient.linearize` and `JacobianOperator`
    take them."""

    expression: str | None
    model: str | None
    dtype: object
    device: str | None


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return np.asarray(value.detach().cpu().numpy())
    return np.asarray(value)


class JacobianOperator(ClosesOnExit, LinearOperator):  # type: ignore[misc]
    """J at a point of the service's function, as a ``LinearOperator`` (see the module).

    Attributes: ``session`` (the `Linearization`), ``wrt`` (names, in column order),
    ``output`` (f at the point: one array, or a list), ``calls`` (requests made to apply it).
    """

    def __init__(
        self,
        client: JVPClient,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: Mapping[str, Any],
        wrt: str | Sequence[str] | None = None,
        dtype: object = None,
        device: str | None = None,
    ) -> None:
        self._client = client
        self._model = model
        self._function = _Function(expression=expression, model=model, dtype=dtype, device=device)
        self._primals = dict(primals)
        names = [wrt] if isinstance(wrt, str) else list(wrt) if wrt is not None else None
        self.calls = 0
        self.session: Linearization = self._linearize(names)
        self.wrt = list(self.session.wrt)
        outputs = self.session.output
        self._several = isinstance(outputs, list)
        self.output = outputs
        out_list = outputs if isinstance(outputs, list) else [outputs]
        self._out_shapes = [tuple(_numpy(o).shape) for o in out_list]
        self._arg_shapes = [self._shape_of(n) for n in self.wrt]
        rows = sum(math.prod(s) for s in self._out_shapes)
        cols = sum(math.prod(s) for s in self._arg_shapes)
        dtype_np = np.dtype(self.session.dtype) if self.session.dtype else np.float64
        super().__init__(dtype=dtype_np, shape=(rows, cols))

    # -- the session --------------------------------------------------------------------

    def _linearize(self, wrt: list[str] | None) -> Linearization:
        session: Linearization = self._client.linearize(
            **self._function, primals=self._primals, wrt=wrt, options={"transpose": True}
        )
        return session

    def _shape_of(self, name: str) -> tuple[int, ...]:
        if name in self._primals:
            return tuple(_numpy(self._primals[name]).shape)
        model = self._model
        assert model is not None, name
        info = self._client.model(model)
        for p in info.parameters:
            if p.name == name:
                return tuple(p.shape)
        raise ValueError(f"linear_operator(): {name!r} is neither an input nor a parameter")

    def _call(self, apply: Callable[[Linearization], Any]) -> Any:
        """``apply(session)``; a session that expired is made again at the point, once."""
        self.calls += 1
        try:
            return apply(self.session)
        except NotFoundError:
            self.session = self._linearize(self.wrt)
            return apply(self.session)

    def close(self) -> None:
        """Delete the session (``DELETE /linearize/{id}``)."""
        self.session.close()

    # -- splitting and joining flat vectors ----------------------------------------------

    def _split(
        self, flat: np.ndarray, shapes: Sequence[tuple[int, ...]], k: int | None
    ) -> list[np.ndarray]:
        """A flat vector (k None) or an (n, k) block as one array per shape ([k, *shape])."""
        parts, start = [], 0
        for shape in shapes:
            size = math.prod(shape)
            piece = flat[start : start + size]
            start += size
            # (np.ascontiguousarray would make a 0-d argument 1-d.)
            block = piece.reshape(shape) if k is None else piece.T.reshape((k, *shape))
            parts.append(np.array(block, dtype=self.dtype, order="C"))
        return parts

    @staticmethod
    def _join(parts: Sequence[Any], k: int | None) -> np.ndarray:
        arrays = [_numpy(p) for p in parts]
        if k is None:
            return np.concatenate([a.reshape(-1) for a in arrays])
        joined: np.ndarray = np.concatenate([a.reshape(k, -1) for a in arrays], axis=1).T
        return joined

    def _tangents(self, parts: list[np.ndarray]) -> dict[str, Any]:
        inputs = {n: p for n, p in zip(self.wrt, parts, strict=True) if n in self._primals}
        params = {n: p for n, p in zip(self.wrt, parts, strict=True) if n not in self._primals}
        return {"tangents": inputs, "parameter_tangents": params or None}

    def _products(self, flat: np.ndarray, k: int | None) -> np.ndarray:
        parts = self._split(flat, self._arg_shapes, k)
        batch = k is not None
        out = self._call(lambda s: s.jvp(**self._tangents(parts), tangent_batch=batch))
        return self._join(out if isinstance(out, list) else [out], k)

    def _transposed(self, flat: np.ndarray, k: int | None) -> np.ndarray:
        parts = self._split(flat, self._out_shapes, k)
        cotangents: Any = tuple(parts) if self._several else parts[0]
        batch = k is not None
        got = self._call(lambda s: s.vjp(cotangents=cotangents, cotangent_batch=batch))
        return self._join([got[n] for n in self.wrt], k)

    # -- LinearOperator ------------------------------------------------------------------

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return self._products(np.asarray(v).reshape(-1), None)

    def _rmatvec(self, u: np.ndarray) -> np.ndarray:
        return self._transposed(np.asarray(u).reshape(-1), None)

    def _matmat(self, V: np.ndarray) -> np.ndarray:
        V = np.asarray(V)
        return self._products(V, V.shape[1])

    def _rmatmat(self, U: np.ndarray) -> np.ndarray:
        U = np.asarray(U)
        return self._transposed(U, U.shape[1])

    def _adjoint(self) -> LinearOperator:
        # Real-valued: the adjoint is the transpose, one /vjp per product.
        return LinearOperator(
            dtype=self.dtype,
            shape=(self.shape[1], self.shape[0]),
            matvec=self._rmatvec,
            rmatvec=self._matvec,
            matmat=self._rmatmat,
            rmatmat=self._matmat,
        )

    _transpose = _adjoint


def linear_operator(client: JVPClient, **kwargs: Any) -> JacobianOperator:
    """``J`` at ``primals`` as a `JacobianOperator`: ``expression=`` or ``model=``,
    ``primals=``, ``wrt=`` (input and parameter names, default every input), ``dtype=``,
    ``device=``."""
    return JacobianOperator(client, **kwargs)


class LeastSquaresProblem:
    """``fun``, ``jac`` and ``x0`` for ``scipy.optimize.least_squares`` over the ``wrt``
    inputs of the service's function, the other inputs held at ``primals``.

    ``fun(z)`` is the flattened output at the point (minus ``observed`` when given) and
    ``jac(z)`` the `JacobianOperator` there: one ``POST /linearize`` per new point serves
    both (the previous point's session is deleted). ``close()`` deletes the last one.
    """

    def __init__(
        self,
        client: JVPClient,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: Mapping[str, Any],
        wrt: str | Sequence[str],
        observed: Any = None,
        dtype: object = None,
        device: str | None = None,
    ) -> None:
        self._client = client
        self._function = _Function(expression=expression, model=model, dtype=dtype, device=device)
        self.wrt = [wrt] if isinstance(wrt, str) else list(wrt)
        missing = [n for n in self.wrt if n not in primals]
        if missing:
            raise ValueError(
                f"least_squares_jac(): wrt names inputs given in primals; missing {missing}"
            )
        self._primals = {k: _numpy(v) for k, v in primals.items()}
        self._shapes = [self._primals[n].shape for n in self.wrt]
        self.observed = None if observed is None else _numpy(observed).reshape(-1)
        self.x0 = np.concatenate([self._primals[n].reshape(-1) for n in self.wrt])
        self._at: np.ndarray | None = None
        self._operator: JacobianOperator | None = None
        self.linearizations = 0

    def _point(self, z: np.ndarray) -> JacobianOperator:
        z = np.asarray(z, dtype=self.x0.dtype)
        if self._at is not None and self._operator is not None and np.array_equal(z, self._at):
            return self._operator
        primals = dict(self._primals)
        start = 0
        for name, shape in zip(self.wrt, self._shapes, strict=True):
            size = math.prod(shape)
            primals[name] = z[start : start + size].reshape(shape)
            start += size
        if self._operator is not None:
            self._operator.close()
        self._operator = JacobianOperator(
            self._client, **self._function, primals=primals, wrt=self.wrt
        )
        self._at = z.copy()
        self.linearizations += 1
        return self._operator

    def fun(self, z: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        op = self._point(z)
        outputs = op.output if isinstance(op.output, list) else [op.output]
        value = np.concatenate([_numpy(o).reshape(-1) for o in outputs]).astype(np.float64)
        return value if self.observed is None else value - self.observed

    def jac(self, z: np.ndarray, *args: Any, **kwargs: Any) -> JacobianOperator:
        return self._point(z)

    def close(self) -> None:
        if self._operator is not None:
            self._operator.close()


def least_squares_jac(client: JVPClient, **kwargs: Any) -> LeastSquaresProblem:
    """A `LeastSquaresProblem`: ``least_squares(p.fun, p.x0, jac=p.jac, tr_solver="lsmr")``."""
    return LeastSquaresProblem(client, **kwargs)
