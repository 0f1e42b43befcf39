"""The ``regularizer`` add-on: a penalty that keeps the weights near the pretrained ones,
(lambda/2) * sum w * (theta - theta_0)^2.

``l2sp`` (Li et al. 2018): w = 1. ``ewc`` (Kirkpatrick et al. 2017): w = the diagonal Fisher of the
reference task at the base model, normalised to mean 1 so lambda means the same on every model
(the raw Fisher is tiny; search lambda on a log scale). Only pretrained parameters are anchored;
the new head is free.

The penalty is a proximal step, decoupled from the gradient as AdamW decouples weight decay: before
each optimizer step, theta <- theta - f * (theta - theta_0) with f = r / (1 + r), r = lr * lambda * w
(the exact minimiser of the penalty plus the distance to theta, so stable at any strength). As a
loss term it went through Adam, which rescales every gradient to about lr per step whatever lambda
is: a strong penalty then shook the weights around theta_0 at step size lr, and through global
gradient-norm clipping it shrank the head's gradient (the task's) to nothing. Measured on the text
case: with EWC lambda 100 the clipped gradient norm was ~1e5 and the head stayed at the majority class.
Each rank applies it to its share of the fp32 weights the optimizer steps from (the backend's
``master_weights``), so DDP and every ZeRO stage take the same step.
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


def proximal_pull(weights: torch.Tensor, anchor: torch.Tensor, rate: float, fisher: torch.Tensor | None) -> None:
    """In place: ``weights`` moved towards ``anchor`` by the proximal step of the penalty at ``rate``
    (lr * lambda), weighted per element by ``fisher`` where given."""
    r = rate if fisher is None else rate * fisher
    weights.sub_((weights - anchor) * (r / (1 + r)))


def fisher_diagonal(module: torch.nn.Module, reference, rows: list[dict[str, torch.Tensor]], names: set[str], device) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher E[(d log p(y|x) / d theta)^2] through the reference's original
    probe, one row at a time on the bare module (per rank, before any all-reduce), then summed
    over ranks and normalised to mean 1."""
    parameters = {name: p for name, p in module.named_parameters() if name in names}
    fisher = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in parameters.items()}
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


