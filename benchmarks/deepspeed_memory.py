"""Per-worker memory and throughput: DDP vs DeepSpeed ZeRO-1/2/3 and ZeRO-3 + CPU offload.

A ~110M-parameter BERT (``BertConfig()`` defaults, built from scratch: no downloads), 2 Ray Train
workers, each configuration a fresh TorchTrainer run through the project's own backends, side by
side in one run. Per worker it measures:

- model-state bytes: every tensor the model and optimizer hold on that rank (parameters or their
  ZeRO-3 partition, gradients, fp32 master copies, optimizer moments, DeepSpeed's flat and
  bucket buffers), found by walking those objects and counting each storage once. DDP's gradient
  buckets live inside its C++ reducer and are not reachable, so DDP's figure is an undercount by
  one gradient copy: the ZeRO / DDP ratios are conservative.
- peak RSS of the worker process (everything: model states, activations, Ray, libraries).
- DeepSpeed's own estimate of per-device model-state memory for the same parameter count
  (``estimate_zero2/3_model_states_mem_needs``; it assumes fp16/bf16 mixed precision on GPU, so it
  is a reference point, not the same quantity as the fp32 CPU measurement).
- training samples/s over the timed steps, and its ratio to DDP.

Run: ``make bench-deepspeed`` (writes ``benchmarks/results/deepspeed_memory.json`` and prints the
markdown table). On CPU, "offload" moves nothing (parameters already live in host memory); it is
measured to show what it costs, and matters on GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {
    "DDP": ("ddp", {}),
    "ZeRO-1": ("deepspeed", {"zero_stage": 1}),
    "ZeRO-2": ("deepspeed", {"zero_stage": 2}),
    "ZeRO-3": ("deepspeed", {"zero_stage": 3}),
    "ZeRO-3 + offload": ("deepspeed", {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}),
}
MiB = 2**20


def held_bytes(roots) -> int:
    """Bytes of every distinct tensor storage reachable from ``roots`` through containers, tensor
    attributes (ZeRO-3's ``ds_tensor``), ``.grad`` and optimizer / DeepSpeed objects."""
    storages: dict[int, int] = {}
    seen: dict[int, object] = {}  # holds what it has seen, so no id is freed and reused mid-walk
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, torch.nn.Module):
            continue
        seen[id(obj)] = obj
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":  # DeepSpeed keeps shape-only meta tensors: no memory
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            stack.extend(value for value in (obj.grad if obj.is_leaf else None, *vars(obj).values()) if value is not None)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif type(obj).__module__.startswith(("deepspeed.runtime", "torch.optim")) and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def deepspeed_estimate(name: str, params: int, largest_layer: int, workers: int) -> int | None:
    """DeepSpeed's estimate of per-device model-state memory (mixed precision on GPU)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if name == "ZeRO-2":
        return estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=workers, cpu_offload=False)[1]
    if name.startswith("ZeRO-3"):
        offload = name.endswith("offload")
        return estimate_zero3_model_states_mem_needs(
            params, largest_layer, num_gpus_per_node=workers, cpu_offload=offload, cpu_offload_params=offload, zero_init=False
        )[1]
    return None


def bench_worker(config: dict) -> None:
    """One configuration on one worker: set up the backend, train, measure, gather to rank 0."""
    import ray.train
    import torch.distributed as dist
    from transformers import BertConfig, BertForSequenceClassification

    from raytune_ft.backends import BACKENDS

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2, num_hidden_layers=config["layers"]))
    params = sum(p.numel() for p in model.parameters())
    largest_layer = max(p.numel() for p in model.parameters())
    recipe = config["recipe"]
    backend = BACKENDS[recipe.train.backend](recipe)
    backend.setup(model, total_steps=config["warmup"] + config["steps"] + 1)

    generator = torch.Generator().manual_seed(ray.train.get_context().get_world_rank())
    batch_size, length = recipe["train"]["batch_size"], config["seq_len"]
    batch = {
        "input_ids": torch.randint(1000, 30000, (batch_size, length), generator=generator),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.int64),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }

    def train_step(measure: bool = False) -> int | None:
        """One optimizer step; with ``measure``, the model-state bytes held between backward and
        step, when gradients and optimizer state are both alive."""
        with backend.accumulating(True), backend.autocast():
            loss = backend.model(**batch).loss
        backend.backward(loss)
        held = held_bytes([list(backend.module.parameters()), getattr(backend, "optimizer", None),
                           getattr(backend.model, "optimizer", None)]) if measure else None
        backend.step(True)
        return held

    for _ in range(config["warmup"]):
        train_step()
    started = time.perf_counter()
    for _ in range(config["steps"]):
        train_step()
    elapsed = time.perf_counter() - started
    mine = {
        "model_state_bytes": train_step(measure=True),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "samples_per_s": batch_size * config["steps"] / elapsed,
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    result = {"ranks": everyone, "params": params, "largest_layer": largest_layer}
    with tempfile.TemporaryDirectory() as directory:  # Ray Train V2 keeps metrics with checkpoints only
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            Path(directory, "result.json").write_text(json.dumps(result))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(result, checkpoint=checkpoint)


def run_config(name: str, precision: str, args) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytune_ft.recipe import validate_recipe

    backend, options = CONFIGS[name]
    recipe = validate_recipe(dict(
        name="bench", task={"type": "text_classification"}, model={"path": "scratch"},
        data={"train": "synthetic", "columns": {"text": "text", "label": "label"}},
        train={"backend": backend, "batch_size": args.batch_size, "schedule": "constant", "precision": precision},
        scaling={"workers": args.workers}, deepspeed=options,
    ))
    trainer = TorchTrainer(
        bench_worker,
        train_loop_config={"recipe": recipe, "layers": args.layers, "warmup": args.warmup, "steps": args.steps, "seq_len": args.seq_len},
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers),
        run_config=ray.train.RunConfig(name=f"bench_{name.replace(' ', '')}_{precision}", storage_path=str(Path(args.storage).resolve())),
    )
    with trainer.fit().checkpoint.as_directory() as directory:
        metrics = json.loads(Path(directory, "result.json").read_text())
    ranks = metrics["ranks"]
    return {
        "name": name, "precision": precision, "params": metrics["params"],
        "model_state_bytes": max(rank["model_state_bytes"] for rank in ranks),
        "peak_rss_bytes": max(rank["peak_rss_bytes"] for rank in ranks),
        "samples_per_s": sum(rank["samples_per_s"] for rank in ranks),
        "deepspeed_estimate_bytes": deepspeed_estimate(name, metrics["params"], metrics["largest_layer"], args.workers),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| precision | backend | model states / worker | vs DDP | peak RSS / worker | vs DDP | DeepSpeed estimate (GPU, mixed precision) | samples/s | vs DDP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ddp = next(r for r in rows if r["name"] == "DDP" and r["precision"] == row["precision"])
        estimate = f"{row['deepspeed_estimate_bytes'] / MiB:,.0f} MiB" if row["deepspeed_estimate_bytes"] else "-"
        lines.append(
            f"| {row['precision']} | {row['name']} | {row['model_state_bytes'] / MiB:,.0f} MiB | {row['model_state_bytes'] / ddp['model_state_bytes']:.2f}x "
            f"| {row['peak_rss_bytes'] / MiB:,.0f} MiB | {row['peak_rss_bytes'] / ddp['peak_rss_bytes']:.2f}x | {estimate} "
            f"| {row['samples_per_s']:.2f} | {row['samples_per_s'] / ddp['samples_per_s']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    import ray

    from raytune_ft.train.ray_start import QUIET_RAY, start_local_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12, help="BERT-base layers: 12 gives 109M parameters")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16", help="train.precision values, comma-separated")
    parser.add_argument("--storage", default="runs/bench_deepspeed")
    parser.add_argument("--output", default="benchmarks/results/deepspeed_memory.json")
    args = parser.parse_args()

    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    start_local_ray(num_cpus=args.workers + 1, logging_level="WARNING")  # the embedded Ray a run starts (its worker environment)
    rows = [run_config(name, precision, args) for precision in args.precisions.split(",") for name in CONFIGS]
    ray.shutdown()

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\n{rows[0]['params'] / 1e6:.1f}M parameters, {args.workers} workers, batch {args.batch_size} x {args.seq_len} tokens, CPU\n")
    print(table(rows))


if __name__ == "__main__":
    main()
