"""Sequence classification with a pretrained transformer encoder (BERT, MiniLM, RoBERTa, ...)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field

from raytune_ft.errors import UserError
from raytune_ft.models import mean_pool
from raytune_ft.schema import Recipe, TaskOptions
from raytune_ft.strategies import in_module
from raytune_ft.tasks import ClassificationMetrics, check_positions, check_pretrained_weights, classification_loss, load_dtype, register


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def override_dropout(config, dropout: float) -> None:
    """Set every dropout probability a transformers config exposes (names differ by family)."""
    for key, value in vars(config).items():
        if isinstance(value, float) and (key.endswith("dropout") or key.endswith("dropout_prob")):
            setattr(config, key, dropout)


def keep_first_layers(config, count: int, model_path: str) -> None:
    """A config with only the first ``count`` layers: ``from_pretrained`` then loads layers 0..count-1
    (encoder.layer.i keeps its pretrained weights) and leaves the layers above unread."""
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        raise UserError("model.num_layers", f"a {config.model_type} config has no num_hidden_layers to truncate")
    if count > layers:
        raise UserError("model.num_layers", f"{count} is more than the {layers} layers of {model_path}")
    config.num_hidden_layers = count


def tokenize(model_path: str, texts, max_length: int) -> np.ndarray:
    """Texts -> an object array of ragged int32 token-id arrays (truncated to max_length)."""
    if not len(texts):  # every row of a batch skipped as bad; the tokenizer refuses an empty list
        return np.empty(0, dtype=object)
    encoded = load_tokenizer(model_path)([str(t) for t in texts], truncation=True, max_length=max_length)
    ids = np.empty(len(encoded["input_ids"]), dtype=object)
    ids[:] = [np.asarray(x, dtype=np.int32) for x in encoded["input_ids"]]
    return ids


def pad_sequences(sequences, pad_id: int, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ragged token lists to the batch's longest (rounded up to `multiple`): [B, T] ids and mask."""
    longest = max(len(s) for s in sequences)
    width = -(-longest // multiple) * multiple
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def encoder_config(model_path: str, dropout: float | None, num_layers: int | None, **overrides):
    """The pretrained model's transformers config with the recipe's dropout and layer count."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, **overrides)
    if dropout is not None:
        override_dropout(config, dropout)
    if num_layers is not None:
        keep_first_layers(config, num_layers, model_path)
    return config


def check_text_model(task) -> None:
    """Driver-side: the model directory of a text task (``model_path``, ``options.max_length``,
    ``skeleton()``) holds a config, a tokenizer and whole safetensors weights of an architecture
    the task can use."""
    from transformers import AutoConfig

    if task.model_path.startswith(("/", ".", "~")) and not Path(task.model_path).expanduser().is_dir():
        raise UserError("model.path", f"directory not found: {task.model_path}")
    try:
        config = AutoConfig.from_pretrained(task.model_path)
        load_tokenizer(task.model_path)
    except Exception as error:  # transformers raises OSError/ValueError/KeyError by case
        raise UserError("model.path", f"{task.model_path} is not a usable model directory ({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
    check_positions("task.max_length", task.options.max_length, getattr(config, "max_position_embeddings", None))
    try:
        skeleton = task.skeleton()
    except (ValueError, KeyError) as error:  # transformers: no model class of this task for this config
        raise UserError("model.path", f"a {config.model_type} model cannot do {task.name} ({str(error).splitlines()[0][:120]})") from None
    check_pretrained_weights(task.model_path, skeleton)


@register
class TextClassification:
    name = "text_classification"
    columns = ("text", "label")
    metrics = ClassificationMetrics.names

    class Options(TaskOptions):
        model_config = ConfigDict(extra="forbid")
        max_length: int = Field(256, ge=8, le=8192, description="tokens kept per text (truncated)")

    def __init__(self, recipe: Recipe, labels: list[str]):
        self.model_path, self.options, self.labels = recipe.model.path, recipe.task, labels
        self.num_layers, self.dropout, self.dtype = recipe.model.num_layers, recipe.train.dropout, load_dtype(recipe)

    def check(self) -> None:
        check_text_model(self)

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": tokenize(self.model_path, batch["text"], self.options.max_length),
                "labels": np.asarray(batch["label"], dtype=np.int64)}

    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Pad each batch to its own longest text (not max_length): short batches cost less."""
        pad_id = load_tokenizer(self.model_path).pad_token_id or 0
        input_ids, attention_mask = pad_sequences(batch["input_ids"], pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(batch["labels"])}

    def config(self):
        return encoder_config(self.model_path, self.dropout, self.num_layers, num_labels=len(self.labels),
                              id2label=dict(enumerate(self.labels)), label2id={label: i for i, label in enumerate(self.labels)})

    def skeleton(self) -> torch.nn.Module:
        """The model's structure on the meta device (no weights read), for driver-side checks."""
        from transformers import AutoModelForSequenceClassification

        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(self.config())

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        model, info = AutoModelForSequenceClassification.from_pretrained(
            self.model_path, config=self.config(), dtype=self.dtype, output_loading_info=True, use_safetensors=True)  # never unpickle
        # The head is whatever the checkpoint did not provide: the classifier, and for encoders
        # saved without one (sentence-transformers) the pooler too.
        model.raytune_ft_new_modules = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
        return model

    def head_names(self, model: torch.nn.Module) -> list[str]:
        """The new modules, and the encoder's pooler where it has one: the dense layer that
        BERT-style encoders put on the first token for sentence-level heads. Sentence encoders
        (sentence-transformers pool the mean) never trained theirs: frozen, its near-constant
        output left every head-only classifier on MiniLM at the majority class (docs/retention.md)."""
        heads = list(getattr(model, "raytune_ft_new_modules", None) or ["classifier"])
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA, PEFT's wrapper
        pooler = f"{base.base_model_prefix}.pooler"
        if getattr(base.base_model, "pooler", None) is not None and not any(in_module(head, [pooler]) for head in heads):
            heads.append(pooler)
        return heads

    def forward(self, model, batch):
        return classification_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])

    def embed(self, model, batch) -> torch.Tensor:
        """Mean-pooled last hidden states [B, H]: the encoder's features, without the head."""
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return mean_pool(outputs.hidden_states[-1], batch["attention_mask"])

    def new_metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(len(self.labels))

    def save_pretrained(self, model: torch.nn.Module, directory: str) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        load_tokenizer(self.model_path).save_pretrained(directory)
