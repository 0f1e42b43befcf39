"""The loop's add-ons: one family, one small interface, one file each, registered by name.

An add-on is switched on by its recipe section (``retention``, ``distill``, ``replay``,
``regularizer``, ``wise_ft``) and joins the one training loop through the hooks below; every hook
has a default that does nothing, so an add-on writes only the hooks it needs. Built-in add-ons run
in registration order: ``retention`` (the reference evaluations) first, since replay, EWC and
WiSE-FT read its references; then the distillation teacher, replay, the L2-SP/EWC penalty and
WiSE-FT. That order is also the order their terms join the objective.

Driver side (classmethods, before Ray Train starts):
- ``plan(recipe, task, splits)``: check the add-on's inputs (files, runs, labels); return what the
  workers need of them (picklable), kept in ``RunPlan.addons[section]``.
- ``datasets(planned, workers)``: Ray Datasets the workers read (``{name: dataset}``).
- ``summary(recipe, state)``: the add-on's part of ``summary.json`` (None: nothing to add).

Worker side (an instance per worker, built after the backend wraps the model):
- ``start_epoch(epoch, seed)``; ``objective(objective, step)``: the micro-batch's objective with
  this add-on's term (``step``: batch, the task's outputs, micro-batch index, whether it ends an
  accumulation); ``before_step(boundary)``: between the backward and the optimizer step (the
  L2-SP/EWC proximal step); ``end_epoch(record, state)``: metrics for the epoch's record, and what the run's
  state keeps; ``save(directory, rank, final)`` / ``load(directory)``: its part of a checkpoint;
  ``finish(state)``: the last change to the weights (WiSE-FT); ``final(state)``: the last scores.

How an add-on behaves under a backend goes through the backend's interface (``snapshot``,
``restore``, ``full_weights``, ``master_weights``, ``partitioned`` and, for partitioned parameters,
``local_grads``), so the add-on itself names no backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from raytune_ft.schema import Recipe

ADDONS: dict[str, type["AddOn"]] = {}


@dataclass
class Step:
    """One micro-batch, as the objective hooks see it."""

    batch: dict[str, torch.Tensor]
    outputs: Any  # the task's forward outputs
    index: int  # micro-batch index in the epoch
    boundary: bool  # ends an accumulation: the optimizer steps after it


@dataclass
class LoopContext:
    """What an add-on's worker side may read: the run as the loop set it up."""

    recipe: Recipe
    plan: Any  # raytune_ft.train.planning.RunPlan
    task: Any
    backend: Any
    heads: list[str]  # module-name prefixes of the task's new head
    rank: int
    world: int
    eval_batch: int
    shards: dict[str, Any]  # the run's dataset shards by name (train, validation, test, references')
    addons: dict[str, "AddOn"] = field(default_factory=dict)  # the add-ons built so far, by section


class AddOn:
    """Base of every add-on: each hook does nothing until an add-on overrides it."""

    section: ClassVar[str]

    def __init__(self, loop: LoopContext):
        self.loop = loop

    @classmethod
    def plan(cls, recipe: Recipe, task, splits) -> Any:
        return None

    @classmethod
    def datasets(cls, planned: Any, workers: int) -> dict[str, Any]:
        return {}

    @classmethod
    def summary(cls, recipe: Recipe, state: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def start_epoch(self, epoch: int, seed: int) -> None:
        pass

    def objective(self, objective: torch.Tensor, step: Step) -> torch.Tensor:
        return objective

    def before_step(self, boundary: bool) -> None:
        pass

    def end_epoch(self, record: dict[str, Any], state: dict[str, Any]) -> None:
        pass

    def save(self, directory: str, rank: int, final: bool) -> None:
        pass

    def load(self, directory: str) -> None:
        pass

    def finish(self, state: dict[str, Any]) -> None:
        pass

    def final(self, state: dict[str, Any]) -> None:
        pass


def register(cls: type[AddOn]) -> type[AddOn]:
    """Class decorator: the add-on joins every run whose recipe sets its ``section``."""
    ADDONS[cls.section] = cls
    return cls


def configured(recipe: Recipe) -> list[type[AddOn]]:
    """The add-ons a recipe switches on, in registration order."""
    return [cls for section, cls in ADDONS.items() if getattr(recipe, section, None)]


def build_addons(loop: LoopContext) -> list[AddOn]:
    """Each configured add-on built on this worker; later ones can read earlier ones in ``loop.addons``."""
    for cls in configured(loop.recipe):
        loop.addons[cls.section] = cls(loop)
    return list(loop.addons.values())


from raytune_ft.addons import references, teacher, replay, penalty, wise_ft  # noqa: E402,F401  (registers the built-ins, in this order)
