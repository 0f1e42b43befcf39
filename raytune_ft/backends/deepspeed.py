"""DeepSpeed backend: ZeRO stages 0-3 and CPU offload behind the same interface as DDP.

``deepspeed.initialize`` runs inside the Ray Train worker and reuses the process group Ray Train
set up (gloo on CPU, with ``DS_ACCELERATOR=cpu``; nccl on GPU). The optimizer and learning-rate
schedule are the ones DDP uses (``optim.py``), handed to DeepSpeed, so a recipe trains the same
way on either backend; with CPU offload that means torch's AdamW on the CPU partitions rather than
DeepSpeed's compiled CPU Adam (``zero_force_ds_cpu_optimizer: false``), which needs no C++ build.

Checkpoints are DeepSpeed's own: every rank writes its shard into the same reported directory and
every rank loads its shard back. They are torch pickles, read here with ``weights_only=True`` and
only the few DeepSpeed classes they hold allowed (DeepSpeed itself would unpickle anything); and
only checkpoints this run wrote into its own run directory are ever loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import warnings
from typing import Any

import torch

from raytune_ft.backends import register
from raytune_ft.backends.optim import build_optimizer, build_scheduler, param_groups, scheduled_lr
from raytune_ft.schema import Recipe, dotted

CHECKPOINT_TAG = "deepspeed"
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 128 * 1024  # glibc mallopt's parameter and its value here
# DeepSpeed's default communication buckets (5e8 elements, 2 GB each in fp32) are sized for
# billion-parameter models and allocated up front; 2**23 elements (32 MiB in fp32) is the order of
# DDP's buckets. deepspeed.config may set other sizes.
BUCKET_ELEMENTS = 2**23
OWN_OPTIMIZER_KEYS = {
    "optimizer": "train.optimizer and train.lr",
    "scheduler": "train.schedule and train.warmup",
}


def checkpoint_classes() -> list[type]:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (ZeRO 1-3, fp16 loss scaling)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler, LossScaleProfile
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, LossScaleProfile, fragment_address]


def load_weights_only(path: str, map_location=None):
    """DeepSpeed's checkpoint-engine ``load``, without unpickling arbitrary objects."""
    with torch.serialization.safe_globals(checkpoint_classes()):
        return torch.load(path, map_location=map_location, weights_only=True)


def strategy_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """The trainable set cannot change after deepspeed.initialize (the optimizer's partitions are
    fixed then), so strategies that change it mid-run are refused. The L2-SP/EWC step acts on the
    fp32 master weights, which ZeRO-0's fp16 optimizer keeps out of reach."""
    problems = []
    if recipe.strategy.method in ("gradual", "lp_ft"):
        problems.append(("strategy.method", f"{recipe.strategy.method} changes what trains mid-run; with train.backend deepspeed use full, freeze, lora or head_only"))
    if recipe.regularizer and recipe.deepspeed.zero_stage == 0 and recipe.train.precision == "fp16":
        problems.append(("regularizer", "with deepspeed.zero_stage 0 and train.precision fp16 the master weights are out of its reach; "
                                        "use zero_stage 1-3 or bf16"))
    return problems


