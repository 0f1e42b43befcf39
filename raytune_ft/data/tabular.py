"""Tabular data (parquet / jsonl / csv / tsv) and image folders: driver-side checks and the Ray
Data pipeline.

The driver checks what it cheaply can before any worker starts (files exist, columns present,
rows present, every label in its label set), reading only the label columns. The pipeline then
streams: read -> select and rename columns to task roles, encode labels -> hold out a validation
fraction by a stable hash -> the task's ``preprocess`` in ``map_batches``.

Label roles: a single-label task has one, ``label``, whose label set is a list (``data.labels``);
a task with several label roles (multitask heads) has one label set per role
(``data.labels: {role: [...]}``). ``data.other_label: {role: name}`` sends a role's values outside
its label set to one bucket label instead of refusing them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raytune_ft.data import assets, images
from raytune_ft.errors import UserError
from raytune_ft.schema import DataSection

logger = logging.getLogger(__name__)

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


def read_checked(path: str, fmt: str, columns: dict[str, str], field: str, prefix: str = "data",
                 label_roles: tuple[str, ...] = ("label",)) -> dict[str, list] | None:
    """Verify every mapped column exists; read the label columns (the cheap check): {role: values}."""
    if not _is_remote(path) and not Path(path).exists():
        raise UserError(field, f"file not found: {path}")
    if fmt == "images":
        labels = images.folder_labels(path, columns, field, prefix)
        if not labels:
            raise UserError(field, f"{path} has no images")
        return {"label": labels}
    try:
        dataset = arrow_dataset(path, fmt)
        names = dataset.schema.names
    except Exception as error:  # pyarrow raises ArrowInvalid/OSError for unreadable files
        raise UserError(path, f"cannot read as {fmt}: {str(error).splitlines()[0][:200]}") from None
    for role, column in columns.items():
        if column not in names:
            raise UserError(f"{prefix}.columns.{role}", f"column {column!r} not in {path}; columns: {', '.join(names)}")
    label_columns = {role: columns[role] for role in label_roles if role in columns}
    try:
        table = dataset.to_table(columns=sorted(set(label_columns.values())) or [names[0]])
    except Exception as error:
        raise UserError(path, f"cannot read as {fmt}: {str(error).splitlines()[0][:200]}") from None
    if table.num_rows == 0:
        raise UserError(field, f"{path} has no rows")
    return {role: table.column(column).to_pylist() for role, column in label_columns.items()} if label_columns else None


def plan_splits(data: DataSection, prefix: str = "data", label_roles: tuple[str, ...] | None = None
                ) -> tuple[list[Split], list[str] | dict[str, list[str]] | None]:
    """Resolve and check every split; return them with the label set: a list for the one ``label``
    role, ``{role: labels}`` for a task with several label roles (``label_roles``), None for
    label-free tasks. ``prefix`` is the recipe path of this data section, for error messages."""
    columns = data.columns
    if label_roles is None:
        label_roles = ("label",) if "label" in columns else ()
    splits, label_values = [], {}
    for name in ("train", "validation", "test"):
        if not getattr(data, name):
            continue
        path = assets.resolve(getattr(data, name), f"{prefix}.{name}")
        fmt = detect_format(path, data.format) if not _is_remote(path) else (data.format if data.format != "auto" else "parquet")
        label_values[name] = read_checked(path, fmt, columns, f"{prefix}.{name}", prefix, label_roles)
        splits.append(Split(name, path, fmt))
    if not data.validation:
        train = splits[0]
        splits[0] = Split("train", train.path, train.fmt, holdout="train")
        splits.insert(1, Split("validation", train.path, train.fmt, holdout="validation"))
    if not label_roles:
        return splits, None
    several = label_roles != ("label",)
    given = data.labels if several else {"label": data.labels}
    label_sets = {role: plan_labels(role, label_values, (given or {}).get(role), data.other_label.get(role),
                                    f"{prefix}.labels.{role}" if several else f"{prefix}.labels", data, prefix)
                  for role in label_roles}
    return splits, label_sets if several else label_sets["label"]


def plan_labels(role: str, label_values: dict[str, dict[str, list]], given: list[str] | None, other: str | None,
                field: str, data: DataSection, prefix: str) -> list[str]:
    """One role's label set (given, else the sorted values of train; the ``other`` bucket appended
    when it is not in it), with every row of every split checked against it."""
    labels = list(given or sorted({str(v) for v in label_values["train"][role] if v is not None}))
    if other is not None and other not in labels:
        labels.append(other)
    if len(labels) < 2:
        raise UserError(f"{prefix}.columns.{role}", f"column {data.columns[role]!r} of {data.train} has fewer than 2 distinct labels")
    if other is not None:
        return labels
    allowed = set(labels)
    for name, values in label_values.items():
        for row, value in enumerate(values[role]):
            if value is None or str(value) not in allowed:
                what = "label" if role == "label" else role
                raise UserError(f"{prefix}.{name}", f"row {row}: {what} {value!r} is not in the label set {field} = {labels}")
    return labels


def holdout_bucket(values: np.ndarray) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per row, from its key (same in every process)."""
    digests = [hashlib.blake2b(str(v).encode(), digest_size=8).digest() for v in values]
    return np.array([int.from_bytes(d, "little") / 2**64 for d in digests])


