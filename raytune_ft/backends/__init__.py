"""Backends: how the model is distributed, stepped and saved. Each registers by short name.

The loop only calls this small interface, so DDP and DeepSpeed mean the same thing by the same
recipe fields (accumulation, clipping, precision):

- ``setup(model, total_steps)``: wrap the model, build optimizer and schedule.
- ``model`` (what forward runs) and ``module`` (the bare model, for export and evaluation).
- ``accumulating(boundary)``: context for a micro-batch; gradients sync only at a boundary.
- ``backward(loss)``, ``step(boundary) -> grad_norm or None``, ``lr()``.
- ``save(directory, rank)`` / ``load(directory)``: weights, optimizer and schedule state (DDP:
  safetensors + JSON from rank 0; DeepSpeed: every rank's shard); ``full_weights()``: a context in
  which ``module`` holds every weight, for export.
- ``snapshot()`` / ``restore(state)``: a CPU copy of the weights (best-epoch restore).
- ``refresh()``: the set of trainable parameters changed (gradual unfreezing): re-wrap.
- ``master_weights()``: this rank's share of the fp32 weights the optimizer steps, as live flat
  views with their offsets in the whole parameters (changing them before ``step`` changes the
  model: the L2-SP/EWC proximal step).
- ``partitioned``: True when parameters are partitioned across ranks (ZeRO-3): every forward is a
  collective that gathers them, so all ranks must run the same number of forwards, in evaluation
  too; outside a forward a rank holds only its partition of each parameter and gradient, which
  ``local_grads()`` reads (after ``backward``); ``zero_grad()`` drops accumulated gradients.
- ``check(recipe) -> [(dotted field, message)]``: recipe problems only this backend has, found
  at validation time, before anything reaches Ray.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from raytune_ft.schema import Recipe

BACKENDS: dict[str, type["Backend"]] = {}


class Backend(Protocol):
    name: ClassVar[str]
    partitioned: bool

    @staticmethod
    def check(recipe: Recipe) -> list[tuple[str, str]]: ...
    def __init__(self, recipe: Recipe): ...


def register(cls):
    """Class decorator: make a backend available to recipes as ``train.backend: <cls.name>``."""
    BACKENDS[cls.name] = cls
    return cls


def ray_world_size() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


from raytune_ft.backends import ddp, deepspeed  # noqa: E402,F401  (registers the built-in backends; deepspeed itself is imported on use)
