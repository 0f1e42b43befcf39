"""The driver side of a run: check inputs, start Ray, fit on Ray Train, write the run's outputs.

A run directory (``output.dir``) is Ray's ``storage_path/name``: Ray keeps checkpoints there, and
the driver adds ``recipe.yaml``, ``metrics.jsonl``, ``summary.json``, ``model/`` (the exported
``save_pretrained`` directory) and ``plots/``. The baseline (the base model with only a new head
trained) runs the same loop into ``baseline/``. On a cluster, ``output.storage_path`` moves Ray's
storage to shared storage (S3, GCS, NFS): checkpoints land in ``storage_path/name`` and the
driver's outputs are copied there at the end, so nothing stays only on one node's disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from raytune_ft.data import tabular
from raytune_ft.data.sharding import ExactEvalDataConfig
from raytune_ft.errors import TrainingFailed, UserError, find_user_error
from raytune_ft.post import configured_steps, run_steps
from raytune_ft.recipe import Recipe
from raytune_ft.report.tables import plural
from raytune_ft.report.tracking import tracked
from raytune_ft.train import WORKER_NICENESS
from raytune_ft.train.checkpoint import verify_checkpoint, write_text_atomic
from raytune_ft.train.faults import FAULT_ENV

API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"
DATASOURCE_V2 = "RAY_DATA_USE_DATASOURCE_V2"
EMBEDDED_RAY_DEFAULTS = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_idle_worker_killing_time_threshold_ms": "300000",
}
WORKER_SETUP_HOOK = "raytune_ft.worker_setup.collect_garbage_less_often"
QUIET_RAY = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints once, not again through Train's logger
    "RAY_DATA_LOG_LEVEL": "WARNING",
}


def init_ray(address: str | None, recipe: Recipe, workers: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray sized for
    ``workers`` training workers at once (default ``scaling.workers``)."""
    import ray
    from ray.data import DataContext

    # Quiet by default: our own progress lines are the live view; Ray's INFO chatter is in its logs.
    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    # Ray Data read RAY_DATA_LOG_LEVEL when it was imported, which may have been before this.
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
        if address or os.environ.get("RAY_ADDRESS"):
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as error:
                raise UserError("--address", f"cannot reach Ray at {address or os.environ.get('RAY_ADDRESS')}: {str(error).splitlines()[0]}") from None
        else:
            # Ray Data's preprocessing needs CPU slots beside the training workers; logical CPUs
            # may exceed cores because tokenisation is light next to a training step.
            per_worker = recipe.scaling.resources_per_worker.get("CPU", 1)
            start_local_ray(num_cpus=max(os.cpu_count() or 1, math.ceil((workers or recipe.scaling.workers) * per_worker) + 2), **kwargs)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # the same rows reach the same worker in the same order
    context.raise_original_map_exception = True  # a UserError in preprocess arrives as itself, not as UserCodeException
    # Ray Data's V2 parquet reader spends ~3 s listing and planning even a one-file read (measured
    # warm, 2 cores); the V1 reader takes 0.1 s. A run reads up to 3 splits plus 2 per reference.
    # RAY_DATA_USE_DATASOURCE_V2, when the user sets it, decides.
    if DATASOURCE_V2 not in os.environ:
        context.use_datasource_v2 = False


