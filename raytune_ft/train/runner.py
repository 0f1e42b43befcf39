"""The driver side of a run: check inputs, start Ray, fit on Ray Train, write the run's outputs.

The baseline (the base model with only a new head trained) runs the same loop into ``baseline/``.
On a cluster, ``output.storage_path`` moves Ray's storage to shared storage (S3, GCS, NFS):
checkpoints land in ``storage_path/name`` and the driver's outputs are copied there at the end,
so nothing stays only on one node's disk.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from raytune_ft import run_folder
from raytune_ft.addons import configured
from raytune_ft.checkpoint import TRAINER_STATE
from raytune_ft.data.sharding import ExactEvalDataConfig
from raytune_ft.errors import TrainingFailed
from raytune_ft.post import configured_steps, run_steps
from raytune_ft.recipe import read_paths
from raytune_ft.report.tables import plural
from raytune_ft.report.tracking import tracked
from raytune_ft.schema import Recipe
from raytune_ft.train.datasets import PreparedData, prepare_datasets
from raytune_ft.train.faults import fault_config
from raytune_ft.train.loop import train_loop_per_worker
from raytune_ft.train.outputs import shared_run_dir, write_outputs
from raytune_ft.train.planning import RunPlan, plan_run, step_plan
from raytune_ft.train.ray_start import check_ray_address, init_ray


def fit(recipe: Recipe, run_dir: Path, data: PreparedData, callbacks: list[Any] = (), resume_from=None) -> dict[str, Any]:
    """One Ray Train run of the loop; returns the final trainer state (history and test metrics).
    ``callbacks``: Ray Train callbacks (a Tune trial forwards the reports to Tune with one);
    ``resume_from``: a checkpoint to start from when the run has none of its own (PBT)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    steps = step_plan(data.train_rows, recipe)
    workers, per_worker = recipe.scaling.workers, dict(recipe.scaling.resources_per_worker)
    sections = [cls.section for cls in configured(recipe)]
    datasets = data.for_run(sections)
    plan = RunPlan(recipe, data.planned.labels, steps, sorted(datasets), {s: data.planned.addons[s] for s in sections if s in data.planned.addons},
                   threads=max(1, int(per_worker.get("CPU", 1))), fault=fault_config(run_dir), resume_from=resume_from)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
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
    print(f"[raytune-ft] {recipe.name}: {steps.train_rows} training rows, {plural(workers, 'worker')} x batch "
          f"{recipe.train.batch_size}, {steps.total_steps} steps ({steps.steps_per_epoch}/epoch), strategy {recipe.strategy.method}", flush=True)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise TrainingFailed(error) from None
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / TRAINER_STATE).read_text())
        exported = Path(directory) / run_folder.MODEL
        if exported.is_dir():
            staging = run_dir / f"{run_folder.MODEL}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(exported, staging)
            shutil.rmtree(run_dir / run_folder.MODEL, ignore_errors=True)
            staging.rename(run_dir / run_folder.MODEL)
    state["plan"] = steps
    return state


def run_baseline(base: Recipe, data: PreparedData, started: float) -> dict[str, Any]:
    """The baseline's summary (``base``: its recipe): measured now, or read back when a resumed run already has it."""
    base_dir = base.run_dir()
    summary = run_folder.finished_summary(base_dir)
    if summary is None:
        print("[raytune-ft] baseline: training only a new head on the frozen base model", flush=True)
        base_dir.mkdir(parents=True, exist_ok=True)
        base_state = fit(base, base_dir, data)
        shutil.rmtree(base_dir / run_folder.MODEL, ignore_errors=True)  # the baseline is a measurement, not an export
        summary = write_outputs(base_dir, base, base_state, None, time.perf_counter() - started)
    print(f"[raytune-ft] baseline done at {time.perf_counter() - started:.0f} s", flush=True)
    return summary


def run(recipe: Recipe, *, resume: bool = False, force: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run a recipe end to end and return its summary."""
    run_dir = recipe.run_dir()
    run_folder.check_run_dir(run_dir, resume, force, read_paths(recipe))
    if resume and (finished := run_folder.finished_summary(run_dir)) is not None:
        print(f"[raytune-ft] {run_dir} is already finished")
        return finished
    planned = plan_run(recipe)
    if resume:
        run_folder.check_resume_checkpoint(run_dir)
    check_ray_address(address)
    shared = shared_run_dir(recipe, run_dir)
    if shared:
        run_folder.check_shared_storage(shared, resume)
    init_ray(address, recipe)
    run_folder.prepare_run_dir(run_dir, resume, force, read_paths(recipe))
    run_folder.write_text_atomic(run_dir / run_folder.RECIPE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    with tracked(recipe, run_dir) as tracker:
        started = time.perf_counter()
        data = prepare_datasets(recipe, planned)
        baseline = run_baseline(planned.baseline, data, started) if planned.baseline else None
        state = fit(recipe, run_dir, data, callbacks=[tracker] if tracker else [])
        summary = write_outputs(run_dir, recipe, state, baseline, time.perf_counter() - started, data.bad_rows)
        if configured_steps(recipe):
            from raytune_ft.post.finished import FinishedRun

            summary["post"] = run_steps(FinishedRun.open(run_dir), configured_steps(recipe))
        if recipe.post.report:
            from raytune_ft.report.html import write_report

            print(f"[raytune-ft] report: {write_report(run_dir)}", flush=True)
    if shared:
        run_folder.publish_outputs(run_dir, shared)
    return summary
