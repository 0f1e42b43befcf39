"""Strategies: which parameters are trained. Each registers itself by short name.

A strategy has ``prepare(model, task) -> model`` (freeze, wrap with adapters; called once before
the backend wraps the model) and ``export(model) -> model`` (e.g. merge adapters before
``save_pretrained``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

STRATEGIES: dict[str, type["Strategy"]] = {}


class Strategy(Protocol):
    name: str

    def __init__(self, options: dict[str, Any]): ...
    def prepare(self, model: torch.nn.Module, task) -> torch.nn.Module: ...
    def export(self, model: torch.nn.Module) -> torch.nn.Module: ...


def register(cls):
    STRATEGIES[cls.name] = cls
    return cls


def build_strategy(recipe: dict[str, Any]) -> "Strategy":
    options = dict(recipe["strategy"])
    return STRATEGIES[options.pop("method")](options)


@register
class Full:
    """Every parameter is trained."""

    name = "full"

    def __init__(self, options: dict[str, Any]):
        self.options = options

    def prepare(self, model, task):
        return model

    def export(self, model):
        return model


@register
class HeadOnly(Full):
    """Only the task's new head is trained; the pretrained body is frozen (a linear probe)."""

    name = "head_only"

    def prepare(self, model, task):
        heads = task.head_names(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(any(name == h or name.startswith(h + ".") for h in heads))
        return model
