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

Bad cells are bad rows: a null or empty cell, or one that is not text where text is read, makes
its row a bad row, which ``data.on_bad_rows`` refuses (naming the file, column and row) or skips
and counts, as it does a row the task cannot preprocess (an undecodable image).

``validate`` reads no URI (``s3://``, ``gs://``, ...): it may need the cluster's credentials and
would download the data; inside ``uris_unread()`` each is recorded instead of read, and named as
not checked. ``run`` reads every split.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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


# (recipe field, URI) of every split left unread; None: every split is read.
_UNREAD: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("unread_uris", default=None)


@contextlib.contextmanager
def uris_unread() -> Iterator[list[tuple[str, str]]]:
    """Within: splits at a URI are not read, but listed in the list this yields (validate)."""
    unread: list[tuple[str, str]] = []
    token = _UNREAD.set(unread)
    try:
        yield unread
    finally:
        _UNREAD.reset(token)


# Roles whose cells must be text; every other role's cell must be neither null nor empty.
TEXT_ROLES = ("text", "question", "prompt", "response")
BAD_LABEL = -1  # the id SelectRows gives a null or empty label: its row is a bad row


def cell_problem(value: Any, role: str) -> str | None:
    """Why a cell cannot serve its role (None: it can): null, empty, or not text in a text role."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, bytes) and not value or isinstance(value, str) and not value.strip():
        return "empty"
    if role in TEXT_ROLES and not isinstance(value, str):
        return f"not text (a {type(value).__name__})"
    return None


def fix_or_skip(problem: str) -> str:
    return f"{problem}; fix it, or set data.on_bad_rows: skip to leave such rows out (counted)"


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
    field: str = ""  # the recipe field that names its source, e.g. data.train
    rows: int | None = None  # rows in its source (None: not read), before the hold-out and data.max_rows

    def expected_rows(self, data: DataSection) -> int | None:
        """Rows this split will have: its share of the source (the hold-out is a stable hash, so
        about ``validation_fraction`` of train), at most ``data.max_rows``."""
        if self.rows is None:
            return None
        share = {"all": 1.0, "train": 1 - data.validation_fraction, "validation": data.validation_fraction}[self.holdout]
        return min(round(self.rows * share), data.max_rows or self.rows)


SMALL_DATA_BYTES = 256 * 2**20  # local data under this is cached across epochs, and its text cells checked at planning


def is_small(path: str) -> bool:
    if _is_remote(path):
        return False
    source = Path(path)
    size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file()) if source.is_dir() else source.stat().st_size
    return size < SMALL_DATA_BYTES


def first_bad_cell(path: str, fmt: str, column: str, role: str) -> tuple[str, int, str] | None:
    """(file, row in it, problem) of the first bad cell of ``column`` in a split's source (None:
    every cell is good), reading that column alone, file by file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for fragment in arrow_dataset(path, fmt).get_fragments():
        values = fragment.to_table(columns=[column]).column(column)
        if pa.types.is_dictionary(values.type):  # a categorical column: its values, not its codes
            values = values.cast(values.type.value_type)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or str(values.type) == "string_view":
            bad = pc.or_kleene(values.is_null(), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
        elif role in TEXT_ROLES:
            bad = pa.array([True] * len(values))  # numbers (a CSV column of digits), lists, ...: not text
        else:
            bad = values.is_null()
        row = pc.index(bad.fill_null(True), True).as_py()
        if row >= 0:
            return fragment.path, row, cell_problem(values[row].as_py(), role)
    return None


def check_exists(path: str, field: str) -> None:
    """A local split must exist. A path the OS refuses to look up (a name over 255 bytes, say)
    is the same one-line error, not a traceback."""
    try:
        found = Path(path).exists()
    except OSError as error:
        raise UserError(field, f"cannot look up {path[:60]}{'...' if len(path) > 60 else ''}: {error.strerror}") from None
    if not found:
        raise UserError(field, f"file not found: {path}")


def read_checked(path: str, fmt: str, columns: dict[str, str], field: str, prefix: str = "data",
                 label_roles: tuple[str, ...] = ("label",)) -> tuple[int, dict[str, list] | None]:
    """Verify every mapped column exists; count the rows and read the label columns (the cheap
    check): (rows, {role: values})."""
    if fmt == "images":
        labels = images.folder_labels(path, columns, field, prefix)
        if not labels:
            raise UserError(field, f"{path} has no images")
        return len(labels), {"label": labels}
    label_columns = {role: columns[role] for role in label_roles if role in columns}
    try:
        dataset = arrow_dataset(path, fmt)
        names = dataset.schema.names
        for role, column in columns.items():
            if column not in names:
                raise UserError(f"{prefix}.columns.{role}", f"column {column!r} not in {path}; columns: {', '.join(names)}")
        if label_columns:
            table = dataset.to_table(columns=sorted(set(label_columns.values())))
            rows = table.num_rows
        else:
            rows = dataset.count_rows()
    except UserError:
        raise
    except Exception as error:  # pyarrow raises ArrowInvalid/OSError for unreadable files
        raise UserError(path, f"cannot read as {fmt}: {str(error).splitlines()[0][:200]}") from None
    if rows == 0:
        raise UserError(field, f"{path} has no rows")
    return rows, {role: table.column(column).to_pylist() for role, column in label_columns.items()} if label_columns else None


def plan_splits(data: DataSection, prefix: str = "data", label_roles: tuple[str, ...] | None = None
                ) -> tuple[list[Split], list[str] | dict[str, list[str]] | None]:
    """Resolve and check every split; return them with the label set: a list for the one ``label``
    role, ``{role: labels}`` for a task with several label roles (``label_roles``), None for
    label-free tasks. ``prefix`` is the recipe path of this data section, for error messages."""
    columns = data.columns
    if label_roles is None:
        label_roles = ("label",) if "label" in columns else ()
    splits, label_values = [], {}
    unread = _UNREAD.get()
    for name in ("train", "validation", "test"):
        if not getattr(data, name):
            continue
        field = f"{prefix}.{name}"
        path = assets.resolve(getattr(data, name), field)
        remote = _is_remote(path)
        if remote:
            fmt = data.format if data.format != "auto" else "parquet"
        else:
            check_exists(path, field)
            fmt = detect_format(path, data.format)
        rows = None
        if remote and unread is not None:
            unread.append((field, path))
        else:
            rows, label_values[name] = read_checked(path, fmt, columns, field, prefix, label_roles)
            if data.on_bad_rows == "fail" and fmt != "images" and is_small(path):
                check_text_cells(path, fmt, columns, field)
        splits.append(Split(name, path, fmt, field=field, rows=rows))
    if not data.validation:
        train = splits[0]
        splits[0] = Split("train", train.path, train.fmt, "train", train.field, train.rows)
        splits.insert(1, Split("validation", train.path, train.fmt, "validation", train.field, train.rows))
    if not label_roles:
        return splits, None
    several = label_roles != ("label",)
    given = data.labels if several else {"label": data.labels}
    paths = {split.name: split.path for split in splits}
    label_sets = {role: plan_labels(role, label_values, (given or {}).get(role), data.other_label.get(role),
                                    f"{prefix}.labels.{role}" if several else f"{prefix}.labels", data, prefix, paths)
                  for role in label_roles}
    return splits, label_sets if several else label_sets["label"]


def check_text_cells(path: str, fmt: str, columns: dict[str, str], field: str) -> None:
    """Small local data, refusing bad rows: its text cells are checked now, before any Ray work
    (the pipeline checks every row of any data, later)."""
    for role in (role for role in columns if role in TEXT_ROLES):
        found = first_bad_cell(path, fmt, columns[role], role)
        if found:
            raise UserError(field, f"{found[0]}: row {found[1]}: " + fix_or_skip(f"column {columns[role]!r} ({role}) is {found[2]}"))


def plan_labels(role: str, label_values: dict[str, dict[str, list]], given: list[str] | None, other: str | None,
                field: str, data: DataSection, prefix: str, paths: dict[str, str]) -> list[str]:
    """One role's label set (given, else the sorted values of train; the ``other`` bucket appended
    when it is not in it), with every row of every split checked against it. A null or empty
    label is a bad cell: refused here, or left to the pipeline to skip and count."""
    if "train" not in label_values and not given:  # train not read (validate, a URI): a stand-in set
        return [f"{role} {i}" for i in range(2)]
    seen = {str(v) for v in label_values.get("train", {}).get(role, []) if cell_problem(v, role) is None}
    labels = list(given or sorted(seen))
    if other is not None and other not in labels:
        labels.append(other)
    if len(labels) < 2:
        raise UserError(f"{prefix}.columns.{role}", f"column {data.columns[role]!r} of {data.train} has fewer than 2 distinct labels")
    allowed = set(labels)
    for name, values in label_values.items():
        for row, value in enumerate(values[role]):
            problem = cell_problem(value, role)
            if problem and data.on_bad_rows == "fail":
                raise UserError(f"{prefix}.{name}", f"{paths[name]}: row {row}: " + fix_or_skip(f"column {data.columns[role]!r} ({role}) is {problem}"))
            if not problem and other is None and str(value) not in allowed:
                what = "label" if role == "label" else role
                raise UserError(f"{prefix}.{name}", f"row {row}: {what} {value!r} is not in the label set {field} = {labels}")
    return labels


def holdout_bucket(values: np.ndarray) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per row, from its key (same in every process)."""
    digests = [hashlib.blake2b(str(v).encode(), digest_size=8).digest() for v in values]
    return np.array([int.from_bytes(d, "little") / 2**64 for d in digests])


def as_lists(values: np.ndarray) -> np.ndarray:
    """A column of list cells with Python lists in them (a question's choices), and lists of records
    (a conversation's [{role, content}, ...]) as JSON text: Ray Data turns neither numpy arrays
    inside a column nor lists of dicts back into Arrow (it would pickle them, and warn)."""
    if values.dtype != object or not any(isinstance(value, np.ndarray) for value in values):
        return values
    out = np.empty(len(values), dtype=object)
    out[:] = [value if not isinstance(value, np.ndarray) else
              json.dumps([dict(item) for item in value]) if len(value) and isinstance(value[0], dict) else value.tolist() for value in values]
    return out


class SelectRows:
    """map_batches step: rename columns to roles, encode labels, keep this split's rows. A null
    or empty label becomes ``BAD_LABEL`` (for ``DropBadRows``)."""

    def __init__(self, columns: dict[str, str], labels: list[str] | dict[str, list[str]] | None, holdout: str, fraction: float,
                 other_label: dict[str, str] | None = None):
        self.columns, self.holdout, self.fraction = columns, holdout, fraction
        label_sets = labels if isinstance(labels, dict) else {"label": labels} if labels else {}
        self.label_ids = {role: {label: i for i, label in enumerate(values)} for role, values in label_sets.items()}
        # A value outside a role's label set: its bucket's id (data.other_label), else refused at planning.
        self.other_ids = {role: self.label_ids[role][name] for role, name in (other_label or {}).items() if role in self.label_ids}

    def encode(self, role: str, value: Any) -> int:
        if cell_problem(value, role):
            return BAD_LABEL
        ids, other = self.label_ids[role], self.other_ids.get(role)
        key = str(value)
        if key not in ids and isinstance(value, float) and value.is_integer():
            key = str(int(value))  # an integer column with nulls reaches numpy as floats
        return ids[key] if other is None else ids.get(key, other)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {role: as_lists(batch[column]) for role, column in self.columns.items()}
        if "path" in batch:  # image folders: the file, for errors that name it
            out["path"] = batch["path"]
        for role in self.label_ids:
            out[role] = np.array([self.encode(role, v) for v in out[role]], dtype=np.int64)
        if self.holdout != "all":
            # The row's input (text, image, ...), never a label: a label would put all of a class on one side.
            key = out[next(role for role in self.columns if role not in self.label_ids)]
            in_validation = holdout_bucket(key) < self.fraction
            keep = in_validation if self.holdout == "validation" else ~in_validation
            out = {role: values[keep] for role, values in out.items()}
        return out


class DropBadRows:
    """map_batches step after ``SelectRows``: a row with a bad cell (``cell_problem``; a label
    ``BAD_LABEL``) is refused, naming its file, column and row (``data.on_bad_rows: fail``), or
    dropped (skip), and so counted with the rows the task cannot preprocess."""

    def __init__(self, split: Split, data: DataSection, label_roles: tuple[str, ...]):
        self.split, self.columns, self.label_roles, self.skip = split, data.columns, label_roles, data.on_bad_rows == "skip"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.ones(len(next(iter(batch.values()))), dtype=bool)
        for role in self.columns:
            if role in self.label_roles:
                bad = np.asarray(batch[role]) == BAD_LABEL
            else:
                bad = np.array([cell_problem(value, role) is not None for value in batch[role]], dtype=bool)
            if bad.any() and not self.skip:
                row = int(np.argmax(bad))
                raise self.error(role, cell_problem(batch[role][row], role) if role not in self.label_roles else "null or empty",
                                 batch["path"][row] if "path" in batch else None)
            keep &= ~bad
        return batch if keep.all() else {key: values[keep] for key, values in batch.items()}

    def error(self, role: str, problem: str, file: str | None) -> UserError:
        """The one-line error: the file and row of the first bad cell of this role's column in the
        split's source (read again for it, one column, only on the way to failing)."""
        column = self.columns[role]
        where = file or self.split.path
        if file is None and self.split.fmt != "images":
            with contextlib.suppress(Exception):  # unreadable here: the split's path still names it
                found = first_bad_cell(self.split.path, self.split.fmt, column, role)
                where = f"{found[0]}: row {found[1]}" if found else where
        return UserError(self.split.field or f"data.{self.split.name}", f"{where}: " + fix_or_skip(f"column {column!r} ({role}) is {problem}"))


# Blocks of a split read on the driver: several, so Ray Data preprocesses them in parallel; a split
# of one block is preprocessed on the driver (prepare_split).
DRIVER_BLOCK_BYTES = 8 * 2**20


def should_cache(split: Split, policy: str) -> bool:
    """Streaming re-reads and re-preprocesses every epoch; small data is cheaper to keep."""
    if policy != "auto":
        return policy == "always"
    return is_small(split.path)


def driver_table(split: Split, columns: list[str]):
    """A small local split's columns, read in this process (image folders: image bytes, path, label)."""
    if split.fmt == "images":
        return images.folder_table(split.path)
    return arrow_dataset(split.path, split.fmt).to_table(columns=columns)


def read_ray(split: Split, columns: list[str], table=None):
    """The split's columns as a Ray Dataset. A small local split is read here, on the driver
    (``table``, when the caller has read it already), and reaches Ray Data through the object
    store: the tasks that preprocess it may run on any node of a cluster and need none of its files
    on their own disk. Larger local data and URIs (s3://, gs://, ...) are read by Ray Data's tasks
    wherever they run, so on a cluster a local path must be on a filesystem every node mounts (see
    docs/clusters.md)."""
    import pyarrow.csv as pacsv
    import ray.data

    if table is not None or is_small(split.path):
        table = driver_table(split, columns) if table is None else table
        rows_per_block = max(1, table.num_rows * DRIVER_BLOCK_BYTES // max(table.nbytes, 1))
        return ray.data.from_arrow([table.slice(start, rows_per_block) for start in range(0, max(table.num_rows, 1), rows_per_block)])
    if not _is_remote(split.path) and sum(node["Alive"] for node in ray.nodes()) > 1:
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


def read_columns(split: Split, data: DataSection) -> list[str]:
    """The source columns a split reads: each mapped column once (a column mapped to two roles is
    read once), and an image folder's file paths."""
    return list(dict.fromkeys(data.columns.values())) + (["path"] if split.fmt == "images" else [])


def row_steps(split: Split, data: DataSection, labels: list[str] | dict[str, list[str]] | None) -> tuple[SelectRows, DropBadRows]:
    """The two map_batches steps every split's rows take before the task's: select, then drop bad rows."""
    return (SelectRows(data.columns, labels, split.holdout, data.validation_fraction, data.other_label),
            DropBadRows(split, data, label_roles_of(labels)))


def rows_dataset(split: Split, data: DataSection, labels: list[str] | dict[str, list[str]] | None, table=None):
    """The streaming Ray Dataset of one split's rows, columns named by task role, labels encoded;
    bad rows included (so that skipping them can count them): ``without_bad_rows`` drops them."""
    dataset = read_ray(split, read_columns(split, data), table).map_batches(row_steps(split, data, labels)[0], batch_format="numpy")
    if data.max_rows:
        dataset = dataset.limit(data.max_rows)
    return dataset


def label_roles_of(labels: list[str] | dict[str, list[str]] | None) -> tuple[str, ...]:
    return tuple(labels) if isinstance(labels, dict) else ("label",) if labels else ()


def without_bad_rows(rows, split: Split, data: DataSection, labels: list[str] | dict[str, list[str]] | None):
    """``rows`` (of ``rows_dataset``) less its bad rows, per ``data.on_bad_rows``."""
    return rows.map_batches(row_steps(split, data, labels)[1], batch_format="numpy")


def prepare_split(split: Split, data: DataSection, labels: list[str] | dict[str, list[str]] | None, steps: list,
                  cache: bool, blocks: int, equal: bool) -> tuple[Any, Callable[[], int]]:
    """One split through ``rows_dataset``, ``without_bad_rows`` and the task's ``steps`` (each a
    map_batches function): the Ray Dataset, and how many rows were read before the bad ones went
    (a function: counting a streamed split runs it). A ``cache``d split is materialized in
    ``blocks`` blocks, ``equal`` (the train split: one per worker, each worker's share whole) or
    near-equal; any other streams.

    A cached split that is one block on the driver is preprocessed right here, by the same steps
    on the same batch: Ray Data would run it as one task in one process too, and would add a
    streaming execution per split and, in a worker process new to this job, that process's
    imports (Ray Data, the tokenizer's or decoder's libraries: seconds of a core in every run).
    Larger and remote splits stream through Ray Data's tasks, in parallel, wherever they run."""
    table = driver_table(split, read_columns(split, data)) if cache and is_small(split.path) else None
    if table is not None and table.nbytes <= DRIVER_BLOCK_BYTES:
        from ray.data.block import BlockAccessor

        from raytune_ft import ray_compat

        def mapped(step, block):  # a block (Arrow, or pandas where Arrow cannot hold a column) as map_batches maps it
            return BlockAccessor.batch_to_block(step(BlockAccessor.for_block(block).to_batch_format("numpy")))

        select, drop_bad = row_steps(split, data, labels)
        rows = mapped(select, table)
        rows = BlockAccessor.for_block(rows).slice(0, data.max_rows) if data.max_rows else rows
        block = mapped(drop_bad, rows)
        for step in steps:
            block = mapped(step, block)
        read = BlockAccessor.for_block(rows).num_rows()
        return ray_compat.materialized(split_block(block, blocks, equal)), lambda: read
    rows = rows_dataset(split, data, labels, table)
    dataset = without_bad_rows(rows, split, data, labels)
    for step in steps:
        dataset = dataset.map_batches(step, batch_format="numpy")
    if cache:
        dataset = (dataset if equal else dataset.repartition(blocks)).materialize()
    return dataset, rows.count


def split_block(block, blocks: int, equal: bool) -> list:
    """``block`` in ``blocks`` slices, in order: equal ones and the remainder (an equal split of
    the dataset then moves no row), or near-equal ones."""
    from ray.data.block import BlockAccessor

    rows = BlockAccessor.for_block(block)
    count = rows.num_rows()
    if equal:
        size = count // blocks
        bounds = [size * i for i in range(blocks + 1)] + ([count] if count % blocks else [])
    else:
        bounds = [round(count * i / blocks) for i in range(blocks + 1)]
    return [rows.slice(start, end) for start, end in zip(bounds, bounds[1:])]
