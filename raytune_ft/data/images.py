"""Image folders as data: ``root/<class name>/<image file>``, one subfolder per class.

A folder reads as the columns ``image`` (the file's bytes), ``label`` (its subfolder's name) and
``path`` (so a file that cannot be decoded is named in the error). Decoding is the task's job,
in Ray Data ``map_batches``, like tokenising text.
"""

from __future__ import annotations

from pathlib import Path

from raytune_ft.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_COLUMNS = ("image", "label")


def image_files(root: str) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_image_folder(path: str) -> bool:
    return Path(path).is_dir() and bool(image_files(path))


def folder_labels(root: str, columns: dict[str, str], field: str, prefix: str) -> list[str]:
    """Check an image folder against the column mapping; the label of every image, in file order."""
    for role, column in columns.items():
        if column not in FOLDER_COLUMNS:
            raise UserError(f"{prefix}.columns.{role}", f"an image folder has the columns {', '.join(FOLDER_COLUMNS)}, not {column!r}")
    files = image_files(root)
    stray = [f for f in files if f.parent == Path(root)]
    if stray:
        raise UserError(field, f"{stray[0]} is not in a class subfolder; put each image under {root}/<class name>/")
    return [f.parent.name for f in files]


def with_label(batch):
    """map_batches step: the class is the name of the file's folder."""
    import numpy as np

    batch["label"] = np.array([Path(str(p)).parent.name for p in batch["path"]], dtype=object)
    return batch


def folder_table(root: str):
    """A folder's images read here: columns image (the file's bytes), path and label."""
    import pyarrow as pa

    files = image_files(root)
    return pa.table({"image": pa.array([f.read_bytes() for f in files], type=pa.binary()),
                     "path": [str(f) for f in files], "label": [f.parent.name for f in files]})


def read_folder(root: str):
    """A folder's images, read by Ray Data's tasks (on a cluster: from a path every node mounts)."""
    import ray.data

    files = ray.data.read_binary_files(root, include_paths=True, file_extensions=[s[1:] for s in IMAGE_SUFFIXES])
    return files.rename_columns({"bytes": "image"}).map_batches(with_label, batch_format="numpy")
