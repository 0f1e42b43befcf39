"""Optimizer and learning-rate schedule from the recipe's ``train`` section."""

from __future__ import annotations

import math
from typing import Any

import torch

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "ln_")


LR_SCALE = "raytune_ft_lr_scale"  # a parameter attribute: its lr multiplier (layer-wise decay)


def param_groups(model: torch.nn.Module, train: dict[str, Any]) -> list[dict[str, Any]]:
    """Trainable parameters grouped by weight decay (none for biases and norms) and lr multiplier."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            key = (not any(k in name for k in NO_DECAY), getattr(parameter, LR_SCALE, 1.0))
            groups.setdefault(key, []).append(parameter)
    return [
        {"params": params, "weight_decay": train["weight_decay"] if decays else 0.0, "lr": train["lr"] * scale}
        for (decays, scale), params in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))
    ]


def apply_layer_lr_decay(model: torch.nn.Module, head_names: list[str], decay: float) -> None:
    """lr x decay^depth, depth counted from the top: the head 0, the top layer 1, ..., embeddings L+1."""
    from raytune_ft.strategies import depth_groups

    parameters = dict(model.named_parameters())
    for depth, group in enumerate(depth_groups(model, head_names)):
        for name in group:
            setattr(parameters[name], LR_SCALE, getattr(parameters[name], LR_SCALE, 1.0) * decay**depth)  # on a task's own scale


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


def scheduled_lr(scheduler, train: dict[str, Any]) -> float:
    """train.lr at the schedule's current step (what train/lr reports), whatever the parameters'
    own multipliers (layer-wise decay, a task's log-variances) make of it."""
    return train["lr"] * scheduler.lr_lambdas[0](scheduler.last_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, train: dict[str, Any], total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, total_steps))
