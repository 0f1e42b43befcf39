"""EfficientNet-Lite (Tan & Le 2019; the mobile "Lite" variant: ReLU6, no squeeze-excitation, fixed
stem and head widths), written out so that no torchvision/timm is needed.

Parameter names follow the PyTorch port the pretrained checkpoint was saved from (``_conv_stem``,
``_blocks.N._depthwise_conv``, ...), so its 294 body tensors load by name, strictly; its ImageNet
classifier ``_fc`` loads as ``classifier``. Convolutions pad like TensorFlow's "SAME" (asymmetric
for stride 2), as the original weights were trained.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raytune_ft.errors import UserError

# (kernel, stride, expand ratio, output channels, repeats) per stage, then stem and head widths.
LITE0: dict[str, Any] = {
    "architecture": "efficientnet_lite",
    "stem_channels": 32,
    "stages": [[3, 1, 1, 16, 1], [3, 2, 6, 24, 2], [5, 2, 6, 40, 2], [3, 2, 6, 80, 3],
               [5, 1, 6, 112, 3], [5, 2, 6, 192, 4], [3, 1, 6, 320, 1]],
    "head_channels": 1280,
    "dropout": 0.2,
    "num_labels": 1000,
}
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the pretrained statistics assume


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ceil(input / stride), extra pixel at
    the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)  # momentum 0.1, not TF's 0.01: short fine-tuning runs need statistics that catch up


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, identity skip when shapes allow."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = channels_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(channels_in, hidden, 1, bias=False)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, channels_out, 1, bias=False)
        self._bn2 = batch_norm(channels_out)
        self.skip = stride == 1 and channels_in == channels_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


class EfficientNetLite(nn.Module):
    """Images [B, 3, H, W] (normalised) -> logits [B, num_labels]; ``features`` gives the pooled
    [B, head_channels] representation the classifier reads."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        stem = config["stem_channels"]
        self._conv_stem = SameConv2d(3, stem, 3, stride=2, bias=False)
        self._bn0 = batch_norm(stem)
        blocks, channels = [], stem
        for kernel, stride, expand, out, repeats in config["stages"]:
            for i in range(repeats):
                blocks.append(MBConvBlock(channels, out, kernel, stride if i == 0 else 1, expand))
                channels = out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(channels, config["head_channels"], 1, bias=False)
        self._bn1 = batch_norm(config["head_channels"])
        self.dropout = nn.Dropout(config["dropout"])
        # Without num_labels (a multitask export's encoder) it is a feature extractor: features() only.
        self.classifier = nn.Linear(config["head_channels"], config["num_labels"]) if config.get("num_labels") else None

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pixels)))  # [B, stem, H/2, W/2]
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))  # [B, head, H/32, W/32]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.feature_map(pixels).mean((2, 3))  # [B, head]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(pixels)))

    def train(self, mode: bool = True):
        """Batch norms whose weights are frozen keep their running statistics too, so a frozen
        body (head-only, freeze, gradual) stays bit-identical."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d) and not module.weight.requires_grad:
                module.eval()
        return self


def read_legacy_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The pretrained package's legacy (pre-1.6, non-zip) torch file, read with
    ``weights_only=True``: torch's restricted unpickler, which refuses any object but tensors and
    plain containers. ``_fc`` is renamed to ``classifier``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for a forbidden object, RuntimeError/OSError otherwise
        raise UserError("model.path", f"{path} is not a weights-only torch checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError("model.path", f"{path} does not hold a dict of tensors")
    return {key.replace("_fc.", "classifier.", 1) if key.startswith("_fc.") else key: value for key, value in state.items()}
