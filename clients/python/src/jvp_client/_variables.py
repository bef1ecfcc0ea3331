"""The inputs of the service's function as the framework bindings see them: the free
variables of an expression in the order the service numbers them, a model's inputs in
the order ``GET /models/{name}`` lists them, and a call's arguments bound to them."""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import JVPClient

_CONSTANTS = frozenset({"pi", "e"})


def expression_variables(expression: str) -> list[str]:
    """An expression's free variables in order of first appearance (as the service
    orders them): names that are not called and not the constants pi and e."""
    tree = ast.parse(expression, mode="eval")
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Call):
            for arg in node.args:
                visit(arg)
            return
        if isinstance(node, ast.Name):
            if node.id not in _CONSTANTS and node.id not in names:
                names.append(node.id)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


class RemoteTarget:
    """The expression or model a binding calls (``jvp_client.torch``, ``jvp_client.jax``);
    ``.names`` lists its inputs in positional order."""

    def __init__(
        self, client: JVPClient, *, expression: str | None = None, model: str | None = None
    ) -> None:
        if (expression is None) == (model is None):
            raise ValueError("remote(): give exactly one of expression= or model=")
        self.client = client
        self.expression, self.model = expression, model
        if expression is not None:
            self.names = expression_variables(expression)
        else:
            assert model is not None
            self.names = [spec.name for spec in client.model(model).inputs]

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's inputs by name: positional in ``names`` order, then by keyword."""
        if len(args) > len(self.names):
            raise TypeError(
                f"expected at most {len(self.names)} inputs {self.names}, got {len(args)}"
            )
        given = dict(zip(self.names, args, strict=False))
        for name, value in kwargs.items():
            if name in given:
                raise TypeError(f"input {name!r} given twice")
            given[name] = value
        missing = [n for n in self.names if n not in given]
        unknown = [n for n in given if n not in self.names]
        if missing or unknown:
            raise TypeError(
                f"expected the inputs {self.names}; missing {missing}, unknown {unknown}"
            )
        return given
