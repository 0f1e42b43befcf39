"""``raytune-ft tune``: a Ray Tune experiment whose trials are Ray Train runs of one recipe.

The driver plans the data and builds the Ray Datasets once; every trial gets them through
``tune.with_parameters`` and runs the loop in its own actor (one worker) or its own TorchTrainer
(several; see ``trial.py``). The experiment
directory (``output.dir``) holds Tune's state and the trials (``trials/trial_<id>/run`` is a
normal run directory), then ``results.csv``, ``summary.md``, ``best_recipe.yaml``,
``plots/trial_curves.png`` and, with two metrics, ``pareto.json``, ``plots/pareto.png`` and
``front/trial_<id>.yaml``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from raytune_ft import log, run_folder
from raytune_ft.errors import UserError
from raytune_ft.recipe import given_fields, read_paths
from raytune_ft.report import plots
from raytune_ft.report.tracking import tracked
from raytune_ft.schema import Recipe
from raytune_ft.train.datasets import prepare_datasets
from raytune_ft.train.faults import FAULT_ENV
from raytune_ft.train.planning import plan_run
from raytune_ft.train.ray_start import check_ray_address, init_ray
from raytune_ft.train.resources import experiment_demand, run_demand
from raytune_ft.train.runner import runs_in_process
from raytune_ft.search import pareto, require_search
from raytune_ft.search.space import decoded, mutations, param_space, tune_values
from raytune_ft.search.trial import STARTUP_METRIC, run_trial, trial_dirname, trial_recipe

TRIALS = run_folder.TRIALS
# A trial of several workers: its Tune actor only waits on its TorchTrainer, whose worker group
# reserves the real resources. A one-worker trial's actor runs the loop, and reserves the worker's.
TRIAL_ACTOR_RESOURCES = {"CPU": 0.01}


def searcher(tune_section):
    """The search algorithm, limited to ``max_concurrent_trials`` running trials. (Tune ignores
    TuneConfig.max_concurrent_trials when given a BasicVariantGenerator instance.)"""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    concurrency = tune_section.max_concurrent_trials
    points = [tune_values(tune_section, point) for point in tune_section.points_to_evaluate] or None
    if tune_section.searcher != "optuna":
        return BasicVariantGenerator(points_to_evaluate=points, random_state=tune_section.seed, max_concurrent=concurrency)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # TPE handles one objective and, since Optuna 3.2, two (the MOTPE variant): no extra sampler.
    single = len(tune_section.metrics) == 1
    optuna_search = OptunaSearch(
        sampler=optuna.samplers.TPESampler(seed=tune_section.seed), points_to_evaluate=points,
        metric=tune_section.metrics[0] if single else tune_section.metrics,
        mode=tune_section.modes[0] if single else tune_section.modes,
    )
    return ConcurrencyLimiter(optuna_search, max_concurrent=concurrency)


def max_epochs(recipe: Recipe) -> int:
    """The most epochs a trial can run."""
    space = recipe.tune.space.get("train.epochs")
    return max(space.values) if space and space.kind != "uniform" else (recipe.train.epochs or 100)


def scheduler(recipe: Recipe):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    tune_section = recipe.tune
    if tune_section.scheduler == "fifo":
        return FIFOScheduler()
    if tune_section.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="epoch", metric=tune_section.metrics[0], mode=tune_section.modes[0],
            perturbation_interval=tune_section.pbt.interval, hyperparam_mutations=mutations(tune_section),
            quantile_fraction=tune_section.pbt.quantile, resample_probability=tune_section.pbt.resample_probability,
            synch=tune_section.pbt.synchronous,
        )
    return ASHAScheduler(
        metric=tune_section.metrics[0], mode=tune_section.modes[0], time_attr="epoch",
        # One past the last epoch: ASHA stops a trial that reaches max_t, which would cut off the
        # run's final test evaluation and model export.
        max_t=max_epochs(recipe) + 1, grace_period=tune_section.asha.grace_period,
        reduction_factor=tune_section.asha.reduction_factor,
    )


def tune_checkpoints_to_keep(tune_section) -> int:
    """How many of a trial's Tune checkpoints (its epochs' copies; only PBT reports them) are kept,
    the oldest deleted first. PBT exploits the checkpoint a top trial reported at its last
    perturbation; the trial reports ``interval`` more before its next one, and another interval's
    worth covers a trial that exploits it and is still starting up when the donor moves on."""
    return 2 * tune_section.pbt.interval + 1


def build_tuner(recipe: Recipe, experiment_dir: Path, trainable, resume: bool):
    from ray import tune

    tune_section = recipe.tune
    path = experiment_dir / TRIALS
    if resume:
        # Finished trials keep their results; interrupted and errored ones continue from their
        # last checkpoint (their run directories are reused).
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    # Tune's newer console output ignores the reporter's columns; the classic table shows ours.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    reporter = tune.CLIReporter(
        parameter_columns=list(tune_section.space), metric_columns=[*tune_section.metrics, "epoch"],
        max_report_frequency=30, max_progress_rows=40,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(tune_section),
        tune_config=tune.TuneConfig(
            search_alg=searcher(tune_section), scheduler=scheduler(recipe), num_samples=tune_section.num_samples,
            time_budget_s=tune_section.time_budget_s,
            trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TRIALS, storage_path=str(experiment_dir), progress_reporter=reporter, verbose=1,
            failure_config=tune.FailureConfig(max_failures=tune_section.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=tune_checkpoints_to_keep(tune_section)),
        ),
    )


def run_experiment(recipe: Recipe, *, resume: bool = False, force: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run the search of ``recipe.tune`` end to end; write and return the experiment summary."""
    from ray import tune

    require_search(recipe)
    tune_section = recipe.tune
    experiment_dir = recipe.run_dir()
    # Assigned as a whole section, so that it counts as given (trials see only given fields).
    recipe.scaling = recipe.scaling.model_copy(update={"workers": tune_section.workers_per_trial})
    run_folder.check_run_dir(experiment_dir, resume, force, inputs=read_paths(recipe))
    planned = plan_run(recipe)
    check_ray_address(address)
    init_ray(address, recipe, experiment_demand(recipe))
    run_folder.prepare_run_dir(experiment_dir, resume, force, read_paths(recipe))
    if resume and not (experiment_dir / TRIALS).is_dir():
        raise UserError("--resume", f"{experiment_dir} holds no tune experiment")
    run_folder.write_text_atomic(experiment_dir / run_folder.RECIPE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    started = time.perf_counter()
    data = prepare_datasets(recipe, planned)
    with tracked(recipe, experiment_dir) as tracker:  # each trial logs as a child of the experiment
        shared = {"recipe": given_fields(recipe), "tune": tune_section, "data": data, "pbt": tune_section.scheduler == "pbt", "tracker": tracker,
                  "trials_dir": str(experiment_dir / TRIALS), "fault": os.environ.get(FAULT_ENV),
                  "log_level": log.level()}
        resources = run_demand(recipe).bundle if runs_in_process(recipe) else TRIAL_ACTOR_RESOURCES
        trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared), resources)
        results = build_tuner(recipe, experiment_dir, trainable, resume).fit()
        return write_experiment_outputs(experiment_dir, recipe, results, time.perf_counter() - started)