def fisher_cache_path(recipe: Recipe, reference_name: str, part: str | None = None) -> str:
    """One cached Fisher per (base model, reference set, sample count, preprocessing), and per
    partition (``part``) where each rank holds its own."""
    from raytune_ft.data.assets import cache_dir

    reference = next(r for r in recipe.retention.references if r.name == reference_name)
    key = json.dumps([recipe.model.path, reference.data.model_dump(mode="json"), recipe.task.model_dump(mode="json"),
                      recipe.regularizer.fisher_samples, recipe.strategy.method, *([part] if part else [])], sort_keys=True)
    return str(cache_dir() / "fisher" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors")


def cached_fisher(path: str, names: set[str]) -> dict[str, torch.Tensor] | None:
    """The cached Fisher if every rank has it (a collective decision: no rank computes alone)."""
    from safetensors.torch import load_file

    have = torch.tensor([1.0 if os.path.isfile(path) else 0.0])
    if distributed():
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
    if have.item() < 1:
        return None
    fisher = load_file(path)
    return fisher if fisher.keys() == names else None


def save_fisher(path: str, fisher: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = f"{path}.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in fisher.items()}, staging)
    os.replace(staging, path)


def partitioned_fisher(loop, reference, singles: list[dict[str, torch.Tensor]], anchor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of ``fisher_diagonal``, on a backend whose parameters and
    gradients are partitioned (ZeRO-3), as this rank's partitions. Its gradients arrive averaged
    over ranks, and a Fisher needs each row's own: so the ranks take turns, every rank running
    the same forwards (each a collective) and only the rank whose turn it is keeping its row's
    term, scaled by the world size, which the average then returns whole."""
    backend, world = loop.backend, loop.world
    count = torch.tensor([len(singles)], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)  # the same number of forwards on every rank
    fisher = {name: torch.zeros_like(value) for name, value in anchor.items()}
    probe, module = reference.original_probe, backend.module
    was_training = module.training
    module.eval()
    for turn in range(world):
        for row in singles[: int(count)]:
            row = {key: value.to(backend.device) for key, value in row.items()}
            with backend.accumulating(True):
                log_p = torch.log_softmax(probe.logits(reference.task.embed(module, row).double()), -1)
                # x grad_accum undoes the engine's division of every loss by the accumulation count
                scale = world * loop.recipe.train.grad_accum if loop.rank == turn else 0.0
                backend.backward(log_p.gather(1, row["labels"].view(-1, 1)).sum().float() * scale)
            for name, grad in backend.local_grads().items():
                if name in fisher:
                    fisher[name] += grad.pow(2)
            backend.zero_grad()
    module.train(was_training)
    sums = torch.tensor([float(sum(value.sum() for value in fisher.values())), float(count) * world], dtype=torch.float64)
    dist.all_reduce(sums)
    numel = sum(p.ds_numel for name, p in module.named_parameters() if name in fisher)  # the whole parameters' sizes
    mean = sums[0] / sums[1] / numel
    return {name: value / sums[1].float() / mean.clamp(min=1e-30).float() for name, value in fisher.items()}


@register
class Penalty(AddOn):
    """L2-SP or EWC anchored at the weights as built (the pretrained body), before any resume;
    EWC's Fisher comes from a retention reference's original readout, cached per base model.
    Anchor and Fisher are kept as this rank's share of the master weights: the whole parameters
    under DDP, the optimizer's partitions under ZeRO (where the Fisher of partitioned parameters
    is taken partition by partition)."""

    section = "regularizer"

    def __init__(self, loop):
        super().__init__(loop)
        spec, backend = loop.recipe.regularizer, loop.backend
        self.strength = spec.strength
        shares = {name: share for name, share in backend.master_weights().items() if not in_module(name, loop.heads)}
        self.anchor = {name: weights.detach().float().clone() for name, (weights, _) in shares.items()}
        self.fisher = None
        if spec.method == "ewc":
            fisher = self.ewc_fisher(spec, set(shares))
            if not backend.partitioned:  # a whole Fisher: this rank's share of each parameter
                fisher = {name: fisher[name].flatten()[start: start + weights.numel()] for name, (weights, start) in shares.items()}
            self.fisher = {name: value.to(self.anchor[name].device) for name, value in fisher.items()}

    def ewc_fisher(self, spec, names: set[str]) -> dict[str, torch.Tensor]:
        loop, backend = self.loop, self.loop.backend
        reference = loop.addons["retention"].references.named(spec.reference)
        # Partitions are per rank: each rank caches its own.
        part = f"rank{loop.rank}-of-{loop.world}" if backend.partitioned else None
        path = fisher_cache_path(loop.recipe, reference.name, part)
        fisher = cached_fisher(path, names)
        if fisher is None:
            rows = reference.local_rows()
            count = min(len(rows.get("labels", [])), max(1, spec.fisher_samples // loop.world))
            singles = [reference.task.collate({key: values[i:i + 1] for key, values in rows.items()}) for i in range(count)]
            if backend.partitioned:
                fisher = partitioned_fisher(loop, reference, singles, self.anchor)
            else:
                fisher = fisher_diagonal(backend.module, reference, singles, names, backend.device)
            if loop.rank == 0 or part:
                save_fisher(path, fisher)
        return fisher

    @torch.no_grad()
    def before_step(self, boundary):
        """The proximal step, once per optimizer step, at this step's learning rate."""
        if not boundary:
            return
        backend = self.loop.backend
        rate = backend.lr() * self.strength
        trainable = {name for name, p in backend.module.named_parameters() if p.requires_grad}  # gradual unfreezing changes it
        for name, (weights, _) in backend.master_weights().items():
            if name in self.anchor and name in trainable:
                proximal_pull(weights, self.anchor[name], rate, None if self.fisher is None else self.fisher[name])
