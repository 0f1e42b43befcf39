"""Checkpoint files without pickle: tensors in safetensors, everything else in JSON.

A nested state (an optimizer's ``state_dict()``, say) is split into a flat tensor file and a JSON
skeleton that refers to each tensor by key, so loading a checkpoint never unpickles anything.
``verify_checkpoint`` checks a checkpoint is whole (no file truncated) before a run resumes from it.
"""

from __future__ import annotations

import json
import os
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


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Raise ValueError naming the first file of a checkpoint that is missing, truncated or not
    what its suffix says; reads headers and structure only, never the tensors."""
    directory = Path(directory)
    if not (directory / TRAINER_STATE).is_file():
        raise ValueError(f"{directory / TRAINER_STATE}: missing")
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                safetensors_shapes(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".pt":  # DeepSpeed's shards: zip archives, whose index sits at the end
                zipfile.ZipFile(path).close()
        except (ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: {error}") from None
