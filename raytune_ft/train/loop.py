"""THE training loop: one function every task, strategy, backend and add-on runs through.

Runs on every Ray Train worker. Everything it needs arrives in ``config["plan"]`` (a packed
``RunPlan``: the typed recipe, the label set, the step plan); nothing is captured from the driver.

Per epoch: stream the worker's train shard, accumulate gradients over ``grad_accum`` micro-batches,
step; then evaluate the validation shard on every rank, reduce the metric statistics across ranks,
decide early stopping (the same decision everywhere, since every rank sees the reduced numbers),
and report a checkpoint. Checkpoints hold everything needed to continue: weights, optimizer and
schedule state, the add-ons' files and ``trainer_state.json`` (counters, history, early-stopping
state). A resumed run restarts the interrupted epoch with the data order it would have had.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from raytune_ft import log, run_folder
from raytune_ft.addons import LoopContext, Step, build_addons
from raytune_ft.backends import BACKENDS
from raytune_ft.checkpoint import TRAINER_STATE
from raytune_ft.errors import Diverged
from raytune_ft.evaluation import Collate, all_reduce_max, all_reduce_sum, average_running_statistics, evaluate, scalars
from raytune_ft.strategies import build_strategy, scale_module_lr
from raytune_ft.tasks import TORCH_DTYPES, build_task, enable_gradient_checkpointing, export_pretrained
from raytune_ft.train.faults import maybe_fail
from raytune_ft.train.planning import RunPlan
from raytune_ft.train.ray_start import WORKER_NICENESS

logger = logging.getLogger(__name__)

BEST_WEIGHTS = "best_weights.safetensors"  # in checkpoints while early stopping waits for an improvement
PREFETCH_BATCHES = 4  # train batches prepared ahead of the step (Ray Data's default: 1); a few MB for the shipped recipes


def worker_logging(level: int) -> None:
    """Our messages at the driver's ``level`` (see raytune_ft.log); our progress lines are the
    live view, so Ray Train's per-report INFO lines and transformers' load reports are noise."""
    import transformers

    from raytune_ft.ray_compat import quiet_train_logs

    log.configure(level)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    quiet_train_logs()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's global seed holds 32 bits; an epoch's seed (seed x 1000 + ...) can pass them
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


def build_model(task, recipe, backend) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The task's model, built the backend's way (under ZeRO-3 each worker loads only its
    partitions), in ``model.dtype``, its activations checkpointed when asked; and what loading it
    cost this worker (seconds, resident memory before and at the peak)."""
    import resource

    import psutil

    rss_before, started = psutil.Process().memory_info().rss, time.perf_counter()
    with backend.model_building():
        model = task.build_model()
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    if recipe.model.dtype and not partitioned:  # partitioned parameters were created in it
        model.to(TORCH_DTYPES[recipe.model.dtype])
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, {"seconds": time.perf_counter() - started, "rss_before_bytes": rss_before,
                   "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "partitioned": partitioned}


def worst_over_ranks(loading: dict[str, Any]) -> dict[str, Any]:
    """Each measure of model loading at its worst over the ranks (every rank gets the same)."""
    values = all_reduce_max(torch.tensor([loading["seconds"], loading["rss_before_bytes"], loading["peak_rss_bytes"], not loading["partitioned"]],
                                         dtype=torch.float64))
    return {"seconds": float(values[0]), "rss_before_bytes": int(values[1]), "peak_rss_bytes": int(values[2]), "partitioned": not bool(values[3])}


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def save_checkpoint(directory: str, state: dict[str, Any], loop: LoopContext, strategy, addons, rank: int, final: bool,
                    best_weights=None) -> None:
    """Every rank that holds state writes its part of a checkpoint into ``directory``. While early
    stopping waits for an improvement, the best weights so far travel with it, so a resumed run
    can still restore them; the final checkpoint carries the exported model."""
    from safetensors.torch import save_file

    backend = loop.backend
    backend.save(directory, rank)
    maybe_fail(loop.plan.fault, loop.world, state["step"], state["epoch"], rank, in_checkpoint=True)
    if best_weights is not None and state["best_epoch"] != state["epoch"] and rank == 0:
        save_file(best_weights, os.path.join(directory, BEST_WEIGHTS))
    for addon in addons:
        addon.save(directory, rank, final)
    if final:
        with backend.full_weights():
            if rank == 0:
                strategy.save_adapter(backend.module, os.path.join(directory, run_folder.ADAPTER))  # before export merges it
                export_pretrained(loop.task, strategy.export(backend.module), os.path.join(directory, run_folder.MODEL))
    if rank == 0:
        with open(os.path.join(directory, TRAINER_STATE), "w") as f:
            json.dump(state, f)


def checkpoint_name(state: dict[str, Any], final: bool) -> str:
    """``checkpoint_epoch_0002``, ``checkpoint_final``; after a restart, ``..._restart1`` and on: an
    epoch reported again by a later attempt never lands in a folder an earlier attempt may have
    left half-written in storage."""
    restarts = len(state.get("resumed_at", []))
    return ("checkpoint_final" if final else f"checkpoint_epoch_{state['epoch']:04d}") + (f"_restart{restarts}" if restarts else "")


def report(metrics: dict[str, Any], state: dict[str, Any], final: bool, save) -> None:
    """Save a checkpoint (``save(directory)``) on the ranks that hold state, then report (a barrier
    over all ranks)."""
    import ray.train

    directory = tempfile.mkdtemp(prefix="raytune_ft_ckpt_")
    save(directory)
    checkpoint = ray.train.Checkpoint.from_directory(directory) if os.listdir(directory) else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(state, final))
    shutil.rmtree(directory, ignore_errors=True)


