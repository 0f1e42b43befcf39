"""THE training loop: one function every task, strategy and backend runs through.

Runs on every Ray Train worker. Everything it needs arrives in ``config`` (the validated recipe as
a dict, the label set and the step plan); nothing is captured from the driver.

Per epoch: stream the worker's train shard, accumulate gradients over ``grad_accum`` micro-batches,
step; then evaluate the validation shard on every rank, reduce the metric statistics across ranks,
decide early stopping (the same decision everywhere, since every rank sees the reduced numbers),
and report a checkpoint. Checkpoints hold everything needed to continue: weights, optimizer and
schedule state, and ``trainer_state.json`` (counters, history, early-stopping state). A resumed
run restarts the interrupted epoch with the data order it would have had.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn

from raytune_ft.train import WORKER_NICENESS

SCALAR_TYPES = (int, float)


def quiet_worker_logs() -> None:
    """Our progress lines are the live view; per-report INFO lines and load reports are noise."""
    import logging

    import transformers

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # The driver turns Ray Data's progress bars off (init_ray); its hint to turn them on is noise.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    try:  # Train V2 logs every report at INFO through a logger named by its file path
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_at_niceness(niceness: str | None) -> None:
    """Set every thread of this worker process to ``niceness`` (Linux; raising a priority needs
    CAP_SYS_NICE or a nice limit that allows it): without the permission, the worker runs as Ray
    started it. Threads started later inherit it from the thread that starts them."""
    if niceness is None:
        return
    try:
        for thread in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(thread), int(niceness))
    except (OSError, ValueError):
        pass


class Collate(NumpyBatchCollateFn):
    """Ray Data collate callable wrapping the task's ``collate`` (numpy batch -> tensors)."""

    def __init__(self, task):
        self.task = task

    def __call__(self, batch):
        return self.task.collate(batch)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def average_running_statistics(module: torch.nn.Module) -> None:
    """Batch-norm running statistics are each rank's own (DDP sends rank 0's only at the next
    training forward, DeepSpeed never): average them, so that every rank evaluates, and rank 0
    exports, the same model."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    stats = [buffer for norm in norms for buffer in (norm.running_mean, norm.running_var)]
    if stats:
        flat = all_reduce_sum(torch.cat([buffer.detach().double().flatten() for buffer in stats])) / dist.get_world_size()
        for buffer, values in zip(stats, flat.split([buffer.numel() for buffer in stats])):
            buffer.copy_(values.view_as(buffer))


def in_lockstep(batches, collective_forward: bool):
    """Yield ``(batch, counts)``. Evaluation shards differ in length by design (one may even be
    empty); when every forward is a collective (ZeRO-3 gathers parameters), a rank whose shard has
    ended keeps running a stand-in batch, uncounted, until every rank is done, so no rank waits on
    a forward that never comes. A rank with no batch at all gets its stand-in from another rank.
    """
    if not collective_forward:
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


def evaluate(task, module, shard, batch_size: int, backend) -> dict[str, Any]:
    """Sharded evaluation: every rank scores its shard; the metric statistics are summed."""
    if shard is None:
        return {}
    metrics = task.new_metrics()
    was_training = module.training
    module.eval()
    batches = shard.iter_torch_batches(batch_size=batch_size, collate_fn=Collate(task))
    with torch.no_grad(), backend.autocast():
        for batch, counts in in_lockstep(batches, backend.collective_forward):
            batch = {key: value.to(backend.device) for key, value in batch.items()}
            _, outputs = task.forward(module, batch)
            if counts:
                metrics.update(outputs, batch)
    module.train(was_training)
    return metrics.compute(all_reduce_sum(metrics.state()))


def scalars(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}/{key}": value for key, value in metrics.items() if isinstance(value, SCALAR_TYPES)}


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


BEST_WEIGHTS = "best_weights.safetensors"


WISE_ANCHOR = "wise_ft_anchor.safetensors"


def report(metrics: dict[str, Any], state: dict[str, Any], backend, task, strategy, rank: int, export: bool,
           best_weights=None, wise_anchor=None) -> None:
    """Save a checkpoint on the ranks that hold state, then report (a barrier over all ranks).

    While early stopping waits for an improvement, the best weights so far travel with the
    checkpoint, so a resumed run can still restore them."""
    import ray.train
    from safetensors.torch import save_file

    from raytune_ft.tasks import export_pretrained

    directory = tempfile.mkdtemp(prefix="raytune_ft_ckpt_")
    backend.save(directory, rank)
    if best_weights is not None and state["best_epoch"] != state["epoch"] and rank == 0:
        save_file(best_weights, os.path.join(directory, BEST_WEIGHTS))
    if wise_anchor is not None and not export and rank == 0:
        save_file(wise_anchor, os.path.join(directory, WISE_ANCHOR))
    if export:
        with backend.full_weights():
            if rank == 0:
                export_pretrained(task, strategy.export(backend.module), os.path.join(directory, "model"))
    if rank == 0:
        with open(os.path.join(directory, "trainer_state.json"), "w") as f:
            json.dump(state, f)
    checkpoint = ray.train.Checkpoint.from_directory(directory) if os.listdir(directory) else None
    name = "final" if export else f"epoch_{state['epoch']:04d}"
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{name}")
    shutil.rmtree(directory, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from raytune_ft.retention.training import (
        Replay, body_trains, build_references, build_regularizer, wise_ft_anchor, wise_ft_sweep,
    )
    from raytune_ft.strategies import build_strategy
    from raytune_ft.tasks import build_task
    from raytune_ft.train.optim import apply_layer_lr_decay
    from raytune_ft.train.backends import BACKENDS
    from raytune_ft.train.distill import Teacher, numbers
    from raytune_ft.train.faults import maybe_fail

    run_at_niceness(os.environ.get(WORKER_NICENESS))
    quiet_worker_logs()
    recipe, plan = config["recipe"], config["plan"]
    train = recipe["train"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    seed_everything(train["seed"])

    task = build_task(recipe, config["labels"])
    strategy = build_strategy(recipe)
    model = strategy.prepare(task.build_model(), task)
    heads = task.head_names(model)
    if recipe["strategy"].get("layer_lr_decay"):
        apply_layer_lr_decay(model, heads, recipe["strategy"]["layer_lr_decay"])
    backend = BACKENDS[train["backend"]](recipe)
    backend.setup(model, plan["total_steps"])
    references = build_references(config, recipe, task)
    if references:
        references.score_base(backend.module, backend.device)
        if rank == 0:
            print("[raytune-ft] reference before training: " + ", ".join(f"{k} {v:.4f}" for k, v in references.before().items()), flush=True)
    penalty = build_regularizer(config, recipe, backend, references, heads)
    replay = Replay(recipe, references, backend.device) if recipe.get("replay") else None
    teacher = Teacher(recipe, config["labels"], backend.device) if recipe.get("distill") else None
    wise_anchor = None

    state: dict[str, Any] = {
        "epoch": 0, "step": 0, "history": [], "best": None, "best_epoch": None, "bad_evals": 0,
        "train_time_s": 0.0, "data_wait_s": 0.0, "train_samples": 0, "eval_time_s": 0.0, "stopped_early": False,
        "resumed_at": [],
    }
    best_weights = None
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    if checkpoint:
        from safetensors.torch import load_file

        with checkpoint.as_directory() as directory:
            backend.load(directory)
            with open(os.path.join(directory, "trainer_state.json")) as f:
                state = json.load(f)
            if os.path.exists(os.path.join(directory, BEST_WEIGHTS)):
                best_weights = load_file(os.path.join(directory, BEST_WEIGHTS))
            if os.path.exists(os.path.join(directory, WISE_ANCHOR)):
                wise_anchor = load_file(os.path.join(directory, WISE_ANCHOR))
        if state["best_epoch"] is not None and state["best_epoch"] == state["epoch"]:
            best_weights = backend.snapshot()
        state.setdefault("resumed_at", []).append({"epoch": state["epoch"], "step": state["step"]})
        if rank == 0:
            print(f"[raytune-ft] resumed at epoch {state['epoch']}, step {state['step']}", flush=True)

    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "validation", "test") if name in config["splits"]}
    eval_batch = train["eval_batch_size"] or 2 * train["batch_size"]
    stopping = train.get("early_stopping")
    micro_per_epoch, accum = plan["micro_batches_per_epoch"], train["grad_accum"]
    done = state["step"] >= plan["total_steps"] or state["stopped_early"]

    while not done:
        epoch = state["epoch"] + 1
        # Reseed per (seed, epoch, rank): dropout masks then do not depend on how many epochs this
        # process has run, so a resumed run continues exactly as an uninterrupted one would.
        epoch_seed = train["seed"] * 1000 + epoch * 16 + rank
        seed_everything(epoch_seed)
        if strategy.on_epoch_start(backend.module, epoch):
            backend.refresh()
        if recipe.get("wise_ft") and wise_anchor is None and body_trains(backend.module, heads):
            wise_anchor = wise_ft_anchor(backend.snapshot(), heads, head_trained_before=epoch > 1)
        if replay:
            replay.start_epoch(epoch_seed)
        backend.model.train()
        loss_sum, wait, samples = torch.zeros(2, dtype=torch.float64), 0.0, 0
        started = time.perf_counter()
        batches = iter(shards["train"].iter_torch_batches(
            batch_size=train["batch_size"], collate_fn=Collate(task),
            local_shuffle_buffer_size=recipe["data"]["shuffle_buffer"] or None,
            local_shuffle_seed=train["seed"] * 1000 + epoch,
        ))
        for index in range(micro_per_epoch):
            fetch = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - fetch
            if batch is None:
                raise RuntimeError(f"train shard ended after {index} of {micro_per_epoch} planned batches")
            batch = {key: value.to(backend.device, non_blocking=True) for key, value in batch.items()}
            boundary = (index + 1) % accum == 0 or index + 1 == micro_per_epoch
            with backend.accumulating(boundary), backend.autocast():
                loss, outputs = task.forward(backend.model, batch)
                objective = loss
                if teacher:  # (1 - alpha) * hard-label loss + alpha * T^2 * KL(teacher || student)
                    objective = (1 - teacher.alpha) * objective + teacher.loss(task, outputs, batch)
                if replay:
                    objective = objective + replay.loss(task, backend.model, index)
                if penalty and boundary:  # once per optimizer step; backends divide by grad_accum
                    objective = objective + penalty.penalty(backend.module) * accum
            backend.backward(objective)
            backend.step(boundary)
            size = len(batch["labels"]) if "labels" in batch else len(next(iter(batch.values())))
            loss_sum += torch.tensor([float(loss.detach()) * size, size], dtype=torch.float64)
            samples += size
            if boundary:
                state["step"] += 1
                maybe_fail(config, state["step"], epoch, rank)
                if rank == 0 and (state["step"] % train["log_every"] == 0 or index + 1 == micro_per_epoch):
                    now = time.perf_counter()
                    print(
                        f"[raytune-ft] epoch {epoch} step {state['step']}/{plan['total_steps']} "
                        f"loss {loss_sum[0] / max(loss_sum[1], 1):.4f} lr {backend.lr():.2e} "
                        f"{samples * world / (now - started):.1f} samples/s data-wait {wait / (now - started):.0%}",
                        flush=True,
                    )
                if state["step"] >= plan["total_steps"]:
                    break
        elapsed = time.perf_counter() - started
        state["epoch"] = epoch
        state["train_time_s"] += elapsed
        state["data_wait_s"] += wait
        state["train_samples"] += samples * world

        eval_started = time.perf_counter()
        train_loss = all_reduce_sum(loss_sum)
        average_running_statistics(backend.module)
        validation = evaluate(task, backend.module, shards.get("validation"), eval_batch, backend)
        reference = references.evaluate(backend.module, backend.device) if references else {}
        state["eval_time_s"] += time.perf_counter() - eval_started
        record = {
            "epoch": epoch, "step": state["step"],
            "train/loss": float(train_loss[0] / train_loss[1].clamp(min=1)), "train/lr": backend.lr(),
            "train/samples_per_s": samples * world / elapsed, "train/data_wait_fraction": wait / elapsed,
            **(teacher.epoch_metrics() if teacher else {}), **scalars("eval", validation), **reference,
        }
        if "retention/min" in reference:
            state["worst_retention"] = min(state.get("worst_retention", 1.0), reference["retention/min"])
            state["ref_time_s"] = state.get("ref_time_s", 0.0) + reference["ref/time_s"]
        if stopping:
            value = record[stopping["metric"]]
            if improved(value, state["best"], stopping["mode"], stopping["min_delta"]):
                state.update(best=value, best_epoch=epoch, bad_evals=0)
                best_weights = backend.snapshot()
            else:
                state["bad_evals"] += 1
                state["stopped_early"] = state["bad_evals"] >= stopping["patience"]
        state["history"].append(record)
        done = state["step"] >= plan["total_steps"] or state["stopped_early"]
        if rank == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("eval/", "retention/min", "train/distill_kl")))
            print(f"[raytune-ft] epoch {epoch} done: train/loss {record['train/loss']:.4f}, {shown}", flush=True)
        report(record, state, backend, task, strategy, rank, export=False, best_weights=best_weights, wise_anchor=wise_anchor)
        maybe_fail(config, state["step"], epoch, rank, after_checkpoint=True)

    if best_weights is not None and state["best_epoch"] != state["epoch"]:
        backend.restore(best_weights)  # early stopping keeps the best evaluated weights
    if wise_anchor is not None:
        state["wise_ft"] = wise_ft_sweep(recipe["wise_ft"], wise_anchor, task, backend, shards.get("validation"), eval_batch, references)
        if rank == 0:
            print(f"[raytune-ft] WiSE-FT: alpha {state['wise_ft']['alpha']} chosen", flush=True)
    if references:
        state["ref_before"] = references.before()
        state["ref_final"] = references.evaluate(backend.module, backend.device)
    test = evaluate(task, backend.module, shards.get("test"), eval_batch, backend)
    state["test"] = test
    if teacher:  # the teacher on the same test shards: the student's score is exactly comparable
        state["teacher_test"] = numbers(evaluate(task, teacher.model, shards.get("test"), eval_batch, backend))
    state["final"] = True
    final = {"epoch": state["epoch"], "step": state["step"], **scalars("test", test)}
    report(final, state, backend, task, strategy, rank, export=True)
