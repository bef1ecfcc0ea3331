"""A repository entry made by someone else (issue 15, reproducer 8).

- ``torch.export.load`` unpickles parts of a .pt2 archive (NOTE [nothing unpickled from a
  .pt2] in app/models/archive.py): an archive with a pickled part is refused with a clear
  load error, and its pickle never runs; the genuine archive still loads.
- A model folder or file that is a symbolic link out of JVP_MODEL_DIR is not served.
- Load errors name files relative to the repository, never by absolute path.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from app.models.repository import load_repository
from tests.models.conftest import ADMIN, INFERENCE, save_model
from tests.wire import from_wire, to_wire


class Touch:
    """A pickle that, unpickled, creates a file: proof that it ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def genuine(repo: Path, name: str = "scale") -> Path:
    """A plain program, y = 3 x + b with b = [1, -1], saved by torch.export.save."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.tensor([1.0, -1.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 3 * x + self.b

    return save_model(repo, name, Scale(), (torch.ones(2),)) / "model.pt2"


def rewrite(program: Path, members: dict[str, bytes]) -> None:
    """The archive with these members (by path inside its one folder) replaced or added."""
    with zipfile.ZipFile(program) as z:
        kept = {i.filename: z.read(i) for i in z.infolist()}
    root = next(iter(kept)).split("/", 1)[0]
    kept.update({f"{root}/{path}": data for path, data in members.items()})
    with zipfile.ZipFile(program, "w") as z:
        for filename, data in kept.items():
            z.writestr(filename, data)


def jvp_is_right(client: TestClient, name: str) -> None:
    """d(3x + b) v = 3 v."""
    x, v = torch.tensor([2.0, 5.0]), torch.tensor([1.0, -0.5])
    r = client.post(
        "/jvp",
        headers=INFERENCE,
        json={"model": name, "primals": {"x": to_wire(x)}, "tangents": {"x": to_wire(v)}},
    )
    assert r.status_code == 200, r.text
    assert from_wire(r.json()["output"]).tolist() == [7.0, 14.0]
    assert from_wire(r.json()["jvp"]).tolist() == [3.0, -1.5]


def opaque_constant(program: Path, marker: Path) -> None:
    """What torch.export.save writes for an opaque constant: a pickle that
    torch.export.load hands to pickle.loads."""
    with zipfile.ZipFile(program) as z:
        root = z.infolist()[0].filename.split("/", 1)[0]
        config = json.loads(z.read(f"{root}/data/constants/model_constants_config.json"))
    config["config"]["evil"] = {
        "path_name": "opaque_obj_0",
        "is_param": False,
        "use_pickle": True,
        "tensor_meta": None,
    }
    rewrite(
        program,
        {
            "data/constants/model_constants_config.json": json.dumps(config).encode(),
            "data/constants/opaque_obj_0": pickle.dumps(Touch(marker)),
        },
    )


def test_archive_with_an_opaque_pickled_constant_is_refused_and_never_unpickled(
    repo: Path, keyed_client: TestClient, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    opaque_constant(genuine(repo, "evil"), marker)
    r = keyed_client.post("/models/evil/load", headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {
        "type": "invalid_request",
        "message": "Model 'evil' failed to load: evil/model.pt2: "
        "data/constants/model_constants_config.json marks 'evil' as pickled: pickled "
        "weights, constants, custom objects and opaque constants are refused (nothing is "
        "unpickled)",
        "param": "name",
    }
    assert not marker.exists()
    # The threat is real: torch.export.load itself runs the pickle (and loads the program).
    torch.export.load(repo / "evil" / "model.pt2")
    assert marker.exists()
    genuine(repo, "scale")
    assert keyed_client.post("/models/scale/load", headers=ADMIN).status_code == 200
    jvp_is_right(keyed_client, "scale")


@pytest.mark.parametrize(
    "member",
    [
        "data/constants/opaque_obj_0",  # pickle.loads, if a config entry names it
        "data/constants/custom_obj_0",  # TorchScript's unpickler, likewise
        "data/weights/model.pt",  # the legacy weights file: torch.load(weights_only=False)
        "data/aotinductor/model/model.so",  # a shared library torch.export.load would load
    ],
)
def test_archive_with_an_unknown_member_is_refused(
    repo: Path, keyed_client: TestClient, tmp_path: Path, member: str
) -> None:
    marker = tmp_path / "unpickled"
    rewrite(genuine(repo, "evil"), {member: pickle.dumps(Touch(marker))})
    r = keyed_client.post("/models/evil/load", headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"] == (
        f"Model 'evil' failed to load: evil/model.pt2: it holds {member!r}, which a plain "
        "torch.export.save program does not: only the program's JSON and raw tensors are "
        "read (pickled objects, AOTInductor libraries and other payloads are refused)"
    )
    assert not marker.exists()
    genuine(repo, "scale")
    assert keyed_client.post("/models/scale/load", headers=ADMIN).status_code == 200
    jvp_is_right(keyed_client, "scale")


def test_pickled_sample_inputs_are_never_read(
    repo: Path, keyed_client: TestClient, tmp_path: Path
) -> None:
    # torch.export.load reads the sample inputs with torch.load(weights_only=True) and, when
    # that fails (as on this pickle), again with weights_only=False: it would run.
    marker = tmp_path / "unpickled"
    rewrite(genuine(repo, "scale"), {"data/sample_inputs/model.pt": pickle.dumps(Touch(marker))})
    r = keyed_client.post("/models/scale/load", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert not marker.exists()
    jvp_is_right(keyed_client, "scale")
    # The threat is real: torch.export.load runs the pickle (then fails on what it made).
    with pytest.raises(RuntimeError):
        torch.export.load(repo / "scale" / "model.pt2")
    assert marker.exists()


def test_model_folder_linking_out_of_the_repository_is_not_served(
    repo: Path, keyed_client: TestClient, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    genuine(outside, "scale")
    (repo / "linked").symlink_to(outside / "scale", target_is_directory=True)
    (repo / "filelinked").mkdir()
    (repo / "filelinked" / "model.pt2").symlink_to(outside / "scale" / "model.pt2")
    for name, what in [("linked", "linked"), ("filelinked", "filelinked/model.pt2")]:
        r = keyed_client.post(f"/models/{name}/load", headers=ADMIN)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"] == (
            f"Model {name!r} failed to load: {what}: a symbolic link out of the model "
            "repository; not served"
        )
        assert keyed_client.get(f"/models/{name}", headers=INFERENCE).status_code == 404
    # At start too; a link that stays inside the repository is served.
    genuine(repo, "scale")
    (repo / "alias").symlink_to(repo / "scale", target_is_directory=True)
    models, failures = load_repository(repo)
    assert sorted(m.name for m in models) == ["alias", "scale"]
    assert set(failures) == {"linked", "filelinked"}
    assert keyed_client.post("/models/alias/load", headers=ADMIN).status_code == 200
    jvp_is_right(keyed_client, "alias")


def test_load_errors_name_files_relative_to_the_repository(
    repo: Path, keyed_client: TestClient
) -> None:
    (repo / "broken").mkdir()
    (repo / "broken" / "model.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    (repo / "empty").mkdir()
    genuine(repo, "badconfig")
    (repo / "badconfig" / "config.json").write_text('{"outputs": [3]}')
    for name, start in [
        ("broken", "broken/model.pt2: not a zip archive"),
        ("empty", "empty: no model.pt2"),
        ("badconfig", "badconfig/config.json: outputs [3] names index 3"),
    ]:
        r = keyed_client.post(f"/models/{name}/load", headers=ADMIN)
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert message.startswith(f"Model {name!r} failed to load: {start}"), message
        assert str(repo) not in message and str(repo.parent) not in message
    _, failures = load_repository(repo)
    assert all(str(repo.parent) not in reason for reason in failures.values()), failures
