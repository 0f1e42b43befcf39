"""Run by test_deepspeed.py in a process of its own (a one-rank gloo group, real DeepSpeed): two
fp32 ZeRO-3 engines from the same seed, the second with ``share_master_partitions``; prints
whether each one's master partitions are its parameter partitions, and whether both hold the same
weights after 3 AdamW steps."""

import json
import os
import socket

import torch
import torch.distributed as dist

from raytune_ft.backends.deepspeed import share_master_partitions, use_cpu_accelerator

with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
use_cpu_accelerator()
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed  # noqa: E402  (after the accelerator is chosen)


def engine(share: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
              "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    if share:
        share_master_partitions(engine.optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 16, generator=generator), torch.randint(0, 2, (4,), generator=generator)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
    flat = engine.optimizer
    shared = [w.data_ptr() == m.data_ptr() for w, m in zip(flat.fp16_partitioned_groups_flat, flat.fp32_partitioned_groups_flat)]
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        weights = torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])
    return shared, weights


plain, plain_weights = engine(False)
shared, shared_weights = engine(True)
print(json.dumps({"plain": plain, "shared": shared, "equal": torch.equal(plain_weights, shared_weights),
                  "moved": (plain_weights - shared_weights).abs().max().item()}))
