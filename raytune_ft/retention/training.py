"""The retention pieces the training loop uses: references, penalties, replay and WiSE-FT."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from raytune_ft.retention.references import Probe, Reference, References, TaskReference
from raytune_ft.retention.regularizers import (
    Regularizer, cached_fisher, fisher_cache_path, fisher_diagonal, pretrained_anchor, save_fisher,
)
from raytune_ft.retention.wise_ft import choose, interpolate


def reference_split(name: str, split: str) -> str:
    """The Ray Train dataset name of a reference split."""
    return f"ref_{name}_{split}"


def build_references(config: dict[str, Any], recipe: dict[str, Any], task) -> References:
    import ray.train

    from raytune_ft.tasks import build_task

    references = []
    batch = recipe["train"]["eval_batch_size"] or 2 * recipe["train"]["batch_size"]
    for spec in config.get("references", []):
        shards = {split: ray.train.get_dataset_shard(reference_split(spec["name"], split)) for split in spec["splits"]}
        if spec["kind"] == "task":
            references.append(TaskReference(spec["name"], task, shards["test"], batch))
        else:
            reference_task = build_task(recipe, spec["labels"])
            head = Probe.from_head(*reference_task.original_head()[1:]) if spec["kind"] == "head" else None
            references.append(Reference(spec["name"], reference_task, len(spec["labels"]), shards, batch, head))
    return References(references)


def local_rows(reference: Reference) -> dict[str, np.ndarray]:
    """This rank's preprocessed rows of the reference train split, read once and kept (small)."""
    parts = list(reference.shards["train"].iter_batches(batch_size=256, batch_format="numpy"))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]} if parts else {}


def build_regularizer(config: dict[str, Any], recipe: dict[str, Any], backend, references: References, heads: list[str]) -> Regularizer | None:
    """L2-SP or EWC anchored at the weights as built (the pretrained body), before any resume."""
    import torch.distributed as dist

    spec = recipe.get("regularizer")
    if not spec:
        return None
    anchor = pretrained_anchor(backend.module, heads)
    if spec["method"] == "l2sp":
        return Regularizer(spec["strength"], anchor)
    reference = references.named(spec["reference"])
    path = fisher_cache_path(recipe, reference.name)
    fisher = cached_fisher(path, anchor)
    if fisher is None:
        rows = local_rows(reference)
        world = dist.get_world_size() if dist.is_initialized() else 1
        count = min(len(rows.get("labels", [])), max(1, spec["fisher_samples"] // world))
        singles = [reference.task.collate({key: values[i:i + 1] for key, values in rows.items()}) for i in range(count)]
        fisher = fisher_diagonal(backend.module, reference, singles, anchor, backend.device)
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_fisher(path, fisher)
    return Regularizer(spec["strength"], anchor, {k: v.to(backend.device) for k, v in fisher.items()})


@contextmanager
def running_statistics_kept(model: torch.nn.Module):
    """Batch norms normalise with, and leave unchanged, their running statistics. A replay batch is
    a few rows from another distribution: in train mode it would both normalise with its own
    few-row statistics and pull the running statistics towards them."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()


class Replay:
    """Reference rows mixed into every training batch: fraction f of the combined batch, scored by
    the reference's original probe (fitted on the base model), weighted by ``loss_weight``. The
    replay order is seeded per (seed, epoch, rank), so a resumed run replays the same rows. Their
    forward leaves batch-norm statistics to the target batches (``running_statistics_kept``)."""

    def __init__(self, recipe: dict[str, Any], references: References, device):
        spec = recipe["replay"]
        self.reference = references.named(spec["reference"])
        self.weight = spec["loss_weight"]
        self.size = max(1, round(recipe["train"]["batch_size"] * spec["fraction"] / (1 - spec["fraction"])))
        self.rows = local_rows(self.reference)
        self.device = device
        self.order = np.arange(len(self.rows["labels"]))

    def start_epoch(self, seed: int) -> None:
        self.order = np.random.default_rng(seed).permutation(len(self.rows["labels"]))

    def loss(self, task, model, index: int) -> torch.Tensor:
        start = (index * self.size) % len(self.order)
        chosen = np.take(self.order, range(start, start + self.size), mode="wrap")
        batch = self.reference.task.collate({key: values[chosen] for key, values in self.rows.items()})
        batch = {key: value.to(self.device) for key, value in batch.items()}
        with running_statistics_kept(model):
            logits = self.reference.original_probe.logits(task.embed(model, batch).double())
        return self.weight * torch.nn.functional.cross_entropy(logits, batch["labels"]).float()


def body_trains(module: torch.nn.Module, heads: list[str]) -> bool:
    from raytune_ft.strategies import in_module

    return any(p.requires_grad and not in_module(name, heads) for name, p in module.named_parameters())


def wise_ft_anchor(weights: dict[str, torch.Tensor], heads: list[str], head_trained_before: bool) -> dict[str, torch.Tensor]:
    """theta_base: the weights when the body starts training, without a never-trained head."""
    from raytune_ft.strategies import in_module

    return {key: value for key, value in weights.items() if head_trained_before or not in_module(key, heads)}


def wise_ft_sweep(spec: dict[str, Any], anchor, task, backend, validation, eval_batch: int, references: References) -> dict[str, Any]:
    """Score every alpha on validation and the references; keep the chosen alpha's weights."""
    from raytune_ft.train.loop import evaluate, scalars

    tuned = backend.snapshot()
    rows = []
    for alpha in spec["alphas"]:
        backend.restore(interpolate(anchor, tuned, alpha))
        row = {"alpha": alpha, **scalars("eval", evaluate(task, backend.module, validation, eval_batch, backend))}
        if references:
            row.update({k: v for k, v in references.evaluate(backend.module, backend.device).items() if k != "ref/time_s"})
        rows.append(row)
    chosen = choose(rows, spec["metric"], spec["min_retention"])
    backend.restore(interpolate(anchor, tuned, chosen["alpha"]))
    return {"alpha": chosen["alpha"], "rows": rows}
