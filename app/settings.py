"""The one settings class: every knob is a ``JVP_*`` environment variable."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings, read from ``JVP_*`` environment variables at start-up."""

    model_config = SettingsConfigDict(env_prefix="JVP_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address `jvp-service serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `jvp-service serve` binds.")
    model_dir: Path | None = Field(
        None, description="Model repository: <dir>/<name>/model.pt2 (+ optional config.json)."
    )
    device: str = Field(
        "auto",
        description="Devices to start workers on: 'auto' (cpu plus every GPU), or a "
        "comma-separated list such as 'cpu' or 'cuda:0,cuda:1'.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Inference keys (Bearer)."
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Admin keys (Bearer)."
    )

    # Limits. Each one answers 413 (or 400 for expression syntax) with the limit in the message.
    max_expression_length: int = Field(2000, ge=1, description="Characters per expression.")
    max_expression_nodes: int = Field(500, ge=1, description="AST nodes per expression.")
    max_expression_depth: int = Field(50, ge=1, description="AST nesting depth per expression.")
    max_tensor_elements: int = Field(16_777_216, ge=1, description="Elements per tensor (16M).")
    max_request_elements: int = Field(
        67_108_864, ge=1, description="Elements across all tensors of one request (64M)."
    )
    max_dims: int = Field(8, ge=0, description="Dimensions per tensor.")

    # Engine.
    max_queue: int = Field(1024, ge=1, description="Work items waiting per device before 503.")
    request_timeout_s: float = Field(60.0, gt=0, description="Deadline of one /jvp request.")
    num_threads: int = Field(0, ge=0, description="torch.set_num_threads; 0 keeps torch's choice.")

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # Accept "k1,k2" as well as a JSON list, so a plain env var works.
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [k.strip() for k in stripped.split(",") if k.strip()]
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
