"""Image classification with a pretrained CNN: EfficientNet-Lite0 (ImageNet) and a new head.

``model.path`` is either a weights-only EfficientNet-Lite torch file (``asset:efficientnet-lite0``)
or a directory this task exported (``config.json`` + ``model.safetensors``; a tiny EfficientNet
saved the same way makes a fast test model). Images of any mode and size become RGB at
``image_size`` (grey is replicated to 3 channels), normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import ConfigDict, Field

from raytune_ft.errors import UserError
from raytune_ft.schema import Recipe, TaskOptions
from raytune_ft.tasks import ClassificationMetrics, classification_loss, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD = "classifier"
MULTITASK_HEADS = ("heads.", "log_variances")  # a multitask export's heads: not this task's


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Image file bytes -> [size, size, 3] uint8 RGB (PIL raises on anything undecodable)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))


def decode_images(batch: dict[str, Any], size: int, skip_bad_rows: bool, row_name: Callable[[int], str] = lambda row: "") -> tuple[np.ndarray, list[int]]:
    """The batch's ``image`` bytes -> pixels [B', S, S, 3] uint8 and the rows kept. An undecodable
    image is a one-line error naming its file (``path``, image folders) or ``row_name(row)``;
    with ``skip_bad_rows`` it is dropped instead (the caller keeps only the rows returned)."""
    pixels, keep = [], []
    for row, data in enumerate(batch["image"]):
        try:
            pixels.append(decode_image(data, size))
            keep.append(row)
        except Exception as error:  # PIL raises UnidentifiedImageError, OSError, ValueError, ...
            if not skip_bad_rows:
                where = str(batch["path"][row]) if "path" in batch else row_name(row)
                raise UserError(where, f"cannot decode image ({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
    return (np.stack(pixels) if pixels else np.zeros((0, size, size, 3), dtype=np.uint8)), keep


def normalise(pixels) -> torch.Tensor:
    """uint8 pixels [B, S, S, 3] -> the model's input [B, 3, S, S]: scaled to [0, 1], ImageNet mean and std."""
    # Contiguous, the layout of the model's weights: a channels-last view of the [B, S, S, 3] pixels
    # made the convolutions' weight gradients channels-last too, unlike the weights and so unlike
    # their DDP buckets, and DDP copied them over every step ("Grad strides do not match bucket
    # view strides"). One copy of the uint8 batch here is cheaper.
    images = torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2).contiguous().float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def random_affine(count: int, device: torch.device, min_scale: float, flip: bool, degrees: float) -> torch.Tensor:
    """[count, 2, 3] affine_grid matrices drawn from torch's generator on ``device`` (the loop seeds
    it per seed, epoch and rank): a random crop of area min_scale..1 and aspect 3/4..4/3, rotated by
    up to +-degrees, mirrored left-right with probability 1/2."""
    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(count, device=device) * (high - low) + low

    area = uniform(min_scale, 1.0)
    aspect = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    width, height = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)
    shift_x, shift_y = uniform(-1, 1) * (1 - width), uniform(-1, 1) * (1 - height)
    angle = torch.deg2rad(uniform(-degrees, degrees))
    mirror = torch.where(torch.rand(count, device=device) < 0.5, -1.0, 1.0) if flip else torch.ones(count, device=device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([
        torch.stack([cos * width * mirror, -sin * height, shift_x], 1),
        torch.stack([sin * width * mirror, cos * height, shift_y], 1),
    ], 1)


def augment_pixels(pixels: torch.Tensor, min_scale: float, flip: bool, degrees: float) -> torch.Tensor:
    """Normalised images [B, 3, S, S] -> each randomly cropped, flipped and rotated: one affine_grid and
    one grid_sample for the whole batch, on the images' device (edges repeat the border). The
    normalisation is per channel and affine, so moving pixels after it equals moving them before."""
    if not (min_scale < 1 or flip or degrees > 0) or not len(pixels):
        return pixels
    theta = random_affine(len(pixels), pixels.device, min_scale, flip, degrees)
    grid = torch.nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
    return torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def save_model(model: torch.nn.Module, directory: str | Path, config: dict[str, Any] | None = None) -> None:
    """The export layout: ``config.json`` (architecture, labels; ``model.config`` unless given)
    and ``model.safetensors``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config or model.config, indent=2))


@register
class ImageClassification:
    name = "image_classification"
    columns = ("image", "label")
    metrics = ClassificationMetrics.names

    class Options(TaskOptions):
        model_config = ConfigDict(extra="forbid")
        image_size: int = Field(64, ge=16, le=1024, description="pixels per side the model sees (images are resized)")
        crop_scale: float = Field(0.8, gt=0, le=1, description="train: random resized crop keeps this to 100% of the area; 1 turns it off")
        flip: bool = Field(True, description="train: mirror left-right with probability 1/2")
        rotation: float = Field(10.0, ge=0, le=180, description="train: rotate by up to +-this many degrees; 0 turns it off")

    def __init__(self, recipe: Recipe, labels: list[str]):
        self.model_path, self.options, self.labels = recipe.model.path, recipe.task, labels
        self.num_layers, self.dropout, self.skip_bad_rows = recipe.model.num_layers, recipe.train.dropout, recipe.data.on_bad_rows == "skip"

    def pretrained(self) -> tuple[dict[str, Any], Path | None]:
        """The base model's config and weights file (None: a checkpoint file carries no config)."""
        from raytune_ft.models.efficientnet_lite import LITE0

        path = Path(self.model_path)
        if path.is_file():
            return dict(LITE0), None
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise UserError("model.path", f"{path} is neither an EfficientNet-Lite weights file nor a directory with config.json and model.safetensors")
        config = json.loads((path / "config.json").read_text())
        if config.get("architecture") != "efficientnet_lite":
            raise UserError("model.path", f"{path}/config.json: architecture {config.get('architecture')!r} is not efficientnet_lite")
        return config, path / "model.safetensors"

    def check(self) -> None:
        """Driver-side: the weights exist and match the architecture (read weights-only)."""
        self.build_model()

    def config(self) -> dict[str, Any]:
        if self.num_layers is not None:
            raise UserError("model.num_layers", "image_classification cannot truncate EfficientNet-Lite yet; remove model.num_layers")
        config, _ = self.pretrained()
        config.update(num_labels=len(self.labels), labels=list(self.labels), image_size=self.options.image_size,
                      mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        if self.dropout is not None:
            config["dropout"] = self.dropout
        return config

    def skeleton(self) -> torch.nn.Module:
        from raytune_ft.models.efficientnet_lite import EfficientNetLite

        with torch.device("meta"):
            return EfficientNetLite(self.config())

    def build_model(self) -> torch.nn.Module:
        """The pretrained body, strictly (every tensor used, none missing), and a new head; an
        export of this task with the same labels (a finished run's model) keeps its trained head,
        and an image multitask export gives its encoder."""
        from safetensors.torch import load_file

        from raytune_ft.models.efficientnet_lite import EfficientNetLite, read_legacy_checkpoint

        pretrained, weights = self.pretrained()
        state = read_legacy_checkpoint(Path(self.model_path)) if weights is None else load_file(weights)
        model = EfficientNetLite(self.config())
        keep_head = pretrained.get("labels") == list(self.labels)
        body = {key: value for key, value in state.items()
                if not key.startswith(MULTITASK_HEADS) and (keep_head or not key.startswith(HEAD + "."))}
        missing, unexpected = model.load_state_dict(body, strict=False)
        missing = [key for key in missing if not key.startswith(HEAD + ".")]
        if missing or unexpected:
            raise UserError("model.path", f"{self.model_path}: weights do not fit the architecture "
                                          f"(missing {', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'})")
        return model

    def original_head(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The base model's own classifier, as pretrained: its labels, weight [labels, features]
        and bias (for a ``head`` retention reference; only those two tensors are read)."""
        from safetensors import safe_open

        pretrained, weights = self.pretrained()
        labels = pretrained.get("labels")
        if weights is not None and labels:
            with safe_open(weights, framework="pt") as state:
                if f"{HEAD}.weight" in state.keys():
                    return list(labels), state.get_tensor(f"{HEAD}.weight"), state.get_tensor(f"{HEAD}.bias")
        raise UserError("model.path", f"{self.model_path} has no classifier with named labels (config.json labels); "
                                      "a head reference needs a model exported with its own labels")

    def head_names(self, model: torch.nn.Module) -> list[str]:
        return [HEAD]

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Decode and resize (Ray Data map_batches, once: the result is cached): pixels [B, S, S, 3]
        uint8, labels [B]."""
        pixels, keep = decode_images(batch, self.options.image_size, self.skip_bad_rows)
        return {"pixels": pixels, "labels": np.asarray(batch["label"], dtype=np.int64)[keep]}

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Train batches on the worker's device: random resized crop, flip and rotation."""
        options = self.options
        return {**batch, "pixels": augment_pixels(batch["pixels"], options.crop_scale, options.flip, options.rotation)}

    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"pixels": normalise(batch["pixels"]), "labels": torch.tensor(batch["labels"])}

    def forward(self, model, batch):
        return classification_loss(model(batch["pixels"]), batch["labels"])

    def embed(self, model, batch) -> torch.Tensor:
        """Globally pooled features [B, head_channels], without the head."""
        return getattr(model, "module", model).features(batch["pixels"])

    def new_metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(len(self.labels))

    def save_pretrained(self, model: torch.nn.Module, directory: str) -> None:
        save_model(model, directory)
