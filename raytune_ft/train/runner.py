"""The driver side of a run: check inputs, start Ray, fit on Ray Train, write the run's outputs.

The baseline (the base model with only a new head trained) runs the same loop into ``baseline/``.
On a cluster, ``output.storage_path`` moves Ray's storage to shared storage (S3, GCS, NFS):
checkpoints land in ``storage_path/name`` and the driver's outputs are copied there at the end,
so nothing stays only on one node's disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from raytune_ft import log, run_folder
from raytune_ft.addons import configured
from raytune_ft.checkpoint import TRAINER_STATE
from raytune_ft.data.sharding import ExactEvalDataConfig
from raytune_ft.errors import TrainingFailed
from raytune_ft.post import configured_steps, run_steps
from raytune_ft.recipe import load_recipe, read_paths
from raytune_ft.report.tables import plural
from raytune_ft.report.tracking import tracked
from raytune_ft.schema import Recipe
from raytune_ft.train.datasets import PreparedData, prepare_datasets
from raytune_ft.train.faults import fault_config
from raytune_ft.train.loop import train_loop_per_worker
from raytune_ft.train.outputs import write_outputs
from raytune_ft.train.planning import RunPlan, plan_run, step_plan
from raytune_ft.train.ray_start import check_ray_address, init_ray
from raytune_ft.train.torch_config import TorchDistributedConfig

logger = logging.getLogger(__name__)


def runs_in_process(recipe: Recipe) -> bool:
    """Whether ``fit(..., in_process=True)`` can run this recipe: one worker, local storage, DDP
    (DeepSpeed sets up its own process group, which a Train worker has and this process has not)."""
    return recipe.scaling.workers == 1 and recipe.train.backend == "ddp" and "://" not in (recipe.output.storage_path or "")


def fit(recipe: Recipe, run_dir: Path, data: PreparedData, callbacks: list[Any] = (), resume_from=None,
        in_process: bool = False) -> dict[str, Any]:
    """One Ray Train run of the loop; returns the final trainer state (history and test metrics).
    ``callbacks``: Ray Train callbacks (a Tune trial forwards the reports to Tune with one);
    ``resume_from``: a checkpoint to start from when the run has none of its own (PBT);
    ``in_process``: run the loop in this process instead (``raytune_ft.train.in_process``; see
    ``runs_in_process``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    steps = step_plan(data.train_rows, recipe)
    workers, per_worker = recipe.scaling.workers, dict(recipe.scaling.resources_per_worker)
    sections = [cls.section for cls in configured(recipe)]
    datasets = data.for_run(sections)
    storage = Path(recipe.output.storage_root(run_dir)) / run_dir.name  # where Ray Train would keep its checkpoints
    if in_process:
        from raytune_ft.train.in_process import fit_in_process, newest_checkpoint

        resume_from = resume_from or newest_checkpoint(storage)  # a retried trial's own, as Ray Train finds a restarted run's
    plan = RunPlan(recipe, data.planned.labels, steps, sorted(datasets), {s: data.planned.addons[s] for s in sections if s in data.planned.addons},
                   threads=max(1, int(per_worker.get("CPU", 1))), fault=fault_config(run_dir), resume_from=resume_from)
    config = {"plan": plan.packed(), "log_level": log.level()}
    logger.info("%s: %d training rows, %s x batch %d, %d steps (%d/epoch), strategy %s", recipe.name, steps.train_rows, plural(workers, "worker"),
                recipe.train.batch_size, steps.total_steps, steps.steps_per_epoch, recipe.strategy.method)
    if in_process:
        return final_state(fit_in_process(train_loop_per_worker, config, datasets, storage, recipe.output.checkpoints_to_keep, list(callbacks)),
                           run_dir, steps)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchDistributedConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=recipe.scaling.use_gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=recipe.output.storage_root(run_dir),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.output.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=recipe.train.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=ExactEvalDataConfig(datasets, workers),
    )
    try:
        with sigint_handler_restored():
            result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise TrainingFailed(error) from None
    return final_state(result.checkpoint, run_dir, steps)


def final_state(checkpoint, run_dir: Path, steps) -> dict[str, Any]:
    """The trainer state in a run's last checkpoint, its exported model (and adapter) copied into
    ``run_dir``."""
    logger.debug("last checkpoint: %s", checkpoint.path)
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / TRAINER_STATE).read_text())
        for name in (run_folder.MODEL, run_folder.ADAPTER):  # the exported model, and a LoRA adapter alone
            exported = Path(directory) / name
            if exported.is_dir():
                run_folder.copy_dir_atomic(exported, run_dir / name)
    state["plan"] = steps
    return state