def trial_rows(recipe: Recipe, results) -> list[dict[str, Any]]:
    """One row per trial: id, status (ok, stopped by the scheduler, error), epochs, sampled values,
    last reported metrics, start-up time."""
    rows = []
    for result in results:
        trial = Path(result.path).name
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        # A trial the scheduler stopped never reached the end of its run, where the summary is written.
        finished = (Path(result.path) / "run" / run_folder.SUMMARY).is_file()
        row = {
            "trial": trial, "status": "error" if result.error else "ok" if finished else "stopped",
            "epochs": int(metrics.get("epoch", 0)),  # the loop's count: a retried trial resumes mid-way
            **decoded(recipe.tune, {path: result.config.get(path) for path in recipe.tune.space}),
            **{metric: metrics.get(metric) for metric in recipe.tune.metrics},
            "first_report_s": metrics.get(STARTUP_METRIC),
            "error": str(result.error).strip().splitlines()[-1][:200] if result.error else "",
        }
        row["curve"] = [] if history is None else history.to_dict("records")
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial"])


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    finished = [row for row in rows if row["status"] == "ok" and _number(row.get(metric))]
    if not finished:
        return None
    return (max if mode == "max" else min)(finished, key=lambda row: row[metric])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def write_recipe(path: Path, recipe: Recipe, row: dict[str, Any]) -> Path:
    """A recipe a user can re-run with ``raytune-ft run``: the base with this trial's values."""
    values = {p: row[p] for p in recipe.tune.space}
    if "alpha" in row:  # a WiSE-FT point: the same run, interpolated at this alpha
        values["wise_ft.alphas"] = [row["alpha"]]
        values["wise_ft.min_retention"] = 0.0
    chosen = trial_recipe(given_fields(recipe), values, row["trial"], None)
    header = f"# {row['trial']} of tune experiment {recipe.name}: " + ", ".join(f"{m} {row[m]:.4f}" for m in recipe.tune.metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = given_fields(chosen)
    data.pop("tune")
    path.write_text(header + "\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def write_experiment_outputs(experiment_dir: Path, recipe: Recipe, results, wall_s: float) -> dict[str, Any]:
    tune_section = recipe.tune
    metrics, modes = tune_section.metrics, tune_section.modes
    rows = trial_rows(recipe, results)
    columns = [key for key in rows[0] if key != "curve"] if rows else []
    with open(experiment_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (experiment_dir / "plots").mkdir(exist_ok=True)
    plots.trial_curves(experiment_dir / "plots" / "trial_curves.png", {row["trial"]: row["curve"] for row in rows}, metrics)
    summary: dict[str, Any] = {
        "name": recipe.name, "searcher": tune_section.searcher, "scheduler": tune_section.scheduler,
        "metrics": metrics, "modes": modes, "trials": len(rows),
        "failed": sum(row["status"] == "error" for row in rows),
        "stopped": sum(row["status"] == "stopped" for row in rows),
        "trial_epochs": sum(row["epochs"] for row in rows), "wall_time_s": wall_s,
        "rows": [{k: v for k, v in row.items() if k != "curve"} for row in rows],
    }
    best = best_row(rows, metrics[0], modes[0])
    if best:
        write_recipe(experiment_dir / "best_recipe.yaml", recipe, best)
        summary["best"] = {"trial": best["trial"], metrics[0]: best[metrics[0]],
                           "model": str(experiment_dir / TRIALS / best["trial"] / "run" / "model")}
    if len(metrics) == 2:
        summary["pareto"] = write_pareto(experiment_dir, recipe, rows)
    (experiment_dir / run_folder.SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
    (experiment_dir / "summary.md").write_text(summary_markdown(summary, recipe))
    return summary


def wise_ft_points(experiment_dir: Path, row: dict[str, Any], metrics: list[str]) -> list[dict[str, Any]]:
    """A finished trial's WiSE-FT sweep (recipe ``wise_ft``): one extra candidate per alpha < 1,
    scored on the trial's checkpoint without retraining (alpha 1 is the trial itself)."""
    sweep = ((run_folder.finished_summary(experiment_dir / TRIALS / row["trial"] / "run") or {}).get("wise_ft") or {}).get("rows", [])
    return [{**row, **{m: point[m] for m in metrics}, "trial": f"{row['trial']}-alpha{point['alpha']:g}", "alpha": point["alpha"]}
            for point in sweep if point["alpha"] < 1 and all(_number(point.get(m)) for m in metrics)]


def write_pareto(experiment_dir: Path, recipe: Recipe, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The front over every finished trial and every WiSE-FT point of theirs; a recipe per member."""
    metrics, modes = recipe.tune.metrics, recipe.tune.modes
    trials = [row for row in rows if row["status"] == "ok" and all(_number(row.get(m)) for m in metrics)]
    candidates = trials + [point for row in trials for point in wise_ft_points(experiment_dir, row, metrics)]
    if not candidates:
        return {"front": [], "hypervolume": 0.0}
    points = [(row[metrics[0]], row[metrics[1]]) for row in candidates]
    front = pareto.pareto_front(points, modes)
    reference = pareto.default_reference(points, modes)
    for i in front:
        write_recipe(experiment_dir / "front" / f"{candidates[i]['trial']}.yaml", recipe, candidates[i])
    plots.pareto_plot(experiment_dir / "plots" / "pareto.png", points, front, [row["trial"] for row in candidates], metrics)
    trials_only = pareto.pareto_front(points[:len(trials)], modes)
    result = {
        "front": [candidates[i]["trial"] for i in front],
        "hypervolume": pareto.hypervolume([points[i] for i in front], modes, reference),
        "hypervolume_trials_only": pareto.hypervolume([points[i] for i in trials_only], modes, reference),
        "reference_point": list(reference),
        "points": [{"trial": row["trial"], **{m: row[m] for m in metrics}} for row in candidates],
    }
    (experiment_dir / "pareto.json").write_text(json.dumps(result, indent=2))
    return result


def summary_markdown(summary: dict[str, Any], recipe: Recipe) -> str:
    """The readable table: one line per trial, the best trial and the front."""
    metrics = summary["metrics"]
    columns = ["trial", "status", "epochs", *recipe.tune.space, *metrics, "first_report_s"]
    lines = [
        f"# Tune experiment {summary['name']}",
        "",
        f"{summary['trials']} trials ({summary['stopped']} stopped early, {summary['failed']} failed), "
        f"searcher {summary['searcher']}, scheduler {summary['scheduler']}, {summary['trial_epochs']} trial-epochs, "
        f"{summary['wall_time_s']:.0f} s",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in summary["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    if "best" in summary:
        lines += ["", f"best on {metrics[0]}: {summary['best']['trial']} ({summary['best'][metrics[0]]:.4f}); "
                      "re-run it with `raytune-ft run best_recipe.yaml`"]
    if "pareto" in summary:
        front = summary["pareto"]
        lines += ["", f"Pareto front ({metrics[0]} vs {metrics[1]}): {', '.join(front['front']) or 'none'}; "
                      f"hypervolume {front.get('hypervolume', 0):.4f} ({front.get('hypervolume_trials_only', 0):.4f} "
                      f"without WiSE-FT points) against reference point {front.get('reference_point')} "
                      "(recipes in front/, plot in plots/pareto.png)"]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None or value == "" else str(value)