def start_local_ray(**kwargs: Any) -> None:
    """Start a new embedded Ray (never one that `ray start` left running here) whose own processes
    know its dashboard. Ray Train's placement-group cleaner finds the cluster through the state
    API; with another Ray on this host it finds two, gives up, and the placement group of every
    Train run whose controller dies with its Tune trial (an ASHA stop, a PBT exploit) leaks its
    CPUs until the next trial waits for ever. RAY_API_SERVER_ADDRESS, set while Ray starts, reaches
    every Ray process and names the one dashboard; this process's environment is left as it was."""
    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # This host is the whole cluster: no node of it can be preempted, so no Train run needs a
    # preemption-watcher actor (a process per run, seconds of a core to start). Train's controller
    # polls its workers every 2 s by default, which a run pays at its start and its end; polling
    # two local actors 4 times a second costs nothing. Ray ends an idle worker process after 1 s
    # once there are more than num_cpus; kept for 5 minutes, processes that already imported torch
    # and transformers can serve a later run in the same driver (4 tiny runs in one process: ~13 s
    # a warm run instead of ~22 s on 2 cores; one `raytune-ft run`, with a handful of workers under
    # num_cpus, gains nothing measurable). A value the user set wins.
    # Ray runs the Python threads of every worker process at nice 15 (its services and C++
    # threads at 0), so the training workers share the cores as equals with Train's and Data's
    # helper actors. The training workers take the driver's niceness instead (where the OS lets
    # them, see train.loop.run_at_niceness); the helpers stay at 15. Measured against plain
    # torchrun: 0.66-0.70 -> 0.80-0.83 on cores short of CPU, no change on idle ones (README).
    # Every worker process runs WORKER_SETUP_HOOK before its first task or actor: fewer garbage
    # collections while a Train worker imports torch and transformers (a warm tiny 2-worker run:
    # 21.1 -> 19.5 CPU-s, alternated twice; README).
    ray_processes_env = {API_SERVER_ADDRESS: f"http://127.0.0.1:{port}", **{
        key: os.environ.get(key, default) for key, default in EMBEDDED_RAY_DEFAULTS.items()},
        WORKER_NICENESS: os.environ.get(WORKER_NICENESS, str(os.getpriority(os.PRIO_PROCESS, 0)))}
    # Every Ray process inherits this environment; an injected fault (tests) travels in a run's
    # config instead, or it would fire in every later run and Tune trial on this Ray.
    previous = {key: os.environ.get(key) for key in [*ray_processes_env, FAULT_ENV]}
    os.environ.update(ray_processes_env)
    os.environ.pop(FAULT_ENV, None)
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK}, **kwargs)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_ray_address(address: str | None) -> None:
    """An explicit ``host:port`` must answer before anything is written: ray.init would otherwise
    retry for minutes, printing its own warnings."""
    address = address or os.environ.get("RAY_ADDRESS")
    host, _, port = (address or "").rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return  # none (embedded Ray), "auto" or a ray:// client address: ray.init decides
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError("--address", f"cannot reach Ray at {address} ({error.strerror or error})") from None


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Never overwrite a run: a second run into a directory needs --resume (continue) or --force.
    Checked before anything is written, so a refused run leaves no trace."""
    if resume and force:
        raise UserError("--force", "cannot be combined with --resume (continue the run, or move it aside and start anew)")
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if resume and not occupied:
        raise UserError("--resume", f"no run to resume in {run_dir}")
    if occupied and not resume and not force:
        raise UserError("output.dir", f"{run_dir} already holds a run; pass --resume to continue it or --force to move it aside")
    existing = next(path for path in (run_dir, *run_dir.parents) if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError("output.dir", f"{run_dir} is not writable ({existing} is not a writable directory)")


def check_resume_checkpoint(run_dir: Path) -> None:
    """The checkpoint Ray Train will resume from (the latest in its run snapshot) must be whole.
    Ray registers a checkpoint only once every worker's files are in storage, so a write cut
    short is never in the snapshot; this catches a registered one damaged since."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME  # internal: no public name

    snapshot = run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    if not snapshot.is_file():
        return
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        directory = run_dir / latest["checkpoint_dir_name"] if latest else None
    except (ValueError, AttributeError, KeyError, TypeError):
        raise UserError("--resume", f"{snapshot}: not Ray Train's run snapshot") from None
    try:
        if directory:
            verify_checkpoint(directory)
    except ValueError as error:
        raise UserError("--resume", f"{error}; the checkpoint to resume from is damaged, nothing was changed "
                                    "(start anew with --force)") from None


def move_aside(path: Path) -> Path:
    """Rename an existing output to ``<name>.old-<time>`` (``--force``): nothing a user has is deleted."""
    aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    print(f"[raytune-ft] moved the existing {path} to {aside}")
    return aside


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Create the run directory (moving an existing run aside with --force) and check it is writable."""
    check_run_dir(run_dir, resume, force)
    if force and run_dir.exists() and any(run_dir.iterdir()):
        move_aside(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError("output.dir", f"{run_dir} is not writable ({error.strerror})") from None


def shared_run_dir(recipe: Recipe, run_dir: Path) -> str | None:
    """The run's directory on shared storage, or None when Ray stores it in the run directory."""
    return f"{recipe.output.storage_root(run_dir)}/{run_dir.name}" if recipe.output.storage_path else None


