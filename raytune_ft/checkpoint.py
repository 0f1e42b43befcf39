"""Checkpoint files without pickle: tensors in safetensors, everything else in JSON.

A nested state (an optimizer's ``state_dict()``, say) is split into a flat tensor file and a JSON
skeleton that refers to each tensor by key, so loading a checkpoint never unpickles anything.
``verify_checkpoint`` checks a checkpoint is whole (no file truncated) before a run resumes from it.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

TENSOR_REF = "__tensor__"
TRAINER_STATE = "trainer_state.json"  # in every checkpoint: the loop's counters, history and early-stopping state


def _split(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {TENSOR_REF: key}
    if isinstance(value, dict):
        return {"__dict__": [[_split(k, tensors, f"{key}.k{i}"), _split(v, tensors, f"{key}.{i}")] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_split(v, tensors, f"{key}.{i}") for i, v in enumerate(value)], "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if TENSOR_REF in value:
            return tensors[value[TENSOR_REF]]
        if "__dict__" in value:
            return {_join(k, tensors): _join(v, tensors) for k, v in value["__dict__"]}
        if "__list__" in value:
            items = [_join(v, tensors) for v in value["__list__"]]
            return tuple(items) if value["tuple"] else items
    return value


def save_state(state: Any, directory: str | os.PathLike, name: str) -> None:
    """Write ``state`` as ``name.safetensors`` + ``name.json``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors, "t")
    directory = Path(directory)
    save_file(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(directory: str | os.PathLike, name: str) -> Any:
    directory = Path(directory)
    tensors = load_file(directory / f"{name}.safetensors")
    return _join(json.loads((directory / f"{name}.json").read_text()), tensors)


def safetensors_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tensor name -> shape, from the header alone (safetensors' own reader, which unpickles
    nothing). Raises ValueError when the file is not safetensors (a pickle, say) or is shorter or
    longer than its header says (half-written)."""
    try:
        with safe_open(path, "pt") as weights:
            return {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    except SafetensorError as error:
        if "not fully covered" in str(error):
            raise ValueError("incomplete: the file is shorter or longer than its header says") from None
        raise ValueError("not a safetensors file") from None


def stored_safetensors_shapes(f) -> dict[str, list[int]]:
    """``safetensors_shapes`` of a file on shared storage (a pyarrow input file) without fetching
    its tensors: the header goes into a sparse local file of the same size, which safetensors'
    reader checks like the original (the 8-byte prefix says how long the header is)."""
    size = f.size()
    prefix = f.read(8)
    length = int.from_bytes(prefix, "little")
    if size < 8 or length > size - 8:
        raise ValueError("not a safetensors file")
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as local:
        local.write(prefix + f.read(length))
        local.truncate(size)  # sparse: no disk used for the tensors' bytes
        local.flush()
        return safetensors_shapes(local.name)


def verify_checkpoint(directory: str | os.PathLike, filesystem=None) -> None:
    """Raise ValueError naming the first file of a checkpoint that is missing, truncated or not
    what its suffix says; reads headers and structure only, never the tensors. ``filesystem``: a
    pyarrow filesystem holding ``directory`` (shared storage, S3, ...); default the local disk."""
    from pyarrow import fs

    filesystem = filesystem or fs.LocalFileSystem()
    root = str(directory).rstrip("/")
    files = sorted(info.path for info in filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
                   if info.type == fs.FileType.File)
    if f"{root}/{TRAINER_STATE}" not in files:
        raise ValueError(f"{root}/{TRAINER_STATE}: missing")
    for path in files:
        try:
            with filesystem.open_input_file(path) as f:
                if path.endswith(".safetensors"):
                    safetensors_shapes(path) if isinstance(filesystem, fs.LocalFileSystem) else stored_safetensors_shapes(f)
                elif path.endswith(".json"):
                    json.loads(f.read())
                elif path.endswith(".pt"):  # DeepSpeed's shards: zip archives, whose index sits at the end
                    zipfile.ZipFile(f).close()
        except (ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: {error}") from None
