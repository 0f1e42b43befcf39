"""The ``replay`` add-on: reference rows mixed into every training batch.

Fraction f of the combined batch is replayed rows of a retention reference, weighted by
``loss_weight``: a probe or head reference's rows scored by its original readout (the probe fitted
on the base model, or the base model's own head); a task reference's train rows by the task's own
loss (a language model keeps modelling general text). The replay order is seeded per (seed, epoch, rank), so a resumed run
replays the same rows. Their forward leaves batch-norm statistics to the target batches.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from raytune_ft.addons import AddOn, register


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


@register
class Replay(AddOn):
    section = "replay"

    def __init__(self, loop):
        super().__init__(loop)
        spec, batch_size = loop.recipe.replay, loop.recipe.train.batch_size
        self.reference = loop.addons["retention"].references.named(spec.reference)
        self.weight = spec.loss_weight
        self.size = max(1, round(batch_size * spec.fraction / (1 - spec.fraction)))
        self.rows = self.reference.local_rows()
        self.count = len(next(iter(self.rows.values())))
        self.order = np.arange(self.count)

    def start_epoch(self, epoch, seed):
        self.order = np.random.default_rng(seed).permutation(self.count)

    def objective(self, objective, step):
        start = (step.index * self.size) % len(self.order)
        chosen = np.take(self.order, range(start, start + self.size), mode="wrap")
        batch = self.reference.task.collate({key: values[chosen] for key, values in self.rows.items()})
        batch = {key: value.to(self.loop.backend.device) for key, value in batch.items()}
        model = self.loop.backend.model
        with running_statistics_kept(model):
            if self.reference.original_probe is None:  # a task reference: the task's own loss
                return objective + self.weight * self.loop.task.forward(model, batch)[0]
            logits = self.reference.original_probe.logits(self.loop.task.embed(model, batch).double())
        return objective + self.weight * torch.nn.functional.cross_entropy(logits, batch["labels"]).float()
