"""What the driver decides before Ray Train starts: the checks, the step plan and the run plan.

``plan_run`` checks everything it cheaply can before a worker starts (the model path, the data
splits and label set, the validation split's size, the task, the strategy on the model's skeleton,
the baseline's recipe, each add-on's inputs) and records what it resolved in the recipe;
``raytune-ft validate`` runs it too. ``RunPlan`` is everything a worker needs, typed; it is the
loop's only input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pathlib import Path

from raytune_ft import run_folder
from raytune_ft.addons import configured
from raytune_ft.data import assets, tabular
from raytune_ft.errors import UserError
from raytune_ft.recipe import derived_recipe, eval_metric_fields
from raytune_ft.report.tables import plural
from raytune_ft.schema import Recipe
from raytune_ft.strategies import build_strategy
from raytune_ft.tasks import TASKS, build_task, check_gradient_checkpointing, task_label_roles

# A validation split that early stopping, WiSE-FT or Tune decides on needs this many rows: below
# it, one row more or less right moves accuracy by 5 points or more, and the decision follows noise.
MIN_VALIDATION_ROWS = 20


@dataclass
class StepPlan:
    """How the training rows become optimizer steps, the same on every worker."""

    train_rows: int
    rows_per_worker: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def step_plan(train_rows: int, recipe: Recipe) -> StepPlan:
    train, workers = recipe.train, recipe.scaling.workers
    rows_per_worker = train_rows // workers
    if rows_per_worker == 0:
        raise UserError("data.train", f"{train_rows} training rows cannot feed {plural(workers, 'worker')}")
    micro = math.ceil(rows_per_worker / train.batch_size)
    steps_per_epoch = math.ceil(micro / train.grad_accum)
    limits = [train.max_steps] if train.max_steps else []
    if train.epochs:
        limits.append(train.epochs * steps_per_epoch)
    return StepPlan(train_rows, rows_per_worker, micro, steps_per_epoch, min(limits))


@dataclass
class PlannedData:
    """The driver's findings: the splits, the label set, the task and each add-on's plan."""

    splits: list[tabular.Split]
    labels: list[str] | dict[str, list[str]] | None
    task: Any
    addons: dict[str, Any] = field(default_factory=dict)  # section -> what the add-on's plan returned
    baseline: Recipe | None = None  # the head-only baseline's recipe, when the run has one


@dataclass
class RunPlan:
    """Everything a worker needs of one Ray Train run (``train_loop_config["plan"]``, packed)."""

    recipe: Recipe
    labels: list[str] | dict[str, list[str]] | None
    steps: StepPlan
    datasets: list[str]  # the names of the Ray Datasets the run gives its workers
    addons: dict[str, Any]
    threads: int  # torch threads per worker
    fault: dict[str, Any]  # an injected fault (tests), or {}
    resume_from: Any = None  # a checkpoint to start from when the run has none of its own (PBT)

    def packed(self) -> bytes:
        """The plan as ``train_loop_config`` carries it: pickled here, unpickled on the workers
        (``unpacked``). Ray Train's controller unpickles the config, and unpickling a RunPlan
        imports the task, strategy and add-on modules, torch among them: ~2 s of a core at the
        head of every run, before the controller asked for a worker. Bytes stay bytes there."""
        from ray import cloudpickle

        return cloudpickle.dumps(self)

    @staticmethod
    def unpacked(packed: bytes) -> RunPlan:
        """A plan ``packed`` by this run's driver (Ray's own transport pickles it the same way)."""
        import pickle

        return pickle.loads(packed)


def check_strategy(recipe: Recipe, task) -> None:
    """Structural checks (layer counts, module names) on the model's meta-device skeleton."""
    build_strategy(recipe).check(task.skeleton())


def check_validation_rows(recipe: Recipe, splits: list[tabular.Split]) -> None:
    """A validation split that a decision is made on (early stopping, WiSE-FT, Tune) has at least
    ``MIN_VALIDATION_ROWS`` rows (as far as planning can count them)."""
    readers = [path for path, metric in eval_metric_fields(recipe)]
    validation = next(split for split in splits if split.name == "validation")
    rows = validation.expected_rows(recipe.data)
    if not readers or rows is None or rows >= MIN_VALIDATION_ROWS:
        return
    if recipe.data.max_rows == rows:
        where, what, fix = "data.max_rows", f"{plural(rows, 'row')} per split leaves {rows} for validation", "raise it"
    elif validation.holdout == "validation":
        where, what = "data.validation_fraction", (f"{recipe.data.validation_fraction} holds out about {rows} of the "
                                                   f"{plural(validation.rows, 'row')} of {validation.path} for validation")
        fix = "raise it, or give a data.validation file"
    else:
        where, what, fix = "data.validation", f"{validation.path} has {plural(rows, 'row')}", "give more"
    raise UserError(where, f"{what}, but {readers[0]} decides on them, which needs at least {MIN_VALIDATION_ROWS}; {fix}")


def baseline_recipe(recipe: Recipe, run_dir: Path) -> Recipe:
    """The same recipe with the body frozen: only a new head is trained. Under ``retention.floor``
    it scores the references too: the floor may deliver it (``raytune_ft.search.floor``)."""
    floor = recipe.retention is not None and recipe.retention.floor is not None
    values = {
        "train.lr": recipe.baseline.lr, "train.epochs": recipe.baseline.epochs, "train.max_steps": None,
        "train.early_stopping": None, "train.warmup": 0.0, "train.head_lr_scale": 1.0, "baseline.enabled": False,
        "strategy": {"method": "head_only"},
        "retention": {"references": [r.model_dump() for r in recipe.retention.references]} if floor else None,
        "regularizer": None, "replay": None, "wise_ft": None, "distill": None, "tune": None,
        "output.dir": str(run_dir / run_folder.BASELINE), "name": f"{recipe.name}-baseline",
    }
    if recipe.output.storage_path:
        values["output.storage_path"] = run_folder.shared_run_dir(recipe, run_dir)
    return derived_recipe(recipe, values, "baseline", origins={"train.lr": "baseline.lr", "train.epochs": "baseline.epochs"})


def for_workers(path: str) -> str:
    """A local path as Train workers can read it: absolute, since Ray Train runs them in a folder
    of their own, where a relative path leads nowhere (an asset or hub id is left as it is)."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def plan_run(recipe: Recipe) -> PlannedData:
    """Driver-side checks before anything reaches Ray: the model path, the data splits and label
    set (recorded in the recipe), the validation split's size, the task, the strategy, the
    baseline's recipe and every add-on's inputs."""
    recipe.model.path = for_workers(assets.resolve(recipe.model.path, "model.path"))
    if getattr(recipe.task, "image_encoder", None):  # VQA's second model
        recipe.task.image_encoder = for_workers(recipe.task.image_encoder)
    label_roles = task_label_roles(TASKS[recipe.task.type], recipe.task)
    splits, labels = tabular.plan_splits(recipe.data, label_roles=label_roles)
    check_validation_rows(recipe, splits)
    recipe.data.labels = labels  # recorded explicitly (one set per label role), so a re-run maps labels the same way
    task = build_task(recipe, labels or [])
    task.check()
    check_strategy(recipe, task)
    if recipe.train.gradient_checkpointing:
        check_gradient_checkpointing(task)
    baseline = None
    if recipe.baseline.enabled:
        baseline = baseline_recipe(recipe, recipe.run_dir())
        check_strategy(baseline, build_task(baseline, labels or []))
    return PlannedData(splits, labels, task, {cls.section: cls.plan(recipe, task, splits) for cls in configured(recipe)}, baseline)
