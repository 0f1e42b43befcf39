"""Multitask classification: one shared pretrained encoder, one linear head per label role.

Each head is a label role of its own (``task.heads`` names them; ``data.columns`` maps each to a
column; ``data.labels`` holds one label set per head). ``task.input`` says what the encoder reads:

- ``text``: a transformers encoder (``model.path``, e.g. MiniLM) whose last hidden states are
  mean-pooled over the real tokens (what sentence encoders were trained for);
- ``image``: EfficientNet-Lite (``model.path`` as in the image task), globally pooled, with the
  image task's decoding, augmentation and normalisation.

Every head reads the same pooled features. The training objective combines the heads'
cross-entropies L_i:

- ``weighting: fixed``: sum_i w_i L_i with the recipe's weights w_i;
- ``weighting: uncertainty`` (Kendall, Gal and Cipolla 2018): sum_i w_i (exp(-s_i) L_i + s_i), the
  log-variances s_i learned with the model (initialised at 0, i.e. weight 1; their own learning
  rate ``log_variance_lr``), so a head whose loss stays high (a noisy or hard task) is weighted
  down, and the +s_i term stops every weight shrinking to 0.

``eval/loss`` is sum_i w_i L_i in both modes (a yardstick that learned weights do not move);
``eval/accuracy`` and ``eval/macro_f1`` are the means over heads, so early stopping, Tune, WiSE-FT
and retention key on them as for one head. The export is the encoder's own layout (text: a plain
transformers directory that ``AutoModel.from_pretrained`` loads; image: the image task's
``config.json`` + ``model.safetensors``) whose ``model.safetensors`` also holds
``heads.<head>.weight|bias`` (and ``log_variances``), with each head's labels in ``config.json``.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

from raytune_ft.errors import UserError
from raytune_ft.models import mean_pool, scale_lr
from raytune_ft.schema import Recipe, TaskOptions
from raytune_ft.tasks import ClassificationMetrics, classification_loss, load_dtype, register
from raytune_ft.tasks.image_classification import ImageClassification, decode_images, normalise, save_model
from raytune_ft.tasks.text_classification import (
    check_text_model, encoder_config, load_tokenizer, pad_sequences, tokenize,
)

HEAD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
INPUTS = ("text", "image")
IMAGE_OPTIONS = ("image_size", "crop_scale", "flip", "rotation")
# Recipe sections that assume one set of logits (distillation, post steps) or a probe task's
# columns (retention references); refused rather than half-supported.
UNSUPPORTED = (("retention",), ("distill",), ("replay",), ("post", "quantize"), ("post", "prune"), ("post", "explain"))


class HeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, gt=0, description="w_i: this head's factor in the objective (and in eval/loss)")


class MultitaskModel(torch.nn.Module):
    """A shared encoder, pooled, with one linear head per label role. Inputs are ``pixels``
    (an EfficientNet-Lite encoder) or ``input_ids`` and ``attention_mask`` (a transformers one).

    ``forward`` returns ({head: logits [B, C_head]}, log-variances [H] or None); the log-variances
    leave through forward so that DDP and DeepSpeed see them used like any other parameter."""

    base_model_prefix = "encoder"  # pretrained weights are the encoder's (check_pretrained_weights)

    def __init__(self, encoder: torch.nn.Module, width: int, dropout: float, classes: dict[str, int], uncertainty: bool,
                 log_variance_lr_scale: float = 1.0):
        super().__init__()
        # Features are pooled from the encoder's body: its own pooler or classifier would go
        # unused and stall DDP's reducer.
        for unused in ("pooler", "classifier"):
            if getattr(encoder, unused, None) is not None:
                setattr(encoder, unused, None)
        self.encoder = encoder
        self.dropout = torch.nn.Dropout(dropout)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, count) for name, count in classes.items()})
        self.log_variances = torch.nn.Parameter(torch.zeros(len(classes))) if uncertainty else None
        if uncertainty:
            scale_lr(self.log_variances, log_variance_lr_scale)

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, width]."""
        if "pixels" in inputs:
            return self.encoder.features(inputs["pixels"])
        hidden = self.encoder(**inputs).last_hidden_state  # [B, T, H]
        return mean_pool(hidden, inputs["attention_mask"])

    def forward(self, **inputs: torch.Tensor):
        pooled = self.dropout(self.features(**inputs))
        log_variances = self.log_variances * 1 if self.log_variances is not None else None
        return {name: head(pooled) for name, head in self.heads.items()}, log_variances


