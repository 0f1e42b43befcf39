"""Sharded evaluation and the collectives it rests on, shared by the loop and its add-ons.

Every rank scores its own shard; metric statistics are summed over ranks, so no rank evaluates
alone and every rank sees the same numbers (and so takes the same decisions).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn

SCALAR_TYPES = (int, float)


class Collate(NumpyBatchCollateFn):
    """Ray Data collate callable wrapping the task's ``collate`` (numpy batch -> tensors)."""

    def __init__(self, task):
        self.task = task

    def __call__(self, batch):
        return self.task.collate(batch)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if distributed():
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (counts differ, and a rank may hold none), on every rank, in
    rank order."""
    if not distributed():
        return values
    shape = torch.tensor(values.shape, dtype=torch.int64)
    shapes = [torch.zeros_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    longest = int(max(s[0] for s in shapes))
    trailing = [int(max(s[i] for s in shapes)) for i in range(1, len(shape))]
    padded = torch.zeros((longest, *trailing), dtype=values.dtype)
    if values.shape[0]:
        padded[: values.shape[0]] = values
    parts = [torch.zeros_like(padded) for _ in shapes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s[0])] for part, s in zip(parts, shapes)])


def average_running_statistics(module: torch.nn.Module) -> None:
    """Batch-norm running statistics are each rank's own (DDP sends rank 0's only at the next
    training forward, DeepSpeed never): average them, so that every rank evaluates, and rank 0
    exports, the same model."""
    if not distributed() or dist.get_world_size() == 1:
        return
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    stats = [buffer for norm in norms for buffer in (norm.running_mean, norm.running_var)]
    if stats:
        flat = all_reduce_sum(torch.cat([buffer.detach().double().flatten() for buffer in stats])) / dist.get_world_size()
        for buffer, values in zip(stats, flat.split([buffer.numel() for buffer in stats])):
            buffer.copy_(values.view_as(buffer))


def in_lockstep(batches, partitioned: bool):
    """Yield ``(batch, counts)``. Evaluation shards differ in length by design (one may even be
    empty); when every forward is a collective (ZeRO-3 gathers parameters), a rank whose shard has
    ended keeps running a stand-in batch, uncounted, until every rank is done, so no rank waits on
    a forward that never comes. A rank with no batch at all gets its stand-in from another rank.
    """
    if not partitioned:
        yield from ((batch, True) for batch in batches)
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    batches, stand_in = iter(batches), None
    while True:
        batch = next(batches, None)
        holding = torch.zeros(world, dtype=torch.int64)
        holding[rank] = batch is not None
        holding = all_reduce_sum(holding)
        if not holding.any():
            return
        if stand_in is None and not holding.all():  # only on the first round: later, every rank has one
            shared = [batch]
            dist.broadcast_object_list(shared, src=int(holding.argmax()))
            stand_in = shared[0]
        stand_in = batch if batch is not None else stand_in
        yield stand_in, batch is not None


def scoring_batches(batches, module, backend):
    """Yield ``(batch on the backend's device, counts)`` of ``batches`` in lockstep
    (``in_lockstep``), ``module`` in eval mode under no_grad and the backend's autocast; its
    training mode comes back once the batches are done."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), backend.autocast():
            for batch, counts in in_lockstep(batches, backend.partitioned):
                yield {key: value.to(backend.device) for key, value in batch.items()}, counts
    finally:
        module.train(was_training)


def evaluate(task, module, shard, batch_size: int, backend) -> dict[str, Any]:
    """Sharded evaluation: every rank scores its shard; the metric statistics are summed."""
    if shard is None:
        return {}
    metrics = task.new_metrics()
    batches = shard.iter_torch_batches(batch_size=batch_size, collate_fn=Collate(task))
    for batch, counts in scoring_batches(batches, module, backend):
        _, outputs = task.forward(module, batch)
        if counts:
            metrics.update(outputs, batch)
    return metrics.compute(all_reduce_sum(metrics.state()))


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics (a confusion matrix, say, left out)."""
    return {key: value for key, value in metrics.items() if isinstance(value, SCALAR_TYPES)}


def scalars(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics named ``<prefix>/<metric>``."""
    return {f"{prefix}/{key}": value for key, value in numbers(metrics).items()}
