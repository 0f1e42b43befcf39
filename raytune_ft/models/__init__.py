"""Architectures written out here, for models whose usual library (timm, torchvision) is not
available, the pooling the text encoders' users share, per-parameter learning-rate scales and the
converters' atomic write."""

import os
import shutil
from pathlib import Path
from typing import Callable

import torch


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, T, H] averaged over the real (unpadded) tokens: [B, H]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


# A parameter's learning-rate multiplier travels on the parameter itself, so every party that
# scales one (a strategy's layer-wise decay, a task's own fast parameters) composes with the others
# and the optimizer's parameter groups read the product (raytune_ft.backends.optim).
LR_SCALE = "raytune_ft_lr_scale"


def scale_lr(parameter: torch.nn.Parameter, factor: float) -> None:
    """Multiply ``parameter``'s learning rate by ``factor`` (on top of any scale it has)."""
    setattr(parameter, LR_SCALE, lr_scale(parameter) * factor)


def lr_scale(parameter: torch.nn.Parameter) -> float:
    return getattr(parameter, LR_SCALE, 1.0)


def save_directory_atomically(target: Path, save: Callable[[Path], None]) -> Path:
    """``save(tmp)`` into a temporary sibling of ``target`` named for this process, then renamed to
    ``target``: a half-written model is never read, and when another process got there first, its
    copy stays."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    save(tmp)
    try:
        tmp.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(tmp)
    return target
