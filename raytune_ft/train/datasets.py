"""The run's Ray Datasets: every split preprocessed by the task, bad rows counted, plus what
the add-ons read (the retention references' splits)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from raytune_ft import ray_compat
from raytune_ft.addons import ADDONS
from raytune_ft.data import tabular
from raytune_ft.errors import UserError, find_user_error
from raytune_ft.schema import Recipe
from raytune_ft.train.planning import PlannedData

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """A run's data, ready for Ray Train: the plan it came from, the splits' datasets by name, the
    train row count, the bad rows skipped per split and each add-on's datasets by name."""

    planned: PlannedData
    datasets: dict[str, Any]
    train_rows: int
    bad_rows: dict[str, int] = field(default_factory=dict)
    addon_datasets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_run(self, sections: list[str]) -> dict[str, Any]:
        """The datasets a run with these add-ons reads (the baseline's: the splits alone)."""
        return {**self.datasets, **{name: dataset for section in sections for name, dataset in self.addon_datasets.get(section, {}).items()}}


@contextlib.contextmanager
def data_errors(split: tabular.Split):
    """A UserError raised inside Ray Data (a row the task cannot preprocess) as the one-line
    error it is; one that names no file gets the split's path. Ray Data's own log of the failure
    (a traceback, as for an internal error) is held back: the exception carries it."""
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.CRITICAL)
    try:
        yield
    except Exception as error:
        found = find_user_error(error)
        if found is None:
            raise
        if found.where:
            raise UserError(found.where, found.message) from None
        raise UserError(f"data.{split.name}", f"{split.path}: {found.message}") from None
    finally:
        data_logger.setLevel(level)


def count_bad_rows(split: tabular.Split, read: int, kept: int, max_fraction: float) -> int:
    """Rows ``on_bad_rows: skip`` dropped from a split; refuse more than ``max_fraction`` of them."""
    bad = read - kept
    if read and bad / read > max_fraction:
        raise UserError("data.max_bad_fraction", f"{bad} of {read} rows of data.{split.name} ({split.path}) are bad ({bad / read:.1%}), "
                                                 f"more than {max_fraction:.1%}; set data.on_bad_rows: fail to see the first")
    if bad:
        logger.warning("data.%s: skipped %d bad rows of %d", split.name, bad, read)
    return bad


def split_datasets(recipe: Recipe, planned: PlannedData) -> tuple[dict[str, Any], int, dict[str, int]]:
    """Every split as a preprocessed Ray Dataset (cached when small: read, decoded, tokenised or
    featurised once per run; a task's augmentation runs later, in the loop, on the worker's
    device), the train row count, and the bad rows skipped per split."""
    data, task = recipe.data, planned.task
    datasets, bad_rows = {}, {}
    for split in planned.splits:
        train = split.name == "train"
        steps = [task.preprocess, *([task.pack] if train and getattr(task, "packing", False) else [])]  # packs: several examples a row
        with data_errors(split):
            # Train shards are one per worker; evaluation shards go by blocks: enough that every worker gets a share.
            dataset, rows_read = tabular.prepare_split(split, data, planned.labels, steps, tabular.should_cache(split, data.cache),
                                                            recipe.scaling.workers * (1 if train else 2), equal=train)
            if train:
                train_rows = dataset.count()
            if data.on_bad_rows == "skip":
                kept = train_rows if train else dataset.count()
                bad_rows[split.name] = count_bad_rows(split, rows_read(), kept, data.max_bad_fraction)
        datasets[split.name] = dataset
    return datasets, train_rows, bad_rows


def prepare_datasets(recipe: Recipe, planned: PlannedData) -> PreparedData:
    """The target splits and every add-on's datasets, ready for Ray Train."""
    started = time.perf_counter()
    ray_compat.start_data_actors()  # on the driver's node, not a Train worker's
    datasets, train_rows, bad_rows = split_datasets(recipe, planned)
    addon_datasets = {section: ADDONS[section].datasets(addon_plan, recipe.scaling.workers) for section, addon_plan in planned.addons.items()}
    logger.info("data ready in %.1f s", time.perf_counter() - started)
    return PreparedData(planned, datasets, train_rows, bad_rows, addon_datasets)
