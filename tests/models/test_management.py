"""Repository management through the API: export, save, load, reload, unload; keys; config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.export import Dim

from tests.conftest import ROOT
from tests.models.conftest import ADMIN, INFERENCE, Loader, central_difference, save_model
from tests.wire import from_wire, to_wire


def _affine(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 2), nn.Tanh()).eval()


def _save_affine(repo: Path, name: str, seed: int, config: dict | None = None) -> nn.Module:
    module = _affine(seed)
    save_model(
        repo,
        name,
        module,
        (torch.randn(2, 3),),
        dynamic_shapes={"input": {0: Dim("b")}},
        config=config,
    )
    return module


def _jvp(client: TestClient, model: str, x: torch.Tensor, v: torch.Tensor, **options: object):
    return client.post(
        "/jvp",
        headers=INFERENCE,
        json={
            "model": model,
            "primals": {"input": to_wire(x, "b64")},
            "tangents": {"input": to_wire(v, "b64")},
            "options": options,
        },
    )


def test_load_model_serves_and_lists_it(repo: Path, keyed_client: TestClient, load: Loader) -> None:
    module = _save_affine(repo, "affine", 1, {"description": "tanh(Wx + b)", "max_batch_size": 8})
    info = load("affine")
    assert info["state"] == "ready" and info["source"] == "repository"
    assert info["inputs"] == [{"name": "input", "shape": [-1, 3], "dtype": "float32"}]
    assert info["parameter_count"] == 3 * 2 + 2
    assert info["max_batch_size"] == 8 and info["description"] == "tanh(Wx + b)"
    listed = {m["name"]: m for m in keyed_client.get("/models", headers=INFERENCE).json()["models"]}
    assert listed["affine"] == info
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    r = _jvp(keyed_client, "affine", x, v, dtype="float64")
    assert r.status_code == 200, r.text
    torch.testing.assert_close(from_wire(r.json()["jvp"]), central_difference(module, [x], [v])[0])


def test_load_model_reload_replaces_and_failed_reload_keeps_old(
    repo: Path, keyed_client: TestClient, load: Loader
) -> None:
    _save_affine(repo, "affine", 1)
    load("affine")
    newer = _save_affine(repo, "affine", 2)
    load("affine")
    x, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    r = _jvp(keyed_client, "affine", x, v, dtype="float64")
    torch.testing.assert_close(from_wire(r.json()["jvp"]), central_difference(newer, [x], [v])[0])

    (repo / "affine" / "model.pt2").write_bytes(b"garbage")
    r = keyed_client.post("/models/affine/load", headers=ADMIN)
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert message == (
        "Model 'affine' failed to load; the version already loaded keeps serving: "
        "affine/model.pt2: not a zip archive as torch.export.save writes "
        "(File is not a zip file)"
    )
    r = _jvp(keyed_client, "affine", x, v, dtype="float64")
    assert r.status_code == 200
    torch.testing.assert_close(from_wire(r.json()["jvp"]), central_difference(newer, [x], [v])[0])


def test_load_model_bad_config_is_422_with_pydantic_message(
    repo: Path, keyed_client: TestClient
) -> None:
    _save_affine(repo, "affine", 1, {"max_batch_size": -1, "dtype": "float8"})
    r = keyed_client.post("/models/affine/load", headers=ADMIN)
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert "max_batch_size" in message and "greater than or equal to 0" in message
    assert "Unknown dtype 'float8'" in message
    (repo / "affine" / "config.json").write_text(json.dumps({"outputs": [1]}))
    r = keyed_client.post("/models/affine/load", headers=ADMIN)
    assert r.status_code == 422
    assert "the program has 1 output(s)" in r.json()["error"]["message"]
    (repo / "affine" / "config.json").write_text(json.dumps({"max_batchsize": 4}))
    r = keyed_client.post("/models/affine/load", headers=ADMIN)
    assert "max_batchsize" in r.json()["error"]["message"]
    assert "Extra inputs are not permitted" in r.json()["error"]["message"]


def test_load_model_errors_404_403_401_and_builtin(repo: Path, keyed_client: TestClient) -> None:
    r = keyed_client.post("/models/nothere/load", headers=ADMIN)
    assert r.status_code == 404
    assert r.json()["error"]["message"] == (
        "No folder 'nothere' in the model repository (JVP_MODEL_DIR)"
    )
    r = keyed_client.post("/models/nothere/load", headers=INFERENCE)
    assert r.status_code == 403
    assert "needs an admin key" in r.json()["error"]["message"]
    assert keyed_client.post("/models/nothere/load").status_code == 401
    r = keyed_client.delete("/models/linear", headers=INFERENCE)
    assert r.status_code == 403
    for method in (keyed_client.post, keyed_client.delete):
        path = "/models/linear/load" if method == keyed_client.post else "/models/linear"
        r = method(path, headers=ADMIN)
        assert r.status_code == 422
        assert (
            "'linear' is a built-in model: built-in models cannot be"
            in r.json()["error"]["message"]
        )
    r = keyed_client.post("/models/..hidden/load", headers=ADMIN)
    assert r.status_code == 422
    assert "Invalid model name '..hidden'" in r.json()["error"]["message"]


def test_unload_model_stops_serving(repo: Path, keyed_client: TestClient, load: Loader) -> None:
    _save_affine(repo, "affine", 1)
    load("affine")
    r = keyed_client.delete("/models/affine", headers=ADMIN)
    assert r.status_code == 200
    assert r.json() == {"name": "affine", "state": "unloaded"}
    r = keyed_client.get("/models/affine", headers=INFERENCE)
    assert r.status_code == 404
    assert "Unknown model 'affine'" in r.json()["error"]["message"]
    r = keyed_client.delete("/models/affine", headers=ADMIN)
    assert r.status_code == 404
    assert (repo / "affine" / "model.pt2").is_file()  # unloading leaves the files alone


def test_create_jvp_uses_config_dtype_and_output_selection(
    repo: Path, keyed_client: TestClient, load: Loader
) -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.sin(), x.exp()

    save_model(repo, "two", Two(), (torch.randn(3),), config={"dtype": "FP64", "outputs": [1]})
    info = load("two")
    assert info["outputs"] == 1 and info["default_dtype"] == "float64"
    r = keyed_client.post(
        "/jvp",
        headers=INFERENCE,
        json={
            "model": "two",
            "primals": {"x": [0.0, 1.0, 2.0]},
            "tangents": {"x": [1.0, 1.0, 1.0]},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dtype"] == "float64"
    torch.testing.assert_close(from_wire(body["jvp"]), torch.tensor([0.0, 1.0, 2.0]).double().exp())
    r = keyed_client.post(
        "/jvp",
        headers=INFERENCE,
        json={"model": "two", "primals": {"x": [0.0, 1.0, 2.0]}, "options": {"dtype": "float32"}},
    )
    assert r.json()["dtype"] == "float32"


def test_create_jvp_batch_norm_model_rows_do_not_mix(
    repo: Path, keyed_client: TestClient, load: Loader
) -> None:
    torch.manual_seed(5)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    with torch.no_grad():
        module(torch.randn(64, 3))  # running statistics that differ from any batch's own
    # Exported in training mode by mistake: the service still serves it in eval mode.
    save_model(
        repo, "bn", module.train(), (torch.randn(4, 3),), dynamic_shapes={"input": {0: Dim("b")}}
    )
    load("bn")
    reference = module.eval()
    x, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    whole = _jvp(keyed_client, "bn", x, v, dtype="float64").json()
    for i in range(5):
        one = _jvp(keyed_client, "bn", x[i : i + 1], v[i : i + 1], dtype="float64").json()
        torch.testing.assert_close(from_wire(one["jvp"]), from_wire(whole["jvp"])[i : i + 1])
        want = central_difference(reference, [x[i : i + 1]], [v[i : i + 1]])[0]
        torch.testing.assert_close(from_wire(one["jvp"]), want)


def test_check_models_cli_reports_each_model(repo: Path) -> None:
    _save_affine(repo, "affine", 1, {"example_inputs": {"input": [5, 3]}})
    (repo / "broken").mkdir()
    (repo / "broken" / "model.pt2").write_bytes(b"nope")
    run = [sys.executable, "-m", "app.cli", "models", "check", str(repo)]
    result = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "ok   affine: method forward; inputs [[5, 3]]; outputs [5, 2]" in result.stdout
    assert "FAIL broken: load failed:" in result.stdout
    shutil.rmtree(repo / "broken")
    result = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 1 model(s) passed" in result.stdout