def check_shared_storage(destination: str, resume: bool) -> None:
    """A run on shared storage is never overwritten either; it is never moved aside or deleted."""
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(destination)
        occupied = bool(filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True)))
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise UserError("output.storage_path", f"cannot open {destination}: {str(error).splitlines()[0]}") from None
    if occupied and not resume:
        raise UserError("output.storage_path", f"{destination} already holds a run; pass --resume to continue it, "
                                               "or give the run another output.dir name")


def publish_outputs(run_dir: Path, destination: str) -> None:
    """Copy the driver's outputs beside the checkpoints on shared storage."""
    from pyarrow import fs

    fs.copy_files(str(run_dir), destination)
    print(f"[raytune-ft] outputs copied to {destination}", flush=True)


def step_plan(train_rows: int, recipe: Recipe) -> dict[str, int]:
    train, workers = recipe.train, recipe.scaling.workers
    rows_per_worker = train_rows // workers
    if rows_per_worker == 0:
        raise UserError("data.train", f"{train_rows} training rows cannot feed {plural(workers, 'worker')}")
    micro = math.ceil(rows_per_worker / train.batch_size)
    steps_per_epoch = math.ceil(micro / train.grad_accum)
    limits = [train.max_steps] if train.max_steps else []
    if train.epochs:
        limits.append(train.epochs * steps_per_epoch)
    return {
        "train_rows": train_rows, "rows_per_worker": rows_per_worker, "micro_batches_per_epoch": micro,
        "steps_per_epoch": steps_per_epoch, "total_steps": min(limits),
    }


@contextlib.contextmanager
def data_errors(split: tabular.Split):
    """A UserError raised inside Ray Data (a row the task cannot preprocess) as the one-line
    error it is; one that names no file gets the split's path. Ray Data's own log of the failure
    (a traceback, as for an internal error) is held back: the exception carries it."""
    import logging

    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.CRITICAL)
    try:
        yield
    except Exception as error:
        found = find_user_error(error)
        if found is None:
            raise
        if found.where:
            raise UserError(found.where, found.message) from None
        raise UserError(f"data.{split.name}", f"{split.path}: {found.message}") from None
    finally:
        data_logger.setLevel(level)


def count_bad_rows(split: tabular.Split, read: int, kept: int, max_fraction: float) -> int:
    """Rows ``on_bad_rows: skip`` dropped from a split; refuse more than ``max_fraction`` of them."""
    bad = read - kept
    if read and bad / read > max_fraction:
        raise UserError("data.max_bad_fraction", f"{bad} of {read} rows of data.{split.name} ({split.path}) are bad ({bad / read:.1%}), "
                                                 f"more than {max_fraction:.1%}; set data.on_bad_rows: fail to see the first")
    if bad:
        print(f"[raytune-ft] data.{split.name}: skipped {bad} bad rows of {read}", flush=True)
    return bad


def build_datasets(recipe: Recipe, splits: list[tabular.Split], labels: list[str] | None, task) -> tuple[dict[str, Any], int, dict[str, int]]:
    """Every split as a preprocessed Ray Dataset (cached when small; train augmented anew each
    epoch when the task augments), the train row count, and the bad rows skipped per split."""
    data = recipe.data.model_dump()
    datasets, bad_rows = {}, {}
    for split in splits:
        rows = tabular.rows_dataset(split, data, labels)
        dataset = rows.map_batches(task.preprocess, batch_format="numpy")
        with data_errors(split):
            if tabular.should_cache(split, data["cache"]):
                # Evaluation shards are split by blocks: enough blocks that every worker gets a share.
                dataset = (dataset if split.name == "train" else dataset.repartition(2 * recipe.scaling.workers)).materialize()
            if split.name == "train":
                train_rows = dataset.count()
            if data["on_bad_rows"] == "skip":
                kept = train_rows if split.name == "train" else dataset.count()
                bad_rows[split.name] = count_bad_rows(split, rows.count(), kept, data["max_bad_fraction"])
        if split.name == "train" and hasattr(task, "augment"):
            dataset = dataset.map_batches(task.augment, batch_format="numpy")
        datasets[split.name] = dataset
    return datasets, train_rows, bad_rows


def check_strategy(recipe: Recipe, task) -> None:
    """Structural checks (layer counts, module names) on the model's meta-device skeleton."""
    from raytune_ft.strategies import build_strategy

    build_strategy(recipe.to_dict()).check(task.skeleton())


