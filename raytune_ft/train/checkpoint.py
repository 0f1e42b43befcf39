"""Checkpoint files without pickle: tensors in safetensors, everything else in JSON.

A nested state (an optimizer's ``state_dict()``, say) is split into a flat tensor file and a JSON
skeleton that refers to each tensor by key, so loading a checkpoint never unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSOR_REF = "__tensor__"


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
