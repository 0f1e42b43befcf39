"""What the driver decides before Ray Train starts: the checks, the step plan and the run plan.

``plan_run`` checks everything it cheaply can before a worker starts (the model path, the data
splits and label set, the task, the strategy on the model's skeleton, each add-on's inputs) and
records what it resolved in the recipe. ``RunPlan`` is everything a worker needs, typed; it is the
loop's only input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raytune_ft.addons import configured
from raytune_ft.data import assets, tabular
from raytune_ft.errors import UserError
from raytune_ft.report.tables import plural
from raytune_ft.schema import Recipe
from raytune_ft.strategies import build_strategy
from raytune_ft.tasks import TASKS, build_task, check_gradient_checkpointing, task_label_roles


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


@dataclass
class RunPlan:
    """Everything a worker needs of one Ray Train run (``train_loop_config["plan"]``)."""

    recipe: Recipe
    labels: list[str] | dict[str, list[str]] | None
    steps: StepPlan
    datasets: list[str]  # the names of the Ray Datasets the run gives its workers
    addons: dict[str, Any]
    threads: int  # torch threads per worker
    fault: dict[str, Any]  # an injected fault (tests), or {}
    resume_from: Any = None  # a checkpoint to start from when the run has none of its own (PBT)


def check_strategy(recipe: Recipe, task) -> None:
    """Structural checks (layer counts, module names) on the model's meta-device skeleton."""
    build_strategy(recipe).check(task.skeleton())


def plan_run(recipe: Recipe) -> PlannedData:
    """Driver-side checks before anything reaches Ray: the model path, the data splits and label
    set (recorded in the recipe), the task, the strategy and every add-on's inputs."""
    recipe.model.path = assets.resolve(recipe.model.path, "model.path")
    label_roles = task_label_roles(TASKS[recipe.task.type], recipe.task)
    splits, labels = tabular.plan_splits(recipe.data, label_roles=label_roles)
    recipe.data.labels = labels  # recorded explicitly (one set per label role), so a re-run maps labels the same way
    task = build_task(recipe, labels or [])
    task.check()
    check_strategy(recipe, task)
    if recipe.train.gradient_checkpointing:
        check_gradient_checkpointing(task)
    return PlannedData(splits, labels, task, {cls.section: cls.plan(recipe, task, splits) for cls in configured(recipe)})
