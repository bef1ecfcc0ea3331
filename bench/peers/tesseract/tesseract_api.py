"""The benchmark's seed function as a Tesseract: f(x, y) = x**2 + y**2 (numpy only).

Served without docker by ``tesseract-runtime serve`` with
``TESSERACT_API_PATH`` pointing here (bench/servers.py does it). The JVP is
written by hand, as a Tesseract author would for numpy code:
d f = 2 x dx + 2 y dy.
"""

from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from tesseract_core.runtime import Array, Differentiable, Float32


class InputSchema(BaseModel):
    x: Differentiable[Array[(None, None), Float32]] = Field(description="First operand.")
    y: Differentiable[Array[(None, None), Float32]] = Field(description="Second operand.")


class OutputSchema(BaseModel):
    result: Differentiable[Array[(None, None), Float32]] = Field(description="x**2 + y**2.")


def apply(inputs: InputSchema) -> OutputSchema:
    return OutputSchema(result=inputs.x**2 + inputs.y**2)


def jacobian_vector_product(
    inputs: InputSchema,
    jvp_inputs: set[str],
    jvp_outputs: set[str],
    tangent_vector: dict[str, Any],
) -> dict[str, Any]:
    jvp = np.zeros_like(inputs.x)
    for name in jvp_inputs:
        jvp += 2 * getattr(inputs, name) * np.asarray(tangent_vector[name])
    return {name: jvp for name in jvp_outputs}
