"""Tabular data (parquet / jsonl / csv / tsv) and image folders: driver-side checks and the Ray
Data pipeline.

The driver checks what it cheaply can before any worker starts (files exist, columns present,
rows present, every label in the label set), reading only the label column. The pipeline then
streams: read -> select and rename columns to task roles, encode labels -> hold out a validation
fraction by a stable hash -> the task's ``preprocess`` in ``map_batches``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raytune_ft.data import assets, images
from raytune_ft.errors import UserError

SUFFIX_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    candidates = [Path(path)]
    if Path(path).is_dir():
        candidates = sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    for candidate in candidates:
        if candidate.suffix.lower() in SUFFIX_FORMATS:
            return SUFFIX_FORMATS[candidate.suffix.lower()]
    if images.is_image_folder(path):
        return "images"
    raise UserError(path, "cannot tell the data format from the file names; set data.format (parquet, jsonl, csv, tsv, images)")


def _is_remote(path: str) -> bool:
    return "://" in path


def arrow_dataset(path: str, fmt: str):
    import pyarrow.csv as pacsv
    import pyarrow.dataset as pads

    file_format = {
        "parquet": "parquet",
        "jsonl": pads.JsonFileFormat() if hasattr(pads, "JsonFileFormat") else "json",
        "csv": pads.CsvFileFormat(),
        "tsv": pads.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter="\t", newlines_in_values=True)),
    }[fmt]
    return pads.dataset(path, format=file_format, exclude_invalid_files=False)


@dataclass
class Split:
    """One data split as the pipeline will read it."""

    name: str
    path: str
    fmt: str
    holdout: str = "all"  # "all", "train" (rows outside the held-out fraction) or "validation"


def read_checked(path: str, fmt: str, columns: dict[str, str], field: str, prefix: str = "data"):
    """Read the label column (the cheap check) and verify every mapped column exists."""
    if not _is_remote(path) and not Path(path).exists():
        raise UserError(field, f"file not found: {path}")
    if fmt == "images":
        labels = images.folder_labels(path, columns, field, prefix)
        if not labels:
            raise UserError(field, f"{path} has no images")
        return labels
    try:
        dataset = arrow_dataset(path, fmt)
        names = dataset.schema.names
    except Exception as error:  # pyarrow raises ArrowInvalid/OSError for unreadable files
        raise UserError(path, f"cannot read as {fmt}: {str(error).splitlines()[0][:200]}") from None
    for role, column in columns.items():
        if column not in names:
            raise UserError(f"{prefix}.columns.{role}", f"column {column!r} not in {path}; columns: {', '.join(names)}")
    try:
        label_column = columns.get("label")
        table = dataset.to_table(columns=[label_column] if label_column else [names[0]])
    except Exception as error:
        raise UserError(path, f"cannot read as {fmt}: {str(error).splitlines()[0][:200]}") from None
    if table.num_rows == 0:
        raise UserError(field, f"{path} has no rows")
    return table.column(label_column).to_pylist() if label_column else None


def plan_splits(data: dict[str, Any], prefix: str = "data") -> tuple[list[Split], list[str] | None]:
    """Resolve and check every split; return them with the label set (None for label-free tasks).
    ``prefix`` is the recipe path of this data section, for error messages."""
    columns = data["columns"]
    splits, label_values = [], {}
    for name in ("train", "validation", "test"):
        if not data.get(name):
            continue
        path = assets.resolve(data[name], f"{prefix}.{name}")
        fmt = detect_format(path, data["format"]) if not _is_remote(path) else (data["format"] if data["format"] != "auto" else "parquet")
        label_values[name] = read_checked(path, fmt, columns, f"{prefix}.{name}", prefix)
        splits.append(Split(name, path, fmt))
    if not data.get("validation"):
        train = splits[0]
        splits[0] = Split("train", train.path, train.fmt, holdout="train")
        splits.insert(1, Split("validation", train.path, train.fmt, holdout="validation"))
    if "label" not in columns:
        return splits, None
    labels = data.get("labels") or sorted({str(v) for v in label_values["train"] if v is not None})
    if len(labels) < 2:
        raise UserError(f"{prefix}.columns.label", f"column {columns['label']!r} of {data['train']} has fewer than 2 distinct labels")
    allowed = set(labels)
    for name, values in label_values.items():
        for row, value in enumerate(values):
            if value is None or str(value) not in allowed:
                raise UserError(f"{prefix}.{name}", f"row {row}: label {value!r} is not in the label set {prefix}.labels = {labels}")
    return splits, labels


def holdout_bucket(values: np.ndarray) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per row, from its key (same in every process)."""
    digests = [hashlib.blake2b(str(v).encode(), digest_size=8).digest() for v in values]
    return np.array([int.from_bytes(d, "little") / 2**64 for d in digests])


class SelectRows:
    """map_batches step: rename columns to roles, encode labels, keep this split's rows."""

    def __init__(self, columns: dict[str, str], labels: list[str] | None, holdout: str, fraction: float):
        self.columns, self.holdout, self.fraction = columns, holdout, fraction
        self.label_ids = {label: i for i, label in enumerate(labels)} if labels else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {role: batch[column] for role, column in self.columns.items()}
        if "path" in batch:  # image folders: the file, for errors that name it
            out["path"] = batch["path"]
        if self.label_ids is not None:
            out["label"] = np.array([self.label_ids[str(v)] for v in out["label"]], dtype=np.int64)
        if self.holdout != "all":
            key = out[next(iter(self.columns))]  # the task's first role: text, image, ...
            in_validation = holdout_bucket(key) < self.fraction
            keep = in_validation if self.holdout == "validation" else ~in_validation
            out = {role: values[keep] for role, values in out.items()}
        return out


CACHE_LIMIT_BYTES = 256 * 2**20


def should_cache(split: Split, policy: str) -> bool:
    """Streaming re-reads and re-preprocesses every epoch; small data is cheaper to keep."""
    if policy != "auto":
        return policy == "always"
    if _is_remote(split.path):
        return False
    path = Path(split.path)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return size < CACHE_LIMIT_BYTES


def read_ray(split: Split):
    import pyarrow.csv as pacsv
    import ray.data

    if split.fmt == "parquet":
        return ray.data.read_parquet(split.path)
    if split.fmt == "images":
        return images.read_folder(split.path)
    if split.fmt == "jsonl":
        return ray.data.read_json(split.path, lines=True)
    if split.fmt == "tsv":
        return ray.data.read_csv(split.path, parse_options=pacsv.ParseOptions(delimiter="\t", newlines_in_values=True))
    return ray.data.read_csv(split.path)


def rows_dataset(split: Split, data: dict[str, Any], labels: list[str] | None):
    """The streaming Ray Dataset of one split's rows, columns named by task role, labels encoded."""
    dataset = read_ray(split).select_columns(list(data["columns"].values()) + (["path"] if split.fmt == "images" else []))
    select = SelectRows(data["columns"], labels, split.holdout, data["validation_fraction"])
    dataset = dataset.map_batches(select, batch_format="numpy")
    if data.get("max_rows"):
        dataset = dataset.limit(data["max_rows"])
    return dataset
