"""Visual question answering by fusing two pretrained encoders: an EfficientNet-Lite image encoder
and a transformers text encoder (MiniLM), joined by a new fusion module and answer classifier.

Fusion ``concat``: the pooled image and question features, concatenated and projected.
Fusion ``cross_attention``: every question token attends over the image's feature-map cells
(one cell per 32x32 pixels), residual and layer norm, then the question is mean-pooled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raytune_ft.models import mean_pool
from raytune_ft.models.efficientnet_lite import EfficientNetLite

ARCHITECTURE = "vqa_fusion"


class ConcatFusion(nn.Module):
    def __init__(self, image_channels: int, text_width: int, hidden: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(image_channels + text_width, hidden), nn.GELU())

    def forward(self, image_map: torch.Tensor, text_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([image_map.mean((2, 3)), mean_pool(text_states, mask)], -1))  # [B, hidden]


class CrossAttentionFusion(nn.Module):
    def __init__(self, image_channels: int, text_width: int, hidden: int, heads: int):
        super().__init__()
        self.image_tokens = nn.Linear(image_channels, text_width)
        self.attention = nn.MultiheadAttention(text_width, heads, batch_first=True)
        self.norm = nn.LayerNorm(text_width)
        self.project = nn.Sequential(nn.Linear(text_width, hidden), nn.GELU())

    def forward(self, image_map: torch.Tensor, text_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cells = self.image_tokens(image_map.flatten(2).transpose(1, 2))  # [B, h*w, D]
        attended, _ = self.attention(text_states, cells, cells, need_weights=False)  # [B, T, D]
        return self.project(mean_pool(self.norm(text_states + attended), mask))  # [B, hidden]


def text_config(config: dict[str, Any]):
    from transformers import AutoConfig

    settings = dict(config["text"])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


class VQAFusion(nn.Module):
    """(pixels [B, 3, S, S], input_ids and attention_mask [B, T]) -> answer logits [B, num_labels].

    ``config`` is what ``config.json`` of an export holds: fusion, hidden, attention_heads, dropout,
    labels, image (the EfficientNet-Lite config), text (the transformers config as a dict).
    ``image``/``text``: pretrained encoders to use instead of freshly initialised ones."""

    base_model_prefix = "text"  # a text encoder's own checkpoint keys (embeddings.*) live under text.*

    def __init__(self, config: dict[str, Any], image: EfficientNetLite | None = None, text: nn.Module | None = None):
        from transformers import AutoModel

        super().__init__()
        self.config = dict(config, architecture=ARCHITECTURE, num_labels=len(config["labels"]))
        self.image = image if image is not None else EfficientNetLite(config["image"])
        self.image.classifier = nn.Identity()  # the ImageNet head is not used: features come from feature_map
        self.text = text if text is not None else AutoModel.from_config(text_config(config), add_pooling_layer=False)
        channels, width = config["image"]["head_channels"], self.text.config.hidden_size
        if config["fusion"] == "cross_attention":
            self.fusion = CrossAttentionFusion(channels, width, config["hidden"], config["attention_heads"])
        else:
            self.fusion = ConcatFusion(channels, width, config["hidden"])
        self.dropout = nn.Dropout(config["dropout"])
        self.classifier = nn.Linear(config["hidden"], len(config["labels"]))

    def fused(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The joint image-question features [B, hidden] the classifier reads."""
        image_map = self.image.feature_map(pixels)  # [B, C, S/32, S/32]
        text_states = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, D]
        return self.fusion(image_map, text_states, attention_mask)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.fused(pixels, input_ids, attention_mask)))