class SelectRows:
    """map_batches step: rename columns to roles, encode labels, keep this split's rows."""

    def __init__(self, columns: dict[str, str], labels: list[str] | dict[str, list[str]] | None, holdout: str, fraction: float,
                 other_label: dict[str, str] | None = None):
        self.columns, self.holdout, self.fraction = columns, holdout, fraction
        label_sets = labels if isinstance(labels, dict) else {"label": labels} if labels else {}
        self.label_ids = {role: {label: i for i, label in enumerate(values)} for role, values in label_sets.items()}
        # A value outside a role's label set: its bucket's id (data.other_label), else refused at planning.
        self.other_ids = {role: self.label_ids[role][name] for role, name in (other_label or {}).items() if role in self.label_ids}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {role: batch[column] for role, column in self.columns.items()}
        if "path" in batch:  # image folders: the file, for errors that name it
            out["path"] = batch["path"]
        for role, ids in self.label_ids.items():
            other = self.other_ids.get(role)
            out[role] = np.array([ids[str(v)] if other is None else ids.get(str(v), other) for v in out[role]], dtype=np.int64)
        if self.holdout != "all":
            key = out[next(iter(self.columns))]  # the task's first role: text, image, ...
            in_validation = holdout_bucket(key) < self.fraction
            keep = in_validation if self.holdout == "validation" else ~in_validation
            out = {role: values[keep] for role, values in out.items()}
        return out


CACHE_LIMIT_BYTES = 256 * 2**20
DRIVER_BLOCK_BYTES = 8 * 2**20  # blocks of a split read on the driver: several, so its preprocessing runs in parallel


def local_size(split: Split) -> int | None:
    """The bytes of a local split's files; None for a URI."""
    if _is_remote(split.path):
        return None
    path = Path(split.path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def should_cache(split: Split, policy: str) -> bool:
    """Streaming re-reads and re-preprocesses every epoch; small data is cheaper to keep."""
    if policy != "auto":
        return policy == "always"
    size = local_size(split)
    return size is not None and size < CACHE_LIMIT_BYTES


def driver_table(split: Split, columns: list[str]):
    """A small local split's columns, read in this process (image folders: image bytes, path, label)."""
    if split.fmt == "images":
        return images.folder_table(split.path)
    return arrow_dataset(split.path, split.fmt).to_table(columns=columns)


def read_ray(split: Split, columns: list[str]):
    """The split's columns as a Ray Dataset. A small local split is read here, on the driver, and
    reaches Ray Data through the object store: the tasks that preprocess it may run on any node of
    a cluster and need none of its files on their own disk. Larger local data and URIs (s3://,
    gs://, ...) are read by Ray Data's tasks wherever they run, so on a cluster a local path must
    be on a filesystem every node mounts (see docs/clusters.md)."""
    import pyarrow.csv as pacsv
    import ray.data

    size = local_size(split)
    if size is not None and size < CACHE_LIMIT_BYTES:
        table = driver_table(split, columns)
        rows_per_block = max(1, table.num_rows * DRIVER_BLOCK_BYTES // max(table.nbytes, 1))
        return ray.data.from_arrow([table.slice(start, rows_per_block) for start in range(0, max(table.num_rows, 1), rows_per_block)])
    if size is not None and sum(node["Alive"] for node in ray.nodes()) > 1:
        logger.warning("%s is read by Ray Data's tasks on every node of this cluster: it must be a path they all mount", split.path)
    if split.fmt == "parquet":
        dataset = ray.data.read_parquet(split.path)
    elif split.fmt == "images":
        dataset = images.read_folder(split.path)
    elif split.fmt == "jsonl":
        dataset = ray.data.read_json(split.path, lines=True)
    elif split.fmt == "tsv":
        dataset = ray.data.read_csv(split.path, parse_options=pacsv.ParseOptions(delimiter="\t", newlines_in_values=True))
    else:
        dataset = ray.data.read_csv(split.path)
    return dataset.select_columns(columns)


def rows_dataset(split: Split, data: DataSection, labels: list[str] | dict[str, list[str]] | None):
    """The streaming Ray Dataset of one split's rows, columns named by task role, labels encoded."""
    # A column mapped to two roles is read once.
    dataset = read_ray(split, list(dict.fromkeys(data.columns.values())) + (["path"] if split.fmt == "images" else []))
    select = SelectRows(data.columns, labels, split.holdout, data.validation_fraction, data.other_label)
    dataset = dataset.map_batches(select, batch_format="numpy")
    if data.max_rows:
        dataset = dataset.limit(data.max_rows)
    return dataset
