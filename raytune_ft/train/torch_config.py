"""Ray Train's torch.distributed set-up without torch in the run's controller.

The controller unpickles the backend config and drives the process group's set-up and teardown
on the workers. Ray's own backend (``TorchConfig`` and ``_TorchBackend``) lives in
``ray.train.torch.config``, which imports torch at the top: ~1.5 s of a core and ~185 MB in every
run's controller, a process that never touches a tensor. This backend sends the workers the same
calls in the same order, naming Ray's functions; the workers resolve them, importing torch where
the loop needs it anyway. Devices: CPUs (gloo) and CUDA GPUs (NCCL), not Ray's TPU path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray.train.backend import Backend, BackendConfig

from raytune_ft import ray_compat

logger = logging.getLogger(__name__)


def set_master_address(address: str, port: int) -> None:
    """On a worker: where rank 0 listens (torch.distributed's ``env://`` initialisation)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)


class TorchDistributedBackend(Backend):
    """torch.distributed's process group over the worker group, as Ray's torch backend makes it:
    gloo on CPUs, NCCL on GPUs, rank 0's address and a free port of its node."""

    share_cuda_visible_devices = True  # as the torch backend: each worker sees every GPU of its node

    def on_start(self, worker_group: Any, backend_config: TorchDistributedConfig) -> None:
        backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        address, port = worker_group.execute_single(0, ray_compat.address_and_free_port)
        worker_group.execute(set_master_address, address=address, port=port)
        worker_group.execute(ray_compat.torch_worker_step, name="_set_torch_distributed_env_vars")  # LOCAL_RANK and the rest, before init
        ray.get([worker_group.execute_single_async(rank, ray_compat.torch_worker_step, name="_setup_torch_process_group", backend=backend,
                                                   world_rank=rank, world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group: Any, backend_config: TorchDistributedConfig) -> None:
        futures = worker_group.execute_async(ray_compat.torch_worker_step, name="_shutdown_torch", destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_compat.torch_shutdown_timeout_s()
        try:
            ray.get(futures, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            logger.warning("the workers' torch process group did not shut down within %d s", timeout_s)


@dataclass
class TorchDistributedConfig(BackendConfig):
    """What ``TorchTrainer`` is given in place of ``TorchConfig()``: the same process group."""

    backend: Optional[str] = None  # TorchTrainer sets it from the scaling config: gloo, or nccl with use_gpu
    timeout_s: int = 1800  # a collective that waits longer than this fails the run

    @property
    def backend_cls(self) -> type:
        return TorchDistributedBackend

    @property
    def train_func_context(self):  # entered on the workers, around the loop
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self) -> Any:
        return ray_compat.torch_framework()