class MultitaskMetrics:
    """Per head, ClassificationMetrics' confusion counts and loss sum; their means over heads.
    The learned log-variances ride along as s_i x rows, equal on every rank, so the summed state
    divided by the summed rows is s_i exactly."""

    names = ("loss", "accuracy", "macro_f1", "count")  # plus <head>_loss, _accuracy, _macro_f1 (, _log_variance)
    retained = ("accuracy", "macro_f1")

    def __init__(self, classes: dict[str, int], weights: list[float], uncertainty: bool):
        self.per_head = {name: ClassificationMetrics(count) for name, count in classes.items()}
        self.weights, self.uncertainty = weights, uncertainty
        self.log_variance_rows = torch.zeros(len(classes), dtype=torch.float64)

    def update(self, outputs, batch: dict[str, torch.Tensor]) -> None:
        loss_sums, logits, log_variances = outputs  # [H] summed losses, {head: [B, C]}, [H] or None
        labels = batch["labels"]  # [B, H]
        for index, (name, metrics) in enumerate(self.per_head.items()):
            metrics.update((loss_sums[index], logits[name]), {"labels": labels[:, index]})
        if log_variances is not None:
            self.log_variance_rows += log_variances.detach().double().cpu() * len(labels)

    def state(self) -> torch.Tensor:
        return torch.cat([metrics.state() for metrics in self.per_head.values()] + [self.log_variance_rows])

    def compute(self, state: torch.Tensor) -> dict[str, Any]:
        results: dict[str, Any] = {}
        confusion, offset, count = {}, 0, 0
        for name, metrics in self.per_head.items():
            size = metrics.num_classes**2 + 1
            head = metrics.compute(state[offset:offset + size])
            offset += size
            confusion[name], count = head.pop("confusion"), head.pop("count")
            results.update({f"{name}_{key}": value for key, value in head.items()})
        heads = list(self.per_head)
        results = {
            "loss": sum(weight * results[f"{name}_loss"] for name, weight in zip(heads, self.weights)),
            "accuracy": float(np.mean([results[f"{name}_accuracy"] for name in heads])),
            "macro_f1": float(np.mean([results[f"{name}_macro_f1"] for name in heads])),
            "count": count,
            **results,
        }
        if self.uncertainty:
            results.update({f"{name}_log_variance": float(state[offset + i] / max(count, 1)) for i, name in enumerate(heads)})
        results["confusion"] = confusion  # {head: [C, C]}: one confusion-matrix plot per head
        return results


