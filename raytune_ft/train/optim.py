"""Optimizer and learning-rate schedule from the recipe's ``train`` section."""

from __future__ import annotations

import math
from typing import Any

import torch

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "ln_")


def param_groups(model: torch.nn.Module, train: dict[str, Any]) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: with weight decay, and without (biases, norms)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(groups: list[dict[str, Any]], train: dict[str, Any]) -> torch.optim.Optimizer:
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=train["lr"], momentum=train["momentum"])
    return torch.optim.AdamW(groups, lr=train["lr"])


def lr_lambda(train: dict[str, Any], total_steps: int):
    """Multiplier of the peak lr at each optimizer step: warmup, then constant/linear/cosine decay."""
    warmup = train["warmup"]
    warmup_steps = int(warmup * total_steps) if warmup < 1 else int(warmup)
    schedule = train["schedule"]

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, train: dict[str, Any], total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, total_steps))