def resume(checkpoint, backend, addons, rank: int) -> tuple[dict[str, Any], Any]:
    """The trainer state and best weights of ``checkpoint``, with the backend's and the add-ons'
    state loaded from it."""
    from safetensors.torch import load_file

    best_weights = None
    with checkpoint.as_directory() as directory:
        backend.load(directory)
        for addon in addons:
            addon.load(directory)
        with open(os.path.join(directory, TRAINER_STATE)) as f:
            state = json.load(f)
        if os.path.exists(os.path.join(directory, BEST_WEIGHTS)):
            best_weights = load_file(os.path.join(directory, BEST_WEIGHTS))
    if state["best_epoch"] is not None and state["best_epoch"] == state["epoch"]:
        best_weights = backend.snapshot()
    state.setdefault("resumed_at", []).append({"epoch": state["epoch"], "step": state["step"]})
    if rank == 0:
        logger.info("resumed at epoch %d, step %d", state["epoch"], state["step"])
    return state, best_weights


def progress(epoch: int, state: dict[str, Any], total_steps: int, loss_sum: torch.Tensor, lr: float, rows: int, wait: float, started: float) -> str:
    elapsed = time.perf_counter() - started
    return (f"epoch {epoch} step {state['step']}/{total_steps} loss {loss_sum[0] / max(loss_sum[1], 1):.4f} "
            f"lr {lr:.2e} {rows / elapsed:.1f} samples/s data-wait {wait / elapsed:.0%}")