def plan_references(recipe: Recipe, task_cls) -> list[dict[str, Any]]:
    """Check every retention reference's data (driver side); its splits and label set."""
    planned = []
    for i, reference in enumerate(recipe.retention.references if recipe.retention else []):
        data = reference.data.model_dump()
        if reference.kind == "head":  # rows are labelled in the base model's own labels, in its order
            data["labels"] = original_head_labels(recipe, task_cls, data.get("labels"), f"retention.references.{i}")
        splits, labels = tabular.plan_splits(data, prefix=f"retention.references.{i}.data")
        if reference.kind == "task":  # the task's own metrics on the whole set, nothing fitted
            by_name = {split.name: split for split in splits}
            train = by_name["train"]
            test = by_name.get("test") or tabular.Split("train", train.path, train.fmt, holdout="all")
            labels = recipe.data.labels  # the run's label set: its model scores these rows
            planned.append({"name": reference.name, "kind": "task", "labels": labels, "data": data,
                            "task": task_cls(recipe.to_dict(), labels or []), "splits": {"test": test}})
            continue
        if labels is None:
            raise UserError(f"retention.references.{i}.data.columns", "a probe reference needs a label column")
        # The held-out part of train is the probe's test split when no test file is given.
        by_name = {split.name: split for split in splits}
        test = by_name.get("test") or by_name["validation"]
        planned.append({"name": reference.name, "kind": reference.kind, "labels": labels, "data": data, "task": task_cls(recipe.to_dict(), labels),
                        "splits": {"train": by_name["train"], "test": test}})
    return planned


def original_head_labels(recipe: Recipe, task_cls, given: list[str] | None, prefix: str) -> list[str]:
    """The labels of the base model's own classifier head, which a ``head`` reference reads."""
    task = task_cls(recipe.to_dict(), recipe.data.labels or [])
    if not hasattr(task, "original_head"):
        raise UserError(f"{prefix}.kind", f"head: the {recipe.task.type} task keeps no original classifier head to read; use kind probe")
    labels = task.original_head()[0]
    if given is not None and list(given) != labels:
        raise UserError(f"{prefix}.data.labels", f"a head reference reads the base model's labels {labels}; remove data.labels or list exactly those")
    return labels


def reference_specs(planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the workers need of each planned reference (picklable: no task, no paths)."""
    return [{"name": r["name"], "kind": r["kind"], "labels": r["labels"], "splits": sorted(r["splits"])} for r in planned]


def reference_datasets(planned: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    from raytune_ft.retention.training import reference_split

    datasets = {}
    for reference in planned:
        for split_name, split in reference["splits"].items():
            dataset = tabular.rows_dataset(split, reference["data"], reference["labels"]).map_batches(reference["task"].preprocess, batch_format="numpy")
            datasets[reference_split(reference["name"], split_name)] = dataset.repartition(2 * workers).materialize()
    return datasets


def fit(recipe: Recipe, run_dir: Path, datasets: dict[str, Any], train_rows: int, labels: list[str] | None,
        references: list[dict[str, Any]] = (), callbacks: list[Any] = (), resume_from=None) -> dict[str, Any]:
    """One Ray Train run of the loop; returns the final trainer state (history and test metrics).
    ``callbacks``: Ray Train callbacks (a Tune trial forwards the reports to Tune with one);
    ``resume_from``: a checkpoint to start from when the run has none of its own (PBT)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raytune_ft.train.faults import fault_config
    from raytune_ft.train.loop import train_loop_per_worker

    plan = step_plan(train_rows, recipe)
    workers = recipe.scaling.workers
    per_worker = dict(recipe.scaling.resources_per_worker)
    config = {
        "recipe": recipe.to_dict(), "labels": labels, "plan": plan, "splits": sorted(datasets),
        "threads": max(1, int(per_worker.get("CPU", 1))), "world_size": workers, "fault": fault_config(run_dir),
        "references": reference_specs(references),
        "resume_from": resume_from,
    }
    if not references:
        datasets = {name: dataset for name, dataset in datasets.items() if not name.startswith("ref_")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
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
    print(f"[raytune-ft] {recipe.name}: {plan['train_rows']} training rows, {plural(workers, 'worker')} x batch "
          f"{recipe.train.batch_size}, {plan['total_steps']} steps ({plan['steps_per_epoch']}/epoch), strategy {recipe.strategy.method}", flush=True)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise TrainingFailed(error) from None
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / "trainer_state.json").read_text())
        if (Path(directory) / "model").is_dir():
            export_dir = run_dir / "model"
            staging = run_dir / "model.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(Path(directory) / "model", staging)
            shutil.rmtree(export_dir, ignore_errors=True)
            staging.rename(export_dir)
    state["plan"] = plan
    return state


