"""The free variables of an expression, in the order the service numbers them."""

from __future__ import annotations

import ast

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
