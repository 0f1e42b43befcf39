"""The ``regularizer`` add-on: a penalty that keeps the weights near the pretrained ones,
(lambda/2) * sum w * (theta - theta_0)^2.

``l2sp`` (Li et al. 2018): w = 1. ``ewc`` (Kirkpatrick et al. 2017): w = the diagonal Fisher of the
reference task at the base model, normalised to mean 1 so lambda means the same on every model
(the raw Fisher is tiny; search lambda on a log scale). Only pretrained parameters are anchored;
the new head is free. The penalty is added to the loss of the micro-batch that ends an
accumulation (times the accumulation count, since backends divide the loss by it), so every
backend syncs and steps it like any other gradient.
"""

from __future__ import annotations

import hashlib
import json
import os
import torch
import torch.distributed as dist

from raytune_ft.addons import AddOn, register
from raytune_ft.evaluation import distributed
from raytune_ft.schema import Recipe
from raytune_ft.strategies import in_module


class Regularizer:
    def __init__(self, strength: float, anchor: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None):
        self.strength, self.anchor, self.weights = strength, anchor, weights

    def penalty(self, module: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32)
        for name, parameter in module.named_parameters():
            if parameter.requires_grad and name in self.anchor:
                distance = (parameter.float() - self.anchor[name]).pow(2)
                if self.weights is not None:
                    distance = distance * self.weights[name]
                total = total.to(distance.device) + distance.sum()
        return 0.5 * self.strength * total


def pretrained_anchor(module: torch.nn.Module, head_names: list[str]) -> dict[str, torch.Tensor]:
    """A float32 copy of every pretrained (non-head) parameter."""
    return {name: p.detach().float().clone() for name, p in module.named_parameters() if not in_module(name, head_names)}


def fisher_diagonal(module: torch.nn.Module, reference, rows: list[dict[str, torch.Tensor]], anchor: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher E[(d log p(y|x) / d theta)^2] through the reference's original
    probe, one row at a time on the bare module (per rank, before any all-reduce), then summed
    over ranks and normalised to mean 1."""
    fisher = {name: torch.zeros_like(value) for name, value in anchor.items()}
    parameters = {name: p for name, p in module.named_parameters() if name in anchor}
    requires = {name: p.requires_grad for name, p in parameters.items()}
    for p in parameters.values():
        p.requires_grad_(True)
    was_training = module.training
    module.eval()
    probe = reference.original_probe
    for row in rows:
        row = {key: value.to(device) for key, value in row.items()}
        module.zero_grad(set_to_none=True)
        log_p = torch.log_softmax(probe.logits(reference.task.embed(module, row).double()), -1)
        log_p.gather(1, row["labels"].view(-1, 1)).sum().backward()
        for name, p in parameters.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float().cpu().pow(2)
    module.zero_grad(set_to_none=True)
    module.train(was_training)
    for name, p in parameters.items():
        p.requires_grad_(requires[name])
    count = torch.tensor([float(len(rows))], dtype=torch.float64)
    flat = torch.cat([value.flatten() for value in fisher.values()])
    if distributed():
        dist.all_reduce(flat)
        dist.all_reduce(count)
    flat = flat / count.clamp(min=1).float()
    flat = flat / flat.mean().clamp(min=1e-30)
    result, offset = {}, 0
    for name, value in fisher.items():
        result[name] = flat[offset: offset + value.numel()].view_as(value)
        offset += value.numel()
    return result


def fisher_cache_path(recipe: Recipe, reference_name: str) -> str:
    """One cached Fisher per (base model, reference set, sample count, preprocessing)."""
    from raytune_ft.data.assets import cache_dir

    reference = next(r for r in recipe.retention.references if r.name == reference_name)
    key = json.dumps([recipe.model.path, reference.data.model_dump(mode="json"), recipe.task.model_dump(mode="json"),
                      recipe.regularizer.fisher_samples, recipe.strategy.method], sort_keys=True)
    return str(cache_dir() / "fisher" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors")


def cached_fisher(path: str, anchor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The cached Fisher if every rank has it (a collective decision: no rank computes alone)."""
    from safetensors.torch import load_file

    have = torch.tensor([1.0 if os.path.isfile(path) else 0.0])
    if distributed():
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
    if have.item() < 1:
        return None
    fisher = load_file(path)
    return fisher if fisher.keys() == anchor.keys() else None


def save_fisher(path: str, fisher: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = f"{path}.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in fisher.items()}, staging)
    os.replace(staging, path)


@register
class Penalty(AddOn):
    """L2-SP or EWC anchored at the weights as built (the pretrained body), before any resume;
    EWC's Fisher comes from a retention reference's original readout, cached per base model."""

    section = "regularizer"

    def __init__(self, loop):
        super().__init__(loop)
        spec, backend = loop.recipe.regularizer, loop.backend
        self.accum = loop.recipe.train.grad_accum
        anchor = pretrained_anchor(backend.module, loop.heads)
        if spec.method == "l2sp":
            self.regularizer = Regularizer(spec.strength, anchor)
            return
        reference = loop.addons["retention"].references.named(spec.reference)
        path = fisher_cache_path(loop.recipe, reference.name)
        fisher = cached_fisher(path, anchor)
        if fisher is None:
            rows = reference.local_rows()
            count = min(len(rows.get("labels", [])), max(1, spec.fisher_samples // loop.world))
            singles = [reference.task.collate({key: values[i:i + 1] for key, values in rows.items()}) for i in range(count)]
            fisher = fisher_diagonal(backend.module, reference, singles, anchor, backend.device)
            if loop.rank == 0:
                save_fisher(path, fisher)
        self.regularizer = Regularizer(spec.strength, anchor, {k: v.to(backend.device) for k, v in fisher.items()})

    def objective(self, objective, step):
        if not step.boundary:  # once per optimizer step; backends divide by grad_accum
            return objective
        return objective + self.regularizer.penalty(self.loop.backend.module) * self.accum