def write_outputs(run_dir: Path, recipe: Recipe, state: dict[str, Any], baseline: dict[str, Any] | None, wall_s: float,
                  bad_rows: dict[str, int] | None = None) -> dict[str, Any]:
    from raytune_ft.report import plots
    from raytune_ft.train.distill import distill_summary

    history = state["history"]
    test = {key: value for key, value in state.get("test", {}).items() if isinstance(value, (int, float))}
    rows = history + ([{"epoch": state["epoch"], "step": state["step"], **{f"test/{k}": v for k, v in test.items()}}] if test else [])
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    final_eval = {k.removeprefix("eval/"): v for k, v in history[-1].items() if k.startswith("eval/")} if history else {}
    target = test or final_eval
    base_target = (baseline or {}).get("test") or (baseline or {}).get("eval") or {}
    summary = {
        "name": recipe.name, "task": recipe.task.type, "model": recipe.model.path, "strategy": recipe.strategy.method,
        "backend": recipe.train.backend, "workers": recipe.scaling.workers,
        "epochs": state["epoch"], "steps": state["step"], "stopped_early": state["stopped_early"], "best_epoch": state["best_epoch"],
        "resumed_at": state.get("resumed_at", []),  # where restarts (worker faults, --resume) picked up
        "labels": recipe.data.labels,  # the label set (per label role for multitask heads)
        "eval": final_eval, "test": test, "baseline": base_target or None,
        "gain": {k: target[k] - base_target[k] for k in ("accuracy", "macro_f1") if k in target and k in base_target},
        "wall_time_s": wall_s, "train_time_s": state["train_time_s"], "eval_time_s": state["eval_time_s"],
        "train_samples_per_s": state["train_samples"] / max(state["train_time_s"], 1e-9),
        "data_wait_fraction": state["data_wait_s"] / max(state["train_time_s"], 1e-9),
        "plan": state["plan"],
        "bad_rows_skipped": bad_rows,
        "retention": retention_summary(state),
        "wise_ft": state.get("wise_ft"),
        "distill": distill_summary(recipe, recipe.data.labels or [], state),
        "outputs": {"run_dir": str(run_dir), "model": str(run_dir / "model"), "metrics": str(run_dir / "metrics.jsonl"),
                    "checkpoints": shared_run_dir(recipe, run_dir) or str(run_dir)},
    }
    plot_files = plots.write_run_plots(run_dir / "plots", history, state.get("test", {}), recipe)
    summary["outputs"]["plots"] = [str(p) for p in plot_files]
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))  # written last: its presence means finished
    return summary


def retention_summary(state: dict[str, Any]) -> dict[str, Any] | None:
    """Reference scores before and after, the ratios, the worst seen during the run, the cost."""
    if "ref_final" not in state:
        return None
    final = state["ref_final"]
    return {
        "before": state["ref_before"],
        "after": {k: v for k, v in final.items() if k.startswith("ref/") and k != "ref/time_s"},
        "retention": {k: v for k, v in final.items() if k.startswith("retention/")},
        "worst_during_run": state.get("worst_retention"),
        "reference_eval_time_s": state.get("ref_time_s", 0.0),
    }


def baseline_recipe(recipe: Recipe, run_dir: Path) -> Recipe:
    """The same recipe with the body frozen: only a new head is trained."""
    data = recipe.to_dict()
    data["train"].update(lr=recipe.baseline.lr, epochs=recipe.baseline.epochs, max_steps=None, early_stopping=None, warmup=0.0)
    data["baseline"]["enabled"] = False
    data.update(retention=None, regularizer=None, replay=None, wise_ft=None, distill=None)
    data["strategy"] = {"method": "head_only"}
    data["output"]["dir"] = str(run_dir / "baseline")
    if recipe.output.storage_path:
        data["output"]["storage_path"] = shared_run_dir(recipe, run_dir)
    data["name"] = f"{recipe.name}-baseline"
    return Recipe(**data)


