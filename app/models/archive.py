"""Reading a repository program (``model.pt2``) so that nothing in it is unpickled.

# NOTE [nothing unpickled from a .pt2]
`torch.export.load` is not safe on an archive one did not make: its own docstring
says it "uses pickle under the hood". In torch 2.13 a ``.pt2`` file is a zip
(torch/export/pt2_archive/_package.py) whose members are, for a plain program
saved by `torch.export.save`:

- ``archive_format`` ("pt2"), ``archive_version``, ``byteorder``,
  ``.data/version``, ``.data/serialization_id``: short text;
- ``models/model.json``: the program, JSON;
- ``data/weights/model_weights_config.json`` and
  ``data/constants/model_constants_config.json``: JSON, one entry per weight or
  tensor constant, with its file (``weight_N``, ``tensor_N``) and ``use_pickle``;
- ``data/weights/weight_N``, ``data/constants/tensor_N``: raw tensor bytes,
  read with ``torch.as_strided`` when ``use_pickle`` is false;
- ``data/sample_inputs/model.pt``: the example inputs, written by ``torch.save``
  (a pickle), and read back with ``torch.load(weights_only=True)`` falling back
  to ``weights_only=False``, a full unpickle, when that fails.

Torch also unpickles a weight or tensor constant marked ``use_pickle``
(``torch.load(weights_only=False)``), a constant ``custom_obj_N`` (TorchScript's
pickler) or ``opaque_obj_N`` (``pickle.loads``), legacy ``data/weights/model.pt``
and ``data/constants/model.pt`` files, and the whole pre-2.8 zip format; and it
loads AOTInductor shared libraries from ``data/aotinductor/``.

So `read_program` opens the zip first and refuses any member but those of the
list above (by name, and ``use_pickle`` false in both configs), then hands
torch a copy of the archive whose sample inputs are empty (torch then reads
none; the service takes its example shapes from config.json) and without
``extra/`` files. Nothing of the archive is unpickled, and no library in it is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

# Paths inside the archive's one top-level folder (its name is free).
_TEXT = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
}
PROGRAM = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_RAW = {
    WEIGHTS_CONFIG: re.compile(r"data/weights/(weight_\d+)"),
    CONSTANTS_CONFIG: re.compile(r"data/constants/(tensor_\d+)"),
}
_DROPPED = re.compile(r"extra/[^/]+")  # text torch reads only when asked; not needed here


class UnreadableProgram(Exception):
    """A .pt2 file that `read_program` cannot read; the message says why (no paths)."""


class ArchiveRefused(UnreadableProgram):
    """A .pt2 file that `read_program` will not hand to torch."""


def _members(archive: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The archive's top-level folder, and its members by their path inside it."""
    infos = [i for i in archive.infolist() if not i.is_dir()]
    roots = {i.filename.split("/", 1)[0] for i in infos}
    if len(roots) != 1 or any("/" not in i.filename for i in infos):
        raise ArchiveRefused(
            "not an archive written by torch.export.save (expected one top-level folder, "
            f"found {sorted(roots)[:5]})"
        )
    root = roots.pop()
    return root, {i.filename[len(root) + 1 :]: i for i in infos}


def _raw_files(archive: zipfile.ZipFile, info: zipfile.ZipInfo, config: str) -> set[str]:
    """The raw tensor files a weights or constants config names; refused if any entry
    would be unpickled."""
    try:
        entries = json.loads(archive.read(info)).get("config", {})
        items = entries.items()
    except (ValueError, AttributeError) as e:
        raise ArchiveRefused(f"{config} is not the JSON torch.export.save writes ({e})") from None
    files = set()
    prefix = config.rsplit("/", 1)[0]
    pattern = _RAW[config]
    for name, entry in items:
        path = f"{prefix}/{entry.get('path_name')}" if isinstance(entry, dict) else ""
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise ArchiveRefused(
                f"{config} marks {name!r} as pickled: pickled weights, constants, custom "
                "objects and opaque constants are refused (nothing is unpickled)"
            )
        if not pattern.fullmatch(path):
            raise ArchiveRefused(
                f"{config} stores {name!r} in {path!r}; only raw tensors "
                f"({pattern.pattern}) are read (custom objects and opaque constants are "
                "pickles, refused)"
            )
        files.add(path)
    return files


def check_archive(archive: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """Refuse (`ArchiveRefused`) anything but the members of a plain torch.export.save
    archive (NOTE [nothing unpickled from a .pt2]); the root and members to copy."""
    root, members = _members(archive)
    for required in (PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG, "archive_format"):
        if required not in members:
            raise ArchiveRefused(f"not a torch.export.save archive of one program: no {required}")
    if archive.read(members["archive_format"]).strip() != b"pt2":
        raise ArchiveRefused("archive_format is not 'pt2'")
    raw = _raw_files(archive, members[WEIGHTS_CONFIG], WEIGHTS_CONFIG)
    raw |= _raw_files(archive, members[CONSTANTS_CONFIG], CONSTANTS_CONFIG)
    known = _TEXT | {PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS} | raw
    for path in members:
        if path not in known and not _DROPPED.fullmatch(path):
            raise ArchiveRefused(
                f"it holds {path!r}, which a plain torch.export.save program does not: "
                "only the program's JSON and raw tensors are read (pickled objects, "
                "AOTInductor libraries and other payloads are refused)"
            )
    return root, {p: i for p, i in members.items() if not _DROPPED.fullmatch(p)}


def read_program(path: Path) -> Any:
    """The `torch.export.ExportedProgram` in ``path``, with nothing unpickled (NOTE
    [nothing unpickled from a .pt2]). Raises `UnreadableProgram` (`ArchiveRefused`)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveRefused(f"not a zip archive as torch.export.save writes ({e})") from None
    except ValueError as e:
        raise ArchiveRefused(f"not a readable zip archive ({e})") from None
    with archive, tempfile.TemporaryDirectory(prefix="jvp-pt2-") as folder:
        root, members = check_archive(archive)
        copy = Path(folder) / "model.pt2"
        with zipfile.ZipFile(copy, "w", zipfile.ZIP_STORED) as out:
            out.writestr(f"{root}/{SAMPLE_INPUTS}", b"")  # empty: torch reads none
            for name, info in members.items():
                if name == SAMPLE_INPUTS:
                    continue
                with archive.open(info) as src, out.open(f"{root}/{name}", "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        try:
            return torch.export.load(copy)
        except Exception as e:  # noqa: BLE001 - any failure to read the file is the same answer
            text = str(e).replace(str(copy), path.name)  # never the temporary folder's path
            raise UnreadableProgram(f"torch.export.load cannot read it: {text}") from None
