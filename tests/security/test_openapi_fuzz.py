"""schemathesis over the service's own OpenAPI schema, in-process (ASGI, lifespan started).

Every operation gets up to 30 generated requests (derandomized, so a run is
repeatable): no 5xx, and every response matches the schema (status code,
content type, body).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.api.app import create_app
from app.settings import Settings

# POST /jvp also takes a safetensors body: fuzz it as raw bytes (the parser must answer 4xx).
schemathesis.serializer.alias("application/x-safetensors", "application/octet-stream")

_DB = Path(tempfile.mkdtemp(prefix="jvp-schemathesis-")) / "jobs.db"
APP = create_app(Settings(database_url=f"sqlite:///{_DB}"))
# The schema is read without starting the app; the lifespan starts with the first case.
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    # Not positive_data_acceptance: a tensor's schema is "any JSON" (app/wire/codec.py checks it,
    # with a 422 naming the field), so schema-valid bodies are rightly rejected.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
