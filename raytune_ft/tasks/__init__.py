"""Tasks: what a model learns. Each task registers itself by short name.

A task is the only task-specific code the training loop sees. It declares the data columns it
needs (``columns``: role names the recipe maps to real columns), the metrics it reports
(``metrics``: ``eval/<name>``, so a recipe naming another metric fails validation), its typed
``Options`` (a subclass of the schema's ``TaskOptions``: the ``task:`` section of a recipe), and:

- optional classmethods ``roles(options)``, ``label_roles(options)`` and ``metric_names(options)``
  when roles and metrics depend on the options (multitask: one label role and metrics per head);
  without them the roles are ``columns``, the label role is ``label`` when it is among them, the
  metrics ``metrics``. The task's ``labels`` are a list for the one ``label`` role, else
  ``{role: [labels]}``. Optional ``probe_columns``: the roles of a ``probe`` retention reference
  when they are not the task's own (a task without a label role: its input and ``label``; its
  ``collate`` then passes the class ids on as ``labels``).

- ``preprocess(batch) -> batch``: runs inside Ray Data ``map_batches`` (decode, tokenise,
  featurise), once per run for data small enough to cache; must be picklable and cheap to
  construct. Optional ``pack(batch) -> batch`` with a true ``packing``: a train-only
  ``map_batches`` before caching that puts several examples in a row (a language model's
  sequence packing).
- Optional ``reference_roles(options, kind)``: the role sets a retention reference of each kind
  may map, when they are not the defaults (see ``task_reference_roles``); a task offering the
  ``drift`` and ``choice`` kinds gives ``generate(model, batch)`` (greedy answers to the rows'
  prompts) and ``sequence_nll(model, batch)`` (each row's summed NLL and scored tokens).
- ``collate(batch) -> dict[str, Tensor]``: numpy batch from the shard iterator to model inputs.
- Optional ``augment(batch) -> batch``: the loop calls it on every training batch (never an
  evaluation batch) once the batch is on the worker's device, so the random draws are batched
  tensor ops there, drawn from torch's generator, which the loop reseeds per (seed, epoch, rank):
  the same recipe and seed augment the same way (image crops, flips, rotations).
- ``build_model() -> nn.Module`` and ``head_names()``: module-name prefixes of the newly
  initialised head (what ``head_only`` trains); ``skeleton()``: the model on the meta device.
- ``embed(model, batch) -> [B, D]``: pooled features without the head (retention probes).
- ``forward(model, batch) -> (loss, outputs)`` and ``new_metrics()``: a Metrics accumulator.
- ``save_pretrained(model, directory)``: the exported layout (loadable without raytune_ft).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from raytune_ft.checkpoint import safetensors_shapes
from raytune_ft.errors import UserError
from raytune_ft.schema import Recipe, TaskOptions

TASKS: dict[str, type["Task"]] = {}


class Metrics(Protocol):
    """Accumulates per-rank statistics whose element-wise sum over ranks is sufficient to
    compute the metrics (so evaluation is sharded and reduced, never rank 0 alone)."""

    names: ClassVar[tuple[str, ...]]  # the scalar metrics ``compute`` returns
    retained: ClassVar[tuple[str, ...]]  # higher-is-better metrics a task reference's retention compares

    def update(self, outputs: Any, batch: dict[str, torch.Tensor]) -> None: ...
    def state(self) -> torch.Tensor: ...
    def compute(self, state: torch.Tensor) -> dict[str, float]: ...


class Task(Protocol):
    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    metrics: ClassVar[tuple[str, ...]]
    Options: ClassVar[type[TaskOptions]]

    def __init__(self, recipe: Recipe, labels: list[str] | dict[str, list[str]]): ...
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


@contextlib.contextmanager
def unwrapping_without_importing_deepspeed():
    """transformers' ``save_pretrained`` unwraps the model through accelerate, which imports
    deepspeed whenever it is installed, only to ask whether the model is a DeepSpeedEngine: 1-2 s
    of a core at the end of every run. No model is one unless deepspeed is already imported (a
    DeepSpeed run has imported it), so until then accelerate is told it is not there."""
    try:
        from accelerate.utils import other
    except ImportError:  # transformers unwraps without accelerate
        yield
        return
    installed = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: "deepspeed" in sys.modules and installed()
    try:
        yield
    finally:
        other.is_deepspeed_available = installed


def export_pretrained(task: Task, model: torch.nn.Module, directory: str) -> None:
    """``task.save_pretrained`` without the needless deepspeed import (see above)."""
    with unwrapping_without_importing_deepspeed():
        task.save_pretrained(model, directory)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_pretrained_weights(model_path: str, skeleton: torch.nn.Module) -> None:
    """Driver-side: a local model directory holds safetensors weights, whole, whose tensors belong
    to ``skeleton`` (the task's model on the meta device) with the shapes its config gives.
    Pickle weights (``pytorch_model.bin``) are refused, never loaded: unpickling can run code."""
    directory = Path(model_path)
    if not directory.is_dir():
        return  # a hub id: transformers fetches it, safetensors only (see the tasks' build_model)
    index = directory / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            ["model.safetensors"] if (directory / "model.safetensors").is_file() else []
    except (ValueError, KeyError, AttributeError):
        raise UserError("model.path", f"{index}: not a safetensors index (no weight_map)") from None
    if not files:
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in directory.glob(pattern))
        if pickles:
            raise UserError("model.path", f"{directory} has only pickle weights ({', '.join(pickles)}), which are never loaded "
                                          "(unpickling can run code); save the model with safe_serialization=True")
        raise UserError("model.path", f"no weights (model.safetensors) in {directory}")
    expected = {name: list(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    matched = 0
    for name in files:
        try:
            shapes = safetensors_shapes(directory / name)
        except (OSError, ValueError) as error:
            raise UserError("model.path", f"{directory / name}: cannot read the weights ({error})") from None
        for key, shape in shapes.items():
            target = key if key in expected else f"{skeleton.base_model_prefix}.{key}"
            if target in expected:
                matched += 1
                if expected[target] != shape:
                    raise UserError("model.path", f"{directory / name}: tensor {key} has shape {shape}, "
                                                  f"but the model's config.json gives {expected[target]}")
    if not matched:
        raise UserError("model.path", f"none of the tensors in {directory} belong to a {type(skeleton).__name__}")


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_dtype(recipe: Recipe) -> torch.dtype | str:
    """What ``from_pretrained`` loads the weights as: ``model.dtype``, else the checkpoint's own."""
    return TORCH_DTYPES[recipe.model.dtype] if recipe.model.dtype else "auto"


def checkpointable(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformers models inside ``model`` (itself included) that can checkpoint activations."""
    from transformers import PreTrainedModel

    found = [module for module in model.modules() if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing]
    return [module for module in found if not any(other is not module and module in list(other.modules()) for other in found)]


def check_gradient_checkpointing(task: "Task") -> None:
    """Driver-side, on the meta skeleton: ``train.gradient_checkpointing`` needs a transformers model."""
    skeleton = task.skeleton()
    if not checkpointable(skeleton):
        raise UserError("train.gradient_checkpointing", f"task {task.name}'s model ({type(skeleton).__name__}) has no layers "
                                                         "transformers can checkpoint; remove it")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations layer by layer in the backward pass (the non-reentrant variant: it
    needs no input that requires a gradient, so frozen embeddings and adapters work alike)."""
    for module in checkpointable(model):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def check_positions(field: str, wanted: int, limit: int | None, what: str = "positions", added: int = 0) -> None:
    """A length the recipe asks for (tokens per text, per transcript; ``added``: tokens the task
    adds to it) fits the model's positions: beyond them a model indexes past its position table,
    on the workers, mid-run."""
    if limit and wanted + added > limit:
        raise UserError(field, f"{wanted}{f' (+ {added} added tokens)' if added else ''} exceeds the model's {limit} {what}")


def all_ranks_finished(finished: torch.Tensor, model: torch.nn.Module) -> bool:
    """Whether decoding may stop. Under ZeRO-3 every forward gathers parameters from every rank,
    so a rank stops only when every rank's sequences have ended (ranks decode different rows)."""
    import torch.distributed as dist

    done = bool(finished.all())
    if not (dist.is_available() and dist.is_initialized()) or not hasattr(next(model.parameters()), "ds_id"):
        return done
    pending = torch.tensor([0 if done else 1], device=finished.device)
    dist.all_reduce(pending)
    return int(pending) == 0


def register(cls):
    """Class decorator: make a task available to recipes as ``task.type: <cls.name>``."""
    TASKS[cls.name] = cls
    return cls


def task_roles(task_cls, options) -> tuple[str, ...]:
    """The data roles a task needs (``options``: its validated Options); one ending in ``?`` is optional."""
    return tuple(task_cls.roles(options)) if hasattr(task_cls, "roles") else tuple(task_cls.columns)


def task_probe_roles(task_cls, options) -> tuple[str, ...]:
    """The data roles of a probe reference: the task's own unless it declares ``probe_columns``."""
    return tuple(getattr(task_cls, "probe_columns", None) or task_roles(task_cls, options))


def task_reference_roles(task_cls, options, kind: str) -> list[tuple[str, ...]]:
    """The role sets a retention reference of ``kind`` may map (a role ending in ``?`` is
    optional); none: the task has no reference of that kind. A task may declare its own
    (``reference_roles(options, kind)``); by default a task reference maps the task's roles, a
    probe or head reference its probe roles."""
    if hasattr(task_cls, "reference_roles"):
        return [tuple(roles) for roles in task_cls.reference_roles(options, kind)]
    if kind == "task":
        return [task_roles(task_cls, options)]
    return [task_probe_roles(task_cls, options)] if kind in ("probe", "head") else []


def task_label_roles(task_cls, options) -> tuple[str, ...]:
    """The roles holding class labels, each with its own label set."""
    if hasattr(task_cls, "label_roles"):
        return tuple(task_cls.label_roles(options))
    return ("label",) if "label" in task_cls.columns else ()


def task_metrics(task_cls, options) -> tuple[str, ...]:
    """The ``eval/<name>`` metrics a task reports."""
    return tuple(task_cls.metric_names(options)) if hasattr(task_cls, "metric_names") else tuple(task_cls.metrics)


def build_task(recipe: Recipe, labels: list[str] | dict[str, list[str]]) -> "Task":
    """The recipe's task (``recipe.task`` holds its typed options) for this label set."""
    return TASKS[recipe.task.type](recipe, labels)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Cross-entropy of logits [B, C]: the mean to train on, and (summed loss, logits) for
    ``ClassificationMetrics``. The logits keep their graph: distillation trains on them."""
    losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")  # [B]
    return losses.mean(), (losses.detach().sum(), logits)


class ClassificationMetrics:
    """Confusion-matrix counts plus summed loss; accuracy, macro-F1 and loss from their sum."""

    names = ("loss", "accuracy", "macro_f1", "count")
    retained = ("accuracy", "macro_f1")

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.loss_sum = 0.0

    def update(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        loss_sum, logits = outputs  # loss summed over the batch, logits [B, C]
        labels = batch["labels"].long().cpu()
        predictions = logits.detach().argmax(-1).cpu()
        index = labels * self.num_classes + predictions
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view_as(self.confusion)
        self.loss_sum += float(loss_sum)

    def state(self) -> torch.Tensor:
        return torch.cat([self.confusion.flatten(), torch.tensor([self.loss_sum], dtype=torch.float64)])

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        """scikit-learn's accuracy and macro-F1 of the reduced confusion matrix: each cell is a
        (true, predicted) pair weighted by its count. Macro over the classes that occur in the
        evaluated set; a class never predicted has precision 0."""
        from sklearn.metrics import accuracy_score, f1_score

        confusion = state[:-1].view(self.num_classes, self.num_classes)
        total = int(confusion.sum())
        scores = {"accuracy": 0.0, "macro_f1": 0.0}
        if total:
            true, predicted = (index.ravel() for index in np.indices(confusion.shape))
            counts = confusion.numpy().ravel()
            present = np.flatnonzero(confusion.sum(1).numpy())
            scores = {"accuracy": float(accuracy_score(true, predicted, sample_weight=counts)),
                      "macro_f1": float(f1_score(true, predicted, labels=present, average="macro", sample_weight=counts, zero_division=0))}
        return {"loss": float(state[-1] / max(total, 1)), **scores, "count": total, "confusion": confusion.long().tolist()}


from raytune_ft.tasks import causal_lm, image_classification, multitask, speech_recognition, text_classification, visual_question_answering  # noqa: E402,F401  (registers built-in tasks)
