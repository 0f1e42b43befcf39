"""The DDP backend: PyTorch DistributedDataParallel on the process group Ray Train sets up."""

from __future__ import annotations

import contextlib

import torch

from raytune_ft.backends import ray_world_size, register
from raytune_ft.backends.optim import build_optimizer, build_scheduler, param_groups, scheduled_lr
from raytune_ft.checkpoint import load_state, save_state
from raytune_ft.schema import Recipe


@register
class DDPBackend:
    """PyTorch DistributedDataParallel (gloo on CPU, nccl on GPU) via Ray Train's process group."""

    name = "ddp"
    partitioned = False

    @staticmethod
    def check(recipe: Recipe) -> list[tuple[str, str]]:
        if recipe.model.dtype == "fp16":
            return [("model.dtype", "fp16 weights need fp32 master weights to step; keep the weights fp32 and train with "
                                    "train.precision fp16 (autocast with loss scaling), or use bf16")]
        return []

    def __init__(self, recipe: Recipe):
        self.train = recipe.train
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.train.precision)
        self.scaler = None  # fp16's loss scaling, built on the worker's device

    def model_building(self):
        """Context in which the task builds the model: nothing to arrange, every worker holds it whole."""
        return contextlib.nullcontext()

    def setup(self, model: torch.nn.Module, total_steps: int) -> None:
        import ray.train.torch

        self.device = ray.train.torch.get_device()
        self.module = model.to(self.device)
        self.refresh()
        self.optimizer = build_optimizer(param_groups(self.module, self.train), self.train)
        self.scheduler = build_scheduler(self.optimizer, self.train, total_steps)
        if self.train.precision == "fp16":
            # fp16's narrow range underflows small gradients: scale the loss up, and the gradients
            # back down before clipping; a step whose gradients overflowed is skipped.
            self.scaler = torch.amp.GradScaler(self.device.type)

    def refresh(self) -> None:
        """(Re-)wrap in DDP, which syncs exactly the parameters trainable at wrapping time.
        find_unused_parameters stays off (it costs a graph walk every step); frozen parameters
        do not count as unused."""
        if ray_world_size() > 1:
            # gradient_as_bucket_view: the gradients live in the all-reduce buckets themselves,
            # not in a second copy beside them (one gradient's worth of memory per worker).
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None, gradient_as_bucket_view=True,
            )
        else:
            self.model = self.module

    def accumulating(self, boundary: bool):
        """Skip DDP's gradient all-reduce on micro-batches that do not end an accumulation."""
        if boundary or self.model is self.module:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.train.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, boundary: bool) -> float | None:
        if not boundary:
            return None
        norm = None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.train.clip_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.requires_grad], self.train.clip_grad_norm
            ))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def master_weights(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Every parameter, flat, with its offset in the whole (0): the optimizer steps the
        parameters themselves, and each worker holds them all (frozen ones too, which gradual
        unfreezing may train later)."""
        return {name: (p.detach().view(-1), 0) for name, p in self.module.named_parameters()}

    def lr(self) -> float:
        return scheduled_lr(self.scheduler, self.train)

    def save(self, directory: str, rank: int) -> None:
        from safetensors.torch import save_model

        if rank == 0:  # DDP replicas are identical: one copy is the whole state
            save_model(self.module, f"{directory}/weights.safetensors")
            save_state({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler else None}, directory, "optimizer")

    def load(self, directory: str) -> None:
        from safetensors.torch import load_model

        load_model(self.module, f"{directory}/weights.safetensors", strict=True, device=str(self.device))
        state = load_state(directory, "optimizer")
        from_recipe = [(group["initial_lr"], group["weight_decay"]) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # State comes from the checkpoint, hyperparameters from the recipe: a PBT trial continues
        # another trial's run with its own lr and weight decay (a plain resume sets the same values).
        self.scheduler.base_lrs = [lr for lr, _ in from_recipe]
        for group, (lr, decay), multiplier in zip(self.optimizer.param_groups, from_recipe, self.scheduler.lr_lambdas):
            group.update(initial_lr=lr, weight_decay=decay, lr=lr * multiplier(self.scheduler.last_epoch))

    def full_weights(self):
        """Context in which ``module`` holds the full weights on rank 0 (replicas already do)."""
        return contextlib.nullcontext()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().to("cpu", copy=True) for key, value in self.module.state_dict().items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
