"""The model repository: ``<JVP_MODEL_DIR>/<name>/model.pt2`` (+ optional ``config.json``).

Programs are read with `torch.export.load`, which needs no Python class of the
model; nothing is unpickled from a client, and nothing is fetched from a URL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.engine.devices import DTYPE_NAMES
from app.models.registry import ServedModel, TensorSpec, module_target

log = logging.getLogger(__name__)

PROGRAM_FILE = "model.pt2"
CONFIG_FILE = "config.json"


class ModelLoadError(Exception):
    """A repository entry that cannot be served; the message says why."""


class ModelConfig(BaseModel):
    """``config.json`` beside a program. Unknown keys are kept for later features."""

    model_config = ConfigDict(extra="allow")

    description: str = ""
    max_batch_size: int = Field(0, ge=0)


def _dim(size: object) -> int:
    return size if isinstance(size, int) else -1  # a SymInt: the dimension may vary


def load_model(path: Path) -> ServedModel:
    """Load one repository entry (a folder) as a served model, or raise ModelLoadError."""
    name = path.name
    program = path / PROGRAM_FILE
    if not program.is_file():
        raise ModelLoadError(f"{path}: no {PROGRAM_FILE}")
    config = ModelConfig()
    if (path / CONFIG_FILE).is_file():
        try:
            config = ModelConfig.model_validate_json((path / CONFIG_FILE).read_bytes())
        except ValidationError as e:
            raise ModelLoadError(f"{path / CONFIG_FILE}: {e}") from None
    try:
        ep = torch.export.load(program)
    except Exception as e:  # noqa: BLE001 - any failure to read the file is the same answer
        raise ModelLoadError(f"{program}: cannot be read by torch.export.load: {e}") from None

    signature = ep.graph_signature
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    input_names = list(signature.user_inputs)
    try:
        arg_names = list(ep.module_call_graph[0].signature.forward_arg_names)
    except (AttributeError, IndexError, TypeError):
        arg_names = input_names
    if len(arg_names) != len(input_names):
        raise ModelLoadError(
            f"{program}: only programs whose inputs are plain tensor arguments are supported "
            f"(got inputs {arg_names})"
        )
    inputs = []
    for arg, placeholder in zip(arg_names, input_names, strict=True):
        val = placeholders[placeholder].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ModelLoadError(f"{program}: input {arg!r} is not a tensor")
        shape = tuple(_dim(s) for s in val.shape)
        inputs.append(TensorSpec(arg, shape, DTYPE_NAMES.get(val.dtype, str(val.dtype))))
    outputs = len(signature.user_outputs)

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
    return ServedModel(
        name=name,
        description=config.description,
        source="repository",
        target=module_target(f"repository:{name}", module, inputs, outputs),
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
        buffers=buffers,
        config=config.model_dump(),
    )


def load_repository(model_dir: Path) -> tuple[list[ServedModel], dict[str, str]]:
    """Every loadable model under ``model_dir``, and the reason for each that failed."""
    models: list[ServedModel] = []
    failures: dict[str, str] = {}
    if not model_dir.is_dir():
        return models, {str(model_dir): "not a directory"}
    for entry in sorted(model_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        try:
            models.append(load_model(entry))
        except ModelLoadError as e:
            failures[entry.name] = str(e)
            log.error("model %s not loaded: %s", entry.name, e)
    return models, failures
