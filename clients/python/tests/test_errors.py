"""Error responses -> exception classes; configuration; arguments checked before sending."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from jvp_fakes import Recorder, error_response, fake_service

import jvp_client
from jvp_client import (
    ADUnsupportedError,
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    DeadlineExceededError,
    ForwardADUnsupportedError,
    InternalServerError,
    JVPClient,
    JVPError,
    NotFoundError,
    OutOfMemoryError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ReverseADUnsupportedError,
    UnprocessableEntityError,
)

X = {"x": np.array([1.0, 2.0])}

CASES = [
    (400, "invalid_expression", BadRequestError, "expression"),
    (401, "unauthorized", AuthenticationError, None),
    (403, "forbidden", PermissionDeniedError, None),
    (404, "not_found", NotFoundError, "model"),
    (413, "too_large", PayloadTooLargeError, "primals.x"),
    (422, "invalid_request", UnprocessableEntityError, "tangents.x"),
    (501, "forward_ad_unsupported", ForwardADUnsupportedError, None),
    (501, "reverse_ad_unsupported", ReverseADUnsupportedError, None),
    (503, "overloaded", OverloadedError, None),
    (504, "timeout", DeadlineExceededError, None),
    (507, "out_of_memory", OutOfMemoryError, None),
    (500, "internal", InternalServerError, None),
    (502, "bad_gateway", InternalServerError, None),
]


@pytest.mark.parametrize(
    ("status", "type_", "cls", "param"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_raise_status_error_class(make_client, status, type_, cls, param) -> None:
    message = f"Expected tangent 'x' of shape [10, 10], got [10, 9] ({status})"
    recorder = Recorder(
        lambda r: error_response(status, type_, message, param, headers={"X-Request-ID": "req-123"})
    )
    client = make_client(recorder, max_retries=0)
    with pytest.raises(cls) as info:
        client.jvp(expression="x * 2", primals=X)
    err = info.value
    assert type(err) is cls
    assert isinstance(err, APIStatusError) and isinstance(err, JVPError)
    # Both 501s share one base, so `except ADUnsupportedError` catches either mode.
    assert isinstance(err, ADUnsupportedError) == (status == 501)
    assert err.status_code == status
    assert err.type == type_
    assert err.message == message
    assert err.param == param
    assert err.request_id == "req-123"
    assert err.body == {"error": {"type": type_, "message": message, "param": param}}
    assert message in str(err) and str(status) in str(err)


def test_raise_501_of_unknown_type_is_forward_as_before(make_client) -> None:
    client = make_client(Recorder(lambda r: error_response(501, "new_kind", "no formula")))
    with pytest.raises(ADUnsupportedError) as info:
        client.jvp(expression="x * 2", primals=X)
    assert type(info.value) is ForwardADUnsupportedError


def test_raise_status_error_for_unlisted_4xx(make_client) -> None:
    client = make_client(Recorder(lambda r: error_response(409, "conflict", "busy")))
    with pytest.raises(APIStatusError) as info:
        client.jvp(expression="x * 2", primals=X)
    assert type(info.value) is APIStatusError and info.value.status_code == 409


def test_raise_status_error_with_text_body(make_client) -> None:
    client = make_client(
        Recorder(lambda r: httpx.Response(502, text="upstream died")), max_retries=0
    )
    with pytest.raises(InternalServerError) as info:
        client.jvp(expression="x * 2", primals=X)
    assert info.value.message == "upstream died"
    assert info.value.type is None and info.value.request_id is None


def test_raise_status_error_with_empty_body(make_client) -> None:
    client = make_client(Recorder(lambda r: httpx.Response(404)))
    with pytest.raises(NotFoundError, match="HTTP 404 Not Found"):
        client.models()


def test_raise_validation_error_for_non_json_success(make_client) -> None:
    client = make_client(Recorder(lambda r: httpx.Response(200, text="<html>")))
    with pytest.raises(APIResponseValidationError, match="Expected a JSON body"):
        client.jvp(expression="x * 2", primals=X)


def test_raise_validation_error_for_malformed_tensor(make_client) -> None:
    bad = {
        "output": {"shape": [3], "dtype": "float32", "data": [1]},
        "jvp": 1,
        "dtype": "float32",
        "device": "cpu",
    }
    client = make_client(Recorder(lambda r: httpx.Response(200, json=bad)))
    with pytest.raises(APIResponseValidationError, match="shape"):
        client.jvp(expression="x * 2", primals=X)


def test_exception_tree_matches_docstring() -> None:
    assert issubclass(APITimeoutError, APIConnectionError)
    assert issubclass(APIConnectionError, JVPError)
    assert issubclass(APIResponseValidationError, JVPError)
    doc = jvp_client._exceptions.__doc__ or ""
    for name in jvp_client._exceptions.__all__:
        cls = getattr(jvp_client, name)
        assert issubclass(cls, JVPError), name
        assert name in doc, f"{name} missing from the tree in the module docstring"
    for _status, _type, cls, _param in CASES:
        assert issubclass(cls, APIStatusError)


def test_send_api_key_as_bearer(make_client) -> None:
    recorder = Recorder(fake_service)
    make_client(recorder, api_key="sk-test").models()
    assert recorder.requests[0].headers["authorization"] == "Bearer sk-test"


def test_send_no_authorization_without_key(make_client, monkeypatch) -> None:
    monkeypatch.delenv("JVP_API_KEY", raising=False)
    recorder = Recorder(fake_service)
    make_client(recorder).models()
    assert "authorization" not in recorder.requests[0].headers


def test_read_base_url_and_api_key_from_env(monkeypatch) -> None:
    monkeypatch.setenv("JVP_BASE_URL", "http://jvp.example:9000/api")
    monkeypatch.setenv("JVP_API_KEY", "sk-env")
    recorder = Recorder(lambda r: httpx.Response(200, json={"status": "ok"}))
    with httpx.Client(transport=httpx.MockTransport(recorder)) as http:
        client = JVPClient(http_client=http)
        assert client.api_key == "sk-env"
        client.health()
    assert str(recorder.requests[0].url) == "http://jvp.example:9000/api/healthz"
    assert recorder.requests[0].headers["authorization"] == "Bearer sk-env"


def test_use_default_base_url_without_env(monkeypatch) -> None:
    monkeypatch.delenv("JVP_BASE_URL", raising=False)
    with JVPClient() as client:
        assert str(client.base_url) == "http://127.0.0.1:8000/"


def test_prefer_arguments_over_env(monkeypatch) -> None:
    monkeypatch.setenv("JVP_BASE_URL", "http://env.example")
    monkeypatch.setenv("JVP_API_KEY", "sk-env")
    with JVPClient(base_url="http://arg.example", api_key="sk-arg") as client:
        assert client.base_url.host == "arg.example" and client.api_key == "sk-arg"


def test_reject_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        JVPClient(max_retries=-1)
    with pytest.raises(ValueError, match="base_url"):
        JVPClient(base_url="ftp://nope")
    with pytest.raises(TypeError, match="httpx.Client"):
        JVPClient(http_client=httpx.AsyncClient())  # type: ignore[arg-type]


def test_close_keeps_given_http_client_open() -> None:
    http = httpx.Client(transport=httpx.MockTransport(fake_service))
    with JVPClient(http_client=http):
        pass
    assert not http.is_closed
    http.close()
    own = JVPClient()
    with own:
        pass
    assert own._client.is_closed


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"primals": X}, TypeError, "exactly one of expression= or model="),
        ({"expression": "x", "model": "linear", "primals": X}, TypeError, "exactly one"),
        ({"expression": "x", "primals": [1.0]}, TypeError, "mapping of input names"),
        (
            {"expression": "x", "primals": X, "parameter_tangents": {"w": 1.0}},
            ValueError,
            "models only",
        ),
        ({"expression": "x", "primals": X, "dtype": "int8"}, ValueError, "dtype"),
        ({"expression": "x", "primals": X, "encoding": "hex"}, ValueError, "encoding"),
        (
            {"expression": "x", "primals": {"x": np.ones(2, np.complex64)}},
            TypeError,
            r"primals\['x'\]: complex",
        ),
    ],
)
def test_reject_bad_jvp_arguments_before_sending(make_client, kwargs, exc, match) -> None:
    recorder = Recorder(fake_service)
    with pytest.raises(exc, match=match):
        make_client(recorder).jvp(**kwargs)
    assert recorder.requests == []


def test_get_models_and_model(make_client) -> None:
    client = make_client(fake_service)
    models = client.models()
    assert [m.name for m in models] == ["linear"]
    info = client.model("linear")
    assert info.inputs[0].name == "x" and info.inputs[0].shape == [-1, 5]
    assert [p.name for p in info.parameters] == ["weight", "bias"]
    with pytest.raises(NotFoundError) as err:
        client.model("nope")
    assert err.value.param == "model"


def test_get_health_not_ready_without_error(make_client, delays) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            return error_response(503, "overloaded", "engine starting")
        return fake_service(request)

    recorder = Recorder(handler)
    status = make_client(recorder, max_retries=3).health()
    assert status.live and not status.ready
    assert len(recorder.requests) == 2 and delays == []  # /readyz is not retried


def test_get_health_ready(make_client) -> None:
    status = make_client(fake_service).health()
    assert status.live and status.ready


def test_load_model_posts_and_reads_model_info(make_client) -> None:
    from jvp_fakes import LINEAR_INFO

    recorder = Recorder(lambda r: httpx.Response(200, json=LINEAR_INFO))
    info = make_client(recorder, api_key="admin").load_model("linear")
    assert info is not None and info.name == "linear"
    request = recorder.requests[0]
    assert (request.method, request.url.path) == ("POST", "/models/linear/load")


def test_unload_model_sends_delete(make_client) -> None:
    recorder = Recorder(lambda r: httpx.Response(204))
    assert make_client(recorder).unload_model("linear") is None
    assert (recorder.requests[0].method, recorder.requests[0].url.path) == (
        "DELETE",
        "/models/linear",
    )


def test_raise_permission_denied_on_admin_route(make_client) -> None:
    recorder = Recorder(lambda r: error_response(403, "forbidden", "needs an admin key"))
    with pytest.raises(PermissionDeniedError, match="needs an admin key"):
        make_client(recorder, api_key="inference").load_model("linear")


def test_reject_model_name_with_slash(make_client) -> None:
    with pytest.raises(ValueError, match="model name"):
        make_client(fake_service).model("a/b")