def plan_run(recipe: Recipe) -> tuple[list[tabular.Split], list[str] | dict[str, list[str]] | None, Any, list[dict[str, Any]]]:
    """Driver-side checks before anything reaches Ray: the model path, the data splits and label
    set (recorded in the recipe), the task, the strategy and the retention references."""
    from raytune_ft.data import assets
    from raytune_ft.recipe import task_options
    from raytune_ft.tasks import TASKS, task_label_roles

    recipe.model.path = assets.resolve(recipe.model.path, "model.path")
    label_roles = task_label_roles(TASKS[recipe.task.type], task_options(recipe))
    splits, labels = tabular.plan_splits(recipe.data.model_dump(), label_roles=label_roles)
    recipe.data.labels = labels  # recorded explicitly (one set per label role), so a re-run maps labels the same way
    task = TASKS[recipe.task.type](recipe.to_dict(), labels or [])
    task.check()
    check_strategy(recipe, task)
    if recipe.distill:
        from raytune_ft.train.distill import plan_teacher

        plan_teacher(recipe, labels or [], task, next(split for split in splits if split.name == "train"))
    return splits, labels, task, plan_references(recipe, TASKS[recipe.task.type])


def prepare_datasets(recipe: Recipe, splits: list[tabular.Split], labels: list[str] | None, task,
                     references: list[dict[str, Any]]) -> tuple[dict[str, Any], int, dict[str, int]]:
    """The target splits and the reference splits as Ray Datasets, the train row count and the
    bad rows skipped per split."""
    started = time.perf_counter()
    datasets, train_rows, bad_rows = build_datasets(recipe, splits, labels, task)
    datasets.update(reference_datasets(references, recipe.scaling.workers))
    print(f"[raytune-ft] data ready in {time.perf_counter() - started:.1f} s", flush=True)
    return datasets, train_rows, bad_rows


def run(recipe: Recipe, *, resume: bool = False, force: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run a recipe end to end and return its summary."""
    run_dir = recipe.run_dir()
    check_run_dir(run_dir, resume, force)
    if resume and (run_dir / "summary.json").is_file():
        print(f"[raytune-ft] {run_dir} is already finished")
        return json.loads((run_dir / "summary.json").read_text())
    splits, labels, task, references = plan_run(recipe)
    if resume:
        check_resume_checkpoint(run_dir)
    check_ray_address(address)
    shared = shared_run_dir(recipe, run_dir)
    if shared:
        check_shared_storage(shared, resume)
    init_ray(address, recipe)
    prepare_run_dir(run_dir, resume, force)
    write_text_atomic(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    with tracked(recipe, run_dir) as tracker:
        started = time.perf_counter()
        datasets, train_rows, bad_rows = prepare_datasets(recipe, splits, labels, task, references)
        baseline = None
        if recipe.baseline.enabled:
            base = baseline_recipe(recipe, run_dir)
            base_dir = base.run_dir()
            if (base_dir / "summary.json").is_file():
                baseline = json.loads((base_dir / "summary.json").read_text())
            else:
                print("[raytune-ft] baseline: training only a new head on the frozen base model", flush=True)
                base_dir.mkdir(parents=True, exist_ok=True)
                base_state = fit(base, base_dir, datasets, train_rows, labels)
                shutil.rmtree(base_dir / "model", ignore_errors=True)  # the baseline is a measurement, not an export
                baseline = write_outputs(base_dir, base, base_state, None, time.perf_counter() - started)
            print(f"[raytune-ft] baseline done at {time.perf_counter() - started:.0f} s", flush=True)
        state = fit(recipe, run_dir, datasets, train_rows, labels, references, callbacks=[tracker] if tracker else [])
        summary = write_outputs(run_dir, recipe, state, baseline, time.perf_counter() - started, bad_rows)
        if configured_steps(recipe):
            from raytune_ft.post.finished import FinishedRun

            summary["post"] = run_steps(FinishedRun.open(run_dir), configured_steps(recipe))
        if recipe.post.report:
            from raytune_ft.report.html import write_report

            print(f"[raytune-ft] report: {write_report(run_dir)}", flush=True)
    if shared:
        publish_outputs(run_dir, shared)
    return summary
