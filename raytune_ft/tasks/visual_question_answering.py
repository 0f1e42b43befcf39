"""Visual question answering as answer classification: an image and a question -> one of the answers.

``model.path`` is the text encoder (a transformers directory such as ``asset:minilm-l6``) or a
directory this task exported; ``task.image_encoder`` is the image encoder (an EfficientNet-Lite
weights file such as ``asset:efficientnet-lite0``, or a directory the image task exported). The
fusion module and the answer classifier are new: they are the head (``head_only`` trains them on
the frozen encoders, which is the baseline). An export brings its own fusion, hidden and
attention_heads; the recipe's are then not used.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field

from raytune_ft.data import assets
from raytune_ft.errors import UserError
from raytune_ft.models.vqa_fusion import ARCHITECTURE, VQAFusion, text_config
from raytune_ft.schema import ModelSection, Recipe, TaskOptions
from raytune_ft.tasks import ClassificationMetrics, check_positions, check_pretrained_weights, classification_loss, load_dtype, register
from raytune_ft.tasks.image_classification import IMAGENET_MEAN, IMAGENET_STD, ImageClassification, decode_images, normalise
from raytune_ft.tasks.text_classification import load_tokenizer, pad_sequences, tokenize

YES_NO = ("yes", "no")


@contextlib.contextmanager
def image_encoder_errors():
    """The image task names its weights ``model.path``; here they are ``task.image_encoder``."""
    try:
        yield
    except UserError as error:
        if error.where != "model.path":
            raise
        raise UserError("task.image_encoder", error.message) from None


class AnswerMetrics:
    """Classification metrics over answers, plus accuracy on the questions whose true answer is
    yes/no and on the rest (colour, shape, ...): a model can score well by guessing yes/no alone."""

    names = ClassificationMetrics.names + ("accuracy_yes_no", "accuracy_other")
    retained = ClassificationMetrics.retained

    def __init__(self, labels: list[str]):
        self.counts = ClassificationMetrics(len(labels))
        self.yes_no = torch.tensor([label.lower() in YES_NO for label in labels])

    def update(self, outputs, batch) -> None:
        self.counts.update(outputs, batch)

    def state(self) -> torch.Tensor:
        return self.counts.state()

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        metrics = self.counts.compute(state)
        confusion = torch.tensor(metrics["confusion"], dtype=torch.float64)
        correct, asked = confusion.diag(), confusion.sum(1)
        for name, rows in (("accuracy_yes_no", self.yes_no), ("accuracy_other", ~self.yes_no)):
            metrics[name] = float(correct[rows].sum() / asked[rows].sum()) if asked[rows].sum() else 0.0
        return metrics


@register
class VisualQuestionAnswering:
    name = "visual_question_answering"
    columns = ("image", "question", "label")
    metrics = AnswerMetrics.names

    class Options(TaskOptions):
        model_config = ConfigDict(extra="forbid")
        image_encoder: str = Field("asset:efficientnet-lite0", description="EfficientNet-Lite weights file, an image-task export, or asset:NAME")
        image_size: int = Field(64, ge=32, le=1024, description="pixels per side the image encoder sees (images are resized)")
        fusion: Literal["concat", "cross_attention"] = Field("concat", description="how image and question features are joined")
        hidden: int = Field(256, ge=8, le=8192, description="width of the fused features the answer classifier reads")
        attention_heads: int = Field(4, ge=1, description="cross_attention: heads (must divide the text encoder's width)")
        max_length: int = Field(32, ge=4, le=512, description="question tokens kept (truncated)")

    def __init__(self, recipe: Recipe, labels: list[str]):
        self.recipe, self.model_path, self.options, self.labels = recipe, recipe.model.path, recipe.task, labels
        self.dropout, self.skip_bad_rows = recipe.train.dropout, recipe.data.on_bad_rows == "skip"
        if recipe.model.num_layers is not None:
            raise UserError("model.num_layers", f"{self.name} cannot truncate its encoders; remove model.num_layers")

    def exported(self) -> dict[str, Any] | None:
        """The config of a directory this task exported, or None (model.path is a text encoder)."""
        config_file = Path(self.model_path) / "config.json"
        if not config_file.is_file():
            return None
        config = json.loads(config_file.read_text())
        return config if config.get("architecture") == ARCHITECTURE else None

    def image_task(self) -> ImageClassification:
        """The image encoder, loaded the way the image task loads its backbone."""
        path = assets.resolve(self.options.image_encoder, "task.image_encoder")
        if not Path(path).exists():
            raise UserError("task.image_encoder", f"not found: {path}")
        # The encoder as the image task loads it, with its own dropout (this task's applies to the fused model).
        recipe = self.recipe.model_copy(update={
            "model": ModelSection(path=path), "train": self.recipe.train.model_copy(update={"dropout": None}),
            "task": ImageClassification.Options(type=ImageClassification.name, image_size=self.options.image_size)})
        return ImageClassification(recipe, ["unused", "labels"])

    def config(self) -> dict[str, Any]:
        exported = self.exported()
        if exported is not None:
            config = dict(exported)
        else:
            from transformers import AutoConfig

            with image_encoder_errors():
                image = self.image_task().config()
            config = {"image": image, "text": AutoConfig.from_pretrained(self.model_path).to_dict(), "fusion": self.options.fusion,
                      "hidden": self.options.hidden, "attention_heads": self.options.attention_heads, "dropout": 0.1}
        config.update(labels=list(self.labels), image_size=self.options.image_size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        if self.dropout is not None:
            config["dropout"] = self.dropout
        return config

    def check(self) -> None:
        """Driver-side: the text encoder's config, tokenizer and safetensors weights fit (an export's
        weights are checked against its own config), the image encoder loads weights-only, and
        cross-attention's heads divide the text width."""
        try:
            load_tokenizer(self.model_path)
            config = self.config()
            width = text_config(config).hidden_size
        except UserError:
            raise
        except Exception as error:  # transformers raises OSError/ValueError/KeyError/TypeError by case
            raise UserError("model.path", f"{self.model_path} is not a usable text encoder ({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
        check_positions("task.max_length", self.options.max_length, getattr(text_config(config), "max_position_embeddings", None))
        if config["fusion"] == "cross_attention" and width % config["attention_heads"]:
            raise UserError("task.attention_heads", f"{config['attention_heads']} does not divide the text encoder's width {width}")
        try:
            skeleton = self.skeleton()
        except (TypeError, ValueError) as error:  # e.g. a decoder-only model (no add_pooling_layer)
            raise UserError("model.path", f"a {config['text'].get('model_type')} model cannot be the text encoder ({str(error).splitlines()[0][:120]}); use a BERT-family encoder") from None
        check_pretrained_weights(self.model_path, skeleton)
        if self.exported() is None:
            with image_encoder_errors():
                self.image_task().build_model()

    def skeleton(self) -> torch.nn.Module:
        with torch.device("meta"):
            return VQAFusion(self.config())

    def build_model(self) -> torch.nn.Module:
        """A fresh fusion head on the two pretrained encoders; or an export whole (its answer
        classifier only when its labels are this run's)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        config = self.config()
        exported = self.exported()
        if exported is None:
            with image_encoder_errors():
                image = self.image_task().build_model()
            text = AutoModel.from_pretrained(self.model_path, add_pooling_layer=False, dtype=load_dtype(self.recipe), use_safetensors=True)  # never unpickle
            return VQAFusion(config, image=image, text=text)
        model = VQAFusion(config)
        state = load_file(Path(self.model_path) / "model.safetensors")
        if exported.get("labels") != list(self.labels):
            state = {key: value for key, value in state.items() if not key.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.startswith("classifier.")]
        if missing or unexpected:
            raise UserError("model.path", f"{self.model_path}: weights do not fit its config.json "
                                          f"(missing {', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'})")
        return model

    def head_names(self, model: torch.nn.Module) -> list[str]:
        return ["fusion", "classifier"]

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Decode and resize the image, tokenise the question (Ray Data map_batches)."""
        pixels, keep = decode_images(batch, self.options.image_size, self.skip_bad_rows, lambda row: f"question {batch['question'][row]!r}")
        questions = [batch["question"][row] for row in keep]
        return {"pixels": pixels, "input_ids": tokenize(self.model_path, questions, self.options.max_length),
                "labels": np.asarray(batch["label"], dtype=np.int64)[keep]}

    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences(batch["input_ids"], load_tokenizer(self.model_path).pad_token_id or 0)
        return {"pixels": normalise(batch["pixels"]), "input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(batch["labels"])}

    def forward(self, model, batch):
        return classification_loss(model(batch["pixels"], batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def embed(self, model, batch) -> torch.Tensor:
        """The fused image-question features [B, hidden], without the answer classifier."""
        return getattr(model, "module", model).fused(batch["pixels"], batch["input_ids"], batch["attention_mask"])

    def new_metrics(self) -> AnswerMetrics:
        return AnswerMetrics(self.labels)

    def save_pretrained(self, model: torch.nn.Module, directory: str) -> None:
        """``config.json`` (both encoders' configs, fusion, labels), ``model.safetensors``, the tokenizer."""
        from safetensors.torch import save_file

        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, target / "model.safetensors")
        (target / "config.json").write_text(json.dumps(model.config, indent=2))
        load_tokenizer(self.model_path).save_pretrained(target)