@contextlib.contextmanager
def sigint_handler_restored() -> Iterator[None]:
    """Ray Train's ``fit()`` installs a Ctrl-C handler (the first press aborts the run gracefully)
    that holds the run's controller actor, and leaves it installed: the finished run's controller
    process (~400 MB) lived on until the next run replaced the handler or the driver exited.
    Putting the previous handler back lets the controller end with its run."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Train installs no handler off the main thread (a Tune trial)
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)


def run_baseline(base: Recipe, data: PreparedData, started: float) -> dict[str, Any]:
    """The baseline's summary (``base``: its recipe): measured now, or read back when a resumed run already has it."""
    base_dir = base.run_dir()
    summary = run_folder.finished_summary(base_dir)
    if summary is None:
        logger.info("baseline: training only a new head on the frozen base model")
        base_dir.mkdir(parents=True, exist_ok=True)
        base_state = fit(base, base_dir, data)
        if base.retention is None:  # a measurement, not an export (with references scored, retention.floor may deliver it)
            shutil.rmtree(base_dir / run_folder.MODEL, ignore_errors=True)
        summary = write_outputs(base_dir, base, base_state, None, time.perf_counter() - started)
    logger.info("baseline done at %.0f s", time.perf_counter() - started)
    return summary


def run(recipe: Recipe, *, resume: bool = False, force: bool = False, address: str | None = None,
        resume_or_start: bool = False) -> dict[str, Any]:
    """Run a recipe end to end and return its summary. ``resume``: continue the run in output.dir,
    or on shared storage (output.storage_path) when the local folder is gone; ``resume_or_start``:
    resume when a run is there, else start one (a driver that a cluster retries)."""
    run_dir = recipe.run_dir()
    shared = run_folder.shared_run_dir(recipe, run_dir)
    if resume_or_start:
        resume = run_folder.holds_run(run_dir) or bool(shared) and run_folder.holds_run(shared)
    run_folder.check_run_dir(run_dir, resume, force, shared, read_paths(recipe))
    if resume and shared and not run_folder.holds_run(run_dir):
        run_folder.restore_from_storage(shared, run_dir)
    finished = run_folder.finished_summary(run_dir) if resume else None
    if finished is not None:
        if step_plan(finished["plan"]["train_rows"], recipe).total_steps <= finished["steps"]:
            logger.info("%s is already finished", run_dir)
            return finished
        (run_dir / run_folder.SUMMARY).unlink()  # more epochs asked for: the run goes on from its final checkpoint
    planned = plan_run(recipe)
    if resume:
        run_folder.check_resume_checkpoint(shared or run_dir)
    changes = run_folder.resume_changes(run_dir, recipe, load_recipe(run_dir / run_folder.RECIPE)) if resume else []
    check_ray_address(address)
    init_ray(address, recipe)
    run_folder.prepare_run_dir(run_dir, resume, force, read_paths(recipe))
    if resume:
        run_folder.record_resume(run_dir, changes)  # recipe.yaml stays what the run was made with
    else:
        run_folder.write_text_atomic(run_dir / run_folder.RECIPE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    if shared:  # storage holds what a resume needs from the start, not only at the end
        run_folder.publish(run_dir, shared, run_folder.RESUMES if resume else run_folder.RECIPE)

    with tracked(recipe, run_dir) as tracker:
        started = time.perf_counter()
        data = prepare_datasets(recipe, planned)
        baseline = None
        if planned.baseline:
            baseline = run_baseline(planned.baseline, data, started)
            if shared:
                run_folder.publish(run_dir, shared, run_folder.BASELINE)
        state = fit(recipe, run_dir, data, callbacks=[tracker] if tracker else [])
        summary = write_outputs(run_dir, recipe, state, baseline, time.perf_counter() - started, data.bad_rows)
        if configured_steps(recipe):
            from raytune_ft.post.finished import FinishedRun

            summary["post"] = run_steps(FinishedRun.open(run_dir), configured_steps(recipe))
        if recipe.post.report:
            from raytune_ft.report.html import write_report

            logger.info("report: %s", write_report(run_dir))
    if shared:
        run_folder.publish(run_dir, shared)
        logger.info("outputs copied to %s", shared)
    return summary
