"""Ray Train's ``TorchConfig`` from a module that does not import torch.

A run's Train controller unpickles its backend config, and the backend instances its callbacks
made from it on the driver, before it starts anything; ``ray.train.torch.config``, where
``TorchConfig`` and its backend live, imports torch at the top: ~2 s of a core at the head of
every run's start-up, before the first worker was asked for. With these classes the controller
imports torch's backend when it first calls it, once the worker group is up, while the workers
import torch themselves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

from ray.train.backend import Backend, BackendConfig

from raytune_ft import ray_compat


class DeferredTorchBackend(Backend):
    """Ray Train's torch.distributed backend (the process group's set-up and teardown), imported
    at its first call."""

    share_cuda_visible_devices = True  # as the torch backend: each worker sees every GPU of its node

    @functools.cached_property
    def torch_backend(self) -> Backend:
        return ray_compat.torch_backend()()

    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        self.torch_backend.on_start(worker_group, backend_config)

    def on_training_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        self.torch_backend.on_training_start(worker_group, backend_config)

    def on_shutdown(self, worker_group: Any, backend_config: BackendConfig) -> None:
        self.torch_backend.on_shutdown(worker_group, backend_config)


@dataclass
class DeferredTorchConfig(BackendConfig):
    """``TorchConfig``'s fields and behaviour (gloo, or NCCL on GPUs, as ``TorchTrainer`` sets)."""

    backend: Optional[str] = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type:
        return DeferredTorchBackend

    @property
    def train_func_context(self):
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self) -> Any:
        return ray_compat.torch_framework()
