"""``jvp-service models check <dir>``: validate a model repository offline.

Each entry is loaded as the service would load it, then one JVP runs on the CPU
on random inputs of the declared shapes: a dimension that may vary (-1) takes
the size of config.json's ``example_inputs``, else 2. Values are uniform in
[0, 1) (so logarithms, square roots and index casts see valid values); every
input has a random tangent. The fallbacks of ``options.fallback = "auto"`` apply
(NOTE [forward-AD fallback]); the report says which method ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from app.engine.devices import parse_dtype
from app.engine.fallback import jvp_with_fallback
from app.engine.forward_coverage import check_forward
from app.engine.jvp import jvp_dual
from app.engine.protocol import Arguments
from app.models.registry import ServedModel
from app.models.repository import load_repository


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str  # the method and output shapes, or why it failed


def example_shape(model: ServedModel, name: str, declared: tuple[int, ...]) -> list[int]:
    example = model.config.get("example_inputs")
    if isinstance(example, dict) and name in example:
        return list(example[name])
    return [2 if d == -1 else d for d in declared]


def check_model(model: ServedModel, *, seed: int = 0) -> CheckResult:
    """One JVP of ``model`` on random inputs; never raises."""
    generator = torch.Generator().manual_seed(seed)
    dtype = parse_dtype(model.default_dtype or "float32")
    try:
        shapes = [example_shape(model, s.name, s.shape) for s in model.inputs]
        inputs = tuple(torch.rand(shape, generator=generator, dtype=dtype) for shape in shapes)
        tangents = tuple(torch.rand(x.shape, generator=generator, dtype=dtype) for x in inputs)
        target = model.target.materialize(dtype, torch.device("cpu"))
        # NOTE [forward mode: exact or refused]: a dropped tangent fails the check.
        check_forward(None, None, Arguments(target, inputs, tangents, {}))
        outputs, jvps, method = jvp_with_fallback(jvp_dual, target, inputs, tangents, {})
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the check
        message = getattr(e, "message", None) or str(e).strip().splitlines()[0]
        return CheckResult(model.name, False, f"JVP failed: {message}")
    if len(outputs) != model.outputs:
        return CheckResult(
            model.name, False, f"expected {model.outputs} output(s), got {len(outputs)}"
        )
    shown = ", ".join(str(list(o.shape)) for o in outputs)
    finite = all(bool(torch.isfinite(j).all()) for j in jvps)
    note = "" if finite else " (the JVP has non-finite values at these inputs)"
    return CheckResult(model.name, True, f"method {method}; inputs {shapes}; outputs {shown}{note}")


def check_repository(model_dir: Path) -> list[CheckResult]:
    """A `CheckResult` per entry (folder) of ``model_dir``, in name order."""
    if not model_dir.is_dir():
        return [CheckResult(str(model_dir), False, "not a directory")]
    models, failures = load_repository(model_dir)
    results = [check_model(m) for m in models]
    results += [CheckResult(name, False, f"load failed: {why}") for name, why in failures.items()]
    return sorted(results, key=lambda r: r.name)


def main(model_dir: Path) -> int:
    """Print one line per model; the exit code is 1 if any failed (or there are none)."""
    results = check_repository(model_dir)
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.name}: {r.detail}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} of {len(results)} model(s) passed")
    return 1 if failed or not results else 0