@register
class Multitask:
    name = "multitask"
    columns = ("text",)  # or ("image",) per task.input, and one label role per head: roles(options)
    metrics = MultitaskMetrics.names

    class Options(TaskOptions):
        model_config = ConfigDict(extra="forbid")
        input: Literal["text", "image"] = Field("text", description="what the shared encoder reads: text (a transformers "
                                                                    "encoder) or image (EfficientNet-Lite)")
        max_length: int = Field(256, ge=8, le=8192, description="text: tokens kept per text (truncated)")
        image_size: int = Field(64, ge=16, le=1024, description="image: pixels per side the model sees (images are resized)")
        crop_scale: float = Field(0.8, gt=0, le=1, description="image, train: random resized crop keeps this to 100% of the area")
        flip: bool = Field(True, description="image, train: mirror left-right with probability 1/2")
        rotation: float = Field(10.0, ge=0, le=180, description="image, train: rotate by up to +-this many degrees")
        heads: dict[str, HeadOptions] = Field(min_length=1, description="head name (its label role in data.columns) -> {weight}")
        weighting: Literal["fixed", "uncertainty"] = Field("fixed", description="fixed weights, or learned log-variances (Kendall et al. 2018)")
        log_variance_lr: float = Field(
            1e-2, gt=0, le=1, description="uncertainty: the log-variances' peak learning rate (same schedule as train.lr); "
                                          "they must move by ~0.1-1, far more than a fine-tuned weight, so train.lr would leave them near 0")

        @field_validator("heads")
        @classmethod
        def _head_names(cls, heads: dict[str, HeadOptions]) -> dict[str, HeadOptions]:
            for name in heads:
                if not HEAD_NAME.match(name) or name in INPUTS:
                    raise ValueError(f"head name {name!r} must be lower-case letters, digits and _ (starting with a letter), "
                                     f"and not {', '.join(INPUTS)}")
            return heads

        @field_validator("max_length", *IMAGE_OPTIONS)
        @classmethod
        def _option_of_the_input(cls, value: Any, info: ValidationInfo) -> Any:
            """An option of the other input would be silently ignored: refused instead."""
            wanted = "text" if info.field_name == "max_length" else "image"
            if "input" in info.data and info.data["input"] != wanted:  # an invalid input is its own error
                raise ValueError(f"applies to task.input {wanted} only (this recipe's input is {info.data['input']})")
            return value

        @model_serializer(mode="wrap")
        def _without_the_other_input(self, dump) -> dict[str, Any]:
            """A recorded recipe (recipe.yaml) reloads: the other input's options, refused when
            given, are left out of it."""
            other = IMAGE_OPTIONS if self.input == "text" else ("max_length",)
            return {key: value for key, value in dump(self).items() if key not in other}

    @classmethod
    def roles(cls, options: "Multitask.Options") -> tuple[str, ...]:
        return (options.input, *options.heads)

    @classmethod
    def label_roles(cls, options: "Multitask.Options") -> tuple[str, ...]:
        return tuple(options.heads)

    @classmethod
    def metric_names(cls, options: "Multitask.Options") -> tuple[str, ...]:
        per_head = ("loss", "accuracy", "macro_f1") + (("log_variance",) if options.weighting == "uncertainty" else ())
        return (*cls.metrics, *(f"{name}_{metric}" for name in options.heads for metric in per_head))

    def __init__(self, recipe: Recipe, labels: dict[str, list[str]]):
        self.recipe, self.model_path, self.options, self.labels = recipe, recipe.model.path, recipe.task, labels
        self.num_layers, self.dropout, self.skip_bad_rows = recipe.model.num_layers, recipe.train.dropout, recipe.data.on_bad_rows == "skip"
        self.image = self.options.input == "image"
        self.uncertainty = self.options.weighting == "uncertainty"
        lr = recipe.train.lr
        self.log_variance_lr_scale = self.options.log_variance_lr / lr if lr else 1.0  # lr 0 trains nothing, these included
        self.weights = [head.weight for head in self.options.heads.values()]
        self.unsupported = [".".join(path) for path in UNSUPPORTED if self._configured(recipe, path)]

    @staticmethod
    def _configured(recipe: Recipe, path: tuple[str, ...]) -> bool:
        node: Any = recipe
        for key in path:
            node = getattr(node, key, None)
        return bool(node)

    def classes(self) -> dict[str, int]:
        return {name: len(self.labels[name]) for name in self.options.heads}

    def check(self) -> None:
        if self.unsupported:
            raise UserError(self.unsupported[0], f"not supported by task {self.name} yet (it assumes one set of logits); remove it")
        if self.image:
            self.build_model()  # the weights exist and fit the architecture (read weights-only)
        else:
            check_text_model(self)

    @cached_property
    def image_task(self) -> ImageClassification:
        """The image encoder's loading, decoding and augmentation: the image task's own (built
        once, not per augmented batch)."""
        options = ImageClassification.Options(type=ImageClassification.name, image_size=self.options.image_size, crop_scale=self.options.crop_scale,
                                              flip=self.options.flip, rotation=self.options.rotation)
        return ImageClassification(self.recipe.model_copy(update={"task": options}), ["unused", "labels"])

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tokenise, or decode and resize; labels [B, H], one column per head in the order of task.heads."""
        labels = np.stack([np.asarray(batch[name], dtype=np.int64) for name in self.options.heads], axis=1)
        if self.image:
            pixels, keep = decode_images(batch, self.options.image_size, self.skip_bad_rows)
            return {"pixels": pixels, "labels": labels[keep]}
        return {"input_ids": tokenize(self.model_path, batch["text"], self.options.max_length), "labels": labels}

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Train batches on the worker's device: the image task's random resized crop, flip and
        rotation (text passes through)."""
        return self.image_task.augment(batch) if self.image else batch

    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = torch.as_tensor(np.asarray(batch["labels"]))
        if self.image:
            return {"pixels": normalise(batch["pixels"]), "labels": labels}
        pad_id = load_tokenizer(self.model_path).pad_token_id or 0
        input_ids, attention_mask = pad_sequences(batch["input_ids"], pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def heads_config(self) -> dict[str, Any]:
        """What config.json records of the heads: each head's labels, and the pooling."""
        return {"multitask_heads": {name: list(self.labels[name]) for name in self.options.heads},
                "multitask_pooling": "global_average" if self.image else "mean"}

    def config(self):
        config = encoder_config(self.model_path, self.dropout, self.num_layers)
        for key, value in self.heads_config().items():
            setattr(config, key, value)
        return config

    def wrap(self, encoder: torch.nn.Module, lr_scale: float = 1.0) -> MultitaskModel:
        """The heads (and log-variances) on ``encoder``."""
        if self.image:
            width, dropout = encoder.config["head_channels"], encoder.config["dropout"]
        else:
            config = encoder.config
            width, dropout = config.hidden_size, getattr(config, "classifier_dropout", None) or getattr(config, "hidden_dropout_prob", 0.1)
        return MultitaskModel(encoder, width, dropout, self.classes(), self.uncertainty, lr_scale)

    def skeleton(self) -> torch.nn.Module:
        from transformers import AutoModel

        with torch.device("meta"):
            return self.wrap(self.image_task.skeleton() if self.image else AutoModel.from_config(self.config()))

    def build_model(self) -> torch.nn.Module:
        if self.image:
            return self.wrap(self.image_task.build_model(), self.log_variance_lr_scale)
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(self.model_path, config=self.config(), dtype=load_dtype(self.recipe), use_safetensors=True)  # never unpickle
        return self.wrap(encoder, self.log_variance_lr_scale)

    def head_names(self, model: torch.nn.Module) -> list[str]:
        return ["heads"] + (["log_variances"] if self.uncertainty else [])

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: batch[key] for key in (("pixels",) if self.image else ("input_ids", "attention_mask"))}

    def forward(self, model, batch):
        logits, log_variances = model(**self.inputs(batch))
        losses, loss_sums = [], []
        for index, name in enumerate(self.options.heads):
            mean, (loss_sum, _) = classification_loss(logits[name], batch["labels"][:, index])
            losses.append(mean)
            loss_sums.append(loss_sum)
        losses = torch.stack(losses)  # [H]
        weights = torch.tensor(self.weights, device=losses.device)
        if log_variances is not None:
            objective = (weights * (torch.exp(-log_variances) * losses + log_variances)).sum()
        else:
            objective = (weights * losses).sum()
        return objective, (torch.stack(loss_sums), logits, log_variances)

    def embed(self, model, batch) -> torch.Tensor:
        """The shared encoder's pooled features [B, width], without the heads."""
        return getattr(model, "module", model).features(**self.inputs(batch))

    def new_metrics(self) -> MultitaskMetrics:
        return MultitaskMetrics(self.classes(), self.weights, self.uncertainty)

    def save_pretrained(self, model: torch.nn.Module, directory: str) -> None:
        """The encoder's own export layout (text: transformers' save_pretrained and the tokenizer;
        image: the image task's), config.json with the heads' labels, its model.safetensors
        extended with the heads (and log-variances)."""
        from pathlib import Path

        from safetensors.torch import load_file, save_file

        if self.image:  # the image task's config, less its stand-in labels, plus the heads'
            config = {key: value for key, value in model.encoder.config.items() if key not in ("labels", "num_labels")}
            save_model(model.encoder, directory, {**config, **self.heads_config()})
        else:
            model.encoder.save_pretrained(directory, safe_serialization=True)
            load_tokenizer(self.model_path).save_pretrained(directory)
        weights = Path(directory) / "model.safetensors"
        tensors = load_file(weights)
        tensors.update({f"heads.{key}": value.detach().contiguous() for key, value in model.heads.state_dict().items()})
        if model.log_variances is not None:
            tensors["log_variances"] = model.log_variances.detach().contiguous()
        save_file(tensors, weights, metadata={"format": "pt"})
