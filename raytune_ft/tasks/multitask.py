"""Multitask text classification: one shared pretrained encoder, one linear head per label role.

Each head is a label role of its own (``task.heads`` names them; ``data.columns`` maps each to a
column; ``data.labels`` holds one label set per head). The encoder's last hidden states are
mean-pooled over the real tokens (what sentence encoders such as MiniLM were trained for) and
every head reads the same pooled features. The training objective combines the heads'
cross-entropies L_i:

- ``weighting: fixed``: sum_i w_i L_i with the recipe's weights w_i;
- ``weighting: uncertainty`` (Kendall, Gal and Cipolla 2018): sum_i w_i (exp(-s_i) L_i + s_i), the
  log-variances s_i learned with the model (initialised at 0, i.e. weight 1; their own learning
  rate ``log_variance_lr``), so a head whose loss stays high (a noisy or hard task) is weighted
  down, and the +s_i term stops every weight shrinking to 0.

``eval/loss`` is sum_i w_i L_i in both modes (a yardstick that learned weights do not move);
``eval/accuracy`` and ``eval/macro_f1`` are the means over heads, so early stopping, Tune, WiSE-FT
and retention key on them as for one head. The export is the encoder as a plain transformers
directory (``AutoModel.from_pretrained`` loads it) whose ``model.safetensors`` also holds
``heads.<head>.weight|bias`` (and ``log_variances``), with each head's labels in ``config.json``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from raytune_ft.errors import UserError
from raytune_ft.models import mean_pool
from raytune_ft.tasks import ClassificationMetrics, classification_loss, register
from raytune_ft.tasks.text_classification import (
    check_text_model, encoder_config, load_tokenizer, pad_sequences, tokenize,
)
from raytune_ft.train.optim import LR_SCALE

HEAD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Recipe sections that assume one set of logits (distillation, post steps) or a probe task's
# columns (retention references); refused rather than half-supported.
UNSUPPORTED = (("retention",), ("distill",), ("replay",), ("post", "quantize"), ("post", "prune"), ("post", "explain"))


class HeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, gt=0, description="w_i: this head's factor in the objective (and in eval/loss)")


class MultitaskModel(torch.nn.Module):
    """A shared encoder, mean-pooled, with one linear head per label role.

    ``forward`` returns ({head: logits [B, C_head]}, log-variances [H] or None); the log-variances
    leave through forward so that DDP and DeepSpeed see them used like any other parameter."""

    base_model_prefix = "encoder"  # pretrained weights are the encoder's (check_pretrained_weights)

    def __init__(self, encoder: torch.nn.Module, classes: dict[str, int], uncertainty: bool, log_variance_lr_scale: float = 1.0):
        super().__init__()
        config = encoder.config
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # features are mean-pooled; an unused pooler would stall DDP's reducer
        self.encoder = encoder
        dropout = getattr(config, "classifier_dropout", None) or getattr(config, "hidden_dropout_prob", 0.1)
        self.dropout = torch.nn.Dropout(dropout)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(config.hidden_size, count) for name, count in classes.items()})
        self.log_variances = torch.nn.Parameter(torch.zeros(len(classes))) if uncertainty else None
        if uncertainty:
            setattr(self.log_variances, LR_SCALE, log_variance_lr_scale)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        return mean_pool(hidden, attention_mask)  # [B, H]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        pooled = self.dropout(self.features(input_ids, attention_mask))
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
    columns = ("text",)  # and one label role per head: roles(options)
    metrics = MultitaskMetrics.names

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        max_length: int = Field(256, ge=8, le=8192, description="tokens kept per text (truncated)")
        heads: dict[str, HeadOptions] = Field(min_length=1, description="head name (its label role in data.columns) -> {weight}")
        weighting: Literal["fixed", "uncertainty"] = Field("fixed", description="fixed weights, or learned log-variances (Kendall et al. 2018)")
        log_variance_lr: float = Field(
            1e-2, gt=0, le=1, description="uncertainty: the log-variances' peak learning rate (same schedule as train.lr); "
                                          "they must move by ~0.1-1, far more than a fine-tuned weight, so train.lr would leave them near 0")

        @field_validator("heads")
        @classmethod
        def _head_names(cls, heads: dict[str, HeadOptions]) -> dict[str, HeadOptions]:
            for name in heads:
                if not HEAD_NAME.match(name) or name in Multitask.columns:
                    raise ValueError(f"head name {name!r} must be lower-case letters, digits and _ (starting with a letter), "
                                     f"and not {', '.join(Multitask.columns)}")
            return heads

    @classmethod
    def roles(cls, options: "Multitask.Options") -> tuple[str, ...]:
        return (*cls.columns, *options.heads)

    @classmethod
    def label_roles(cls, options: "Multitask.Options") -> tuple[str, ...]:
        return tuple(options.heads)

    @classmethod
    def metric_names(cls, options: "Multitask.Options") -> tuple[str, ...]:
        per_head = ("loss", "accuracy", "macro_f1") + (("log_variance",) if options.weighting == "uncertainty" else ())
        return (*cls.metrics, *(f"{name}_{metric}" for name in options.heads for metric in per_head))

    def __init__(self, recipe: dict[str, Any], labels: dict[str, list[str]]):
        self.model_path = recipe["model"]["path"]
        self.num_layers = recipe["model"].get("num_layers")
        self.options = self.Options(**{k: v for k, v in recipe["task"].items() if k != "type"})
        self.labels = labels
        self.dropout = recipe["train"].get("dropout")
        self.uncertainty = self.options.weighting == "uncertainty"
        lr = recipe["train"]["lr"]
        self.log_variance_lr_scale = self.options.log_variance_lr / lr if lr else 1.0  # lr 0 trains nothing, these included
        self.weights = [head.weight for head in self.options.heads.values()]
        self.unsupported = [".".join(path) for path in UNSUPPORTED if self._configured(recipe, path)]

    @staticmethod
    def _configured(recipe: dict[str, Any], path: tuple[str, ...]) -> bool:
        node: Any = recipe
        for key in path:
            node = (node or {}).get(key)
        return bool(node)

    def classes(self) -> dict[str, int]:
        return {name: len(self.labels[name]) for name in self.options.heads}

    def check(self) -> None:
        if self.unsupported:
            raise UserError(self.unsupported[0], f"not supported by task {self.name} yet (it assumes one set of logits); remove it")
        check_text_model(self)

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tokenise; labels [B, H], one column per head in the order of task.heads."""
        labels = np.stack([np.asarray(batch[name], dtype=np.int64) for name in self.options.heads], axis=1)
        return {"input_ids": tokenize(self.model_path, batch["text"], self.options.max_length), "labels": labels}

    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        pad_id = load_tokenizer(self.model_path).pad_token_id or 0
        input_ids, attention_mask = pad_sequences(batch["input_ids"], pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.as_tensor(np.asarray(batch["labels"]))}

    def config(self):
        config = encoder_config(self.model_path, self.dropout, self.num_layers)
        config.multitask_heads = {name: list(self.labels[name]) for name in self.options.heads}  # labels, in config.json
        config.multitask_pooling = "mean"
        return config

    def skeleton(self) -> torch.nn.Module:
        from transformers import AutoModel

        with torch.device("meta"):
            return MultitaskModel(AutoModel.from_config(self.config()), self.classes(), self.uncertainty)

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(self.model_path, config=self.config(), use_safetensors=True)  # never unpickle
        return MultitaskModel(encoder, self.classes(), self.uncertainty, self.log_variance_lr_scale)

    def head_names(self, model: torch.nn.Module) -> list[str]:
        return ["heads"] + (["log_variances"] if self.uncertainty else [])

    def forward(self, model, batch):
        logits, log_variances = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
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
        """The shared encoder's mean-pooled features [B, H], without the heads."""
        return getattr(model, "module", model).features(batch["input_ids"], batch["attention_mask"])

    def new_metrics(self) -> MultitaskMetrics:
        return MultitaskMetrics(self.classes(), self.weights, self.uncertainty)

    def save_pretrained(self, model: torch.nn.Module, directory: str) -> None:
        """The encoder's own save_pretrained layout (config.json with the heads' labels, tokenizer),
        its model.safetensors extended with the heads (and log-variances)."""
        from pathlib import Path

        from safetensors.torch import load_file, save_file

        model.encoder.save_pretrained(directory, safe_serialization=True)
        weights = Path(directory) / "model.safetensors"
        tensors = load_file(weights)
        tensors.update({f"heads.{key}": value.detach().contiguous() for key, value in model.heads.state_dict().items()})
        if model.log_variances is not None:
            tensors["log_variances"] = model.log_variances.detach().contiguous()
        save_file(tensors, weights, metadata={"format": "pt"})
        load_tokenizer(self.model_path).save_pretrained(directory)
