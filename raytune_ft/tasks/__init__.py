"""Tasks: what a model learns. Each task registers itself by short name.

A task is the only task-specific code the training loop sees. It declares the data columns it
needs (``columns``: role names the recipe maps to real columns), its typed ``Options``, and:

- ``preprocess(batch) -> batch``: runs inside Ray Data ``map_batches`` (tokenise, featurise);
  must be picklable and cheap to construct. Optional ``augment(batch) -> batch``: a train-only
  ``map_batches`` after caching, so it draws anew every epoch (image crops, flips).
- ``collate(batch) -> dict[str, Tensor]``: numpy batch from the shard iterator to model inputs.
- ``build_model() -> nn.Module`` and ``head_names()``: module-name prefixes of the newly
  initialised head (what ``head_only`` trains); ``skeleton()``: the model on the meta device.
- ``embed(model, batch) -> [B, D]``: pooled features without the head (retention probes).
- ``forward(model, batch) -> (loss, outputs)`` and ``new_metrics()``: a Metrics accumulator.
- ``save_pretrained(model, directory)``: the exported layout (loadable without raytune_ft).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

TASKS: dict[str, type["Task"]] = {}


class Metrics(Protocol):
    """Accumulates per-rank statistics whose element-wise sum over ranks is sufficient to
    compute the metrics (so evaluation is sharded and reduced, never rank 0 alone)."""

    def update(self, outputs: Any, batch: dict[str, torch.Tensor]) -> None: ...
    def state(self) -> torch.Tensor: ...
    def compute(self, state: torch.Tensor) -> dict[str, float]: ...


class Task(Protocol):
    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    Options: ClassVar[type]

    def __init__(self, recipe: dict[str, Any], labels: list[str]): ...
    def check(self) -> None: ...
    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]: ...
    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...
    def build_model(self) -> torch.nn.Module: ...
    def skeleton(self) -> torch.nn.Module: ...
    def head_names(self, model: torch.nn.Module) -> list[str]: ...
    def embed(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]: ...
    def new_metrics(self) -> Metrics: ...
    def save_pretrained(self, model: torch.nn.Module, directory: str) -> None: ...


def register(cls):
    """Class decorator: make a task available to recipes as ``task.type: <cls.name>``."""
    TASKS[cls.name] = cls
    return cls


def build_task(recipe: dict[str, Any], labels: list[str]) -> "Task":
    return TASKS[recipe["task"]["type"]](recipe, labels)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Cross-entropy of logits [B, C]: the mean to train on, and (summed loss, logits) for
    ``ClassificationMetrics``."""
    losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")  # [B]
    return losses.mean(), (losses.detach().sum(), logits.detach())


class ClassificationMetrics:
    """Confusion-matrix counts plus summed loss; accuracy, macro-F1 and loss from their sum."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.loss_sum = 0.0

    def update(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        loss_sum, logits = outputs  # loss summed over the batch, logits [B, C]
        labels = batch["labels"].long().cpu()
        predictions = logits.argmax(-1).cpu()
        index = labels * self.num_classes + predictions
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view_as(self.confusion)
        self.loss_sum += float(loss_sum)

    def state(self) -> torch.Tensor:
        return torch.cat([self.confusion.flatten(), torch.tensor([self.loss_sum], dtype=torch.float64)])

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        confusion = state[:-1].view(self.num_classes, self.num_classes)
        total = confusion.sum().clamp(min=1)
        true_positive = confusion.diag()
        precision = true_positive / confusion.sum(0).clamp(min=1)
        recall = true_positive / confusion.sum(1).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        present = confusion.sum(1) > 0  # macro over classes that occur in the evaluated set
        return {
            "loss": float(state[-1] / total),
            "accuracy": float(true_positive.sum() / total),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "count": int(total),
            "confusion": confusion.long().tolist(),
        }


from raytune_ft.tasks import image_classification, text_classification  # noqa: E402,F401  (registers built-in tasks)
