"""Architectures written out here, for models whose usual library (timm, torchvision) is not
available, and the pooling the text encoders' users share."""

import torch


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, T, H] averaged over the real (unpadded) tokens: [B, H]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
