"""The reference for the overhead benchmarks: a plain torchrun DDP script, no Ray.

It reads the same recipe as ``raytune-ft run`` and does the same work: the same model and dtype,
tokenizer, padding, rows (the train split less the validation holdout, ``data.max_rows`` of
them), batch size, optimizer groups, schedule, clipping and precision. Data is pre-tokenised in
memory (the cheapest possible input pipeline). With ``scaling.use_gpu``: NCCL, one GPU per process,
batches copied from pinned memory like the loop's. Like the DDP backend, one process trains the
bare model (DDP's all-reduce over a world of one would be work the other side does not do).
Prints one JSON line: samples/s per epoch, training seconds, steps, the rows, the parameter count
and attention kernel. With ``train.max_steps`` it stops there and, with ``--export DIR``, does the rest of
what a short run does too: scores the validation rows after every epoch, the test rows at the end,
and exports the model (rank 0), so the start-up benchmark compares the same work.

Run: torchrun --nproc_per_node N benchmarks/plain_ddp.py RECIPE [--set field=value ...] [--export DIR]
"""

import argparse
import contextlib
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from raytune_ft import load_recipe
from raytune_ft.backends.optim import build_optimizer, build_scheduler, param_groups
from raytune_ft.data.tabular import SelectRows
from raytune_ft.tasks import TORCH_DTYPES
from raytune_ft.train.planning import plan_run


def split_rows(recipe, planned, name: str = "train") -> dict[str, np.ndarray]:
    """A split's rows by task role, in file order: the holdout and ``max_rows`` as Ray Data applies them."""
    split = next(split for split in planned.splits if split.name == name)
    columns = list(dict.fromkeys(recipe.data.columns.values()))
    table = pq.read_table(split.path, columns=columns).to_pydict()
    select = SelectRows(recipe.data.columns, planned.labels, split.holdout, recipe.data.validation_fraction, recipe.data.other_label)
    rows = select({column: np.array(values) for column, values in table.items()})
    return {role: values[: recipe.data.max_rows] for role, values in rows.items()}


def score(task, model, rows: dict[str, np.ndarray], batch_size: int, device: torch.device) -> None:
    """Every rank scores its share of ``rows``; the metric states are summed over the ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    encoded = task.preprocess(rows)
    count = len(next(iter(encoded.values())))
    bare = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    metrics = task.new_metrics()
    bare.eval()
    with torch.no_grad():
        for start in range(rank * batch_size, count, world * batch_size):
            batch = task.collate({key: values[start : start + batch_size] for key, values in encoded.items()})
            batch = {key: value.to(device) for key, value in batch.items()}
            metrics.update(task.forward(bare, batch)[1], batch)
    dist.all_reduce(metrics.state())
    bare.train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[], help="a recipe override, as raytune-ft run takes it")
    parser.add_argument("--export", default=None, help="score the validation rows every epoch, then the test rows, and export the model here (rank 0)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    train = recipe.train
    if train.grad_accum != 1 or train.precision == "fp16":
        raise SystemExit("plain_ddp.py: train.grad_accum 1 and fp32 or bf16 only")
    gpu = recipe.scaling.use_gpu
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(recipe.scaling.resources_per_worker.get("CPU", 1))))  # as the loop does
    torch.manual_seed(train.seed)

    planned = plan_run(recipe)
    task = planned.task
    rows = split_rows(recipe, planned)
    encoded = task.preprocess(rows)
    count = len(next(iter(rows.values())))
    per_worker = count // world
    mine = slice(rank * per_worker, (rank + 1) * per_worker)
    encoded = {key: values[mine] for key, values in encoded.items()}

    model = task.build_model()
    if recipe.model.dtype:
        model.to(TORCH_DTYPES[recipe.model.dtype])
    model.to(device).train()  # from_pretrained returns eval mode; fine-tuning trains with the model's dropout
    params = sum(p.numel() for p in model.parameters())
    attention = getattr(model.config, "_attn_implementation", None)
    optimizer = build_optimizer(param_groups(model, train), train)
    steps_per_epoch = -(-per_worker // train.batch_size)
    epochs = train.epochs or -(-train.max_steps // steps_per_epoch)
    scheduler = build_scheduler(optimizer, train, min(epochs * steps_per_epoch, train.max_steps or epochs * steps_per_epoch))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if gpu else None, gradient_as_bucket_view=True)
    autocast = {"bf16": torch.bfloat16}.get(train.precision)
    rates, steps, train_s = [], 0, 0.0
    eval_batch = train.eval_batch_size or 2 * train.batch_size  # the loop's
    validation = split_rows(recipe, planned, "validation") if args.export and any(split.name == "validation" for split in planned.splits) else None
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(per_worker)
        started = time.perf_counter()
        for start in range(0, per_worker, train.batch_size):
            index = order[start : start + train.batch_size]
            batch = task.collate({key: values[index] for key, values in encoded.items()})
            batch = {key: (value.pin_memory() if gpu else value).to(device, non_blocking=True) for key, value in batch.items()}
            with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                loss, _ = task.forward(model, batch)
            loss.backward()
            if train.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if steps == train.max_steps:
                break
        if gpu:
            torch.cuda.synchronize()  # the epoch ends when its last step has run, not when it was queued
        train_s += time.perf_counter() - started
        rates.append(per_worker * world / (time.perf_counter() - started))
        if validation is not None:  # as the loop does after every epoch
            score(task, model, validation, eval_batch, device)
        if steps == train.max_steps:
            break
    if args.export:  # what a run does after training: the test rows scored, the model exported
        score(task, model, split_rows(recipe, planned, "test"), eval_batch, device)
        if rank == 0:
            task.save_pretrained(model.module if world > 1 else model, args.export)
    if rank == 0:
        print(json.dumps({"samples_per_s_by_epoch": rates, "train_s": train_s, "steps": steps, "train_rows": count,
                          "params": params, "attention": attention}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