class EpochBatches:
    """Each epoch's train batches. The next epoch's iterator is opened, and its first batch
    fetched, in a thread while this epoch is evaluated and checkpointed: an epoch's first step
    otherwise waits for the iterator's start-up (Ray Data's threads, the first collate), which
    on a short epoch was most of its data wait (issue 46). Waiting for that thread, if it is
    late, is counted as data wait like any fetch."""

    def __init__(self, open_epoch: Callable[[int], Iterator[dict]]):
        self._open_epoch = open_epoch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="next-epoch-batches")
        self._ahead: dict[int, Future] = {}

    def _start(self, epoch: int) -> tuple[Iterator[dict], list[dict]]:
        iterator = iter(self._open_epoch(epoch))
        first = next(iterator, None)
        return iterator, [] if first is None else [first]

    def prepare(self, epoch: int) -> None:
        """Open ``epoch``'s batches now, in the background."""
        self._ahead[epoch] = self._pool.submit(self._start, epoch)

    def epoch(self, epoch: int) -> Iterator[dict]:
        """``epoch``'s batches: the prepared ones, else opened at the first fetch."""
        ahead = self._ahead.pop(epoch, None)
        iterator, first = ahead.result() if ahead else self._start(epoch)
        try:
            yield from first
            yield from iterator
        finally:
            iterator.close()  # a stopped epoch (max_steps) ends its prefetch threads now

    def close(self) -> None:
        for ahead in self._ahead.values():  # prepared for an epoch that early stopping cancelled
            ahead.result()[0].close()
        self._ahead.clear()
        self._pool.shutdown()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    plan = RunPlan.unpacked(config["plan"])
    recipe, train, steps = plan.recipe, plan.recipe.train, plan.steps
    run_at_niceness(os.environ.get(WORKER_NICENESS))
    worker_logging(config["log_level"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(plan.threads)
    seed_everything(train.seed)

    # The model: the task builds it, the strategy chooses what trains, the backend distributes it.
    task, strategy, backend = build_task(recipe, plan.labels), build_strategy(recipe), BACKENDS[train.backend](recipe)
    model, loading = build_model(task, recipe, backend)
    model = strategy.prepare(model, task)
    if train.head_lr_scale != 1:
        scale_module_lr(model, task.head_names(model), train.head_lr_scale)
    backend.setup(model, steps.total_steps)
    logger.debug("worker %d of %d: %s, %d torch threads, backend %s", rank, world, backend.device, plan.threads, train.backend)
    shards = {name: ray.train.get_dataset_shard(name) for name in plan.datasets}
    eval_batch = train.eval_batch_size or 2 * train.batch_size
    loop = LoopContext(recipe, plan, task, backend, task.head_names(model), rank, world, eval_batch, shards)
    addons = build_addons(loop)  # the reference evaluations score the base model here

    state: dict[str, Any] = {
        "epoch": 0, "step": 0, "history": [], "best": None, "best_epoch": None, "bad_evals": 0,
        "train_time_s": 0.0, "data_wait_s": 0.0, "train_samples": 0, "eval_time_s": 0.0, "stopped_early": False,
        "resumed_at": [],
    }
    best_weights = None
    checkpoint = ray.train.get_checkpoint() or plan.resume_from
    if checkpoint:
        state, best_weights = resume(checkpoint, backend, addons, rank)
    state["model_load"] = worst_over_ranks(loading)  # this attempt's
    stopping = train.early_stopping
    augment = getattr(task, "augment", None)  # train batches only: evaluation sees the data as it is
    done = state["step"] >= steps.total_steps or state["stopped_early"]
    # Pinned host memory: the copy to a GPU runs asynchronously. Batches ready ahead: several,
    # so that a fetch thread late for one step (a busy host) still has the next batch waiting.
    train_batches = EpochBatches(lambda epoch: shards["train"].iter_torch_batches(
        batch_size=train.batch_size, collate_fn=Collate(task), pin_memory=backend.device.type == "cuda", prefetch_batches=PREFETCH_BATCHES,
        local_shuffle_buffer_size=recipe.data.shuffle_buffer or None, local_shuffle_seed=train.seed * 1000 + epoch,
    ))

    while not done:
        epoch = state["epoch"] + 1
        # Reseed per (seed, epoch, rank): dropout masks then do not depend on how many epochs this
        # process has run, so a resumed run continues exactly as an uninterrupted one would.
        epoch_seed = train.seed * 1000 + epoch * 16 + rank
        seed_everything(epoch_seed)
        if strategy.on_epoch_start(backend.module, epoch):
            backend.refresh()
        for addon in addons:
            addon.start_epoch(epoch, epoch_seed)
        backend.model.train()
        loss_sum, wait, samples = torch.zeros(2, dtype=torch.float64), 0.0, 0
        norms = []  # the optimizer steps' gradient norms before clipping (where the backend has one)
        started = time.perf_counter()
        batches = train_batches.epoch(epoch)
        for index in range(steps.micro_batches_per_epoch):
            fetch = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - fetch
            if batch is None:
                raise RuntimeError(f"train shard ended after {index} of {steps.micro_batches_per_epoch} planned batches")
            batch = {key: value.to(backend.device, non_blocking=True) for key, value in batch.items()}
            if augment:  # on the device, drawn from torch's generator as reseeded above
                batch = augment(batch)
            boundary = (index + 1) % train.grad_accum == 0 or index + 1 == steps.micro_batches_per_epoch
            with backend.accumulating(boundary), backend.autocast():
                loss, outputs = task.forward(backend.model, batch)
                objective = loss
                for addon in addons:  # distillation, replay, L2-SP/EWC: each adds its term
                    objective = addon.objective(objective, Step(batch, outputs, index, boundary))
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value) or not math.isfinite(float(objective.detach())):  # before it reaches the weights
                raise Diverged(state["step"] + 1, epoch, loss_value if not math.isfinite(loss_value) else float(objective.detach()))
            backend.backward(objective)
            for addon in addons:
                addon.before_step(boundary)
            norm = backend.step(boundary)
            if norm is not None:
                norms.append(norm)
            size = len(batch["labels"]) if "labels" in batch else len(next(iter(batch.values())))
            loss_sum += torch.tensor([loss_value * size, size], dtype=torch.float64)
            samples += size
            if boundary:
                state["step"] += 1
                maybe_fail(plan.fault, world, state["step"], epoch, rank)
                if rank == 0 and (state["step"] % train.log_every == 0 or index + 1 == steps.micro_batches_per_epoch):
                    logger.info(progress(epoch, state, steps.total_steps, loss_sum, backend.lr(), samples * world, wait, started))
                if state["step"] >= steps.total_steps:
                    break
        elapsed = time.perf_counter() - started
        batches.close()
        if state["step"] < steps.total_steps:
            train_batches.prepare(epoch + 1)
        # The worst rank's wait: under DDP the others wait for it at the all-reduce, which their
        # own clocks count as computing.
        wait = float(all_reduce_max(torch.tensor([wait], dtype=torch.float64)))
        state["epoch"] = epoch
        state["train_time_s"] += elapsed
        state["data_wait_s"] += wait
        state["train_samples"] += samples * world

        # Evaluation: every rank scores its shards; the add-ons add theirs (references, distillation KL).
        eval_started = time.perf_counter()
        train_loss = all_reduce_sum(loss_sum)
        average_running_statistics(backend.module)
        validation = evaluate(task, backend.module, shards.get("validation"), eval_batch, backend)
        record = {
            "epoch": epoch, "step": state["step"],
            "train/loss": float(train_loss[0] / train_loss[1].clamp(min=1)), "train/lr": backend.lr(),
            "train/samples_per_s": samples * world / elapsed, "train/data_wait_fraction": wait / elapsed,
            **({"train/grad_norm": sum(norms) / len(norms), "train/grad_norm_max": max(norms)} if norms else {}),
            **scalars("eval", validation),
        }
        for addon in addons:
            addon.end_epoch(record, state)
        state["eval_time_s"] += time.perf_counter() - eval_started
        if stopping:
            value = record[stopping.metric]
            if improved(value, state["best"], stopping.mode, stopping.min_delta):
                state.update(best=value, best_epoch=epoch, bad_evals=0)
                best_weights = backend.snapshot()
            else:
                state["bad_evals"] += 1
                state["stopped_early"] = state["bad_evals"] >= stopping.patience
        state["history"].append(record)
        done = state["step"] >= steps.total_steps or state["stopped_early"]
        if rank == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("eval/", "retention/min", "train/distill_kl")))
            logger.info("epoch %d done: train/loss %.4f, %s", epoch, record["train/loss"], shown)
        report(record, state, False, lambda d: save_checkpoint(d, state, loop, strategy, addons, rank, False, best_weights))
        maybe_fail(plan.fault, world, state["step"], epoch, rank, after_checkpoint=True)
    train_batches.close()

    if best_weights is not None and state["best_epoch"] != state["epoch"]:
        backend.restore(best_weights)  # early stopping keeps the best evaluated weights
    for addon in addons:
        addon.finish(state)  # the last change to the weights (WiSE-FT's interpolation)
    for addon in addons:
        addon.final(state)  # the last scores (the references, the teacher on the test split)
    state["test"] = evaluate(task, backend.module, shards.get("test"), eval_batch, backend)
    state["final"] = True
    final = {"epoch": state["epoch"], "step": state["step"], **scalars("test", state["test"])}
    report(final, state, True, lambda d: save_checkpoint(d, state, loop, strategy, addons, rank, True))
