"""The model repository: ``<JVP_MODEL_DIR>/<name>/model.pt2`` (+ optional ``config.json``).

Programs are read with `torch.export.load`, which needs no Python class of the
model, after app/models/archive.py has refused any archive with a pickled part
(NOTE [nothing unpickled from a .pt2]); nothing is fetched from a URL. A folder or
file that is a symbolic link out of the repository is not served, and messages
name files relative to the repository (``<name>/model.pt2``), never by absolute path.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.engine.devices import DTYPE_NAMES, parse_dtype
from app.engine.errors import InvalidRequest, NotFound
from app.models.archive import UnreadableProgram, read_program
from app.models.registry import ModelRegistry, ServedModel, TensorSpec, module_target

log = logging.getLogger(__name__)

PROGRAM_FILE = "model.pt2"
CONFIG_FILE = "config.json"


class ModelLoadError(Exception):
    """A repository entry that cannot be served; the message says why."""


class ModelConfig(BaseModel):
    """``config.json`` beside a program; every key is optional, an unknown key is an error
    (so a misspelt key fails the load instead of being ignored)."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field("", description="What GET /models shows.")
    max_batch_size: int = Field(
        0, ge=0, description="Largest batch dynamic batching may form; 0: no batching."
    )
    example_inputs: dict[str, list[Annotated[int, Field(ge=1)]]] = Field(
        default_factory=dict,
        description="A concrete shape per input (for `jvp-service models check` and warm-up).",
    )
    dtype: str | None = Field(
        None, description="Computation dtype when a request gives none (float32 if unset)."
    )
    outputs: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="Which of the program's outputs to return, by index."
    )

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return DTYPE_NAMES[parse_dtype(value, param="dtype")]
        except InvalidRequest as e:
            raise ValueError(e.message) from None

    @field_validator("outputs")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"output indices must be distinct, got {value}")
        return value


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str) -> None:
    """A model name is one folder name: letters, digits, ``_ . -`` (never a path)."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidRequest(
            f"Invalid model name {name!r}: expected 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
            param="name",
        )


# Operators whose behaviour differs between training and evaluation, and the index of
# their ``training`` argument. See `_serve_in_eval`.
_TRAINING_ARG = {
    torch.ops.aten.batch_norm.default: 5,
    torch.ops.aten.native_batch_norm.default: 5,
    torch.ops.aten._native_batch_norm_legit.default: 5,
    torch.ops.aten.dropout.default: 2,
    torch.ops.aten.feature_dropout.default: 2,
    torch.ops.aten.alpha_dropout.default: 2,
    torch.ops.aten.feature_alpha_dropout.default: 2,
}


_DTYPE_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}

# NOTE [literal operands in programs]
# torch.export writes ``4.0 * u`` as ``aten.mul.Tensor(u, 4.0)``: the literal is wrapped
# into a 0-d tensor, which forward AD gives a zero tangent whose kernels infer shapes
# through PyTorch's Python meta functions (NOTE [literal operands] in
# app/engine/expressions.py). The Scalar overload computes the same kernel on the same
# wrapped number (its primal is ``mul.Tensor`` of it), but its forward formula has no
# tangent for the literal: a JVP of the 32x32 Bratu residual (tests/solve/bratu.py) took
# 379 instead of 777 µs with its two literals rewritten. The numbers are the same
# (tests/models/test_literal_operands.py compares them bit for bit in every dtype).
_SCALAR_OVERLOADS = {
    torch.ops.aten.add.Tensor: torch.ops.aten.add.Scalar,
    torch.ops.aten.sub.Tensor: torch.ops.aten.sub.Scalar,
    torch.ops.aten.mul.Tensor: torch.ops.aten.mul.Scalar,
    torch.ops.aten.div.Tensor: torch.ops.aten.div.Scalar,
}


def _literal(value: object) -> bool:
    """A Python number the program holds as a constant (not a bool, not a symbolic size)."""
    return type(value) in (int, float)


def _serve_in_eval(module: torch.fx.GraphModule) -> int:
    """Rewrite a program traced in training mode to evaluation mode, in place.

    Models are served in eval mode: batch norm uses its running statistics and
    dropout is the identity, so one request's result never depends on another
    request's rows (nor on other rows of its own batch). An exported module
    refuses ``.eval()``, so the ``training`` argument of each such call is set to
    False instead. Dtype assertions are dropped too (any dtype may be asked for), and a
    literal operand takes its Scalar overload (NOTE [literal operands in programs]).
    Returns how many calls were rewritten.
    """
    changed = 0
    for node in list(module.graph.nodes):
        if node.op == "call_function" and node.target in _DTYPE_ASSERTS and not node.users:
            # ``x.to(...)`` in a program asserts the dtype it was traced in; the service
            # runs programs in the request's dtype, so these checks would always fail.
            module.graph.erase_node(node)
            changed += 1
            continue
        scalar = _SCALAR_OVERLOADS.get(node.target) if node.op == "call_function" else None
        if scalar is not None and len(node.args) == 2 and _literal(node.args[1]):
            node.target = scalar  # NOTE [literal operands in programs]
            changed += 1
            continue
        index = _TRAINING_ARG.get(node.target) if node.op == "call_function" else None
        if index is not None and len(node.args) > index and node.args[index] is not False:
            args = list(node.args)
            args[index] = False
            node.args = tuple(args)
            changed += 1
    if changed:
        module.recompile()
    return changed


def _dim(size: object) -> int:
    return size if isinstance(size, int) else -1  # a SymInt: the dimension may vary


def _inside(repository: Path, path: Path) -> bool:
    """Whether ``path``, its links resolved, lies in the repository."""
    return path.resolve().is_relative_to(repository.resolve())


# A long function on purpose: reading one model folder, each check with its own message,
# in the order a folder is read (the program file, config.json, the program, its specs).
def load_model(path: Path) -> ServedModel:
    """Load one repository entry (a folder) as a served model, or raise ModelLoadError."""
    name = path.name
    repository = path.parent
    program = path / PROGRAM_FILE
    shown = f"{name}/{PROGRAM_FILE}"  # relative to the repository: never an absolute path
    for part, label in (
        (path, name),
        (program, shown),
        (path / CONFIG_FILE, f"{name}/{CONFIG_FILE}"),
    ):
        if part.exists() and not _inside(repository, part):
            raise ModelLoadError(
                f"{label}: a symbolic link out of the model repository; not served"
            )
    if not program.is_file():
        raise ModelLoadError(f"{name}: no {PROGRAM_FILE}")
    config = ModelConfig()
    if (path / CONFIG_FILE).is_file():
        try:
            config = ModelConfig.model_validate_json((path / CONFIG_FILE).read_bytes())
        except ValidationError as e:
            raise ModelLoadError(f"{name}/{CONFIG_FILE}: {e}") from None
    try:
        ep = read_program(program)
    except UnreadableProgram as e:
        raise ModelLoadError(f"{shown}: {e}") from None

    signature = ep.graph_signature
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    input_names = list(signature.user_inputs)
    try:
        arg_names = list(ep.module_call_graph[0].signature.forward_arg_names)
    except (AttributeError, IndexError, TypeError):
        arg_names = input_names
    if len(arg_names) != len(input_names):
        raise ModelLoadError(
            f"{shown}: only programs whose inputs are plain tensor arguments are supported "
            f"(got inputs {arg_names})"
        )
    inputs = []
    for arg, placeholder in zip(arg_names, input_names, strict=True):
        val = placeholders[placeholder].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ModelLoadError(f"{shown}: input {arg!r} is not a tensor")
        shape = tuple(_dim(s) for s in val.shape)
        inputs.append(TensorSpec(arg, shape, DTYPE_NAMES.get(val.dtype, str(val.dtype))))
    outputs = len(signature.user_outputs)
    _check_config(config, name, inputs, outputs)

    state = ep.state_dict
    parameters = [
        TensorSpec(k, tuple(state[k].shape), DTYPE_NAMES.get(state[k].dtype, str(state[k].dtype)))
        for k in signature.parameters
    ]
    buffers = [
        TensorSpec(k, tuple(state[k].shape), DTYPE_NAMES.get(state[k].dtype, str(state[k].dtype)))
        for k in signature.buffers
        if k in state
    ]
    module = ep.module()
    if _serve_in_eval(module):
        log.info("model %s: rewritten for serving (eval mode, any dtype, literal operands)", name)
    select = None if config.outputs is None else tuple(config.outputs)
    served_outputs = outputs if select is None else len(select)
    return ServedModel(
        name=name,
        description=config.description,
        source="repository",
        target=module_target(f"repository:{name}", module, inputs, served_outputs, select),
        inputs=inputs,
        outputs=served_outputs,
        parameters=parameters,
        buffers=buffers,
        config=config.model_dump(),
    )


def _check_config(config: ModelConfig, name: str, inputs: list[TensorSpec], outputs: int) -> None:
    """What config.json says must agree with the program."""
    shown = f"{name}/{CONFIG_FILE}"
    declared = {s.name: s.shape for s in inputs}
    for name, shape in config.example_inputs.items():
        if name not in declared:
            raise ModelLoadError(
                f"{shown}: example_inputs names {name!r}, "
                f"but the program's inputs are {list(declared)}"
            )
        want = declared[name]
        fits = len(shape) == len(want) and all(
            d in (-1, s) for s, d in zip(shape, want, strict=True)
        )
        if not fits:
            raise ModelLoadError(
                f"{shown}: example_inputs[{name!r}] is {shape}, "
                f"but the program declares {list(want)} (-1: any size)"
            )
    if config.outputs is not None:
        bad = [i for i in config.outputs if i >= outputs]
        if bad:
            raise ModelLoadError(
                f"{shown}: outputs {config.outputs} names index {bad[0]}, "
                f"but the program has {outputs} output(s) (indices 0-{outputs - 1})"
            )


def _builtin_names() -> set[str]:
    from app.models.builtin import BUILTINS  # here: builtin imports this package's registry

    return {make.__name__ for make in BUILTINS}


def builtin_refusal(name: str, verb: str) -> InvalidRequest:
    return InvalidRequest(
        f"{name!r} is a built-in model: built-in models cannot be {verb}. "
        "Give your model another name (its folder name in the repository).",
        param="name",
    )


def load_into(registry: ModelRegistry, model_dir: Path | None, name: str) -> ServedModel:
    """(Re)load ``<model_dir>/<name>`` and serve it; on any failure the registry is unchanged,
    so a model already served under that name keeps serving.

    Raises InvalidRequest (bad name, a built-in's name, a program or config that
    does not load: the message says why) or NotFound (no such folder).
    Blocking (reads and deserialises the program): call it off the event loop.
    """
    check_name(name)
    existing = registry.find(name)
    if (existing is not None and existing.source == "builtin") or name in _builtin_names():
        raise builtin_refusal(name, "overwritten")
    if model_dir is None:
        raise NotFound(
            "No model repository is configured: set JVP_MODEL_DIR to a folder of "
            "<name>/model.pt2 entries",
            param="name",
        )
    path = model_dir / name
    if not path.is_dir():
        raise NotFound(f"No folder {name!r} in the model repository (JVP_MODEL_DIR)", param="name")
    try:
        model = load_model(path)
    except ModelLoadError as e:
        kept = "; the version already loaded keeps serving" if existing is not None else ""
        raise InvalidRequest(f"Model {name!r} failed to load{kept}: {e}", param="name") from None
    registry.add(model)
    log.info("model %s %s", name, "reloaded" if existing else "loaded")
    return model


def unload_from(registry: ModelRegistry, name: str) -> ServedModel:
    """Stop serving a repository model (its folder is left alone); built-ins stay."""
    model = registry.get(name)  # NotFound (404) names the models there are
    if model.source == "builtin":
        raise builtin_refusal(name, "unloaded")
    registry.remove(name)
    log.info("model %s unloaded", name)
    return model


def load_repository(model_dir: Path) -> tuple[list[ServedModel], dict[str, str]]:
    """Every loadable model under ``model_dir``, and the reason for each that failed.

    A folder named like a built-in model is not loaded (built-ins cannot be replaced).
    """
    models: list[ServedModel] = []
    failures: dict[str, str] = {}
    if not model_dir.is_dir():
        return models, {str(model_dir): "not a directory"}
    reserved = _builtin_names()
    for entry in sorted(model_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if entry.name in reserved:
            failures[entry.name] = str(builtin_refusal(entry.name, "overwritten"))
            log.error("model %s not loaded: %s", entry.name, failures[entry.name])
            continue
        try:
            models.append(load_model(entry))
        except ModelLoadError as e:
            failures[entry.name] = str(e)
            log.error("model %s not loaded: %s", entry.name, e)
    return models, failures