def recipe_settings(recipe: Recipe) -> dict[str, tuple[Any, str]]:
    """Every DeepSpeed config key the recipe decides: dotted key -> (value, the recipe field)."""
    train, options = recipe.train, recipe.deepspeed
    return {
        "train_micro_batch_size_per_gpu": (train.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (train.grad_accum, "train.grad_accum"),
        "train_batch_size": (
            train.batch_size * train.grad_accum * recipe.scaling.workers,
            "train.batch_size x train.grad_accum x scaling.workers",
        ),
        "gradient_clipping": (train.clip_grad_norm or 0.0, "train.clip_grad_norm"),
        "bf16.enabled": (train.precision == "bf16", "train.precision"),
        "fp16.enabled": (train.precision == "fp16", "train.precision"),
        "zero_optimization.stage": (options.zero_stage, "deepspeed.zero_stage"),
        "zero_optimization.offload_optimizer.device": (options.offload_optimizer, "deepspeed.offload_optimizer"),
        "zero_optimization.offload_param.device": (options.offload_params, "deepspeed.offload_params"),
    }


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``, nested dicts key by key."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed config: the recipe's settings, with ``deepspeed.config`` merged over them."""
    generated: dict[str, Any] = {
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW on CPU partitions; see the module docstring
        "zero_allow_untested_optimizer": True,  # SGD is as safe as AdamW under ZeRO (elementwise update)
        "steps_per_print": 10**9,  # our own progress lines are the live view
        "zero_optimization": {
            "reduce_bucket_size": BUCKET_ELEMENTS,
            "allgather_bucket_size": BUCKET_ELEMENTS,
            "stage3_prefetch_bucket_size": BUCKET_ELEMENTS,
            # ZeRO-3 keeps up to 1e9 gathered parameters alive by default (every parameter of a 1B
            # model: no saving at the peak); a bucket's worth is enough to overlap the next gather.
            "stage3_max_live_parameters": BUCKET_ELEMENTS,
            "stage3_max_reuse_distance": BUCKET_ELEMENTS,
            # ZeRO-3 steps its partition in sub-groups, copying each one's gradients into a new
            # flat tensor first: with the default 1e9 elements that copy is the whole gradient
            # partition, the peak of every step (fp32 0.5B on 2 workers: +0.5 GiB a worker).
            "sub_group_size": BUCKET_ELEMENTS,
        },
    }
    for key, (value, _) in recipe_settings(recipe).items():
        if value == "none":  # no offload: leave the offload section out entirely
            continue
        *parents, leaf = key.split(".")
        node = generated
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return merge(generated, recipe.deepspeed.config)


def use_cpu_accelerator() -> None:
    """DeepSpeed on the CPU. Its accelerator JIT-builds one small op (the shared-memory all-reduce):
    beside this Python environment, not in a cache shared by every environment (where a killed
    build's lock hangs all)."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # read once, when deepspeed is first imported
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def build_cpu_op() -> None:
    """Build that op now (`make install`), where runs look for it, so no run waits for it."""
    use_cpu_accelerator()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def prepare_worker() -> None:
    """This worker process, set for DeepSpeed (both calls are idempotent):

    - glibc's mmap threshold fixed at 128 KiB. glibc raises it after each large free and then
      serves large tensors from a heap it does not give back, so gathered ZeRO-3 parameters and
      optimizer temporaries stayed resident (fp32 0.25B on 2 workers: ZeRO-3's peak 5.2 -> 3.6
      GiB). DeepSpeed workers only: every large tensor then takes fresh pages, 16% of a DDP
      MiniLM step on CPU (benchmarks/MEASUREMENTS.md). A no-op without glibc.
    - DeepSpeed 0.19 calls the collectives torch 2.11 deprecates, and torch warns at every call,
      into the user's console: nothing a user can act on."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            category=FutureWarning)


def share_master_partitions(optimizer) -> None:
    """ZeRO-3 whose weights are already in the master dtype (fp32, no offload): the optimizer
    updates the parameter partitions themselves instead of a copy of them. DeepSpeed means to
    (``_create_fp32_partitions`` aliases them when dtype and device match) but compares a
    ``torch.device`` with a device-name string, never equal, and clones: 2 of the 10 bytes a
    parameter that fp32 ZeRO-3 holds per worker on 2 ranks (benchmarks/MEASUREMENTS.md). Its
    step already copies master to parameters in place, which aliased partitions make a no-op."""
    if getattr(optimizer, "offload_optimizer", True) or getattr(optimizer, "params_in_nvme_and_cpu", True):
        return
    groups = zip(getattr(optimizer, "fp16_partitioned_groups_flat", []), getattr(optimizer, "fp32_partitioned_groups_flat", []))
    for weights, master in groups:
        if weights is not None and master.data_ptr() != weights.data_ptr() and weights.dtype == master.dtype \
                and weights.device == master.device and weights.shape == master.shape:
            master.data = weights.data  # the optimizer's state is keyed by ``master``, which stays


@register
class DeepSpeedBackend:
    """DeepSpeed ZeRO (stages 0-3, optional CPU offload of optimizer state and parameters)."""

    name = "deepspeed"

    @staticmethod
    def check(recipe: Recipe) -> list[tuple[str, str]]:
        """Raw-config keys that contradict the recipe, and precision the hardware cannot run."""
        raw = recipe.deepspeed.config
        problems = [(f"deepspeed.config.{key}", f"set by {field}; the backend builds it like ddp does, remove it here")
                    for key, field in OWN_OPTIMIZER_KEYS.items() if key in raw]
        leaves = dotted(raw)
        for key, (value, field) in recipe_settings(recipe).items():
            if key in leaves and leaves[key] != value:
                problems.append((f"deepspeed.config.{key}", f"{leaves[key]!r} conflicts with {field} ({value!r}); set it there"))
        if recipe.model.dtype not in (None, recipe.train.precision):
            problems.append(("model.dtype", f"deepspeed keeps the weights in train.precision's dtype ({recipe.train.precision}); "
                                            f"set model.dtype to {recipe.train.precision} or leave it out"))
        if recipe.train.precision == "fp16" and not recipe.scaling.use_gpu:
            problems.append(("train.precision", "fp16 with deepspeed needs scaling.use_gpu: true; use bf16 or fp32 on CPU"))
        if recipe.tune and recipe.tune.scheduler == "pbt":
            problems.append(("tune.scheduler", "pbt restarts trials with changed hyperparameters, which the deepspeed "
                                               "backend's restored optimizer does not take yet; use ddp, or asha"))
        return problems + strategy_problems(recipe)

    def __init__(self, recipe: Recipe):
        self.train = recipe.train
        self.config = deepspeed_config(recipe)
        self.partitioned = self.config["zero_optimization"]["stage"] == 3

    @contextlib.contextmanager
    def model_building(self):
        """Context in which the task builds the model (the process prepared first: ``prepare_worker``).
        Under ZeRO-3, transformers' ``from_pretrained`` creates every parameter partitioned
        (``deepspeed.zero.Init``) and fills one gathered module at a time from rank 0's
        memory-mapped checkpoint, so no worker allocates the whole model; transformers asks for
        that through a global DeepSpeed config, set only while the model is built (a teacher
        built later must load whole)."""
        prepare_worker()
        if not self.partitioned:
            yield
            return
        import ray.train.torch

        if ray.train.torch.get_device().type != "cuda":
            use_cpu_accelerator()
        import deepspeed
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        # DeepSpeed's own communication layer, on the process group Ray Train set up: zero.Init
        # partitions over it (and the config's batch check reads its world size).
        deepspeed.init_distributed(dist_init_required=False)
        keep_alive = HfDeepSpeedConfig(self.config)  # transformers holds only a weak reference
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del keep_alive

    def setup(self, model: torch.nn.Module, total_steps: int) -> None:
        import ray.train.torch

        self.device = ray.train.torch.get_device()
        if self.device.type != "cuda":
            use_cpu_accelerator()
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        prepare_worker()  # again: a model may have been built without model_building
        optimizer = build_optimizer(param_groups(model, self.train), self.train)
        scheduler = build_scheduler(optimizer, self.train, total_steps)
        # DeepSpeed keeps the optimizer's param_group dicts, so the schedule built on them still
        # sets the lr it steps with; the engine steps the schedule once per optimizer step.
        self.model, _, _, self.scheduler = deepspeed.initialize(
            model=model.to(self.device), optimizer=optimizer, lr_scheduler=scheduler, config=self.config,
            dist_init_required=False,
        )
        self.module = self.model.module
        self.model.checkpoint_engine.load = load_weights_only
        if self.partitioned:
            share_master_partitions(self.model.optimizer)

    def accumulating(self, boundary: bool):
        """The loop decides the boundary (an epoch's last micro-batch ends an accumulation too)."""
        self.model.set_gradient_accumulation_boundary(boundary)
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()  # with bf16/fp16 the engine holds the weights in that dtype

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # divides by gradient_accumulation_steps, as DDP's backward does

    def step(self, boundary: bool) -> float | None:
        self.model.step()  # every micro-batch: the engine counts them and updates on the boundary
        if not boundary:
            return None
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return scheduled_lr(self.scheduler, self.train)

    def save(self, directory: str, rank: int) -> None:
        """Every rank writes its own shard files (rank-numbered names) into ``directory``."""
        self.model.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, directory: str) -> None:
        path, _ = self.model.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint in {directory}")

    def master_weights(self) -> dict[str, tuple[torch.Tensor, int]]:
        """This rank's share of the fp32 master weights that the optimizer steps and copies into
        the model after each step, as live flat views with their offset in the flattened whole
        parameter: ZeRO-3 partitions, ZeRO-1/2 fragments of the flat optimizer partition (none
        where the parameter lies in another rank's), the parameter itself where the optimizer
        steps it directly (ZeRO-0 in fp32)."""
        from deepspeed.utils import safe_get_local_fp32_param

        shares = {}
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if self.partitioned:
                shares[name] = (safe_get_local_fp32_param(p).detach().view(-1), torch.distributed.get_rank() * p.ds_tensor.ds_numel)
            elif getattr(p, "_hp_mapping", None) is not None:
                shares[name] = (p._hp_mapping.hp_fragment.detach().view(-1), p._hp_mapping.lp_fragment_address.start)
            elif not hasattr(p, "_hp_mapping"):
                shares[name] = (p.detach().view(-1), 0)
        return shares

    def local_grads(self) -> dict[str, torch.Tensor]:
        """ZeRO-3, after a boundary ``backward``: this rank's partition of every trainable gradient
        (averaged over ranks), as fp32 copies."""
        from deepspeed.utils import safe_get_local_grad

        return {name: safe_get_local_grad(p).detach().float().clone() for name, p in self.module.named_parameters() if p.requires_grad}

    def zero_grad(self) -> None:
        self.model.optimizer.zero_grad()

    def full_weights(self):
        """Under ZeRO-3, gather every parameter on every rank (a collective: all ranks enter)."""
        if not self.partitioned:
            return contextlib.nullcontext()  # stages 0-2 keep a full copy of the weights everywhere
        return self.gathered(modifier_rank=None)

    def gathered(self, modifier_rank: int | None):
        """ZeRO-3: every parameter gathered, re-partitioned on leaving (from ``modifier_rank``'s copy).
        A forward ends with the parameters its recorded trace needs next already being fetched;
        an evaluation's forward has no backward to use them, and DeepSpeed refuses to
        re-partition a parameter still in flight: all of them are released first."""
        import deepspeed

        self.model.empty_partition_cache()
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=modifier_rank)

    def snapshot(self) -> dict[str, torch.Tensor]:
        with self.full_weights():
            return {key: value.detach().to("cpu", copy=True) for key, value in self.module.state_dict().items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights into the module, for evaluation and export: training does not continue
        from here (an fp32 ZeRO-3 optimizer's masters are the partitions loaded into; any other
        optimizer's master copy is left as it was)."""
        if not self.partitioned:
            self.module.load_state_dict(state)
            return
        # Every rank loads the same snapshot; rank 0's copy is re-partitioned on leaving.
        with self.gathered(modifier_rank=0):
            self.module.load_state_dict(state)
